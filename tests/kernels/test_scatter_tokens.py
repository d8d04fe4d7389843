"""scatter_tokens: Triton (interpreted) against scatter_tokens_ref, the reference against plain loops,
and the noise fill (whose Triton and torch streams differ) by its statistics and reproducibility."""

import importlib
import pytest
import torch

from d2v2.kernels._utils import tl, triton
from d2v2.kernels.scatter_tokens import scatter_tokens, scatter_tokens_ref
from tests.helpers import assert_close, lowp_tolerance

# The module itself: the package re-exports the function under the same name.
scatter_tokens_module = importlib.import_module("d2v2.kernels.scatter_tokens")

SHAPES = [
    # (R, length, K, D)
    pytest.param(2, 7, 4, 32, id="Dpow2"),
    pytest.param(6, 13, 4, 5, id="oddN-Dodd"),  # D not a power of two, length prime
    pytest.param(3, 9, 1, 5, id="K1"),  # a single kept token per row
    pytest.param(2, 6, 6, 6, id="keep-all"),  # K == length: nothing to fill
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]
IMPLS = ["triton", "torch"]


def make_ids(rows: int, length: int, kept: int, dtype=torch.int64, sort: bool = True) -> torch.Tensor:
    """[rows, kept] distinct positions per row, as the maskers produce them (sorted unless told)."""
    ids = torch.stack([torch.randperm(length)[:kept] for _ in range(rows)])
    return (ids.sort(dim=1).values if sort else ids).to(dtype)


def filled_mask(ids: torch.Tensor, length: int) -> torch.Tensor:
    """[R, length] bool, True where no kept token lands."""
    mask = torch.ones(ids.shape[0], length, dtype=torch.bool)
    for r in range(ids.shape[0]):
        mask[r, ids[r].long()] = False
    return mask


def loop_scatter(y, ids, length, fill_vector):
    """Independent definition with a constant fill (zeros when fill_vector is None), one token at a time."""
    rows, kept, dim = y.shape
    fill = torch.zeros(dim, dtype=torch.float64) if fill_vector is None else fill_vector.double()
    out = fill.repeat(rows, length, 1)
    for r in range(rows):
        for j in range(kept):
            out[r, int(ids[r, j])] = y[r, j].double()
    return out


def loop_scatter_grads(dout, ids):
    """Independent dy (the gather at ids) and dfill (dout summed over the filled positions)."""
    rows, length, _ = dout.shape
    dy = torch.stack([torch.stack([dout[r, int(n)] for n in ids[r]]) for r in range(rows)]).double()
    dfill = dout.double()[filled_mask(ids, length)].sum(0)
    return dy, dfill


def inputs(rows, length, kept, dim, dtype, fill_kind, ids_dtype=torch.int64, sort=True):
    y = torch.randn(rows, kept, dim).to(dtype).requires_grad_()
    fill = torch.randn(dim).to(dtype).requires_grad_() if fill_kind == "vector" else fill_kind
    return y, make_ids(rows, length, kept, ids_dtype, sort), fill


@pytest.mark.parametrize("rows,length,kept,dim", SHAPES)
@pytest.mark.parametrize("fill_kind", ["zero", "vector"])
def test_ref_matches_loops(rows, length, kept, dim, fill_kind):
    y, ids, fill = inputs(rows, length, kept, dim, torch.float32, fill_kind)
    fill_vector = fill if fill_kind == "vector" else None
    out = scatter_tokens_ref(y, ids, length, fill)
    assert_close(out, loop_scatter(y, ids, length, fill_vector), atol=1e-6, rtol=1e-6, name="out")

    dout = torch.randn_like(out)
    leaves = [y] + ([fill] if fill_kind == "vector" else [])
    grads = torch.autograd.grad(out, leaves, dout)
    dy_expected, dfill_expected = loop_scatter_grads(dout, ids)
    assert_close(grads[0], dy_expected, atol=1e-6, rtol=1e-6, name="dy")
    if fill_kind == "vector":
        assert_close(grads[1], dfill_expected, atol=1e-5, rtol=1e-5, name="dfill")


@pytest.mark.parametrize("rows,length,kept,dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill_kind", ["zero", "vector"])
def test_triton_matches_ref(rows, length, kept, dim, dtype, fill_kind):
    y, ids, fill = inputs(rows, length, kept, dim, dtype, fill_kind)
    # The oracle always runs in fp32, so low-precision outputs are judged against exact math.
    y32 = y.detach().float().requires_grad_()
    fill32 = fill.detach().float().requires_grad_() if fill_kind == "vector" else fill
    atol, rtol = lowp_tolerance(dtype)

    out = scatter_tokens(y, ids, length, fill, impl="triton")
    out_ref = scatter_tokens_ref(y32, ids, length, fill32)
    assert out.dtype == dtype and out.shape == (rows, length, dim)
    assert_close(out, out_ref, atol=atol, rtol=rtol, name="out")

    dout = torch.randn_like(out)
    leaves = [y] + ([fill] if fill_kind == "vector" else [])
    leaves32 = [y32] + ([fill32] if fill_kind == "vector" else [])
    grads = torch.autograd.grad(out, leaves, dout)
    grads_ref = torch.autograd.grad(out_ref, leaves32, dout.float())
    for name, got, want, leaf in zip(("dy", "dfill"), grads, grads_ref, leaves):
        assert got.dtype == leaf.dtype
        # dfill sums over every filled position; scale atol with its magnitude.
        assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol, name=name)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_unsorted_ids_any_index_dtype(ids_dtype):
    # Correctness must not rely on the maskers' ascending order.
    y, ids, fill = inputs(3, 11, 4, 6, torch.float32, "vector", ids_dtype=ids_dtype, sort=False)
    out = scatter_tokens(y, ids, 11, fill, impl="triton")
    assert_close(out, loop_scatter(y, ids, 11, fill), atol=1e-6, rtol=1e-6, name="out")
    dout = torch.randn_like(out)
    dy, dfill = torch.autograd.grad(out, (y, fill), dout)
    dy_expected, dfill_expected = loop_scatter_grads(dout, ids)
    assert_close(dy, dy_expected, atol=1e-6, rtol=1e-6, name="dy")
    assert_close(dfill, dfill_expected, atol=1e-5, rtol=1e-5, name="dfill")


def test_fill_grad_spans_several_chunks():
    # length > the 128-position chunk of the fill-gradient pass, and not a multiple of it.
    y, ids, fill = inputs(2, 300, 7, 3, torch.float32, "vector")
    out = scatter_tokens(y, ids, 300, fill, impl="triton")
    dout = torch.randn_like(out)
    dy, dfill = torch.autograd.grad(out, (y, fill), dout)
    dy_expected, dfill_expected = loop_scatter_grads(dout, ids)
    assert_close(dy, dy_expected, atol=1e-6, rtol=1e-6, name="dy")
    assert_close(dfill, dfill_expected, atol=1e-4, rtol=1e-5, name="dfill")


def test_many_tiles_per_row(monkeypatch):
    # Tiny tiles and chunks force several ragged blocks per row in every pass (the real shapes have
    # them: 196-999 positions over tiles of a few rows), which the small test shapes otherwise fit in one.
    monkeypatch.setattr(scatter_tokens_module, "TILE_ELEMENTS", 16)  # D = 5 -> tiles of 2 tokens x 8 channels
    monkeypatch.setattr(scatter_tokens_module, "FILL_GRAD_CHUNK", 6)  # 3 tiles per fill-gradient program, 3 chunks
    y, ids, fill = inputs(3, 13, 5, 5, torch.float32, "vector", sort=False)
    out = scatter_tokens(y, ids, 13, fill, impl="triton")
    assert_close(out, loop_scatter(y, ids, 13, fill), atol=1e-6, rtol=1e-6, name="out")
    dout = torch.randn_like(out)
    dy, dfill = torch.autograd.grad(out, (y, fill), dout)
    dy_expected, dfill_expected = loop_scatter_grads(dout, ids)
    assert_close(dy, dy_expected, atol=1e-6, rtol=1e-6, name="dy")
    assert_close(dfill, dfill_expected, atol=1e-5, rtol=1e-5, name="dfill")
    # The noise stream does not depend on the tile shape, only on seed, row, position and D.
    generator = torch.Generator().manual_seed(3)
    small_tiles = scatter_tokens(y, ids, 13, generator=generator, impl="triton")
    monkeypatch.undo()
    generator.manual_seed(3)
    assert torch.equal(scatter_tokens(y, ids, 13, generator=generator, impl="triton"), small_tiles)


def test_mixed_dtypes_like_autocast():
    # bf16 tokens with an fp32 learned fill vector: out follows y, dfill follows the fill vector.
    y, ids, _ = inputs(4, 10, 3, 8, torch.bfloat16, "zero")
    fill = torch.randn(8, requires_grad=True)
    out = scatter_tokens(y, ids, 10, fill, impl="triton")
    assert out.dtype == torch.bfloat16
    dout = torch.randn_like(out)
    dy, dfill = torch.autograd.grad(out, (y, fill), dout)
    assert dy.dtype == torch.bfloat16 and dfill.dtype == torch.float32
    _, dfill_expected = loop_scatter_grads(dout, ids)
    assert_close(dfill, dfill_expected, atol=1e-4, rtol=1e-5, name="dfill")


@pytest.mark.parametrize("impl", IMPLS)
def test_noise_fill_statistics(impl):
    # Triton's and torch's streams differ: kept rows must match exactly, noise only in distribution.
    rows, length, kept, dim, std = 4, 64, 8, 64, 0.01
    y, ids, _ = inputs(rows, length, kept, dim, torch.float32, "noise")
    out = scatter_tokens(y, ids, length, "noise", noise_std=std, impl=impl)
    filled = filled_mask(ids, length)
    assert torch.equal(out[~filled].view(rows, kept, dim), y.detach())
    noise = out.detach()[filled].flatten().double()  # 14,336 draws
    # Mean within 5 standard errors; the sample std of n normal draws is within ~4% at n = 14k.
    assert abs(noise.mean().item()) < 5 * std / noise.numel() ** 0.5
    assert abs(noise.std().item() / std - 1) < 0.04
    # Independent across positions and channels: neighbouring draws are uncorrelated.
    flat = out.detach()[filled].double()
    assert abs(torch.corrcoef(torch.stack([flat[:, :-1].flatten(), flat[:, 1:].flatten()]))[0, 1]) < 0.05
    assert abs(torch.corrcoef(torch.stack([flat[:-1].flatten(), flat[1:].flatten()]))[0, 1]) < 0.05


@pytest.mark.parametrize("impl", IMPLS)
def test_noise_is_fresh_per_call_and_reproducible(impl):
    y, ids, _ = inputs(3, 12, 4, 16, torch.float32, "noise")
    filled = filled_mask(ids, 12)
    generator = torch.Generator().manual_seed(1234)
    first = scatter_tokens(y, ids, 12, generator=generator, impl=impl)
    second = scatter_tokens(y, ids, 12, generator=generator, impl=impl)
    assert not torch.isclose(first[filled], second[filled]).any(), "the generator must advance per call"

    generator.manual_seed(1234)
    assert torch.equal(scatter_tokens(y, ids, 12, generator=generator, impl=impl), first)
    # Rows draw their own noise even where they fill the same positions.
    same_ids = ids[:1].expand_as(ids)
    out = scatter_tokens(y, same_ids, 12, generator=generator, impl=impl)
    row_filled = filled_mask(same_ids[:1], 12)[0]
    assert not torch.isclose(out[0, row_filled], out[1, row_filled]).any()
    # generator=None draws from torch's default generator, which the seed fixture controls.
    torch.manual_seed(7)
    again = scatter_tokens(y, ids, 12, impl=impl)
    torch.manual_seed(7)
    assert torch.equal(scatter_tokens(y, ids, 12, impl=impl), again)


def test_noise_is_tl_randn4x_up_to_rounding():
    # The fill's Box-Muller takes sine and cosine from a polynomial (no libdevice slow path to spill):
    # the pair stays within 4e-7 of the exact values and the normals within 2e-6 of tl.randn4x's.
    @triton.jit
    def probe(u_ptr, sin_ptr, cos_ptr, diff_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        sin, cos = scatter_tokens_module._sincos_2pi(tl.load(u_ptr + offs))
        tl.store(sin_ptr + offs, sin)
        tl.store(cos_ptr + offs, cos)
        a0, a1, a2, a3 = scatter_tokens_module._randn4x(1234, offs)
        b0, b1, b2, b3 = tl.randn4x(1234, offs)
        diff = tl.maximum(tl.maximum(tl.abs(a0 - b0), tl.abs(a1 - b1)), tl.maximum(tl.abs(a2 - b2), tl.abs(a3 - b3)))
        tl.store(diff_ptr + offs, diff)

    n = 4096
    u = torch.cat([torch.rand(n - 6), torch.tensor([0.0, 0.125, 0.25, 0.5, 0.875, 1 - 2**-24])])
    sin, cos, diff = torch.empty(n), torch.empty(n), torch.empty(n)
    probe[(1,)](u, sin, cos, diff, N=n)
    angle = 2 * torch.pi * u.double()
    assert (sin.double() - angle.sin()).abs().max() < 4e-7
    assert (cos.double() - angle.cos()).abs().max() < 4e-7
    assert diff.max() < 2e-6


def test_noise_std_zero_and_noise_grad():
    y, ids, _ = inputs(3, 9, 4, 6, torch.float32, "noise")
    out = scatter_tokens(y, ids, 9, "noise", noise_std=0.0, impl="triton")
    assert torch.equal(out, loop_scatter(y, ids, 9, None).float())
    dout = torch.randn_like(out)
    (dy,) = torch.autograd.grad(out, (y,), dout)
    dy_expected, _ = loop_scatter_grads(dout, ids)
    assert_close(dy, dy_expected, atol=0, rtol=0, name="dy")


def test_fill_grad_is_deterministic():
    y, ids, fill = inputs(4, 13, 4, 5, torch.float32, "vector")
    out = scatter_tokens(y, ids, 13, fill, impl="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (y, fill), dout, retain_graph=True)
    second = torch.autograd.grad(out, (y, fill), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    y = torch.randn(3, 5, 4).transpose(1, 2)  # [3, 4, 5], not contiguous
    ids = make_ids(3, 10, 4).repeat(1, 2)[:, ::2]  # [3, 4] with stride 2 along K
    fill = torch.randn(10)[::2]  # [5] with stride 2
    out = scatter_tokens(y, ids, 10, fill, impl="triton")
    assert_close(out, loop_scatter(y, ids, 10, fill), atol=1e-6, rtol=1e-6, name="out")


def test_auto_on_cpu_is_the_reference():
    y, ids, _ = inputs(3, 9, 4, 5, torch.float32, "zero")
    assert torch.equal(scatter_tokens(y, ids, 9, "zero"), scatter_tokens_ref(y, ids, 9, "zero"))


def _bad_calls():
    y = torch.randn(3, 4, 5)
    ids = make_ids(3, 9, 4)
    return [
        pytest.param(dict(y=y.long()), "y must have dtype", id="y-int"),
        pytest.param(dict(y=y[0]), "y must be 3-D", id="y-2d"),
        pytest.param(dict(y=[1.0]), "y must be a torch.Tensor", id="y-list"),
        pytest.param(dict(ids_keep=ids.float()), "ids_keep must have dtype", id="ids-float"),
        pytest.param(dict(ids_keep=ids[0]), "ids_keep must be 2-D", id="ids-1d"),
        pytest.param(dict(ids_keep=ids[:2]), r"ids_keep must have shape \[3, 4\]", id="ids-rows"),
        pytest.param(dict(ids_keep=ids[:, :3]), r"ids_keep must have shape \[3, 4\]", id="ids-K"),
        pytest.param(dict(ids_keep=ids.clone().fill_(9)), r"ids_keep values must lie in \[0, 9\)", id="ids-high"),
        pytest.param(dict(ids_keep=ids.clone().fill_(-2)), r"ids_keep values must lie in \[0, 9\)", id="ids-neg"),
        pytest.param(dict(ids_keep=ids.to("meta")), "ids_keep must be on cpu", id="ids-device"),
        pytest.param(dict(length=3), "length must be an int >= K = 4", id="length-short"),
        pytest.param(dict(length=9.0), "length must be an int >= K = 4", id="length-float"),
        pytest.param(dict(fill="mask"), "fill must be one of", id="fill-name"),
        pytest.param(dict(fill=0.0), "fill must be one of", id="fill-number"),
        pytest.param(dict(fill=torch.randn(4)), r"fill must have shape \[5\]", id="fill-shape"),
        pytest.param(dict(fill=torch.randn(1, 5)), "fill must be 1-D", id="fill-2d"),
        pytest.param(dict(fill=torch.zeros(5, dtype=torch.long)), "fill must have dtype", id="fill-int"),
        pytest.param(dict(fill=torch.randn(5, device="meta")), "fill must be on cpu", id="fill-device"),
        pytest.param(dict(noise_std=-0.1), "noise_std must be a finite number >= 0", id="std-negative"),
        pytest.param(dict(noise_std=float("nan")), "noise_std must be a finite number >= 0", id="std-nan"),
        pytest.param(dict(noise_std="0.01"), "noise_std must be a finite number >= 0", id="std-str"),
        pytest.param(dict(generator=0), "generator must be a torch.Generator", id="generator-int"),
        # A CPU generator for tensors on another device (meta stands in for CUDA on a CPU-only machine).
        pytest.param(
            dict(y=y.to("meta"), ids_keep=ids.to("meta"), generator=torch.Generator()),
            "generator must be on meta",
            id="generator-device",
        ),
        pytest.param(dict(impl="cuda"), "impl must be one of", id="impl"),
    ]


@pytest.mark.parametrize("override,message", _bad_calls())
def test_bad_arguments_raise(override, message):
    args = dict(y=torch.randn(3, 4, 5), ids_keep=make_ids(3, 9, 4), length=9)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        scatter_tokens(**args)


def test_check_ids_false_skips_only_the_range_check(monkeypatch):
    module = importlib.import_module("d2v2.kernels.scatter_tokens")
    y, ids = torch.randn(2, 2, 4), torch.tensor([[0, 5], [1, 2]])

    def no_sync_allowed(*_args):
        raise AssertionError("range check ran")

    monkeypatch.setattr(module, "check_index_range", no_sync_allowed)
    out = scatter_tokens(y, ids, 6, fill="zero", impl="torch", check_ids=False)
    assert torch.equal(out, scatter_tokens_ref(y, ids, 6, fill="zero"))
    with pytest.raises(AssertionError, match="range check ran"):
        scatter_tokens(y, ids, 6, fill="zero", impl="torch")
    with pytest.raises(ValueError, match="length"):  # the cheap checks stay
        scatter_tokens(y, ids, 1, fill="zero", impl="torch", check_ids=False)
