"""Tests for d2v2.models.layers.masking: exact counts, mask structure, randomness, mask_to_ids, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2v2.models.layers.masking import (
    _block_union,
    _equalise,
    inverse_block_mask,
    mask_to_ids,
    random_mask,
    span_mask,
    wav2vec_span_mask,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_mask(mask: torch.Tensor, batch: int, length: int, masked: int):
    assert mask.shape == (batch, length)
    assert mask.dtype == torch.bool and mask.device.type == "cpu"
    counts = mask.sum(dim=1)
    assert (counts == masked).all(), f"masked per row {counts.unique().tolist()}, expected {masked}"


# --------------------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize(
    "grid, mask_ratio, block, adjust, masked",
    [
        (14, 0.8, 3, 0.07, 157),  # image base: keeps floor(196 * 0.2) = 39
        (14, 0.75, 3, 0.1, 147),  # image large: keeps 49
        (16, 0.75, 3, 0.1, 192),  # image huge, patch 14 (224 / 14 = 16): keeps 64
        ((7, 9), 0.6, 2, 0.07, 38),  # non-square, even block: keeps floor(63 * 0.4) = 25
        ((3, 5), 0.5, 7, 0.0, 8),  # block wider than the grid: keeps floor(7.5) = 7
        ((1, 1), 0.0, 3, 0.07, 0),  # one patch, nothing masked
        (14, 0.0, 3, 0.07, 0),  # ratio 0 keeps everything
    ],
)
def test_inverse_block_mask_exact_count(grid, mask_ratio, block, adjust, masked):
    mask = inverse_block_mask(64, grid, mask_ratio, block=block, adjust=adjust, generator=_gen())
    length = grid * grid if isinstance(grid, int) else grid[0] * grid[1]
    _assert_mask(mask, 64, length, masked)


@pytest.mark.parametrize(
    "length, mask_ratio, span, adjust, masked",
    [
        (999, 0.5, 5, 0.05, 499),  # audio base, 20 s: floor(499.5)
        (999, 0.55, 5, 0.1, 549),  # audio large: floor(549.45)
        (100, 0.29, 5, 0.05, 29),  # 100 * 0.29 is 28.999999999999996 in binary floating point
        (7, 0.3, 9, 0.05, 2),  # span longer than the sequence
        (1, 0.0, 5, 0.05, 0),  # one frame, nothing masked
    ],
)
def test_span_mask_exact_count(length, mask_ratio, span, adjust, masked):
    mask = span_mask(32, length, mask_ratio, span=span, adjust=adjust, generator=_gen())
    _assert_mask(mask, 32, length, masked)


@pytest.mark.parametrize(
    "length, mask_ratio, masked",
    [
        (512, 0.48, 246),  # text base: keeps floor(512 * 0.52) = 266
        (512, 0.5, 256),  # text large
        (100, 0.29, 29),  # 100 * (1 - 0.29) is 70.99999999999999 in floating point; keeps 71
        (17, 0.33, 6),  # odd length: keeps floor(11.39) = 11
        (1, 0.0, 0),
    ],
)
def test_random_mask_exact_count(length, mask_ratio, masked):
    mask = random_mask(32, length, mask_ratio, generator=_gen())
    _assert_mask(mask, 32, length, masked)


def test_clone_major_batch_of_released_size():
    # 16 images x 16 clones in one call, as the image loader draws them: every row is exact.
    mask = inverse_block_mask(16 * 16, 14, 0.8, generator=_gen())
    _assert_mask(mask, 256, 196, 157)
    assert mask.view(16, 16, 196).unique(dim=1).shape[1] == 16  # no two clones share a mask


# ----------------------------------------------------------------------------------------- structure


def test_block_union_squares_are_clamped_not_shifted():
    # 6 x 6 grid; centre (0, 0) with b = 3: offsets -1..1 clamp to rows/cols 0..1.
    corner = _block_union(torch.tensor([[0]]), 6, 6, 3).view(6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:2, 0:2] = True
    assert torch.equal(corner, expected)
    # centre (5, 0) with even b = 4: offsets -2..1, rows 3..6 -> 3..5, cols -2..1 -> 0..1.
    edge = _block_union(torch.tensor([[5 * 6 + 0]]), 6, 6, 4).view(6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[3:6, 0:2] = True
    assert torch.equal(edge, expected)
    # an interior centre (2, 3) with b = 3 covers the full square; two overlapping centres union.
    both = _block_union(torch.tensor([[2 * 6 + 3, 3 * 6 + 3]]), 6, 6, 3).view(6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:5, 2:5] = True
    assert torch.equal(both, expected)


def test_block_union_spans_in_1d():
    # length 10, span 5 (offsets -2..2): centre 1 covers 0..3 (clamped), centre 9 covers 7..9.
    union = _block_union(torch.tensor([[1, 9], [5, 5]]), 1, 10, 5, two_d=False)
    expected = torch.tensor(
        [[1, 1, 1, 1, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(union, expected)


@pytest.mark.parametrize(
    "grid, mask_ratio, adjust",
    [(14, 0.8, 0.07), (14, 0.75, 0.1), (16, 0.75, 0.1)],  # base, large, huge-14
)
def test_block_count_before_equalising_is_near_target(grid, mask_ratio, adjust):
    # `adjust` exists so that the union of the drawn squares lands near the kept count on average.
    length, keep = grid * grid, 1 - mask_ratio
    target = math.floor(length * keep)
    centres = torch.randint(length, (2048, math.floor(length * (keep + adjust) / 9)), generator=_gen())
    mean_union = _block_union(centres, grid, grid, 3).sum(dim=1).float().mean().item()
    assert abs(mean_union - target) < 0.1 * target, (mean_union, target)


def _fraction_with_kept_neighbour(kept: torch.Tensor, height: int, width: int) -> float:
    grid = kept.view(-1, 1, height, width).float()
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    neighbours = F.conv2d(grid, cross, padding=1)
    return ((neighbours > 0) & (grid > 0)).sum().item() / grid.sum().item()


def test_inverse_block_mask_keeps_blocks():
    # Base config: nearly every kept patch touches another (about 0.95), where a uniformly random
    # mask with the same ratio gives about 1 - 0.8^4 = 0.59.
    blocks = ~inverse_block_mask(512, 14, 0.8, generator=_gen(1))
    scattered = ~random_mask(512, 196, 0.8, generator=_gen(1))
    assert _fraction_with_kept_neighbour(blocks, 14, 14) > 0.9
    assert _fraction_with_kept_neighbour(scattered, 14, 14) < 0.65


def _fraction_in_long_runs(mask: torch.Tensor, span: int) -> float:
    """Fraction of masked frames lying in a run of at least ``span`` consecutive masked frames."""
    full_windows = mask.unfold(1, span, 1).all(dim=-1).float()  # [rows, T - span + 1]
    covered = F.max_pool1d(F.pad(full_windows[:, None], (span - 1, span - 1)), span, stride=1)[:, 0] > 0
    return (covered & mask).sum().item() / mask.sum().item()


def test_span_mask_masks_runs():
    # Audio base: about 0.87 of the masked frames are in runs >= 5; the rest are the single frames
    # that pad the union up to the exact count. A uniformly random mask gives about 0.19.
    spans = span_mask(64, 999, 0.5, generator=_gen(1))
    scattered = random_mask(64, 999, 0.5, generator=_gen(1))
    assert _fraction_in_long_runs(spans, 5) > 0.8
    assert _fraction_in_long_runs(scattered, 5) < 0.3


def test_equalise_trims_within_and_pads_outside_the_selection_uniformly():
    rows = 4000
    selected = torch.zeros(rows, 40, dtype=torch.bool)
    selected[:, :20] = True
    trimmed = _equalise(selected, 10, _gen())  # surplus: keep 10 of the 20 selected
    assert not trimmed[:, 20:].any()
    frequency = trimmed[:, :20].float().mean(dim=0)  # 0.5 each; std 0.008 over 4000 rows
    assert (frequency - 0.5).abs().max() < 0.05, frequency
    padded = _equalise(selected, 30, _gen())  # shortfall: all 20 plus 10 of the other 20
    assert padded[:, :20].all()
    frequency = padded[:, 20:].float().mean(dim=0)
    assert (frequency - 0.5).abs().max() < 0.05, frequency


# -------------------------------------------------------------------------------------- randomness


@pytest.mark.parametrize(
    "make",
    [
        lambda g: inverse_block_mask(16, 14, 0.8, generator=g),
        lambda g: span_mask(16, 999, 0.5, generator=g),
        lambda g: random_mask(16, 512, 0.48, generator=g),
    ],
    ids=["block", "span", "random"],
)
def test_reproducible_from_the_generator(make):
    assert torch.equal(make(_gen(7)), make(_gen(7)))
    assert not torch.equal(make(_gen(7)), make(_gen(8)))
    generator = _gen(7)
    assert not torch.equal(make(generator), make(generator))  # the stream advances
    torch.manual_seed(3)
    first = make(None)
    torch.manual_seed(3)
    assert torch.equal(make(None), first)  # None draws from the global generator


def test_rows_are_independent_draws():
    # Kept sets of independent uniform 266-of-512 draws overlap by 266^2 / 512 = 138.2 on average
    # (std of the mean over 511 pairs about 0.25); identical or anti-correlated rows would not.
    kept = ~random_mask(512, 512, 0.48, generator=_gen())
    overlap = (kept[1:] & kept[:-1]).sum(dim=1).float().mean().item()
    assert abs(overlap - 266**2 / 512) < 1.5, overlap
    # Every position is masked equally often: 246 / 512 = 0.48 (std about 0.022 over 512 rows).
    assert ((~kept).float().mean(dim=0) - 246 / 512).abs().max() < 0.12
    for mask in (inverse_block_mask(256, 14, 0.8, generator=_gen()), span_mask(256, 999, 0.5, generator=_gen())):
        assert mask.unique(dim=0).shape[0] == 256  # no two rows alike
        # Adjacent rows overlap as much as far-apart rows do.
        near = (mask[1:129] & mask[:128]).sum(dim=1).float().mean()
        far = (mask[128:] & mask[:128]).sum(dim=1).float().mean()
        assert abs(near - far) < 0.02 * mask.shape[1], (near, far)


def test_span_mask_reaches_both_ends():
    mask = span_mask(256, 999, 0.5, generator=_gen())
    frequency = mask.float().mean(dim=0)
    assert frequency[0] > 0.2 and frequency[-1] > 0.2  # clamped spans cover the border frames
    assert frequency.min() > 0.2


# ------------------------------------------------------------------------------------- mask_to_ids


@pytest.mark.parametrize(
    "mask",
    [
        lambda: inverse_block_mask(8, 14, 0.8, generator=_gen()),
        lambda: span_mask(8, 101, 0.5, generator=_gen()),  # odd length
        lambda: torch.ones(3, 5, dtype=torch.bool),  # everything masked: kept = 0
        lambda: torch.zeros(1, 4, dtype=torch.bool),  # one row, nothing masked
    ],
    ids=["block", "span", "all-masked", "none-masked"],
)
def test_mask_to_ids(mask):
    mask = mask()
    ids = mask_to_ids(mask)
    num_keep = int((~mask[0]).sum())
    assert ids.shape == (mask.shape[0], num_keep) and ids.dtype == torch.int64
    for row, row_ids in zip(mask, ids):  # plain per-row reference
        assert torch.equal(row_ids, torch.arange(mask.shape[1])[~row])
    if num_keep > 1:
        assert (ids.diff(dim=1) > 0).all()
    assert not mask.gather(1, ids).any()


def test_mask_to_ids_rejects_bad_masks():
    with pytest.raises(ValueError, match="row 0 keeps 3, row 1 keeps 2"):
        mask_to_ids(torch.tensor([[0, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D bool"):
        mask_to_ids(torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2-D bool"):
        mask_to_ids(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one row"):
        mask_to_ids(torch.zeros(0, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.Tensor"):
        mask_to_ids([[True, False]])


# ------------------------------------------------------------------------------------------ bad input


class _CudaLikeGenerator(torch.Generator):
    """A CPU generator that reports a CUDA device: no CUDA build is needed to test the check."""

    device = torch.device("cuda")


BLOCK_ARGS = dict(batch=4, grid=14, mask_ratio=0.8)
SPAN_ARGS = dict(batch=4, length=50, mask_ratio=0.5)
RANDOM_ARGS = dict(batch=4, length=50, mask_ratio=0.5)


@pytest.mark.parametrize(
    "fn, base, override, match",
    [
        (inverse_block_mask, BLOCK_ARGS, dict(batch=0), "batch must be a positive int"),
        (inverse_block_mask, BLOCK_ARGS, dict(batch=2.0), "batch must be a positive int"),
        (inverse_block_mask, BLOCK_ARGS, dict(batch=True), "batch must be a positive int"),
        (inverse_block_mask, BLOCK_ARGS, dict(grid=0), "grid height must be a positive int"),
        (inverse_block_mask, BLOCK_ARGS, dict(grid=(14, -1)), "grid width must be a positive int"),
        (inverse_block_mask, BLOCK_ARGS, dict(grid=(14, 14.0)), "grid width must be a positive int"),
        (inverse_block_mask, BLOCK_ARGS, dict(grid=(14,)), "grid must be an int or a pair"),
        (inverse_block_mask, BLOCK_ARGS, dict(grid="14"), "grid must be an int or a pair"),
        (inverse_block_mask, BLOCK_ARGS, dict(mask_ratio=1.0), r"mask_ratio must be a float in \[0, 1\)"),
        (inverse_block_mask, BLOCK_ARGS, dict(mask_ratio=-0.1), r"mask_ratio must be a float in \[0, 1\)"),
        (inverse_block_mask, BLOCK_ARGS, dict(mask_ratio=float("nan")), "mask_ratio must be a float"),
        (inverse_block_mask, BLOCK_ARGS, dict(mask_ratio="0.8"), "mask_ratio must be a float"),
        (inverse_block_mask, BLOCK_ARGS, dict(block=0), "block must be a positive int"),
        (inverse_block_mask, BLOCK_ARGS, dict(adjust=-0.01), "adjust must be a finite float >= 0"),
        (inverse_block_mask, BLOCK_ARGS, dict(adjust=float("inf")), "adjust must be a finite float >= 0"),
        (inverse_block_mask, BLOCK_ARGS, dict(grid=2), r"keeps floor\(4 \* 0.2\) = 0 of 4 patches"),
        (inverse_block_mask, BLOCK_ARGS, dict(generator=0), "generator must be a torch.Generator"),
        (inverse_block_mask, BLOCK_ARGS, dict(generator=_CudaLikeGenerator()), "must be a CPU generator"),
        (span_mask, SPAN_ARGS, dict(batch=-1), "batch must be a positive int"),
        (span_mask, SPAN_ARGS, dict(length=0), "length must be a positive int"),
        (span_mask, SPAN_ARGS, dict(mask_ratio=1.5), r"mask_ratio must be a float in \[0, 1\)"),
        (span_mask, SPAN_ARGS, dict(span=0), "span must be a positive int"),
        (span_mask, SPAN_ARGS, dict(adjust=float("nan")), "adjust must be a finite float >= 0"),
        (span_mask, SPAN_ARGS, dict(mask_ratio=1 - 1e-12), "masks all 50 frames"),
        (span_mask, SPAN_ARGS, dict(generator="seed"), "generator must be a torch.Generator"),
        (random_mask, RANDOM_ARGS, dict(batch=0), "batch must be a positive int"),
        (random_mask, RANDOM_ARGS, dict(length=-3), "length must be a positive int"),
        (random_mask, RANDOM_ARGS, dict(mask_ratio=1), r"mask_ratio must be a float in \[0, 1\)"),
        (random_mask, RANDOM_ARGS, dict(length=3, mask_ratio=0.7), r"keeps floor\(3 \* 0.3\) = 0 of 3 tokens"),
        (random_mask, RANDOM_ARGS, dict(generator=_CudaLikeGenerator()), "must be a CPU generator"),
    ],
)
def test_bad_arguments_raise(fn, base, override, match):
    with pytest.raises(ValueError, match=match):
        fn(**{**base, **override})


def test_numpy_integers_and_ratios_are_accepted():
    # Data-loader code often holds sizes as numpy scalars.
    mask = inverse_block_mask(np.int64(2), (np.int64(14), np.int32(14)), np.float64(0.8), generator=_gen())
    _assert_mask(mask, 2, 196, 157)


# -- wav2vec 2.0 span masks ------------------------------------------------------------------------


def test_wav2vec_span_mask_masks_about_half_in_equal_counts():
    mask = wav2vec_span_mask(16, 999, 0.65, 10, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(dim=1)
    assert mask.dtype == torch.bool and mask.shape == (16, 999)
    assert (counts == counts[0]).all()
    assert 0.40 < counts[0].item() / 999 < 0.55  # the reference's ~49 %


def test_wav2vec_span_mask_is_spans_before_trimming_and_reproducible():
    g = torch.Generator().manual_seed(3)
    one_row = wav2vec_span_mask(1, 200, 0.65, 10, generator=g)  # a single row is never trimmed
    runs = torch.diff(torch.cat([torch.tensor([0]), one_row[0].int(), torch.tensor([0])])).nonzero().flatten()
    lengths = (runs[1::2] - runs[0::2]).tolist()
    assert all(n >= 10 for n in lengths[:-1]) and sum(lengths) == int(one_row.sum())  # merged spans of >= 10
    again = wav2vec_span_mask(1, 200, 0.65, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one_row, again)


def test_wav2vec_span_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mask_prob"):
        wav2vec_span_mask(2, 100, 1.5)
    with pytest.raises(ValueError, match="cannot place"):
        wav2vec_span_mask(2, 3, 0.65, 10, min_masks=5)
