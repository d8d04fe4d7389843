"""Pieces every data reader shares: the corrupt-sample signal and per-sample seeds."""

from __future__ import annotations

import hashlib


class CorruptSample(Exception):
    """A data file that cannot be read; the loader skips it and counts it."""

    def __init__(self, path: str, cause: BaseException | str):
        super().__init__(f"{path}: {cause}")
        self.path = path


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (run seed, epoch, position, ...).

    Every random choice in the data pipeline (sample order, crops, masks) is drawn from a
    generator seeded this way, so a run resumed at (epoch, position) sees exactly the same data
    as an uninterrupted one, whatever the number of loader workers.
    """
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
