"""``d2v2 import-fairseq``: synthetic fairseq data2vec 2.0 checkpoints (real OmegaConf configs pickled
in them, fairseq's key names) import into run folders whose models compute what the originals did;
unsafe pickles and existing run folders are refused."""

from __future__ import annotations

import argparse
import enum
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import yaml

omegaconf = pytest.importorskip("omegaconf")
from omegaconf import OmegaConf  # noqa: E402

from d2v2.engine.training.checkpoint import load_checkpoint  # noqa: E402
from d2v2.engine.cli import main  # noqa: E402
from d2v2.engine.interop.fairseq_keys import TAGS, fairseq_name, fairseq_tensor  # noqa: E402
from d2v2.engine.interop.safe_pickle import SafeUnpickler, UnsafePickleError, plain  # noqa: E402
from d2v2.engine.probe import method_from_checkpoint  # noqa: E402
from d2v2.models.data2vec2 import Data2Vec2, data2vec2_config  # noqa: E402
from tests.helpers import assert_close, one_line_error  # noqa: E402

MODALITIES = ("image", "audio", "text")
NO_DROPOUT = dict(encoder_dropout=0.0, attention_dropout=0.0, post_mlp_dropout=0.0, prenet_dropout=0.0,
                  layerdrop=0.0, prenet_layerdrop=0.0, decoder_input_dropout=0.0, embed_dropout=0.0)  # fmt: skip
MAX_UPDATE = 1234


def tiny_model(modality: str) -> Data2Vec2:
    extra = dict(vocab_size=50, max_positions=40) if modality == "text" else {}
    model = Data2Vec2(data2vec2_config(modality, "tiny", impl="torch", **NO_DROPOUT, **extra))
    with torch.no_grad():  # a teacher that differs from the student, as after training
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def source_for(model: Data2Vec2) -> torch.Tensor:
    cfg = model.cfg
    if cfg.modality == "image":
        return torch.randn(2, 3, cfg.image_size, cfg.image_size)
    if cfg.modality == "audio":
        return torch.randn(2, 6400)
    return torch.randint(3, cfg.vocab_size, (2, 17))


def fairseq_model_config(model: Data2Vec2) -> dict:
    """The ``cfg.model`` of a fairseq data2vec 2.0 run (ref 1.1: ``Data2VecMultiConfig``)."""
    cfg, modality = model.cfg, model.cfg.modality
    decoder = dict(decoder_dim=cfg.decoder_dim, decoder_groups=cfg.decoder_groups, decoder_kernel=cfg.decoder_kernel,
                   decoder_layers=cfg.decoder_layers, input_dropout=cfg.decoder_input_dropout,
                   add_positions_masked=False, add_positions_all=False, decoder_residual=cfg.decoder_residual,
                   projection_layers=cfg.projection_layers, projection_ratio=cfg.projection_ratio)  # fmt: skip
    mod = dict(type=TAGS[modality], prenet_depth=cfg.prenet_depth, prenet_layerdrop=0.0, prenet_dropout=0.0,
               start_drop_path_rate=0.0, end_drop_path_rate=0.0, num_extra_tokens=int(modality == "image"),
               init_extra_token_zero=False, mask_noise_std=cfg.mask_noise_std, mask_prob=cfg.mask_ratio,
               inverse_mask=modality == "image", mask_prob_adjust=cfg.mask_prob_adjust, mask_length=cfg.mask_length,
               ema_local_encoder=modality == "image", local_grad_mult=1.0, use_alibi_encoder=modality == "audio",
               alibi_scale=1.0, learned_alibi=False, learned_alibi_scale=modality == "audio",
               learned_alibi_scale_per_head=modality == "audio", learned_alibi_scale_per_layer=False,
               num_alibi_heads="${model.num_heads}", model_depth="${model.depth}", decoder=decoder)  # fmt: skip
    if modality == "image":
        mod.update(input_size=cfg.image_size, in_chans=cfg.in_chans, patch_size=cfg.patch_size,
                   embed_dim=cfg.embed_dim, fixed_positions=True, transformer_decoder=False)  # fmt: skip
    elif modality == "audio":
        spec = " + ".join(f"[({c}, {k}, {s})]" for c, k, s in cfg.conv_feature_layers)
        mod.update(extractor_mode="layer_norm", feature_encoder_spec=spec, conv_pos_width=cfg.conv_pos_width,
                   conv_pos_groups=cfg.conv_pos_groups, conv_pos_depth=cfg.conv_pos_depth,
                   conv_pos_pre_ln=False)  # fmt: skip
    else:
        mod.update(max_source_positions=cfg.max_positions, learned_pos=True, dropout=0.0, no_scale_embedding=True,
                   layernorm_embedding=True, no_token_positional_embeddings=False)  # fmt: skip
    return dict(
        _name="data2vec_multi", loss_beta=0.0, loss_scale=cfg.loss_scale, depth=cfg.depth, num_heads=cfg.num_heads,
        norm_eps=cfg.norm_eps, norm_affine=True, encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0,
        activation_dropout=0.0, dropout_input=0.0, layerdrop=0.0, embed_dim=cfg.embed_dim, mlp_ratio=cfg.mlp_ratio,
        layer_norm_first=False, average_top_k_layers=cfg.average_top_k_layers, end_of_block_targets=False,
        clone_batch=cfg.clone_batch, instance_norm_target_layer=cfg.target_layer_norm == "instance",
        layer_norm_target_layer=cfg.target_layer_norm == "layer",
        instance_norm_targets=cfg.target_final_norm == "instance",
        layer_norm_targets=cfg.target_final_norm == "layer", ema_decay=cfg.ema_decay, ema_end_decay=cfg.ema_end_decay,
        ema_anneal_end_step="${optimization.max_update}", ema_encoder_only=modality == "text",
        max_update="${optimization.max_update}", modalities={modality: mod}, shared_decoder=None,
        supported_modality=TAGS[modality], cls_loss=cfg.cls_loss, seed="${common.seed}",
    )  # fmt: skip


def fairseq_state(model: Data2Vec2, ema: bool = True) -> dict:
    """The inverse of the import's mapping applied to ``model``: its weights under fairseq's names."""
    modality, pad = model.cfg.modality, model.cfg.padding_idx
    blocks_only = modality == "text"  # ema_encoder_only: the EMA holds the shared blocks only
    state, teacher = {}, {}
    for name, tensor in model.state_dict().items():
        key = fairseq_name(name, modality, teacher_blocks_only=blocks_only)
        (teacher if name.startswith("teacher.") else state)[key] = fairseq_tensor(name, tensor.clone(), pad)
    if ema:
        state["_ema"] = teacher
    return state


def write_checkpoint(path, model: Data2Vec2, as_args: bool = False, legacy: bool = False, **extra) -> None:
    root = {"common": {"seed": 1}, "optimization": {"max_update": MAX_UPDATE, "lr": [0.001]},
            "task": {"_name": "mae_image_pretraining"}, "model": fairseq_model_config(model)}  # fmt: skip
    # fairseq's extra_state keeps its meters' numpy values
    extra_state = {"epoch": 2, "metrics": {"loss": np.float64(1.5), "counts": np.arange(3)}}
    ckpt = {"model": fairseq_state(model), "optimizer_history": [{"num_updates": 7}], "extra_state": extra_state}
    if as_args:  # fairseq before Hydra: a flat argparse Namespace
        flat = {**root["model"], "ema_anneal_end_step": MAX_UPDATE, "max_update": MAX_UPDATE, "seed": 1}
        ckpt.update(args=argparse.Namespace(**flat), cfg=None)
    else:
        ckpt["cfg"] = OmegaConf.create(root)
    ckpt.update(extra)
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)  # legacy: torch < 1.6's format


def import_run(tmp_path, capsys, ckpt_name="ckpt.pt", out_name="run", extra=()):
    out = tmp_path / out_name
    assert main(["import-fairseq", str(tmp_path / ckpt_name), "--out", str(out), *extra]) == 0
    return out, capsys.readouterr().out


# -- the key names, checked literally against fairseq's ------------------------------------------------


def test_fairseq_names_are_fairseqs_own():
    image, audio, text = (tiny_model(m) for m in MODALITIES)
    names = {m: set(fairseq_state(model)) for m, model in zip(MODALITIES, (image, audio, text))}
    for key in ("modality_encoders.IMAGE.extra_tokens", "modality_encoders.IMAGE.local_encoder.proj.weight",
                "modality_encoders.IMAGE.fixed_positional_encoder.positions",
                "modality_encoders.IMAGE.context_encoder.norm.weight",
                "modality_encoders.IMAGE.context_encoder.blocks.0.attn.qkv.weight",
                "modality_encoders.IMAGE.decoder.blocks.0.0.weight", "modality_encoders.IMAGE.decoder.proj.weight",
                "blocks.1.mlp.fc1.weight", "blocks.0.norm2.bias"):  # fmt: skip
        assert key in names["image"], key
    for key in ("modality_encoders.AUDIO.local_encoder.conv_layers.0.0.weight",
                "modality_encoders.AUDIO.local_encoder.conv_layers.6.2.1.bias",
                "modality_encoders.AUDIO.project_features.1.weight",
                "modality_encoders.AUDIO.project_features.2.weight",
                "modality_encoders.AUDIO.relative_positional_encoder.1.0.weight",
                "modality_encoders.AUDIO.relative_positional_encoder.5.0.bias",
                "modality_encoders.AUDIO.alibi_scale"):  # fmt: skip
        assert key in names["audio"], key
    for key in ("modality_encoders.TEXT.local_encoder.embed_tokens.weight",
                "modality_encoders.TEXT.local_encoder.layernorm_embedding.weight",
                "modality_encoders.TEXT.decoder.proj.0.weight",
                "modality_encoders.TEXT.decoder.proj.2.weight"):  # fmt: skip
        assert key in names["text"], key
    image_ema = fairseq_state(image)["_ema"]
    assert "modality_encoders.IMAGE.extra_tokens" in image_ema and not any(".decoder." in k for k in image_ema)
    assert "modality_encoders.AUDIO.local_encoder.conv_layers.0.0.weight" not in fairseq_state(audio)["_ema"]
    assert "0.attn.qkv.weight" in fairseq_state(text)["_ema"]  # ema_encoder_only: the ModuleList's own names
    state = fairseq_state(text)
    # fairseq's learned positions: max_positions + padding_idx + 1 rows, position p at row padding_idx + 1 + p
    positions = state["modality_encoders.TEXT.local_encoder.embed_positions.weight"]
    assert positions.shape == (40 + 1 + 1, 64)
    assert torch.equal(positions[2], text.encoder.embed.local_encoder.embed_positions.weight[0])
    assert fairseq_state(audio)["modality_encoders.AUDIO.alibi_scale"].shape == (1, 1, 4, 1, 1)


# -- the import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_import_gives_the_same_student_and_teacher(tmp_path, capsys, modality):
    original = tiny_model(modality)
    write_checkpoint(tmp_path / "ckpt.pt", original)
    out, printed = import_run(tmp_path, capsys)
    assert "teacher: " in printed and "from the EMA teacher" in printed
    model, config = method_from_checkpoint(str(out))  # what `d2v2 probe --checkpoint RUN` builds
    model.eval()
    source = source_for(original)
    with torch.no_grad():
        assert_close(model.forward_features(source), original.forward_features(source), atol=1e-5, rtol=1e-5,
                     name="student features")  # fmt: skip
        assert_close(model.probe_features(source), original.probe_features(source), atol=1e-5, rtol=1e-5,
                     name="teacher features")  # fmt: skip
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert config["method"] == "data2vec2" and config["model"]["modality"] == modality
    assert config["model"]["ema_anneal_end_step"] == MAX_UPDATE  # ${optimization.max_update}, resolved
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written == config
    imported = load_checkpoint(out)["imported"]
    assert imported["format"] == "fairseq data2vec 2.0" and imported["dropped"] == []


def test_argparse_args_checkpoint_in_the_legacy_format(tmp_path, capsys):
    original = tiny_model("image")
    write_checkpoint(tmp_path / "ckpt.pt", original, as_args=True, legacy=True)
    out, _ = import_run(tmp_path, capsys)
    model, config = method_from_checkpoint(str(out))
    source = source_for(original)
    with torch.no_grad():
        assert_close(model.eval().forward_features(source), original.forward_features(source), atol=1e-5, rtol=1e-5)
    assert config["model"]["ema_anneal_end_step"] == MAX_UPDATE


FINE_TUNES = [
    # (modality, fairseq model, its key prefix, the config key holding the pretraining run's config, head,
    #  how the import names the head)
    ("audio", "wav2vec_ctc", "w2v_encoder.w2v_model.", "w2v_args",
     {"w2v_encoder.proj.weight": (32, 64), "w2v_encoder.proj.bias": (32,)}, "w2v_encoder.proj (2)"),
    ("image", "mae_image_classification", "model.", "pretrained_model_args",
     {"fc_norm.weight": (64,), "head.weight": (10, 64)}, "fc_norm.weight, head.weight"),
]  # fmt: skip


@pytest.mark.parametrize("modality, name, prefix, args_key, head, said", FINE_TUNES, ids=[f[1] for f in FINE_TUNES])
def test_fine_tuned_checkpoint_imports_its_encoder_and_says_what_it_dropped(
    tmp_path, capsys, modality, name, prefix, args_key, head, said
):
    original = tiny_model(modality)
    pretraining = {"model": fairseq_model_config(original), "optimization": {"max_update": MAX_UPDATE}}
    encoder = {k: v for k, v in fairseq_state(original, ema=False).items() if ".decoder." not in k}
    state = {prefix + k: v for k, v in encoder.items()}
    state.update({k: torch.randn(shape) for k, shape in head.items()})
    cfg = OmegaConf.create({"model": {"_name": name, "model_path": "pretrained.pt", args_key: pretraining}})
    torch.save({"model": state, "cfg": cfg}, tmp_path / "ckpt.pt")
    # a CTC fine-tune imports as a recogniser (test_fairseq_ctc.py); --encoder-only as its pretrained encoder
    out, printed = import_run(tmp_path, capsys, extra=["--encoder-only"] if name == "wav2vec_ctc" else [])
    assert f"dropped 2 tensors outside the encoder: {said}" in printed
    assert "decoder: newly initialised" in printed and "teacher: a copy of the student" in printed
    model, _ = method_from_checkpoint(str(out))
    source = source_for(original)
    with torch.no_grad():
        assert_close(model.eval().forward_features(source), original.forward_features(source), atol=1e-5, rtol=1e-5)
        student = original.forward_features(source)[:, original.cfg.num_extra_tokens :]
        assert_close(model.probe_features(source), student, atol=1e-5, rtol=1e-5)  # the teacher is the student
    assert load_checkpoint(out)["imported"]["format"] == f"fairseq data2vec 2.0 (fine-tuned: {name})"


def test_fine_tune_without_its_pretraining_config_is_refused(tmp_path, capsys):
    original = tiny_model("image")
    state = {"model." + k: v for k, v in fairseq_state(original, ema=False).items()}
    cfg = OmegaConf.create({"model": {"_name": "mae_image_classification", "model_path": "pretrained.pt"}})
    torch.save({"model": state, "cfg": cfg}, tmp_path / "ckpt.pt")
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "without the pretraining run's config" in err and "model_path" in err


def test_unsupported_variant_is_refused_naming_the_field(tmp_path, capsys):
    original = tiny_model("image")
    write_checkpoint(tmp_path / "ckpt.pt", original)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ckpt["cfg"].model.layer_norm_first = True
    torch.save(ckpt, tmp_path / "ckpt.pt")
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "layer_norm_first=True" in err
    assert not (tmp_path / "run").exists()


def test_missing_weights_are_listed(tmp_path, capsys):
    original = tiny_model("text")
    write_checkpoint(tmp_path / "ckpt.pt", original)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    del ckpt["model"]["blocks.1.mlp.fc2.weight"]
    ckpt["model"]["blocks.9.mlp.fc2.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "missing 1: blocks.1.mlp.fc2.weight" in err and "unexpected 1: blocks.9.mlp.fc2.weight" in err


# -- refusals --------------------------------------------------------------------------------------------


class Exploit:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_with_no_side_effect(tmp_path, capsys, legacy):
    marker = tmp_path / "pwned"
    write_checkpoint(tmp_path / "ckpt.pt", tiny_model("image"), legacy=legacy, extra_state={"hook": Exploit(marker)})
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "refusing" in err and ("posix.system" in err or "os.system" in err)
    assert not marker.exists() and not (tmp_path / "run").exists()
    # the same file through plain pickle would have run it: the test's exploit is real
    torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert marker.exists()


def test_existing_out_is_refused(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt.pt", tiny_model("image"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("a week of GPU time")
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(out)])
    assert "already exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert "cannot read" in err


# -- the safe unpickler on real OmegaConf objects ---------------------------------------------------------


def loads(data: bytes):
    import io

    return SafeUnpickler(io.BytesIO(data)).load()


@pytest.fixture
def fairseq_enum_module(monkeypatch):
    """fairseq's ``Modality`` enum, importable under its fairseq module name (so that pickle names it)."""
    name = "examples.data2vec.data.modality"
    module = types.ModuleType(name)

    class Modality(enum.Enum):
        AUDIO = enum.auto()
        IMAGE = enum.auto()
        TEXT = enum.auto()

    Modality.__module__, Modality.__qualname__ = name, "Modality"
    module.Modality = Modality
    for parent in ("examples", "examples.data2vec", "examples.data2vec.data"):
        monkeypatch.setitem(sys.modules, parent, sys.modules.get(parent, types.ModuleType(parent)))
    monkeypatch.setitem(sys.modules, name, module)
    return Modality


def test_omegaconf_objects_become_plain_data(fairseq_enum_module):
    cfg = OmegaConf.create({"model": {"depth": 3, "rate": 0.5, "spec": [1, [2, 3]], "none": None,
                                      "ref": "${model.depth}", "type": fairseq_enum_module.IMAGE},
                            "missing": "???"})  # fmt: skip
    data = loads(pickle.dumps(cfg, protocol=2))
    assert plain(data) == {"model": {"depth": 3, "rate": 0.5, "spec": [1, [2, 3]], "none": None, "ref": 3,
                                     "type": "IMAGE"}, "missing": "???"}  # fmt: skip
    namespace = loads(pickle.dumps(argparse.Namespace(a=1, b="x"), protocol=2))
    assert plain(namespace) == {"a": 1, "b": "x"}


@pytest.mark.parametrize("payload", [os.system, eval, getattr, torch.load, types.SimpleNamespace(a=1)])
def test_disallowed_globals_are_refused_before_any_call(payload):
    with pytest.raises(UnsafePickleError, match="not allowed"):
        loads(pickle.dumps(payload, protocol=2))


# -- the run folder in the engine ---------------------------------------------------------------------


def test_pretrain_starts_from_an_import_and_refuses_to_resume_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path / "cache"))
    write_checkpoint(tmp_path / "ckpt.pt", tiny_model("image"))
    run, _ = import_run(tmp_path, capsys)
    fast = ["--set", "data.num_workers=0", "--set", "data.batch_size=4", "--set", "train.log_every=1"]
    new = tmp_path / "new"
    argv = ["pretrain", "--recipe", str(run / "config.yaml"), "--init-from", str(run), "--out", str(new)]
    assert main([*argv, "--max-steps", "1", *fast]) == 0
    assert f"initialised the weights from {run}" in capsys.readouterr().out
    err = one_line_error(capsys, ["pretrain", "--out", str(run), "--max-steps", "1"])
    assert "holds weights only" in err and "--init-from" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000000"]


def test_an_imported_runs_config_is_a_recipe_for_its_own_model(tmp_path, capsys, monkeypatch):
    """A 64-px model imported into the tiny image recipe (32-px crops): its config.yaml crops 64 px."""
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path / "cache"))
    model = Data2Vec2(data2vec2_config("image", "tiny", impl="torch", image_size=64, **NO_DROPOUT))
    write_checkpoint(tmp_path / "ckpt.pt", model.eval())
    run, _ = import_run(tmp_path, capsys)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["crop_size"] == 64
    fast = ["--set", "data.num_workers=0", "--set", "data.batch_size=4", "--set", "train.log_every=1"]
    argv = ["pretrain", "--recipe", str(run / "config.yaml"), "--init-from", str(run), "--out", str(tmp_path / "new")]
    assert main([*argv, "--max-steps", "1", *fast]) == 0
