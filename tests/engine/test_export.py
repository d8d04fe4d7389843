"""`d2v2 export`: every method's encoder round-trips through its export, and the standard targets
load into their Hugging Face / timm classes with the same features (to 1e-5)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from d2v2.engine.training.checkpoint import save_checkpoint
from d2v2.engine.cli import main
from d2v2.engine.config import to_dict
from d2v2.engine.export import export, standard_target
from d2v2.models import build_method, load_pretrained, method_config
from tests.helpers import one_line_error

ATOL = 1e-5
# (method, modality, config overrides): every method on every modality it runs; a small vocabulary.
CASES = [
    ("data2vec2", "image", {}),
    ("data2vec2", "audio", {}),
    ("data2vec2", "text", {"vocab_size": 100}),
    ("data2vec", "image", {}),
    ("data2vec", "audio", {}),
    ("data2vec", "text", {"vocab_size": 100}),
    ("mae", "image", {}),
    ("mlm", "text", {"vocab_size": 100}),
    ("wav2vec2", "audio", {}),
]
# The standard class each default export targets (None: d2v2's own format).
TARGETS = {
    ("data2vec2", "image"): None,  # post-norm blocks after an embedding LayerNorm
    ("data2vec2", "audio"): None,  # ALiBi
    ("data2vec2", "text"): "Data2VecTextModel",
    ("data2vec", "image"): "Data2VecVisionModel",
    ("data2vec", "audio"): "Data2VecAudioModel",
    ("data2vec", "text"): "Data2VecTextModel",
    ("mae", "image"): "timm VisionTransformer",
    ("mlm", "text"): "RobertaModel",
    ("wav2vec2", "audio"): "Wav2Vec2Model",
}


def make_run(tmp_path, name: str, modality: str, overrides: dict):
    """A run folder holding one checkpoint of a tiny method whose teacher differs from its student."""
    cfg = method_config(name, modality, "tiny", impl="torch", **overrides)
    method = build_method(name, cfg)
    with torch.no_grad():  # every tensor moved (teacher and student alike, each its own way)
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path / f"{name}-{modality}"
    save_checkpoint(run, 3, {"config": {"method": name, "model": to_dict(cfg)}, "method": method.state_dict()})
    return run, method.eval()


def sample(method, batch: int = 2):
    """A source batch (and padding mask) for the method's modality."""
    cfg = method.cfg
    if cfg.modality == "image":
        return torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size), None
    if cfg.modality == "audio":
        return torch.randn(batch, 1600), None  # 4 CNN frames
    tokens = torch.randint(4, cfg.vocab_size, (batch, 12))
    padding = torch.zeros(batch, 12, dtype=torch.bool)
    padding[-1, -3:] = True  # the last row ends in padding
    return tokens.masked_fill(padding, cfg.padding_idx), padding


def reference(method, weights: str, source, padding):
    """What the export must reproduce: the student's forward_features, or the teacher's features."""
    with torch.no_grad():
        if weights == "student":
            return method.forward_features(source, padding)
        return method.probe_features(source, padding)


@pytest.mark.parametrize("name,modality,overrides", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_own_format_round_trip_every_method(tmp_path, name, modality, overrides):
    run, method = make_run(tmp_path, name, modality, overrides)
    source, padding = sample(method)
    has_teacher = hasattr(method, "teacher")
    for weights in ("teacher", "student") if has_teacher else ("student",):
        out = tmp_path / f"export-{weights}"
        info = export(str(run), str(out), weights=weights, fmt="d2v2", tokenizer=False, log=lambda *_: None)
        assert info["target"] == "d2v2" and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        encoder = load_pretrained(out)
        with torch.no_grad():
            got = encoder(source, padding)[:, method.modality.num_extra_tokens if weights == "teacher" else 0 :]
        torch.testing.assert_close(got, reference(method, weights, source, padding), atol=ATOL, rtol=0)
    if has_teacher:  # the default is the teacher, and it is not the student
        config = json.loads((tmp_path / "export-teacher" / "config.json").read_text())
        assert config["weights"] == "teacher" and config["method"] == name
        teacher = load_file(str(tmp_path / "export-teacher" / "model.safetensors"))
        student = load_file(str(tmp_path / "export-student" / "model.safetensors"))
        assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


@pytest.mark.parametrize("name,modality,overrides", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_default_export_picks_the_standard_class_and_keeps_every_weight(tmp_path, name, modality, overrides):
    run, method = make_run(tmp_path, name, modality, overrides)
    out = tmp_path / "export"
    lines = []
    info = export(str(run), str(out), tokenizer=False, log=lines.append)
    expected = TARGETS[(name, modality)]
    assert info["target"] == (expected or "d2v2")
    assert info["weights"] == ("teacher" if hasattr(method, "teacher") else "student")
    config = json.loads((out / "config.json").read_text())
    if expected is None:
        assert config["format"] == "d2v2-encoder" and "no standard class" in lines[-1]
        return
    exported = load_file(str(out / "model.safetensors"))
    ours = sum(p.numel() for p in method.encoder.state_dict().values())
    theirs = sum(t.numel() for t in exported.values())
    # Every weight is there: only the added zero rows (positions, token type) and dropped key biases differ.
    assert theirs - ours == _added(name, modality, method.cfg)
    assert config["d2v2"]["weights"] == info["weights"] and config["d2v2"]["step"] == 3


def _added(name, modality, cfg) -> int:
    dim = cfg.embed_dim
    if modality == "text":
        return (cfg.padding_idx + 1) * dim + dim  # RoBERTa's position offset rows and one token-type row
    if (name, modality) == ("data2vec", "image"):
        return dim - cfg.depth * dim + dim  # a CLS position row, no key bias per block, the mask vector
    if (name, modality) == ("data2vec", "audio"):
        return dim  # the mask vector (masked_spec_embed)
    if modality == "image":
        return dim  # the CLS position row
    return 0


# -- the standard classes themselves -----------------------------------------------------------------

HF_CASES = [c for c in CASES if TARGETS[c[:2]] not in (None, "timm VisionTransformer")]


@pytest.mark.parametrize("name,modality,overrides", HF_CASES, ids=[f"{c[0]}-{c[1]}" for c in HF_CASES])
def test_hf_export_loads_into_transformers_with_the_same_features(tmp_path, name, modality, overrides):
    transformers = pytest.importorskip("transformers", reason="the interop extra (transformers) is not installed")
    run, method = make_run(tmp_path, name, modality, overrides)
    out = tmp_path / "export"
    info = export(str(run), str(out), tokenizer=False, log=lambda *_: None)
    model_class = getattr(transformers, info["target"])
    kwargs = {} if modality == "audio" else {"add_pooling_layer": False}
    model, loading = model_class.from_pretrained(str(out), output_loading_info=True, **kwargs)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    source, padding = sample(method)
    with torch.no_grad():
        if modality == "text":
            got = model.eval()(input_ids=source, attention_mask=(~padding).long()).last_hidden_state
            keep = ~padding  # HF leaves the padded rows' values to chance; d2v2 too
        elif modality == "audio":
            got, keep = model.eval()(input_values=source).last_hidden_state, None
        else:
            got, keep = model.eval()(pixel_values=source).last_hidden_state, None
    expected = reference(method, info["weights"], source, padding)
    extra = method.modality.num_extra_tokens
    if info["weights"] == "teacher":
        got = got[:, extra:]
    if keep is not None:
        got, expected = got[keep], expected[keep]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_mae_export_loads_into_timm_with_the_same_features(tmp_path):
    timm = pytest.importorskip("timm", reason="timm (and torchvision) are not installed: pip install 'd2v2[interop]'")
    run, method = make_run(tmp_path, "mae", "image", {})
    out = tmp_path / "export"
    export(str(run), str(out), log=lambda *_: None)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    source, _ = sample(method)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(source), method.forward_features(source), atol=ATOL, rtol=0)


# -- command line ------------------------------------------------------------------------------------


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    run, _ = make_run(tmp_path, "mae", "image", {})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "a")], "no checkpoint at"),
        (["--checkpoint", str(run), "--out", str(taken)], "refuses to overwrite"),
        (["--checkpoint", str(run), "--out", str(tmp_path / "b"), "--weights", "ema"], "teacher or student"),
        (["--checkpoint", str(run), "--out", str(tmp_path / "c"), "--weights", "teacher"], "has no EMA teacher"),
        (["--checkpoint", str(run), "--out", str(tmp_path / "d"), "--format", "onnx"], "auto or d2v2"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert (taken / "keep.txt").read_text() == "precious" and not (tmp_path / "a").exists()


# Read-only folders and mount points are simulated: the tests run as root, which permission bits do not
# stop, and cannot mount.


def test_out_under_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    run, _ = make_run(tmp_path, "mae", "image", {})
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(read_only) and real_access(p, mode, **kw))
    err = one_line_error(capsys, ["export", "--checkpoint", str(run), "--out", str(read_only / "exp")])
    assert f"cannot be written: {read_only} is read-only; give a writable --out" in err
    monkeypatch.setattr(os, "access", real_access)

    def full(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("d2v2.engine.export.write_folder", full)  # the write itself fails
    err = one_line_error(capsys, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")])
    assert f"--out {tmp_path / 'exp'} cannot be written (Read-only file system); give a writable --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mae-image", "ro"]  # no temporary folder left


def test_an_empty_out_that_cannot_be_replaced_is_written_into(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path, "mae", "image", {})
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_rmdir, real_replace = os.rmdir, os.replace

    def busy(path, *args, **kwargs):  # a mount point: neither removed nor renamed over
        if os.fspath(path) == str(mount):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(os, "rmdir", lambda p, *a, **k: busy(p) or real_rmdir(p, *a, **k))
    monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: busy(d) or real_replace(s, d, *a, **k))
    assert main(["export", "--checkpoint", str(run), "--out", str(mount)]) == 0
    assert sorted(p.name for p in mount.iterdir()) == ["config.json", "model.safetensors"]


def test_a_fairseq_checkpoint_points_to_import_fairseq(tmp_path, capsys):
    pytest.importorskip("omegaconf")
    from tests.engine.test_fairseq_import import tiny_model, write_checkpoint

    write_checkpoint(tmp_path / "base.pt", tiny_model("image"))
    err = one_line_error(capsys, ["export", "--checkpoint", str(tmp_path / "base.pt"), "--out", str(tmp_path / "exp")])
    assert f"is a fairseq checkpoint, not a d2v2 one; import it first with `d2v2 import-fairseq {tmp_path / 'base.pt'}" in err
    assert "\x1b" not in err and "trust" not in err and not (tmp_path / "exp").exists()


def test_standard_target_explains_every_fallback():
    for name, modality, overrides in CASES:
        target, why = standard_target(name, method_config(name, modality, "tiny", **overrides))
        assert (target.name if target else None) == TARGETS[(name, modality)] and why
    target, why = standard_target("data2vec2", method_config("data2vec2", "text", "tiny", prenet_depth=1))
    assert target is None and "prenet" in why
    target, why = standard_target("data2vec", method_config("data2vec", "audio", "tiny", alibi=True))
    assert target is None and "ALiBi" in why


def test_cli_exports_a_text_run_with_its_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path / "cache"))
    run, out = tmp_path / "run", tmp_path / "export"
    fast = ["--set", "data.num_workers=0", "--set", "data.vocab_size=300", "--set", "data.block_size=64"]
    assert main(["pretrain", "--recipe", "text-tiny", "--out", str(run), "--max-steps", "1", *fast]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert "Data2VecTextModel (transformers)" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "data2vec-text" and config["d2v2"]["weights"] == "teacher"
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == "<pad>" and tokenizer_config["mask_token"] == "<mask>"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.token_to_id("<pad>") == config["pad_token_id"]
    assert max(tokenizer.get_vocab().values()) < config["vocab_size"]
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert hf_tokenizer("def f(x): return x").input_ids == tokenizer.encode("def f(x): return x").ids
    assert hf_tokenizer.pad_token_id == config["pad_token_id"]
