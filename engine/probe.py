"""Linear probe and kNN on the frozen teacher features of a pretrained checkpoint.

Features are the teacher encoder's final outputs, averaged over the patch tokens (the CLS token
left out), computed once for the whole labelled set. The linear probe is an L2-regularised
multinomial logistic regression (scikit-learn, on standardised features); the kNN classifier votes
among the k nearest training samples by cosine similarity, weighted by exp(similarity / 0.07).
The labelled set is the embedded digits by default, or an ImageFolder tree (one folder per class),
split once into train and test with a fixed seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from d2v2.models.data2vec2 import Data2Vec2, Data2Vec2Config

from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import from_dict
from .data import embedded, images


def default_result_path(state_file: Path) -> Path:
    """``<run>/probe/step-XXXXXXXX.json``: in the run folder, where pruning old checkpoints never reaches.

    A ``state.pt`` outside a run's ``checkpoints/`` folder gets ``probe-<folder>.json`` beside its folder.
    """
    folder = state_file.parent
    if folder.parent.name == "checkpoints":
        return folder.parent.parent / "probe" / f"{folder.name}.json"
    return folder.parent / f"probe-{folder.name}.json"


def method_from_checkpoint(path: str) -> tuple[Data2Vec2, dict]:
    """Rebuild the model a checkpoint was trained as, with its weights; returns (model, config dict)."""
    state = load_checkpoint(path)
    if "config" not in state or "method" not in state:
        raise ValueError(f"{path} is not a d2v2 pretraining checkpoint (it has no config/method entries)")
    model_cfg = dict(state["config"]["model"])
    model_cfg.pop("size", None)
    model = Data2Vec2(from_dict(Data2Vec2Config, model_cfg, "model"))
    model.load_state_dict(state["method"])
    return model.eval(), state["config"]


@torch.no_grad()
def teacher_features(model: Data2Vec2, pixels: torch.Tensor, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Mean-pooled teacher features [M, D] of images [M, 3, H, W] (already normalised)."""
    if model.cfg.modality != "image":
        raise ValueError(f"the probe runs on image checkpoints; this one is {model.cfg.modality!r}")
    model = model.to(device)
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        x = model.teacher(pixels[start : start + batch_size].to(device))  # [b, 1 + N, D]
        out.append(x[:, model.cfg.num_extra_tokens :].float().mean(dim=1).cpu())
    return torch.cat(out)


def labelled_images(data: str | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [M, 3, size, size] and labels [M]: the digits, or an ImageFolder tree."""
    if data is None:
        pixels, labels = embedded.digits(size=size)
        return (pixels - torch.tensor(images.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(images.IMAGENET_STD).view(1, 3, 1, 1), labels
    paths, labels, classes = images.list_images(data)
    if len(classes) < 2:
        raise ValueError(f"the probe needs labelled images: {data} must hold one folder per class (found {len(classes)})")
    transform = images.EvalTransform(size)
    pixels = []
    for p in paths:
        try:
            pixels.append(transform(images.load_rgb(p)))
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
            raise ValueError(f"--data: {p} cannot be read as an image ({type(e).__name__}: {e}); fix or remove it") from e
    return torch.stack(pixels), torch.tensor(labels)


def split(num: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(num)
    n_test = max(1, int(round(num * test_fraction)))
    return order[n_test:], order[:n_test]


def linear_probe_accuracy(train_x, train_y, test_x, test_y, c: float = 1.0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    clf.fit(train_x.numpy(), train_y.numpy())
    return float(clf.score(test_x.numpy(), test_y.numpy()))


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07) -> float:
    train_x = torch.nn.functional.normalize(train_x, dim=1)
    test_x = torch.nn.functional.normalize(test_x, dim=1)
    sims, idx = (test_x @ train_x.T).topk(min(k, train_x.shape[0]), dim=1)
    votes = torch.zeros(test_x.shape[0], int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
    return float((votes.argmax(1) == test_y).float().mean())


def probe(
    checkpoint: str, data: str | None = None, out: str | None = None, device: str | None = None,
    test_fraction: float = 0.3, seed: int = 0, log=print,
) -> dict:
    """Probe a checkpoint; prints the accuracies and writes them to JSON (next to it by default)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = method_from_checkpoint(checkpoint)
    pixels, labels = labelled_images(data, model.cfg.image_size)
    feats = teacher_features(model, pixels, device=device)
    train, test = split(len(labels), test_fraction, seed)
    result = {
        "checkpoint": str(resolve_checkpoint(checkpoint)),
        "data": data or "embedded digits",
        "train_samples": int(len(train)),
        "test_samples": int(len(test)),
        "classes": int(labels.max()) + 1,
        "linear_accuracy": linear_probe_accuracy(feats[train], labels[train], feats[test], labels[test]),
        "knn_accuracy": knn_accuracy(feats[train], labels[train], feats[test], labels[test]),
    }
    target = Path(out) if out else default_result_path(resolve_checkpoint(checkpoint))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    log(f"linear probe {100 * result['linear_accuracy']:.1f} % | kNN {100 * result['knn_accuracy']:.1f} % "
        f"({result['classes']} classes, {result['test_samples']} test samples) -> {target}")
    return result
