"""Read the pickled files of a run folder (or a user's) without running code pickled in them.

A pickle names the functions that rebuild its objects, and ``pickle.load`` calls whatever it names, so
a file can run any command. d2v2 reads its pickled files only through ``load_torch``
(``torch.load(weights_only=True)``: tensors and plain values; ``state.pt``) and ``safe_dcp`` (the
shards and ``.metadata`` of a sharded checkpoint). A refused file raises ``UnsafePickleError``
naming the file and the class, before anything named in it is called. (The token cache, probe and
bench results are JSON and raw integers, in which no code can be named.)
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

__all__ = ["UnsafePickleError", "load_torch", "refused"]


class UnsafePickleError(ValueError):
    """A file names a class or function that is not allowed (it would run foreign code)."""


def refused(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its many-paragraph "if you trust the source" message."""
    text = str(error)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"it names {match.group(1)}, which is not allowed (it could run code)"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    detail = paragraphs[1] if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only") else text
    return f"it holds more than tensors and plain values ({detail.splitlines()[0] if detail else type(error).__name__})"


def load_torch(file: str | Path, **kwargs) -> object:
    """``torch.load(file, weights_only=True)`` on the CPU; a refused file is an UnsafePickleError naming
    the file and the class."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"refusing {file}: {refused(e)}") from None
