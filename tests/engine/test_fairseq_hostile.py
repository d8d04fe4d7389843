"""``d2v2 import-fairseq`` on hostile or malformed checkpoints: each a one-line error naming the
cause and the fix, exit 2, in well under a second, and no run folder left behind."""

from __future__ import annotations

import sys
import time

import pytest
import torch

pytest.importorskip("omegaconf")

from d2v2.engine.interop.safe_pickle import ConfigShapeError, plain  # noqa: E402
from tests.helpers import one_line_error  # noqa: E402


def _shared(levels: int) -> list:
    """A list holding the same list twice, ``levels`` deep: 2**levels paths through a few hundred bytes."""
    node: list = [0]
    for _ in range(levels):
        node = [node, node]
    return node


def _nested(levels: int) -> list:
    node: list = []
    for _ in range(levels):
        node = [node]
    return node


def test_shared_references_are_converted_once():
    start = time.perf_counter()
    out = plain({"model": {"x": _shared(40)}})
    assert time.perf_counter() - start < 1.0  # without sharing: 2**40 visits
    node = out["model"]["x"]
    for _ in range(40):
        assert node[0] is node[1]  # the result shares as the pickle did
        node = node[0]


def test_a_cycle_or_too_deep_a_config_is_refused():
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ConfigShapeError, match="contains itself"):
        plain({"model": cyclic})
    with pytest.raises(ConfigShapeError, match="nests more than 100 levels"):
        plain({"model": _nested(3000)})


@pytest.mark.parametrize("cfg, says", [
    ({"model": {"x": _shared(40)}}, "no data2vec 2.0 encoder weights"),
    ({"model": {"x": _nested(3000)}}, "config nests more than 100 levels deep; it is not a config fairseq writes"),
], ids=["shared-40", "nested-3000"])  # fmt: skip
def test_a_small_hostile_config_is_a_quick_one_line_error(tmp_path, capsys, cfg, says):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # torch.save's pickler recurses per level
    try:
        torch.save({"cfg": cfg, "model": {}}, tmp_path / "ckpt.pt")
    finally:
        sys.setrecursionlimit(limit)
    assert (tmp_path / "ckpt.pt").stat().st_size < 40_000
    start = time.perf_counter()
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert time.perf_counter() - start < 1.0 and says in err and str(tmp_path / "ckpt.pt") in err
    assert not (tmp_path / "run").exists()
