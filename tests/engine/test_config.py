"""Strict config loading: overrides, type checks, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from d2v2.engine.config import apply_overrides, from_dict, merge, parse_override, to_dict


@dataclass(kw_only=True, slots=True)
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    mode: Literal["a", "b"] = "a"


@dataclass(kw_only=True, slots=True)
class Outer:
    name: str = "x"
    steps: int = 10
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_from_dict_coerces_and_nests():
    cfg = from_dict(Outer, {"steps": 5.0, "inner": {"lr": 1, "betas": [0.8, 0.9], "mode": "b"}})
    assert cfg.steps == 5 and cfg.inner.lr == 1.0 and cfg.inner.betas == (0.8, 0.9) and cfg.inner.mode == "b"
    assert to_dict(cfg)["inner"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stepz": 1}, "unknown config key stepz; valid keys: inner, limit, name, steps"),
        ({"inner": {"lrr": 1}}, "unknown config key inner.lrr"),
        ({"steps": "many"}, "steps must be an integer"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"inner": {"mode": "c"}}, "inner.mode must be one of 'a', 'b'"),
        ({"inner": {"betas": [0.9]}}, "inner.betas must have 2 entries"),
        ({"limit": "x"}, "limit must be int or None"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_dict(Outer, data)


def test_overrides_parse_yaml_values():
    assert parse_override("optim.lr=5e-4") == (["optim", "lr"], 5e-4)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    data = apply_overrides({"inner": {"lr": 1.0}}, ["inner.lr=0.5", "steps=3"])
    assert data == {"inner": {"lr": 0.5}, "steps": 3}
    with pytest.raises(ValueError, match="key=value"):
        parse_override("justakey")


def test_merge_is_recursive():
    assert merge({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}, "b": 1}
