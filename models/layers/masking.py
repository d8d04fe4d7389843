"""Mask generators: data2vec 2.0's inverse block masks (images), span masks (audio) and uniform random
masks (text), wav2vec 2.0's span masks (also data2vec 1.0's for audio), data2vec 1.0's text spans and
BEiT's block-wise image masks, plus the conversion from a mask to the kept-token indices the student
gathers.

All generators are pure functions of their arguments and a ``torch.Generator``; they run on the CPU
(in the data-loader workers, as the reference does) and return a bool tensor ``[batch, length]`` with
True = masked and exactly the same number of masked positions in every row, so the student sequence
is a dense ``[batch, kept, D]`` tensor. Every row is an independent draw. For ``B`` samples with ``K``
masks each, call with ``batch = B * K`` (or once per sample with ``batch = K`` and concatenate): rows
``i * K .. i * K + K - 1`` are then sample ``i``'s masks, the clone-major order the kernels expect.

The algorithms follow the reference (data2vec 2.0, Baevski et al. 2022, arXiv:2212.07525; fairseq
``data_utils.compute_block_mask_2d`` / ``compute_block_mask_1d`` and ``modalities/base.random_masking``;
fairseq ``examples/data2vec/data/modality.py`` and ``modalities/base.py: compute_mask``):

- ``inverse_block_mask``: pick ``floor(L * (p + adjust) / block**2)`` block centres with replacement
  (p = 1 - mask_ratio, the kept fraction), select a ``block x block`` square around each, clamped to the
  grid, equalise the selection to exactly ``floor(L * p)`` cells, and keep the selected cells.
- ``span_mask``: the same in 1-D with spans of ``span`` frames, ``floor(T * (mask_ratio + adjust) / span)``
  centres, equalised to exactly ``floor(T * mask_ratio)`` masked frames (not inverted).
- ``random_mask``: keep a uniformly random ``floor(L * (1 - mask_ratio))``-subset of the positions.
- ``wav2vec_span_mask``: wav2vec 2.0's ``compute_mask_indices`` (static spans, ``require_same_masks``):
  span starts drawn without replacement with a probabilistically rounded count (at least
  ``min_masks``), overlapping spans merged, then every row trimmed to the smallest row's count.

Equalising draws a uniform score per cell, adds 1 to the cells already selected and keeps the top
``count`` per row: a surplus is trimmed to a uniformly random subset of the selection, a shortfall is
filled with a uniformly random subset of the unselected cells (single cells, not blocks), as in the
reference, but with one vectorised ``topk`` instead of a loop over rows.

Limits:
- CPU only: a CUDA generator is rejected; move the result to the GPU with the batch.
- Random streams differ from fairseq's, so masks match the reference in distribution, not bit for bit.
- Counts are floors of ``length * fraction`` taken after rounding to 9 decimals, so binary rounding
  cannot lose a token (``100 * (1 - 0.29)`` is 70.99999999999999 in floating point; the count is 71).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

__all__ = [
    "inverse_block_mask", "span_mask", "random_mask", "wav2vec_span_mask", "mlm_span_mask", "beit_block_mask",
    "mask_to_ids",
]  # fmt: skip


def inverse_block_mask(
    batch: int,
    grid: int | Sequence[int],
    mask_ratio: float,
    block: int = 3,
    adjust: float = 0.07,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Image masks: the visible patches form (clamped) ``block x block`` squares; everything else is masked.

    Args:
        batch: number of masks (rows) to draw.
        grid: patch grid ``(H, W)``, or ``d`` for a ``d x d`` grid; L = H * W.
        mask_ratio: fraction R of patches to mask, in [0, 1); exactly ``L - floor(L * (1 - R))`` are.
        block: side b of the visible squares.
        adjust: extra kept fraction A used only to choose how many squares to draw, compensating for
            overlaps and clamping (base 0.07, large/huge 0.1).
        generator: CPU generator to draw from; None uses the global one.

    Returns:
        bool ``[batch, H * W]``, True = masked, row-major over the grid.
    """
    batch, (height, width) = _check_count("batch", batch), _check_grid(grid)
    mask_ratio, block, adjust = _check_ratio(mask_ratio), _check_count("block", block), _check_adjust(adjust)
    _check_generator(generator)
    length = height * width
    keep_fraction = 1.0 - mask_ratio
    num_keep = _floor_count(length * keep_fraction)
    if num_keep == 0:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps floor({length} * {keep_fraction:g}) = 0 of {length} patches; "
            f"use a ratio of at most {1 - 1 / length:g}"
        )
    num_blocks = _floor_count(length * (keep_fraction + adjust) / block**2)
    centres = torch.randint(length, (batch, num_blocks), generator=generator)
    selected = _block_union(centres, height, width, block)
    return ~_equalise(selected, num_keep, generator)


def span_mask(
    batch: int,
    length: int,
    mask_ratio: float,
    span: int = 5,
    adjust: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Audio masks: spans of ``span`` frames, then exactly ``floor(length * mask_ratio)`` masked per row.

    Args:
        batch: number of masks (rows) to draw.
        length: number of frames T (of the full utterance the mask is made for).
        mask_ratio: fraction R of frames to mask, in [0, 1).
        span: length of each masked span, centred on its centre frame (offsets ``-(span // 2)`` ..
            ``span - 1 - span // 2``), clamped to the sequence.
        adjust: extra fraction A used only to choose how many spans to draw (base 0.05, large 0.1).
        generator: CPU generator to draw from; None uses the global one.

    Returns:
        bool ``[batch, length]``, True = masked.
    """
    batch, length = _check_count("batch", batch), _check_count("length", length)
    mask_ratio, span, adjust = _check_ratio(mask_ratio), _check_count("span", span), _check_adjust(adjust)
    _check_generator(generator)
    num_masked = _floor_count(length * mask_ratio)
    if num_masked == length:  # only reachable through the rounding in _floor_count
        raise ValueError(f"mask_ratio={mask_ratio} masks all {length} frames; use a smaller ratio")
    num_spans = _floor_count(length * (mask_ratio + adjust) / span)
    centres = torch.randint(length, (batch, num_spans), generator=generator)
    selected = _block_union(centres, 1, length, span, two_d=False)
    return _equalise(selected, num_masked, generator)


def random_mask(
    batch: int,
    length: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Text masks: keep a uniformly random ``floor(length * (1 - mask_ratio))``-subset of the tokens.

    Args:
        batch: number of masks (rows) to draw.
        length: number of tokens L.
        mask_ratio: fraction R of tokens to mask, in [0, 1) (text base 0.48: 266 of 512 kept).
        generator: CPU generator to draw from; None uses the global one.

    Returns:
        bool ``[batch, length]``, True = masked.
    """
    batch, length = _check_count("batch", batch), _check_count("length", length)
    mask_ratio = _check_ratio(mask_ratio)
    _check_generator(generator)
    keep_fraction = 1.0 - mask_ratio
    num_keep = _floor_count(length * keep_fraction)
    if num_keep == 0:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps floor({length} * {keep_fraction:g}) = 0 of {length} tokens; "
            f"use a ratio of at most {1 - 1 / length:g}"
        )
    nothing_selected = torch.zeros(batch, length, dtype=torch.bool)
    return ~_equalise(nothing_selected, num_keep, generator)


def wav2vec_span_mask(
    batch: int,
    length: int,
    mask_prob: float = 0.65,
    span: int = 10,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """wav2vec 2.0 / data2vec 1.0 audio masks (fairseq ``compute_mask_indices``, static lengths, no
    overlap avoidance, ``require_same_masks``): p = 0.65, span 10 masks about 49 % of the frames.

    Per row of ``size`` frames (``length``, or the row's own entry of ``lengths``: a padded batch, as
    fine-tuning masks it): ``n = max(min_masks, int(mask_prob * size / span + u))`` with u ~ U(0, 1)
    (probabilistic rounding), n distinct span starts drawn uniformly from ``[0, size - span)`` (the
    reference's ``np.random.choice(sz - min_len, n, replace=False)``), each masking ``span`` frames (cut
    at the row's end, so padding is never masked); overlaps merge; n = 0 masks nothing. Then every row
    keeps a uniformly random subset of its masked frames of the size of the smallest row's, so all rows
    mask the same number of frames.

    Returns:
        bool ``[batch, length]``, True = masked.
    """
    batch, length = _check_count("batch", batch), _check_count("length", length)
    span, min_masks = _check_count("span", span), int(min_masks)
    mask_prob = _check_prob(mask_prob)
    if min_masks < 0:
        raise ValueError(f"min_masks must be >= 0, got {min_masks}")
    _check_generator(generator)
    sizes = [length] * batch if lengths is None else [int(n) for n in lengths]
    if len(sizes) != batch or not all(1 <= n <= length for n in sizes):
        raise ValueError(f"lengths must give {batch} row lengths in [1, {length}], got {sizes}")
    rounding = torch.rand(batch, generator=generator)
    selected = torch.zeros(batch, length, dtype=torch.bool)
    for row, (size, u) in enumerate(zip(sizes, rounding.tolist())):
        count = max(min_masks, int(mask_prob * size / span + u))
        if count == 0:
            continue
        min_len = span if size - span > count else size - count - 1
        if min_len < 0 or size - min_len < count:
            raise ValueError(
                f"cannot place {count} spans of {span} in {size} frames; use longer clips (or a smaller mask_prob/span)"
            )
        starts = torch.randperm(size - min_len, generator=generator)[:count]
        _mark_spans(selected[row, :size], starts, span)
    num_masked = int(selected.sum(dim=1).min())
    if num_masked >= min(sizes):
        raise ValueError(f"the spans cover all {min(sizes)} frames of a row; use longer clips (or a smaller mask_prob/span)")
    return _equalise(selected, num_masked, generator)


def mlm_span_mask(
    batch: int,
    length: int,
    mask_prob: float = 0.35,
    span: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """data2vec 1.0 text masks (fairseq ``MaskTokensDataset`` with ``mask_multiple_length``, no random
    or unchanged replacement): p = 0.35, spans of 4 tokens.

    Per row: ``n = int(mask_prob * length / span + u)`` with u ~ U(0, 1) (probabilistic rounding), n
    distinct span starts drawn uniformly from all ``length`` positions (the reference's
    ``np.random.choice(sz, n, replace=False)``), each masking ``span`` tokens cut at the end; overlaps
    merge (about 30 % of the tokens end up masked at p = 0.35, span 4). Then every row keeps a
    uniformly random subset of its masked tokens of the size of the smallest row's (at least one),
    so all rows mask the same number of tokens (the reference's counts vary by row; the student sees
    every position either way, the equal counts only keep the batch's masks one dense tensor).

    Returns:
        bool ``[batch, length]``, True = masked.
    """
    batch, length, span = _check_count("batch", batch), _check_count("length", length), _check_count("span", span)
    mask_prob = _check_prob(mask_prob)
    if length < 2:
        raise ValueError(f"length must be >= 2 to mask some but not all tokens, got {length}")
    _check_generator(generator)
    rounding = torch.rand(batch, generator=generator)
    selected = torch.zeros(batch, length, dtype=torch.bool)
    for row, u in enumerate(rounding):
        count = min(length, max(1, int(mask_prob * length / span + float(u))))
        starts = torch.randperm(length, generator=generator)[:count]
        _mark_spans(selected[row], starts, span)
    num_masked = min(int(selected.sum(dim=1).min()), length - 1)
    return _equalise(selected, num_masked, generator)


def beit_block_mask(
    batch: int,
    grid: int | Sequence[int],
    num_masked: int = 75,
    min_block: int = 16,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """data2vec 1.0 image masks: BEiT's block-wise masking (``MaskingGenerator``), exactly
    ``num_masked`` patches per row (75 of 196 in the release, about 38 %).

    Per row, blocks are added while fewer than ``num_masked`` patches are masked: with r the patches
    still to mask, up to 10 attempts draw an area uniformly between ``min_block`` and r and a log-uniform
    aspect ratio in [min_aspect, 1 / min_aspect], round the block to h = round(sqrt(area * aspect)),
    w = round(sqrt(area / aspect)) (both smaller than the grid), place it uniformly, and accept it when
    it adds between 1 and r new patches. A row stops when no attempt adds anything; BEiT then leaves it
    short, here it is filled up to exactly ``num_masked`` with uniformly random single patches, so every
    row masks the same number.

    Args:
        batch: number of masks (rows) to draw.
        grid: patch grid ``(H, W)``, or ``d`` for a ``d x d`` grid.
        num_masked: patches to mask per row, in [1, H * W).
        min_block: smallest block area (BEiT's ``min_num_patches``, 16).
        min_aspect: smallest aspect ratio h / w (0.3; the largest is its inverse).
        generator: CPU generator to draw from; None uses the global one.

    Returns:
        bool ``[batch, H * W]``, True = masked, row-major over the grid.
    """
    batch, (height, width) = _check_count("batch", batch), _check_grid(grid)
    num_masked, min_block = _check_count("num_masked", num_masked), _check_count("min_block", min_block)
    if num_masked >= height * width:
        raise ValueError(f"num_masked must be below the {height * width} patches of the grid, got {num_masked}")
    if isinstance(min_aspect, bool) or not isinstance(min_aspect, numbers.Real) or not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be a float in (0, 1], got {min_aspect!r}")
    _check_generator(generator)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    for mask in masks:
        count = 0
        while count < num_masked:  # every pass adds >= 1 patch or stops
            added = _beit_block(mask, num_masked - count, min_block, log_aspect, generator)
            if added == 0:
                break
            count += added
    return _equalise(masks.view(batch, -1), num_masked, generator)


def _beit_block(
    mask: torch.Tensor, limit: int, min_block: int, log_aspect: tuple[float, float], generator
) -> int:
    """Try (at most 10 times) to mask one block adding 1 .. ``limit`` new patches to ``mask`` [H, W]
    in place; returns how many it added (0: every attempt failed)."""
    height, width = mask.shape
    for u_area, u_aspect, u_top, u_left in torch.rand(10, 4, generator=generator).tolist():
        area = min_block + (limit - min_block) * u_area  # uniform between min_block and limit
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (w < width and h < height):
            continue
        top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
        block = mask[top : top + h, left : left + w]
        new = h * w - int(block.sum())
        if 0 < new <= limit:
            block.fill_(True)
            return new
    return 0


def mask_to_ids(mask: torch.Tensor) -> torch.Tensor:
    """Kept positions of each row, ascending: ``ids_keep`` int64 ``[rows, kept]`` for gather/scatter_tokens.

    Every row must keep the same number of positions (the generators above guarantee it); the check
    and ``nonzero`` sync with the host, so call this in the data loader, not on the GPU hot path.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"mask must be a 2-D bool tensor [rows, length], got {str(mask.dtype).replace('torch.', '')} "
            f"of shape {list(mask.shape)}"
        )
    rows = mask.shape[0]
    if rows == 0:
        raise ValueError("mask must have at least one row, got shape [0, ...]")
    kept = ~mask
    kept_per_row = kept.sum(dim=1)
    num_keep = int(kept_per_row[0])
    unequal = kept_per_row != num_keep
    if bool(unequal.any()):
        row = int(unequal.nonzero()[0])
        raise ValueError(
            f"mask rows must all keep the same number of positions; row 0 keeps {num_keep}, "
            f"row {row} keeps {int(kept_per_row[row])}"
        )
    # nonzero lists (row, column) pairs in row-major order, so each row's columns come out ascending.
    return kept.nonzero()[:, 1].reshape(rows, num_keep)


def _block_union(
    centres: torch.Tensor, height: int, width: int, block: int, two_d: bool = True
) -> torch.Tensor:
    """bool ``[rows, height * width]``: the union of the ``block x block`` squares (or, when ``two_d`` is
    False, the ``block``-long spans along each grid row) around each row's ``centres`` (int64
    ``[rows, n]``, flat indices). Cells past the border are clamped onto it, so edge squares are
    truncated, not shifted."""
    num_rows = centres.shape[0]
    offsets = torch.arange(block) - block // 2  # -(b // 2) .. b - 1 - b // 2: not centred for even b
    centre_y, centre_x = centres // width, centres % width
    xs = (centre_x[..., None] + offsets).clamp_(0, width - 1)  # [rows, n, b]
    if two_d:
        ys = (centre_y[..., None] + offsets).clamp_(0, height - 1)  # [rows, n, b]
        cells = ys[..., :, None] * width + xs[..., None, :]  # [rows, n, b, b]
    else:
        cells = centre_y[..., None] * width + xs  # [rows, n, b]
    selected = torch.zeros(num_rows, height * width, dtype=torch.bool)
    return selected.scatter_(1, cells.reshape(num_rows, -1), True)


def _equalise(selected: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """Exactly ``count`` True cells per row: a uniformly random ``count``-subset of the row's selected
    cells when it has that many, otherwise all of them plus a uniformly random subset of the others."""
    scores = torch.rand(selected.shape, generator=generator)  # [rows, length] in [0, 1)
    scores += selected  # selected cells score in [1, 2): they all outrank every unselected cell
    chosen = scores.topk(count, dim=1, sorted=False).indices  # [rows, count]
    return torch.zeros_like(selected).scatter_(1, chosen, True)


def _mark_spans(row: torch.Tensor, starts: torch.Tensor, span: int) -> None:
    """Set ``span`` cells from each of ``starts`` in the bool row [length], in place; spans are cut at the end."""
    cells = (starts[:, None] + torch.arange(span)).flatten()
    row[cells[cells < row.shape[0]]] = True


def _floor_count(value: float) -> int:
    """floor(value) for counts, after rounding to 9 decimals so that 70.99999999999999 counts as 71."""
    return math.floor(round(value, 9))


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_grid(grid: object) -> tuple[int, int]:
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, Sequence) or isinstance(grid, (str, bytes)) or len(grid) != 2:
        raise ValueError(f"grid must be an int or a pair (height, width) of positive ints, got {grid!r}")
    return _check_count("grid height", grid[0]), _check_count("grid width", grid[1])


def _check_ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"mask_ratio must be a float in [0, 1), got {value!r}")
    return float(value)


def _check_prob(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"mask_prob must be a float in (0, 1), got {value!r}")
    return float(value)


def _check_adjust(value: object) -> float:
    # The reference only ever adds to the fraction (overlaps and clamping can only lose cells).
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < math.inf:
        raise ValueError(f"adjust must be a finite float >= 0, got {value!r}")
    return float(value)


def _check_generator(generator: object) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator got {generator.device}")
