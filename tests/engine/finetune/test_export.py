"""Export of fine-tuned models: into Hugging Face's classification and CTC classes where the head matches
(same logits to 1e-5; a recogniser's processor gives d2v2's greedy transcript), and d2v2's own format
elsewhere, read back with its head by load_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from d2v2.engine.training.checkpoint import save_checkpoint
from d2v2.engine.config import to_dict
from d2v2.engine.data.audio import normalize_waveform
from d2v2.engine.data.letters import STANDARD, Letters
from d2v2.engine.export import export
from d2v2.engine.finetune.config import resolve_finetune_config
from d2v2.engine.finetune.decoding import DecodeConfig, Decoder
from d2v2.engine.finetune.run import build_model
from d2v2.models import SpeechRecognizer, load_pretrained, method_config

ATOL = 1e-5
CLASSES = ["cat", "dog", "emu"]
# (method, modality, config overrides, the class it exports to: None = d2v2's own format)
CASES = [
    ("data2vec2", "text", {"vocab_size": 100}, "Data2VecTextForSequenceClassification"),
    ("mlm", "text", {"vocab_size": 100}, "RobertaForSequenceClassification"),
    ("data2vec", "text", {"vocab_size": 100}, "Data2VecTextForSequenceClassification"),
    ("wav2vec2", "audio", {}, "Wav2Vec2ForSequenceClassification"),
    ("data2vec", "audio", {}, "Data2VecAudioForSequenceClassification"),
    ("data2vec", "image", {}, "Data2VecVisionForImageClassification"),
    ("data2vec2", "image", {}, None),
    ("data2vec2", "audio", {}, None),
    ("mae", "image", {}, None),
]


def make_finetuned_run(tmp_path, method: str, modality: str, overrides: dict, classes=CLASSES, recipe: str | None = None):
    """A fine-tuning run folder holding one checkpoint of a tiny classifier (or ``recipe``'s model) with
    every weight moved."""
    cfg = resolve_finetune_config(recipe or f"finetune-{modality}-tiny", ["pretrained.checkpoint=/pretrained"])
    model_cfg = method_config(method, modality, "tiny", impl="torch", **overrides)
    model = build_model(cfg, method, model_cfg, classes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if recipe is not None and "speech" in recipe:  # letters and words: <pad>, </s>, <unk> never win, | often
            model.head.linear.bias[1:4] = -100.0
            model.head.linear.bias[4] += 2.0
    config = {"recipe": cfg.recipe, "method": method, **{k: v for k, v in to_dict(cfg).items() if k != "recipe"},
              "encoder": {"method": method, "config": to_dict(model_cfg)}, "classes": classes}  # fmt: skip
    run = tmp_path / f"ft-{method}-{modality}"
    save_checkpoint(run, 4, {"config": config, "method": model.state_dict(), "trainer": {"step": 4}})
    return run, model


def sample(cfg, batch: int = 2):
    if cfg.modality == "image":
        return {"source": torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size)}
    if cfg.modality == "audio":
        return {"source": torch.randn(batch, 3200)}
    tokens = torch.randint(4, cfg.vocab_size, (batch, 12))
    tokens[:, 0] = 0  # <s>
    padding = torch.zeros(batch, 12, dtype=torch.bool)
    padding[-1, -3:] = True
    return {"source": tokens.masked_fill(padding, cfg.padding_idx), "padding_mask": padding}


@pytest.mark.parametrize("method,modality,overrides,target", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_finetuned_export_keeps_the_head(tmp_path, method, modality, overrides, target):
    run, model = make_finetuned_run(tmp_path, method, modality, overrides)
    out = tmp_path / "export"
    info = export(str(run), str(out), tokenizer=False, log=lambda *_: None)
    assert info["target"] == (target or "d2v2")
    batch = sample(model.encoder.modality.cfg if hasattr(model.encoder, "modality") else model.modality.cfg)
    with torch.no_grad():
        expected = model(batch)["logits"]
    if target is None:
        loaded = load_pretrained(out)
        assert json.loads((out / "config.json").read_text())["task"]["classes"] == CLASSES
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch)["logits"], expected, atol=ATOL, rtol=0)
        return
    transformers = pytest.importorskip("transformers", reason="the interop extra (transformers) is not installed")
    hf, loading = getattr(transformers, target).from_pretrained(str(out), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    assert hf.config.id2label == dict(enumerate(CLASSES))
    with torch.no_grad():
        if modality == "text":
            got = hf.eval()(input_ids=batch["source"], attention_mask=(~batch["padding_mask"]).long()).logits
        elif modality == "audio":
            got = hf.eval()(input_values=batch["source"]).logits
        else:
            got = hf.eval()(pixel_values=batch["source"]).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_a_regression_head_exports_as_one_output(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the interop extra (transformers) is not installed")
    run, _ = make_finetuned_run(tmp_path, "mlm", "text", {"vocab_size": 100}, classes=None)
    export(str(run), str(tmp_path / "export"), tokenizer=False, log=lambda *_: None)
    hf = transformers.RobertaForSequenceClassification.from_pretrained(str(tmp_path / "export"))
    assert hf.config.num_labels == 1 and hf.config.problem_type == "regression"


SPEECH = [("wav2vec2", "Wav2Vec2ForCTC"), ("data2vec", "Data2VecAudioForCTC"), ("data2vec2", None)]


@pytest.mark.parametrize("method,target", SPEECH, ids=[c[0] for c in SPEECH])
def test_speech_recognizer_exports_with_its_vocabulary(tmp_path, method, target):
    letters = list(STANDARD.symbols)
    run, model = make_finetuned_run(tmp_path, method, "audio", {}, classes=letters, recipe="finetune-speech-tiny")
    out = tmp_path / "export"
    info = export(str(run), str(out), tokenizer=False, log=lambda *_: None)
    assert info["target"] == (target or "d2v2")
    raw = np.random.default_rng(0).normal(0, 0.3, 16000).astype(np.float32)  # 1 s, unpadded
    source = torch.from_numpy(normalize_waveform(raw))[None]  # as transcribe feeds it
    with torch.no_grad():
        expected = model({"source": source})
    words = Decoder(Letters(tuple(letters)), DecodeConfig())(expected["logits"], expected["lengths"])
    assert words[0].strip()  # the test means something: the model says some letters
    if target is None:
        loaded = load_pretrained(out)
        assert isinstance(loaded, SpeechRecognizer)
        assert json.loads((out / "config.json").read_text())["task"]["classes"] == letters
        with torch.no_grad():
            torch.testing.assert_close(loaded({"source": source})["logits"], expected["logits"], atol=ATOL, rtol=0)
        return
    transformers = pytest.importorskip("transformers", reason="the interop extra (transformers) is not installed")
    assert set(info["files"]) >= {"vocab.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"}
    hf, loading = getattr(transformers, target).from_pretrained(str(out), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    hf.eval()
    prefix = "wav2vec2" if method == "wav2vec2" else "data2vec_audio"
    torch.testing.assert_close(getattr(hf, prefix).masked_spec_embed, model.fill.embedding)  # fine-tuning's vector
    processor = transformers.Wav2Vec2Processor.from_pretrained(str(out))
    inputs = processor(raw, sampling_rate=16000, return_tensors="pt")
    # the same normalisation, but for its variance epsilon (1e-7, ours 1e-5)
    torch.testing.assert_close(inputs["input_values"], source, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        logits = hf(input_values=source).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)
    hf_words = processor.batch_decode(logits.argmax(-1))
    # HF writes one space per word boundary it keeps; d2v2 joins the words with one
    assert [" ".join(w.split()) for w in hf_words] == words
    assert hf.config.pad_token_id == 0 and processor.tokenizer.pad_token_id == 0  # the blank: our row 0
    assert processor.tokenizer.convert_ids_to_tokens(list(range(len(letters))))[4:] == letters[4:]
