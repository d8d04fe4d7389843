"""bench/shapes.py: the reference shapes are the base recipes' (not copies), the EMA list is the teacher's."""

from __future__ import annotations

import math

import pytest

from d2v2.bench import shapes
from d2v2.models import data2vec2_config


def test_reference_shapes_are_the_base_recipes():
    vit, audio, text = (shapes.REFERENCE_SHAPES[n] for n in ("vit-b", "audio-base", "text-base"))
    # The data2vec 2.0 paper's per-GPU numbers (reference section 2), as the recipes and presets give them.
    assert (vit.batch, vit.clones, vit.length, vit.kept, vit.grid, vit.target_layers) == (16, 16, 196, 39, (14, 14), 10)
    assert (vit.target_final, vit.dec_dim, vit.dec_kernel, vit.dec_groups) == ("layer", 768, 3, 16)
    assert (audio.batch, audio.clones, audio.length, audio.kept, audio.target_layers) == (3, 8, 999, 500, 8)
    assert (audio.dec_dim, audio.dec_kernel, audio.alibi, audio.has_pos) == (384, 7, True, False)
    assert (text.batch, text.clones, text.length, text.kept, text.target_layers) == (4, 8, 512, 266, 12)
    assert (text.dec_groups, text.dec_residual, text.loss_scale) == (1, False, 1.0)
    assert all((s.dim, s.heads) == (768, 12) for s in (vit, audio, text))


def test_shapes_follow_the_recipe():
    # A changed recipe or preset changes the spec: nothing is copied.
    spec = shapes.spec_from_recipe("t", "text-tiny")
    cfg = data2vec2_config("text", "tiny")
    assert (spec.dim, spec.heads, spec.clones, spec.dec_dim) == (cfg.embed_dim, cfg.num_heads, cfg.clone_batch, cfg.decoder_dim)


@pytest.mark.parametrize("size, tensors, millions", [("base", 149, (85, 87))])
def test_ema_list_is_the_vit_b_teacher(size, tensors, millions):
    params = shapes.ema_parameter_shapes("image", size)
    assert len(params) == tensors and (768, 3, 16, 16) in params and (2304, 768) in params
    assert sum(s == (3072, 768) for s in params) == 12  # 2 prenet + 10 shared blocks
    assert (196, 768) not in params  # the fixed sin-cos positions are copied, never averaged
    assert millions[0] * 1e6 < sum(math.prod(s) for s in params) < millions[1] * 1e6
