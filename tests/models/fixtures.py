"""What the model tests share: tiny methods of every registered (method, modality), their batches, and
the "loss goes down" run. Generic tests (``test_method.py``) iterate ``registered_pairs()``, so a new
method or modality is covered as soon as it has a tiny preset."""

from __future__ import annotations

import dataclasses

import torch

from d2v2.models import METHODS, build_method, method_config

AUDIO_SAMPLES = 12_800  # 39 frames with the tiny CNN: room for wav2vec 2.0's spans of 10
TEXT_TOKENS = 32
TEXT_VOCAB = 64
DROPOUTS = ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_dropout", "prenet_dropout",
            "input_dropout", "embed_dropout", "decoder_input_dropout", "dropout_input", "dropout_features",
            "layerdrop", "prenet_layerdrop", "drop_path_rate")  # fmt: skip


def registered_pairs() -> list[tuple[str, str]]:
    """Every (method, modality) of ``METHODS`` with a tiny preset."""
    pairs = []
    for name in METHODS:
        for modality in ("image", "audio", "text"):
            try:
                method_config(name, modality, "tiny")
            except ValueError:
                continue
            pairs.append((name, modality))
    return pairs


def tiny_config(method: str, modality: str, deterministic: bool = False, **overrides):
    """The tiny preset with the torch kernels, a small text vocabulary and, with ``deterministic``,
    every dropout and LayerDrop off (so that every parameter is used in every step)."""
    fields = {f.name for f in dataclasses.fields(METHODS[method].config)}
    values = {"impl": "torch"}
    if modality == "text":
        values.update(vocab_size=TEXT_VOCAB, max_positions=64)
    if deterministic:
        values.update({name: 0.0 for name in DROPOUTS if name in fields})
    values.update(overrides)
    return method_config(method, modality, "tiny", **values)


def tiny_method(method: str, modality: str, deterministic: bool = False, **overrides):
    return build_method(method, tiny_config(method, modality, deterministic, **overrides))


def make_source(cfg, batch_size: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """A collated source of ``cfg``'s modality: images, waveforms or token ids past the special ones."""
    if cfg.modality == "image":
        return torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, generator=generator)
    if cfg.modality == "audio":
        return torch.randn(batch_size, AUDIO_SAMPLES, generator=generator)
    return torch.randint(5, cfg.vocab_size, (batch_size, TEXT_TOKENS), generator=generator)


def make_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """A batch as the loader makes it: the source and the method's own masks."""
    generator = torch.Generator().manual_seed(seed)
    source = make_source(model.cfg, batch_size, generator)
    return {"source": source, "mask": model.modality.make_masks(batch_size, source, generator=generator)}


def student_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("teacher.")}


def train_losses(model, batch: dict, steps: int, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> list:
    """AdamW on one fixed batch for ``steps`` updates, ``after_step`` after each: the losses."""
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=betas)
    losses = []
    for step in range(1, steps + 1):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_step(step)
        losses.append(loss.item())
    return losses


def fit(model, batch: dict, steps: int, lr: float = 3e-3) -> tuple[dict, list[float]]:
    """``steps`` AdamW updates of a fine-tuning model on one batch (its groups' ``lr_scale`` applied):
    (the last outputs, the losses)."""
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=lr)
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)
    losses = []
    for _ in range(steps):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    return out, losses
