"""The ``Method`` protocol, checked the same way for every registered method x modality at tiny size
(timm's generic model tests): a forward and backward where every student parameter gets a gradient
and no teacher parameter does, ``after_step`` applying the method's EMA rule, ``probe_features``
of the promised shape, and an export round trip through ``save_pretrained`` / ``load_pretrained``."""

from __future__ import annotations

import pytest
import torch

from d2v2.models import load_pretrained, save_pretrained
from d2v2.models.layers.embeddings import embed_paths
from tests.helpers import assert_close
from tests.models.fixtures import make_batch, make_source, registered_pairs, student_parameters, tiny_method

PAIRS = registered_pairs()
IDS = [f"{method}-{modality}" for method, modality in PAIRS]


def test_every_method_and_modality_is_covered():
    assert {method for method, _ in PAIRS} == {"data2vec2", "data2vec", "mae", "mlm", "wav2vec2"}
    assert ("data2vec2", "audio") in PAIRS and ("mae", "image") in PAIRS


@pytest.mark.parametrize("method, modality", PAIRS, ids=IDS)
def test_forward_backward_reaches_every_student_parameter_and_no_teacher_one(method, modality):
    torch.manual_seed(0)
    model = tiny_method(method, modality, deterministic=True).train()
    out = model(make_batch(model))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in student_parameters(model).items() if p.requires_grad and p.grad is None]
    assert missing == []
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("method, modality", [p for p in PAIRS if p[0] in ("data2vec2", "data2vec")],
                         ids=[i for p, i in zip(PAIRS, IDS) if p[0] in ("data2vec2", "data2vec")])  # fmt: skip
def test_after_step_is_the_methods_ema_rule(method, modality):
    model = tiny_method(method, modality, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10)
    with torch.no_grad():  # student and teacher differ everywhere
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.encoder.named_parameters())
    copies = embed_paths(getattr(model.cfg, "teacher_copies", ()))
    model.after_step(3)
    decay = model.ema_decay(3)
    assert 0.9 < decay < 0.99
    for name, p in model.teacher.named_parameters():
        s = student[name].detach()
        copied = not student[name].requires_grad or (copies and name.startswith(copies))
        expected = s if copied else decay * before[name] + (1 - decay) * s
        assert_close(p, expected, atol=1e-6, rtol=1e-6, name=name)
    snapshot = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.after_step(3)  # the same step again: nothing changes
    assert all(torch.equal(p, snapshot[n]) for n, p in model.teacher.named_parameters())


@pytest.mark.parametrize("method, modality", PAIRS, ids=IDS)
def test_probe_features_have_one_row_per_position(method, modality):
    model = tiny_method(method, modality).eval()
    source = make_source(model.cfg, batch_size=3)
    features = model.probe_features(source)
    assert features.shape == (3, model.modality.num_positions(source), model.cfg.embed_dim)
    assert torch.isfinite(features).all() and not features.requires_grad


@pytest.mark.parametrize("method, modality", PAIRS, ids=IDS)
def test_export_round_trip_gives_the_same_encoder(method, modality, tmp_path):
    model = tiny_method(method, modality).eval()
    folder = save_pretrained(model.encoder.state_dict(), method, model.cfg, tmp_path / "export", "student")
    encoder = load_pretrained(folder, impl="torch")
    source = make_source(model.cfg, batch_size=2)
    with torch.no_grad():
        assert torch.equal(encoder(source), model.encoder(source))
