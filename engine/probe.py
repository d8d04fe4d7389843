"""Linear probe and kNN on the frozen features of a pretrained checkpoint, for every modality.

Features are ``Method.probe_features`` (the EMA teacher's final outputs where the method has a
teacher, else its encoder's), averaged over the positions (the CLS token left out), computed once
for the whole labelled set (``probe_sets``: digits, voices and rates of the synthetic speech, pydoc
topics of text blocks, or a folder with one subfolder per class). The linear probe is an L2-regularised
multinomial logistic regression (scikit-learn, on standardised features); the kNN classifier votes
among the k nearest training samples by cosine similarity, weighted by exp(similarity / 0.07).
Each task's set is split once into train and test with a fixed seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from d2v2.models import Method

from .training.checkpoint import method_from_checkpoint, resolve_checkpoint, run_folder_of
from .probe_sets import labelled_set
from .training.runfolder import export_command


def default_result_path(state_file: Path) -> Path:
    """``<run>/probe/step-XXXXXXXX.json``: in the run folder, where pruning old checkpoints never reaches.

    A ``state.pt`` outside a run's ``checkpoints/`` folder gets ``probe-<folder>.json`` beside its folder.
    """
    folder, run = state_file.parent, run_folder_of(state_file)
    return run / "probe" / f"{folder.name}.json" if run is not None else folder.parent / f"probe-{folder.name}.json"


@torch.no_grad()
def frozen_features(model: Method, sources: torch.Tensor, batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Mean-pooled frozen features [M, D] (``Method.probe_features``: the teacher's where the method
    has one) of a labelled set's sources."""
    model = model.to(device)
    out = []
    for start in range(0, sources.shape[0], batch_size):
        x = model.probe_features(sources[start : start + batch_size].to(device))  # [b, N, D]
        out.append(x.float().mean(dim=1).cpu())
    return torch.cat(out)


def split(num: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(num)
    n_test = max(1, int(round(num * test_fraction)))
    return order[n_test:], order[:n_test]


def check_split(task: str, labels: torch.Tensor, classes: list[str], train: np.ndarray, test: np.ndarray, test_fraction: float) -> None:
    """A one-line error where a task cannot be probed: a class with a single sample, or a split that
    leaves the classifier fewer than two classes to fit or nothing to test."""
    counts = torch.bincount(labels, minlength=len(classes))
    lonely = [classes[c] for c in range(len(classes)) if counts[c] < 2]
    if lonely:
        raise ValueError(
            f"probe task {task!r}: class(es) {', '.join(lonely[:5])} have fewer than 2 samples; the probe needs at "
            "least 2 per class (one to fit, one to test): add samples or remove those classes"
        )
    if len(test) == 0 or len(np.unique(labels.numpy()[train])) < 2:
        raise ValueError(
            f"--test-fraction {test_fraction:g} leaves {len(train)} training and {len(test)} test samples of "
            f"{len(labels)} for task {task!r}; the classifier needs two classes to fit and a sample to test: "
            "use a fraction nearer 0.3, or more data"
        )


def linear_probe_accuracy(train_x, train_y, test_x, test_y, c: float = 1.0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    # One BLAS thread: these matrices are small, and BLAS threads contending with torch's (or with
    # another process) make each iteration many times slower.
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(train_x.numpy(), train_y.numpy())
        return float(clf.score(test_x.numpy(), test_y.numpy()))


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07) -> float:
    train_x = torch.nn.functional.normalize(train_x, dim=1)
    test_x = torch.nn.functional.normalize(test_x, dim=1)
    sims, idx = (test_x @ train_x.T).topk(min(k, train_x.shape[0]), dim=1)
    votes = torch.zeros(test_x.shape[0], int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
    return float((votes.argmax(1) == test_y).float().mean())


def probe_tasks(model: Method, labelled, device: str = "cpu", test_fraction: float = 0.3, seed: int = 0) -> dict[str, dict]:
    """Linear-probe and kNN accuracy of ``model``'s frozen features on each task of a labelled set
    (``probe_sets.labelled_set``), on the same held-out split for a given ``seed``."""
    splits = {task: split(len(labels), test_fraction, seed) for task, labels in labelled.tasks.items()}
    for task, (train, test) in splits.items():  # before the features are computed
        check_split(task, labelled.tasks[task], labelled.classes[task], train, test, test_fraction)
    was_training = model.training
    feats = frozen_features(model.eval(), labelled.sources, device=device)
    model.train(was_training)
    tasks = {}
    for task, labels in labelled.tasks.items():
        train, test = splits[task]
        tasks[task] = {
            "classes": len(labelled.classes[task]),
            "train_samples": int(len(train)),
            "test_samples": int(len(test)),
            "linear_accuracy": linear_probe_accuracy(feats[train], labels[train], feats[test], labels[test]),
            "knn_accuracy": knn_accuracy(feats[train], labels[train], feats[test], labels[test]),
        }
    return tasks


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
    start = time.perf_counter()
    state_file = resolve_checkpoint(checkpoint)
    model, config = method_from_checkpoint(checkpoint)
    labelled = labelled_set(model.modality.name, model.cfg, config, data, run_folder_of(state_file))
    tasks = probe_tasks(model, labelled, device, test_fraction, seed)
    main_task, first = next(iter(tasks.items()))  # the main task's figures also stand at the top level
    result = {"checkpoint": str(state_file), "data": labelled.description, **first, "tasks": tasks}
    target = Path(out) if out else default_result_path(state_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    for task, r in tasks.items():
        log(f"{task}: linear probe {100 * r['linear_accuracy']:.1f} % | kNN {100 * r['knn_accuracy']:.1f} % "
            f"({r['classes']} classes, {r['test_samples']} test samples)")
    folder = state_file.parent.name  # step-00000020, or a folder of the user's
    which = f"step {int(folder[5:])}" if folder.startswith("step-") and folder[5:].isdigit() else folder
    log(f"probe done: {which} of {checkpoint} in {time.perf_counter() - start:.1f} s: {main_task} linear probe "
        f"{100 * first['linear_accuracy']:.1f} % | kNN {100 * first['knn_accuracy']:.1f} %")
    log(f"results:    {target}")
    log(f"export:     {export_command(checkpoint)}")
    return result
