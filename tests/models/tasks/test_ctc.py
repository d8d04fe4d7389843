"""Speech recognition's model: the CTC loss against a hand count of the paths, every audio method's encoder
with fine-tuning's masks (its own fill), the frozen-encoder phase, and masks that never reach padding."""

from __future__ import annotations

import math

import pytest
import torch

from d2v2.models import CTCHead, SpeechRecognizer, build_method
from d2v2.models.tasks import FrameMasking, ctc_loss

from ..fixtures import fit, tiny_config

AUDIO_METHODS = ["data2vec2", "data2vec", "wav2vec2"]


def recognizer(method: str, vocab: int = 8, **kwargs) -> tuple[SpeechRecognizer, object]:
    cfg = tiny_config(method, "audio", deterministic=True)
    built = build_method(method, cfg)
    model = SpeechRecognizer(built.encoder, built.modality, CTCHead(cfg.embed_dim, vocab), built.mask_fill(), **kwargs)
    return model, built


def test_ctc_loss_is_the_paths_counted_by_hand():
    # Utterance 1: 2 frames, label "a" (id 1): the paths a a, a -, - a. Utterance 2: 1 frame (1 of padding), label "b".
    logits = torch.randn(2, 2, 3)
    p = logits.softmax(-1)
    one = p[0, 0, 1] * p[0, 1, 1] + p[0, 0, 1] * p[0, 1, 0] + p[0, 0, 0] * p[0, 1, 1]
    two = p[1, 0, 2]
    labels, label_lengths = torch.tensor([[1], [2]]), torch.tensor([1, 1])
    loss = ctc_loss(logits, torch.tensor([2, 1]), labels, label_lengths)
    torch.testing.assert_close(loss, -(one.log() + two.log()) / 2)
    # A transcript longer than its frames cannot be aligned: it adds 0 (zero_infinity), not inf.
    impossible = ctc_loss(logits[:1, :1], torch.tensor([1]), torch.tensor([[1, 2]]), torch.tensor([2]))
    assert impossible.item() == 0.0 and math.isfinite(impossible.item())


@pytest.mark.parametrize("method", AUDIO_METHODS)
def test_every_audio_encoder_learns_with_its_own_mask_fill(method):
    model, built = recognizer(method, freeze_feature_encoder=True)
    cfg = built.cfg
    source = torch.randn(2, 16000)
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 9000:] = True
    masking = FrameMasking(model.modality, cfg.embed_dim, 0.3, 4, model.fill.min_spans, 0.2, 8)
    batch = {"source": source, "padding_mask": padding, "label": torch.tensor([[4, 5, 6], [7, 4, 1]]),
             "label_lengths": torch.tensor([3, 2]),
             **masking(torch.tensor([16000, 9000]), 16000, torch.Generator().manual_seed(0))}  # fmt: skip
    out, losses = fit(model, batch, steps=6)
    assert out["logits"].shape == (2, 49, 8) and out["lengths"].tolist() == [49, 27]
    assert losses[-1] < losses[0]
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []
    learned = model.fill.embedding is not None
    assert learned == (method != "data2vec2")  # data2vec 2.0 fills with noise, the others with their mask vector


def test_the_pretrained_mask_vector_comes_with_the_encoder():
    model, _ = recognizer("wav2vec2")
    _, pretrained = recognizer("wav2vec2")
    with torch.no_grad():
        pretrained.encoder.mask_emb.fill_(0.5)
    model.load_encoder(pretrained.encoder.state_dict(), pretrained)
    torch.testing.assert_close(model.fill.embedding, torch.full_like(model.fill.embedding, 0.5))
    x = torch.zeros(1, 3, model.fill.embedding.shape[0])
    mask = torch.tensor([[False, True, False]])
    channels = torch.zeros(1, x.shape[-1], dtype=torch.bool)
    channels[0, :4] = True
    filled = model.fill(x, mask, channels)
    assert (filled[0, 1, 4:] == 0.5).all() and (filled[0, :, :4] == 0).all() and (filled[0, 0] == 0).all()


def test_the_encoder_stays_frozen_for_the_first_updates():
    model, _ = recognizer("data2vec2", freeze_updates=2)
    batch = {"source": torch.randn(1, 8000), "label": torch.tensor([[4, 5]]), "label_lengths": torch.tensor([2])}
    model(batch)["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.linear.weight.grad is not None and model.skips_parameters  # DDP must expect unused parameters
    model.zero_grad()
    model.after_step(2)
    model(batch)["loss"].backward()
    assert model.encoder.blocks[0].mlp.fc1.weight.grad is not None


def test_frame_masks_stay_within_each_utterance():
    cfg = tiny_config("data2vec2", "audio")
    model, _ = recognizer("data2vec2")
    masking = FrameMasking(model.modality, cfg.embed_dim, 0.65, 10, 1, 0.5, 16)
    lengths = torch.tensor([48000, 20000, 32000])
    masks = masking(lengths, 48000, torch.Generator().manual_seed(1))
    own = model.modality.num_frames(lengths)
    mask = masks["mask"]
    assert mask.shape == (3, int(model.modality.num_frames(48000)))
    counts = mask.sum(1)
    assert (counts == counts[0]).all() and counts[0] > 0  # the same count in every row (require_same_masks)
    for row, frames in enumerate(own.tolist()):
        assert not mask[row, frames:].any()  # padding is never masked
    assert masks["channel_mask"].shape == (3, cfg.embed_dim) and masks["channel_mask"].any()
    again = masking(lengths, 48000, torch.Generator().manual_seed(1))
    assert torch.equal(again["mask"], mask)  # a pure function of the generator
