"""``d2v2 import-fairseq`` of CTC fine-tunes (``wav2vec_ctc``: data2vec 2.0, data2vec 1.0, wav2vec 2.0):
synthetic checkpoints in fairseq's layout import into speech-recognition runs whose logits are the
original weights' (encoder output, then ``w2v_encoder.proj``), which ``transcribe`` and ``evaluate`` decode
to the original's greedy transcripts; the head's rows must fit the letter dictionary."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import yaml

omegaconf = pytest.importorskip("omegaconf")
from omegaconf import OmegaConf  # noqa: E402

from d2v2.engine.training.checkpoint import load_checkpoint, method_from_checkpoint  # noqa: E402
from d2v2.engine.cli import main  # noqa: E402
from d2v2.engine.data.audio import normalize_waveform  # noqa: E402
from d2v2.engine.data.letters import STANDARD, Letters  # noqa: E402
from d2v2.engine.finetune.decoding import DecodeConfig, Decoder  # noqa: E402
from d2v2.engine.finetune.run import finetuned_model  # noqa: E402
from d2v2.engine.interop.fairseq_keys import wav2vec_fairseq_names  # noqa: E402
from d2v2.engine.interop.standard_targets import split_qkv  # noqa: E402
from d2v2.models import build_method, method_config  # noqa: E402
from tests.engine.test_fairseq_import import MAX_UPDATE, fairseq_model_config, fairseq_state, tiny_model  # noqa: E402
from tests.helpers import assert_close, one_line_error  # noqa: E402

PREFIX = "w2v_encoder.w2v_model."
NO_DROPOUT = dict(encoder_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
# A wav2vec_ctc fine-tune's own settings (Wav2Vec2AsrConfig), as fairseq's base_10h.yaml sets them
FINE_TUNE = dict(final_dropout=0.0, dropout=0.0, activation_dropout=0.1, attention_dropout=0.0, layerdrop=0.05,
                 apply_mask=True, mask_prob=0.65, mask_length=10, mask_channel_prob=0.5, mask_channel_length=64,
                 freeze_finetune_updates=10000, feature_grad_mult=0.0, normalize=True)  # fmt: skip
WORDS = ["HELLO WORLD", "GOOD DAY"]


def fairseq_wav2vec(method: str) -> tuple[torch.nn.Module, dict, dict]:
    """A tiny wav2vec 2.0 or data2vec 1.0 method, its encoder under fairseq's names (``Wav2Vec2Model``,
    ``Data2VecAudioModel``) and its fairseq model config."""
    original = build_method(method, method_config(method, "audio", "tiny", impl="torch", **NO_DROPOUT,
                                                  **({"input_dropout": 0.0, "post_mlp_dropout": 0.0} if method == "data2vec"
                                                     else {"dropout_input": 0.0})))  # fmt: skip
    with torch.no_grad():  # every weight moved from its init, the norms' affines included
        for p in original.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = original.cfg
    state = split_qkv(original.encoder.state_dict())
    if method == "data2vec":
        state["mask_emb"] = original.mask_emb.detach()
    mode = getattr(cfg, "extractor_mode", "layer_norm")
    names = wav2vec_fairseq_names(state, method, mode)
    fairseq = {names[k]: v.clone() for k, v in state.items()}
    spec = " + ".join(f"[({c}, {k}, {s})]" for c, k, s in cfg.conv_feature_layers)
    model_cfg = dict(
        _name="wav2vec2" if method == "wav2vec2" else "data2vec_audio", extractor_mode=mode,
        encoder_layers=cfg.depth, encoder_embed_dim=cfg.embed_dim, encoder_ffn_embed_dim=4 * cfg.embed_dim,
        encoder_attention_heads=cfg.num_heads, activation_fn="gelu", layer_type="transformer", dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0,
        layer_norm_first=False, conv_feature_layers=spec, conv_bias=False, quantize_targets=True, latent_vars=320,
        conv_pos_groups=cfg.conv_pos_groups, feature_grad_mult=0.1, mask_prob=0.65,
    )  # fmt: skip
    if method == "data2vec":
        model_cfg.update(conv_pos=cfg.conv_pos_width, pos_conv_depth=cfg.conv_pos_depth, average_top_k_layers=2,
                         instance_norm_target_layer=True, ema_decay=0.999)  # fmt: skip
    else:
        model_cfg.update(conv_pos=cfg.conv_pos_kernel, pos_conv_depth=1)
    return original.eval(), fairseq, model_cfg


def fairseq_data2vec2() -> tuple[torch.nn.Module, dict, dict]:
    original = tiny_model("audio")
    encoder = {k: v for k, v in fairseq_state(original, ema=False).items() if ".decoder." not in k}
    return original, encoder, fairseq_model_config(original)


def random_head(rows: int = len(STANDARD), dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A head that says letters and words: <pad>, </s> and <unk> never win, | often."""
    weight, bias = torch.randn(rows, dim) * 0.2, torch.randn(rows) * 0.1
    bias[1:4] = -100.0
    bias[4] += 2.0
    return weight, bias


def write_ctc_checkpoint(path, encoder: dict, model_cfg: dict, head, extra: dict | None = None, as_args: bool = False,
                         **fine_tune) -> None:  # fmt: skip
    """A ``wav2vec_ctc`` checkpoint: the encoder under ``w2v_encoder.w2v_model.``, the head ``w2v_encoder.proj``,
    the pretraining run's whole config in ``w2v_args`` (Hydra; ``as_args``: flat argparse Namespaces, as
    fairseq wrote them before Hydra, e.g. the released wav2vec 2.0 base fine-tunes)."""
    state = {PREFIX + k: v for k, v in encoder.items()}
    state.update({"w2v_encoder.proj.weight": head[0], "w2v_encoder.proj.bias": head[1], **(extra or {})})
    ckpt = {"model": state, "optimizer_history": [{"num_updates": 20000}]}
    if as_args:
        flat = {k: v for k, v in model_cfg.items() if k != "_name"}
        w2v_args = argparse.Namespace(arch=model_cfg["_name"], max_update=MAX_UPDATE, seed=1, **flat)
        ckpt.update(cfg=None, args=argparse.Namespace(arch="wav2vec_ctc", w2v_path="pretrained.pt", w2v_args=w2v_args,
                                                      task="audio_pretraining", labels="ltr", max_update=20000,
                                                      **{**FINE_TUNE, **fine_tune}))  # fmt: skip
    else:
        pretraining = {"model": model_cfg, "optimization": {"max_update": MAX_UPDATE}, "common": {"seed": 1}}
        ckpt["cfg"] = OmegaConf.create({
            "model": {"_name": "wav2vec_ctc", "w2v_path": "pretrained.pt", "w2v_args": pretraining, **FINE_TUNE, **fine_tune},
            "task": {"_name": "audio_finetuning", "data": "/data/ls-10h", "labels": "ltr", "normalize": True},
            "optimization": {"max_update": 20000, "lr": [5e-5]},
        })  # fmt: skip
    torch.save(ckpt, path)


def reference_logits(original, method: str, source: torch.Tensor, head) -> torch.Tensor:
    """What fairseq's ``Wav2VecCtc`` computes in eval mode: proj(encoder output)."""
    with torch.no_grad():
        x = original.forward_features(source) if method == "data2vec2" else original.encoder(source)
        return F.linear(x, *head)


METHODS = ["data2vec2", "data2vec", "wav2vec2"]


def test_the_synthetic_wav2vec_checkpoints_use_fairseqs_names():
    _, w2v2, _ = fairseq_wav2vec("wav2vec2")
    _, d2v1, _ = fairseq_wav2vec("data2vec")
    common = ["feature_extractor.conv_layers.0.0.weight", "feature_extractor.conv_layers.6.0.weight", "layer_norm.weight",
              "post_extract_proj.weight", "post_extract_proj.bias", "mask_emb", "encoder.layer_norm.bias",
              "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.2.self_attn.out_proj.bias",
              "encoder.layers.1.self_attn_layer_norm.weight", "encoder.layers.1.fc1.weight", "encoder.layers.2.fc2.bias",
              "encoder.layers.0.final_layer_norm.bias"]  # fmt: skip
    for key in common + ["feature_extractor.conv_layers.0.2.weight", "encoder.pos_conv.0.weight_g",
                         "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias"]:  # fmt: skip
        assert key in w2v2, key
    for key in common + ["feature_extractor.conv_layers.3.2.1.weight", "encoder.pos_conv.0.0.weight",
                         "encoder.pos_conv.4.0.bias"]:  # fmt: skip
        assert key in d2v1, key
    assert "feature_extractor.conv_layers.1.2.weight" not in w2v2  # GroupNorm on the first layer only
    # conv 7 + group norm 2 + layer_norm 2 + post_extract_proj 2 + mask_emb + pos_conv 3 + encoder.layer_norm 2
    # + 3 layers x (q, k, v, out, self_attn_layer_norm, fc1, fc2, final_layer_norm: 16)
    assert len(w2v2) == 67 and w2v2["encoder.pos_conv.0.weight_g"].shape == (1, 1, 128)
    assert len(d2v1) == 7 * 3 + 4 + 1 + 5 * 2 + 2 + 48


@pytest.mark.parametrize("method", METHODS)
def test_ctc_fine_tune_imports_as_a_recognizer_with_the_same_transcripts(tmp_path, capsys, method):
    original, encoder, model_cfg = fairseq_data2vec2() if method == "data2vec2" else fairseq_wav2vec(method)
    head = random_head()
    leftovers = {PREFIX + "quantizer.vars": torch.zeros(1, 640, 8)} if method == "wav2vec2" else {}
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, model_cfg, head, leftovers)
    run = tmp_path / "run"
    assert main(["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned by wav2vec_ctc, with its CTC head over 32 letters and specials (LibriSpeech dict.ltr.txt)" in printed
    assert "a speech-recognition run" in printed and "decoder:" not in printed and "teacher:" not in printed
    imported = load_checkpoint(run)["imported"]
    if method == "wav2vec2":  # the pretraining leftover is dropped and said; the head is kept
        assert "dropped 1 tensors outside the encoder: w2v_encoder.w2v_model" in printed
        assert imported["dropped"] == [PREFIX + "quantizer.vars"]
    else:
        assert "dropped" not in printed and imported["dropped"] == []

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"] == "speech-recognition" and config["classes"] == list(STANDARD.symbols)
    assert config["encoder"]["method"] == method
    assert config["pretrained"]["checkpoint"] == str((tmp_path / "ckpt.pt").resolve())  # where the encoder came from
    head_cfg = config["head"]  # the fine-tune's own settings, carried over
    assert (head_cfg["mask_prob"], head_cfg["mask_channel_prob"], head_cfg["freeze_updates"],
            head_cfg["freeze_feature_encoder"]) == (0.65, 0.5, 10000, True)  # fmt: skip
    assert config["model"]["layerdrop"] == 0.05 and config["encoder"]["config"]["layerdrop"] == 0.05

    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.3, 16000).astype(np.float32) for _ in WORDS]
    sources = torch.from_numpy(np.stack([normalize_waveform(w) for w in waves]))  # as transcribe and evaluate read them
    expected = reference_logits(original, method, sources, head)
    model = finetuned_model(str(run))[0]
    with torch.no_grad():
        out = model({"source": sources})
    assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5, name="logits")
    words = Decoder(STANDARD, DecodeConfig())(expected, torch.full((2,), expected.shape[1]))
    assert all(w.strip() for w in words)  # the comparison below means something

    data = tmp_path / "data"  # fairseq's layout: evaluate --data
    data.mkdir()
    for i, wave in enumerate(waves):
        sf.write(data / f"{i}.wav", wave, 16000, subtype="FLOAT")  # read back exactly
    for split in ("train", config["data"]["valid_split"]):
        (data / f"{split}.tsv").write_text(f"{data}\n" + "".join(f"{i}.wav\t16000\n" for i in range(len(WORDS))))
        (data / f"{split}.wrd").write_text("\n".join(WORDS) + "\n")
        (data / f"{split}.ltr").write_text("\n".join(" ".join(w.replace(" ", "|")) + " |" for w in WORDS) + "\n")
    assert main(["transcribe", "--checkpoint", str(run), *(str(data / f"{i}.wav") for i in range(len(WORDS)))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t", 1)[1] for line in lines] == words
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data)]) == 0
    result = json.loads(next((run / "eval").glob("*.json")).read_text())
    said = {e["reference"]: e["hypothesis"] for e in result["examples"]}
    assert [said[w] for w in WORDS] == words


def test_a_dictionary_that_does_not_fit_the_head_is_a_one_line_error(tmp_path, capsys):
    _, encoder, model_cfg = fairseq_data2vec2()
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, model_cfg, random_head())
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{c} {100 - i}\n" for i, c in enumerate("|ABCDEFGHIJ")))
    argv = ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")]
    err = one_line_error(capsys, [*argv, "--dict", str(tmp_path / "dict.ltr.txt")])
    assert "32 outputs" in err and "makes 15 (4 specials + 11 letters)" in err and "--dict PATH" in err
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, model_cfg, random_head(rows=30))
    err = one_line_error(capsys, argv)
    assert "30 outputs" in err and "LibriSpeech's dict.ltr.txt (the default) makes 32" in err
    assert not (tmp_path / "run").exists()


def test_a_given_dictionary_names_the_rows(tmp_path, capsys):
    _, encoder, model_cfg = fairseq_data2vec2()
    letters = list(reversed(STANDARD.letters))  # the same 28 letters in another order: the file's is the head's
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in letters))
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, model_cfg, random_head())
    assert main(["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run"),
                 "--dict", str(tmp_path / "dict.ltr.txt")]) == 0  # fmt: skip
    assert f"--dict {tmp_path / 'dict.ltr.txt'}" in capsys.readouterr().out
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["classes"] == list(Letters.of(letters).symbols)


def test_dict_needs_a_ctc_head(tmp_path, capsys):
    _, encoder, model_cfg = fairseq_data2vec2()
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, model_cfg, random_head())
    (tmp_path / "dict.ltr.txt").write_text("A 1\n")
    argv = ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")]
    err = one_line_error(capsys, [*argv, "--encoder-only", "--dict", str(tmp_path / "dict.ltr.txt")])
    assert "--dict gives the letters of a CTC fine-tune's head" in err and "--encoder-only" in err


@pytest.mark.parametrize("method", ["wav2vec2", "data2vec"])
def test_a_pretrained_wav2vec_or_data2vec1_checkpoint_imports_its_encoder_for_fine_tuning(tmp_path, capsys, method):
    original, encoder, model_cfg = fairseq_wav2vec(method)
    objective = {"quantizer.vars": torch.zeros(1, 640, 8), "project_q.weight": torch.zeros(256, 8),
                 "final_proj.weight": torch.zeros(256, 64)}  # the pretraining objective's parts, dropped
    ckpt = {"model": {**encoder, **objective}, "optimizer_history": [{"num_updates": 400000}],
            "cfg": OmegaConf.create({"model": model_cfg, "optimization": {"max_update": MAX_UPDATE}, "common": {"seed": 1}})}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    run = tmp_path / "run"
    assert main(["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "the pretraining objective's parts are not" in printed and "fine-tuned" not in printed
    state = load_checkpoint(run)
    assert state["config"]["method"] == method and state["config"]["recipe"] == ("wav2vec2-" if method == "wav2vec2" else "d2v1-") + "audio-tiny"
    assert sorted(state["imported"]["dropped"]) == sorted(objective)

    model, _ = method_from_checkpoint(str(run))  # what probe, export and finetune --checkpoint RUN build
    sources = torch.from_numpy(normalize_waveform(np.random.default_rng(0).normal(0, 0.3, 16000).astype(np.float32)))[None]
    with torch.no_grad():
        assert_close(model.encoder(sources), original.encoder(sources), atol=1e-5, rtol=1e-5, name="encoder output")
    if method == "data2vec":
        assert torch.equal(model.mask_emb, original.mask_emb)
    assert main(["finetune", "--recipe", "finetune-speech-tiny", "--checkpoint", str(run), "--out", str(tmp_path / "ft"),
                 "--set", "train.max_steps=1", "--set", "train.eval_every=1"]) == 0  # fmt: skip


@pytest.mark.parametrize("field,value,says", [
    ("layer_norm_first", True, "model.layer_norm_first=True"),
    ("layer_type", "conformer", "model.layer_type='conformer'"),
    ("pos_conv_depth", 5, "model.pos_conv_depth=5"),
])  # fmt: skip
def test_a_wav2vec_variant_d2v2_does_not_build_is_refused_naming_the_field(tmp_path, capsys, field, value, says):
    _, encoder, model_cfg = fairseq_wav2vec("wav2vec2")
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, {**model_cfg, field: value}, random_head())
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")])
    assert says in err and "does not implement" in err


def test_newer_weight_norm_names_and_missing_weights(tmp_path, capsys):
    original, encoder, model_cfg = fairseq_wav2vec("wav2vec2")
    newer = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    renamed = {re.sub("weight_[gv]$", lambda m: newer[m[0]], k): v for k, v in encoder.items()}
    head = random_head()
    write_ctc_checkpoint(tmp_path / "ckpt.pt", renamed, model_cfg, head)
    assert main(["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")]) == 0
    source = torch.from_numpy(normalize_waveform(np.random.default_rng(1).normal(0, 1, 8000).astype(np.float32)))[None]
    with torch.no_grad():
        got = finetuned_model(str(tmp_path / "run"))[0]({"source": source})["logits"]
    assert_close(got, reference_logits(original, "wav2vec2", source, head), atol=1e-5, rtol=1e-5)
    del encoder["encoder.layers.1.fc2.weight"]
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, model_cfg, head)
    err = one_line_error(capsys, ["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run2")])
    assert "does not match the wav2vec 2.0 model" in err and "missing 1: encoder.layers.1.fc2.weight" in err


@pytest.mark.parametrize("method", ["data2vec", "wav2vec2"])
def test_an_imported_recognizer_exports_to_hugging_face_with_the_same_logits(tmp_path, capsys, method):
    """fairseq -> d2v2 -> transformers: Hugging Face's classes, whose modules are fairseq's renamed, compute
    what the fairseq weights did (a pre-Hydra checkpoint, as the released wav2vec 2.0 base fine-tunes are)."""
    transformers = pytest.importorskip("transformers", reason="the interop extra (transformers) is not installed")
    original, encoder, model_cfg = fairseq_wav2vec(method)
    head = random_head()
    write_ctc_checkpoint(tmp_path / "ckpt.pt", encoder, model_cfg, head, as_args=True, normalize=False)
    assert main(["import-fairseq", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "run")]) == 0
    assert "task.normalize false" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    target = {"wav2vec2": "Wav2Vec2ForCTC", "data2vec": "Data2VecAudioForCTC"}[method]
    hf = getattr(transformers, target).from_pretrained(str(tmp_path / "hf")).eval()
    source = torch.from_numpy(normalize_waveform(np.random.default_rng(2).normal(0, 1, 12000).astype(np.float32)))[None]
    with torch.no_grad():
        got = hf(input_values=source).logits
    assert_close(got, reference_logits(original, method, source, head), atol=1e-4, rtol=1e-4, name=target)
