"""d2v2's own pretrained-encoder format: what ``d2v2 export`` writes where no standard class matches.

A folder with two files:

- ``model.safetensors``: the encoder's state dict under d2v2's own parameter names (those of
  ``method.encoder``; for an EMA teacher, the teacher's tensors with the student's for the parts the
  teacher does not own, so the folder holds one complete encoder);
- ``config.json``: ``{"format": "d2v2-encoder", "format_version": 1, "method": ..., "modality": ...,
  "weights": "teacher" | "student", "config": {every field of the method's config dataclass}}``
  plus where it came from (``source``, ``step``).

A fine-tuned model's export adds ``"task": {"name", "head" (the head's spec), "classes", "regression"}``
and holds the ``Classifier``'s weights (``encoder.*``, ``head.*``); a speech recogniser's adds ``"blank"``
(the CTC blank's row) and holds the ``SpeechRecognizer``'s (``fill.*`` too: fine-tuning's mask vector),
its ``classes`` the letter vocabulary, row by row.

``load_pretrained(folder)`` rebuilds the encoder from ``d2v2.models`` alone (no engine, no data):
``encoder(source, padding_mask) -> [B, extra + N, D]``, the method's ``forward_features`` (images: CLS
first). It builds the method to get its encoder, so the method's whole config is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from .layers.embeddings import migrate_embed_keys
from .methods import build_method, method_entry

__all__ = ["FORMAT", "CONFIG_FILE", "WEIGHTS_FILE", "save_pretrained", "write_folder", "load_pretrained", "config_from_dict"]

FORMAT = "d2v2-encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _plain(value):
    """A config value as JSON (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_from_dict(method: str, values: dict):
    """The method's config dataclass from the plain values ``save_pretrained`` wrote (lists back to
    tuples where the field is a tuple); ValueError naming an unknown field."""
    cls = method_entry(method).config
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config.json holds unknown {cls.__name__} fields {unknown}: it was written by another d2v2 version")
    kwargs = {k: _tuples(v) if str(fields[k].type).startswith("tuple") else v for k, v in values.items()}
    return cls(**kwargs)


def save_pretrained(
    state: dict[str, torch.Tensor], method: str, cfg, out: str | os.PathLike, weights: str, **info
) -> Path:
    """Write an encoder ``state`` (d2v2 names) of ``method`` with config ``cfg`` into folder ``out``.

    ``weights`` says whose weights they are ("teacher" or "student"); ``info`` (e.g. source, step)
    is stored in config.json as is. Returns the folder.
    """
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "modality": cfg.modality,
        "weights": weights,
        "config": {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init},
        **info,
    }
    return write_folder(out, state, config)


def write_folder(out: str | os.PathLike, state: dict[str, torch.Tensor], config: dict) -> Path:
    """``model.safetensors`` (``state``, contiguous on the CPU) and ``config.json`` in folder ``out``
    (made if needed): the layout of every export, d2v2's own or a library's. Returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def load_pretrained(path: str | os.PathLike, impl: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The encoder saved by ``save_pretrained`` (``d2v2 export`` in d2v2's own format), in eval mode.

    Args:
        path: the exported folder (config.json + model.safetensors).
        impl: kernel implementation to run with ("auto" | "triton" | "torch"); default the saved one.
        device: where the weights go.

    Returns:
        the encoder module: ``encoder(source, padding_mask=None) -> [B, extra + N, D]``; for a fine-tuned
        export (``config.json`` with a ``task``), the ``d2v2.models.Classifier`` with its head:
        ``model({"source": ..., "padding_mask": ...})["logits"]``, class names in ``config["task"]["classes"]``;
        for a speech recogniser the ``d2v2.models.SpeechRecognizer``: per-frame ``logits`` [B, N, V] and
        ``lengths`` [B], the vocabulary (blank at ``config["task"]["blank"]``) in ``classes``.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{folder} is not an exported encoder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(
            f"{folder} is not in d2v2's own format (config.json has no \"format\": \"{FORMAT}\"); a standard "
            "export (Hugging Face, timm) loads with that library"
        )
    values = dict(config["config"])
    if impl is not None:
        values["impl"] = impl
    method = build_method(config["method"], config_from_dict(config["method"], values))
    weights = load_file(str(weights_file))
    task = config.get("task")
    if task is not None:  # a fine-tuned model: the encoder with its head
        from .tasks import Classifier, CTCHead, SpeechRecognizer, build_head

        head = build_head(task["head"])
        if isinstance(head, CTCHead):  # with the method's fill, whose mask vector fine-tuning trained
            model = SpeechRecognizer(method.encoder, method.modality, head, method.mask_fill(), blank=int(task["blank"]))
        else:
            model = Classifier(method.encoder, method.modality, head, regression=bool(task["regression"]))
        model.load_state_dict(weights)
        return model.to(device).eval()
    encoder = method.encoder
    if hasattr(encoder, "embed"):  # an export written before the embeddings were modules
        weights = migrate_embed_keys(weights)
    encoder.load_state_dict(weights)
    return encoder.to(device).eval()
