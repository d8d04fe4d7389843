"""One optimizer update of every method at tiny size on the CPU: ``Trainer.train_step`` (forward, backward,
clipping, AdamW, the EMA teacher where the method has one) on synthetic batches of 4 samples, each
method built by ``d2v2.bench.train.build`` from its modality's tiny recipe, as ``d2v2 bench train`` does.
Audio clips are cut to 1 s (the tiny recipe's 20 s clips cost seconds per step on one core).
"""

from __future__ import annotations

import pytest
import torch

from d2v2.bench import train
from d2v2.engine.training.trainer import Trainer

METHODS = [("data2vec2", "image"), ("data2vec2", "audio"), ("data2vec2", "text"), ("data2vec", "image"),
           ("mae", "image"), ("wav2vec2", "audio"), ("mlm", "text")]  # fmt: skip
BATCH = 4
CLIP_SAMPLES = 16_000


@pytest.mark.parametrize("method, modality", METHODS, ids=lambda v: v)
def test_train_step(benchmark, method, modality, tmp_path):
    model, cfg = train.build(method, modality, "tiny")
    cfg.data.max_samples = CLIP_SAMPLES
    cfg.train.log_every = cfg.train.checkpoint_every = 10**9
    batches = train.synthetic_batches(model, cfg, BATCH)
    trainer = Trainer(model, None, cfg.optim, cfg.train, tmp_path, torch.device("cpu"), BATCH, {}, log=lambda *_: None)
    trainer.train_step(batches)  # the first step allocates the optimizer state
    benchmark.extra_info.update(method=method, modality=modality, batch=BATCH)
    benchmark(trainer.train_step, batches)
