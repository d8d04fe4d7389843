"""The modality seam, the same checks for every modality: the embedding module it builds declares its
parts and gives the promised shapes, and its masks are [B * clones, N] with equal counts per row."""

from __future__ import annotations

import pytest
import torch

from d2v2.models import MODALITIES, modality_for
from d2v2.models.layers.embeddings import EMBED_PARTS
from tests.models.fixtures import make_source, tiny_config


@pytest.mark.parametrize("name", sorted(MODALITIES))
def test_embed_is_a_module_that_declares_its_parts(name):
    cfg = tiny_config("data2vec2", name)
    modality = modality_for(cfg)
    embed = modality.build_embed(cfg)
    assert isinstance(embed, torch.nn.Module)
    assert {n.split(".")[0] for n, _ in embed.named_parameters()} <= set(EMBED_PARTS)
    source = make_source(cfg, batch_size=2)
    feats, _ = embed.local_features(source)
    length = modality.num_positions(source)
    assert feats.shape == (2, length, cfg.embed_dim)
    tokens, _ = embed(feats)
    assert tokens.shape == (2, modality.num_extra_tokens + length, cfg.embed_dim)


@pytest.mark.parametrize("name", sorted(MODALITIES))
def test_masks_are_clone_major_with_equal_counts(name):
    cfg = tiny_config("data2vec2", name)
    modality = modality_for(cfg)
    source = make_source(cfg, batch_size=3)
    masks = modality.make_masks(3, source, torch.Generator().manual_seed(0))
    assert masks.dtype == torch.bool and masks.shape == (3 * cfg.clone_batch, modality.num_positions(source))
    assert masks.shape[0] == 3 * modality.clones
    counts = masks.sum(dim=1)
    assert (counts == counts[0]).all() and 0 < counts[0] < masks.shape[1]
