"""The field checks every method config runs in its ``__post_init__``, written once.

Each failure is one ``ValueError("<Config>.<field> <problem>; <fix>")``: the field, what is wrong
with its value, and how to fix it (the CLI prints it as a one-line error).
"""

from __future__ import annotations

import math

__all__ = ["ConfigChecker"]


class ConfigChecker:
    """Checks of the fields of one config dataclass instance ``cfg`` (named by its class)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.name = type(cfg).__name__

    def fail(self, field: str, problem: str, fix: str) -> None:
        raise ValueError(f"{self.name}.{field} {problem}; {fix}")

    def choice(self, field: str, choices: tuple) -> None:
        value = getattr(self.cfg, field)
        if value not in choices:
            self.fail(field, f"must be one of {choices}, got {value!r}", "pick one of those")

    def int(self, field: str, minimum: int) -> None:
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(field, f"must be an int >= {minimum}, got {value!r}", f"set it to an int >= {minimum}")

    def fraction(self, field: str) -> None:
        """A probability in [0, 1)."""
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self.fail(field, f"must be a probability in [0, 1), got {value!r}", "use a value in [0, 1)")

    def nonnegative(self, field: str) -> None:
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            self.fail(field, f"must be a finite number >= 0, got {value!r}", "use a value >= 0")

    def positive(self, field: str) -> None:
        self.nonnegative(field)
        if getattr(self.cfg, field) == 0:
            self.fail(field, "must be > 0, got 0", "use a positive value")
