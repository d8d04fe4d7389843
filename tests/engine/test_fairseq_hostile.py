"""``d2v2 import-fairseq`` on hostile or malformed checkpoints: each a one-line error naming the
cause and the fix, exit 2, in well under a second, and no run folder left behind."""

from __future__ import annotations

import errno
import os
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


# -- malformed configs and weights: the field named, not a traceback ---------------------------------------

from tests.engine.test_fairseq_import import fairseq_state, tiny_model, write_checkpoint  # noqa: E402


def _edited(tmp_path, edit, modality: str = "image"):
    """A valid synthetic checkpoint with ``edit(cfg.model)`` applied; returns its path."""
    write_checkpoint(tmp_path / "ckpt.pt", tiny_model(modality))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    edit(ckpt["cfg"].model)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def _set(path: str, value):
    def edit(model):
        *parents, key = path.split(".")
        node = model
        for part in parents:
            node = node[part]
        node[key] = value

    return edit


MALFORMED = {  # id: (edit of cfg.model, what the message must say)
    "modalities-list": (lambda m: setattr(m, "modalities", [dict(m.modalities.image)]),
                        "model.modalities is [{"),
    "decoder-none": (_set("modalities.image.decoder", "none"),
                     "model.modalities.image.decoder is 'none', not a section of settings"),
    "unresolved": (_set("depth", "${model.depth}"),
                   "model.depth is '${model.depth}', an interpolation that names no value"),
    "embed-dim-word": (_set("embed_dim", "wide"), "model.embed_dim is 'wide', not a whole number"),
    "depth-fraction": (_set("depth", 2.7), "model.depth is 2.7, not a whole number"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_config_names_its_field(tmp_path, capsys, case):
    edit, says = MALFORMED[case]
    ckpt = _edited(tmp_path, edit)
    err = one_line_error(capsys, ["import-fairseq", str(ckpt), "--out", str(tmp_path / "run")])
    assert says in err and "import" in err, err
    assert not (tmp_path / "run").exists()


def test_a_fine_tune_without_ema_missing_a_weight_lists_it(tmp_path, capsys):
    from omegaconf import OmegaConf

    from tests.engine.test_fairseq_import import fairseq_model_config

    original = tiny_model("image")
    state = {"model." + k: v for k, v in fairseq_state(original, ema=False).items() if ".decoder." not in k}
    del state["model.blocks.1.mlp.fc2.weight"]
    pretraining = {"model": fairseq_model_config(original)}
    cfg = OmegaConf.create({"model": {"_name": "mae_image_classification", "pretrained_model_args": pretraining}})
    torch.save({"model": state, "cfg": cfg}, tmp_path / "ckpt.pt")
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "missing 1: blocks.1.mlp.fc2.weight" in err and "not a d2v2-importable variant" in err


# -- an --out that cannot be written (simulated: the tests run as root, which permission bits do not stop) --


def test_out_under_a_read_only_folder_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path / "ckpt.pt", tiny_model("image"))
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(tmp_path / "ro") and real_access(p, mode, **kw))
    for out in (tmp_path / "ro" / "new" / "run", tmp_path / "ro"):  # under it, and the (empty) folder itself
        err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(out)])
        assert f"--out {out} cannot be written: {tmp_path / 'ro'} is read-only; give a writable --out" in err
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("exists", [False, True], ids=["new", "empty-folder"])
def test_a_failed_write_leaves_nothing_and_gives_no_resume_advice(tmp_path, capsys, monkeypatch, exists):
    write_checkpoint(tmp_path / "ckpt.pt", tiny_model("image"))
    out = tmp_path / "run"
    if exists:
        out.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(torch, "save", read_only)
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(out)])
    assert f"--out {out} cannot be written (Read-only file system); give a writable --out" in err
    assert "--resume" not in err
    assert (list(out.iterdir()) == []) if exists else not out.exists()
