"""gather_tokens: Triton (interpreted) against gather_tokens_ref, and the reference against plain loops."""

import importlib
import pytest
import torch

from d2v2.kernels.gather_tokens import gather_tokens, gather_tokens_ref
from tests.helpers import assert_close, lowp_tolerance

# The module itself: the package re-exports the function under the same name.
gather_tokens_module = importlib.import_module("d2v2.kernels.gather_tokens")

SHAPES = [
    # (B, clones, N, K, D)
    pytest.param(2, 1, 7, 4, 32, id="clones1-Dpow2"),
    pytest.param(2, 3, 13, 4, 5, id="clones3-oddN-Dodd"),  # D not a power of two, N prime
    pytest.param(2, 3, 9, 1, 5, id="K1"),  # a single kept token per row
    pytest.param(1, 2, 6, 6, 6, id="keep-all"),  # K == N: every position kept by every clone
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def make_ids(rows: int, length: int, kept: int, dtype=torch.int64, sort: bool = True) -> torch.Tensor:
    """[rows, kept] distinct positions per row, as the maskers produce them (sorted unless told)."""
    ids = torch.stack([torch.randperm(length)[:kept] for _ in range(rows)])
    return (ids.sort(dim=1).values if sort else ids).to(dtype)


def loop_gather(x, ids, pos, clones):
    """Independent definition: y[r, j] = x[r // clones, ids[r, j]] + pos[ids[r, j]], one token at a time."""
    rows, kept = ids.shape
    y = torch.empty(rows, kept, x.shape[2], dtype=torch.float64)
    for r in range(rows):
        for j in range(kept):
            n = int(ids[r, j])
            y[r, j] = x[r // clones, n].double() + (pos[n].double() if pos is not None else 0.0)
    return y


def loop_gather_grads(dy, ids, batch, length, clones):
    """Independent dx (summed over clones) and dpos (summed over every row), one token at a time."""
    rows, kept, dim = dy.shape
    dx = torch.zeros(batch, length, dim, dtype=torch.float64)
    for r in range(rows):
        for j in range(kept):
            dx[r // clones, int(ids[r, j])] += dy[r, j].double()
    return dx, dx.sum(0)


def inputs(batch, clones, length, kept, dim, dtype, with_pos=True, ids_dtype=torch.int64, sort=True):
    x = torch.randn(batch, length, dim).to(dtype).requires_grad_()
    pos = torch.randn(length, dim).to(dtype).requires_grad_() if with_pos else None
    ids = make_ids(batch * clones, length, kept, ids_dtype, sort)
    return x, ids, pos


@pytest.mark.parametrize("batch,clones,length,kept,dim", SHAPES)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
def test_ref_matches_loops(batch, clones, length, kept, dim, with_pos):
    x, ids, pos = inputs(batch, clones, length, kept, dim, torch.float32, with_pos)
    y = gather_tokens_ref(x, ids, pos, clones)
    assert_close(y, loop_gather(x, ids, pos, clones), atol=1e-6, rtol=1e-6, name="y")

    dy = torch.randn_like(y)
    leaves = [x] + ([pos] if with_pos else [])
    grads = torch.autograd.grad(y, leaves, dy)
    dx_expected, dpos_expected = loop_gather_grads(dy, ids, batch, length, clones)
    assert_close(grads[0], dx_expected, atol=1e-5, rtol=1e-5, name="dx")
    if with_pos:
        assert_close(grads[1], dpos_expected, atol=1e-5, rtol=1e-5, name="dpos")


@pytest.mark.parametrize("batch,clones,length,kept,dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
def test_triton_matches_ref(batch, clones, length, kept, dim, dtype, with_pos):
    x, ids, pos = inputs(batch, clones, length, kept, dim, dtype, with_pos)
    # The oracle always runs in fp32, so low-precision outputs are judged against exact math.
    x32 = x.detach().float().requires_grad_()
    pos32 = pos.detach().float().requires_grad_() if with_pos else None
    atol, rtol = lowp_tolerance(dtype)

    y = gather_tokens(x, ids, pos, clones, impl="triton")
    y_ref = gather_tokens_ref(x32, ids, pos32, clones)
    assert y.dtype == dtype and y.shape == (batch * clones, kept, dim)
    assert_close(y, y_ref, atol=atol, rtol=rtol, name="y")

    dy = torch.randn_like(y)
    leaves = [x] + ([pos] if with_pos else [])
    leaves32 = [x32] + ([pos32] if with_pos else [])
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, leaves32, dy.float())
    for name, got, want, leaf in zip(("dx", "dpos"), grads, grads_ref, leaves):
        assert got.dtype == leaf.dtype
        # Summing over clones and samples grows the magnitude; scale atol with it.
        assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol, name=name)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_unsorted_ids_any_index_dtype(ids_dtype):
    # Correctness must not rely on the maskers' ascending order.
    x, ids, pos = inputs(2, 3, 11, 4, 6, torch.float32, ids_dtype=ids_dtype, sort=False)
    y = gather_tokens(x, ids, pos, 3, impl="triton")
    assert_close(y, loop_gather(x, ids, pos, 3), atol=1e-6, rtol=1e-6, name="y")
    dy = torch.randn_like(y)
    dx, dpos = torch.autograd.grad(y, (x, pos), dy)
    dx_expected, dpos_expected = loop_gather_grads(dy, ids, 2, 11, 3)
    assert_close(dx, dx_expected, atol=1e-5, rtol=1e-5, name="dx")
    assert_close(dpos, dpos_expected, atol=1e-5, rtol=1e-5, name="dpos")


@pytest.mark.parametrize("x_grad,pos_grad", [(True, False), (False, True)], ids=["x-only", "pos-only"])
def test_grad_to_one_input_only(x_grad, pos_grad):
    x, ids, pos = inputs(2, 3, 9, 4, 5, torch.float32)
    x.requires_grad_(x_grad)
    pos.requires_grad_(pos_grad)
    y = gather_tokens(x, ids, pos, 3, impl="triton")
    y.backward(torch.ones_like(y))
    dx_expected, dpos_expected = loop_gather_grads(torch.ones_like(y), ids, 2, 9, 3)
    assert (x.grad is not None) == x_grad and (pos.grad is not None) == pos_grad
    if x_grad:
        assert_close(x.grad, dx_expected, atol=1e-5, rtol=1e-5, name="dx")
    else:
        assert_close(pos.grad, dpos_expected, atol=1e-5, rtol=1e-5, name="dpos")


def test_many_tiles_per_row(monkeypatch):
    # Tiny tiles force several ragged token blocks per row in both passes (the real shapes have them:
    # K = 39 or 266 kept tokens over tiles of a few rows), which the small test shapes otherwise fit in one.
    monkeypatch.setattr(gather_tokens_module, "TILE_ELEMENTS", 16)  # D = 5 -> tiles of 2 tokens x 8 channels
    x, ids, pos = inputs(2, 3, 11, 5, 5, torch.float32, sort=False)
    y = gather_tokens(x, ids, pos, 3, impl="triton")
    assert_close(y, loop_gather(x, ids, pos, 3), atol=1e-6, rtol=1e-6, name="y")
    dy = torch.randn_like(y)
    dx, dpos = torch.autograd.grad(y, (x, pos), dy)
    dx_expected, dpos_expected = loop_gather_grads(dy, ids, 2, 11, 3)
    assert_close(dx, dx_expected, atol=1e-5, rtol=1e-5, name="dx")
    assert_close(dpos, dpos_expected, atol=1e-5, rtol=1e-5, name="dpos")


def test_mixed_dtypes_like_autocast():
    # bf16 features with an fp32 position table (a parameter under autocast): y follows x, dpos follows pos.
    x, ids, _ = inputs(2, 3, 10, 4, 8, torch.bfloat16)
    pos = torch.randn(10, 8, requires_grad=True)
    y = gather_tokens(x, ids, pos, 3, impl="triton")
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    dx, dpos = torch.autograd.grad(y, (x, pos), dy)
    assert dx.dtype == torch.bfloat16 and dpos.dtype == torch.float32
    _, dpos_expected = loop_gather_grads(dy, ids, 2, 10, 3)
    assert_close(dpos, dpos_expected, atol=1e-4, rtol=1e-5, name="dpos")


def test_backward_is_deterministic():
    x, ids, pos = inputs(2, 3, 13, 4, 5, torch.float32)
    y = gather_tokens(x, ids, pos, 3, impl="triton")
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, pos), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, pos), dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    # A transposed view of x and a strided ids view reach the kernel as contiguous copies.
    x = torch.randn(2, 5, 9).transpose(1, 2)  # [2, 9, 5], not contiguous
    ids = make_ids(4, 9, 3).repeat(1, 2)[:, ::2]  # [4, 3] with stride 2 along K
    pos = torch.randn(5, 9).t()  # [9, 5], not contiguous
    y = gather_tokens(x, ids, pos, 2, impl="triton")
    assert_close(y, loop_gather(x, ids, pos, 2), atol=1e-6, rtol=1e-6, name="y")


def test_auto_on_cpu_is_the_reference():
    x, ids, pos = inputs(2, 3, 9, 4, 5, torch.float32)
    assert torch.equal(gather_tokens(x, ids, pos, 3), gather_tokens_ref(x, ids, pos, 3))


def _bad_calls():
    x = torch.randn(2, 9, 5)
    ids = make_ids(6, 9, 4)
    pos = torch.randn(9, 5)
    return [
        pytest.param(dict(x=x.long()), "x must have dtype", id="x-int"),
        pytest.param(dict(x=x[0]), "x must be 3-D", id="x-2d"),
        pytest.param(dict(x=x.numpy()), "x must be a torch.Tensor", id="x-numpy"),
        pytest.param(dict(ids_keep=ids.float()), "ids_keep must have dtype", id="ids-float"),
        pytest.param(dict(ids_keep=ids[0]), "ids_keep must be 2-D", id="ids-1d"),
        pytest.param(dict(ids_keep=ids[:4]), r"ids_keep must have shape \[6, \*\]", id="ids-rows"),
        pytest.param(dict(ids_keep=ids.clone().fill_(9)), r"ids_keep values must lie in \[0, 9\)", id="ids-high"),
        pytest.param(dict(ids_keep=ids.clone().fill_(-1)), r"ids_keep values must lie in \[0, 9\)", id="ids-neg"),
        pytest.param(dict(ids_keep=ids.to("meta")), "ids_keep must be on cpu", id="ids-device"),
        pytest.param(dict(pos=pos[:8]), r"pos must have shape \[9, 5\]", id="pos-N"),
        pytest.param(dict(pos=pos[:, :4]), r"pos must have shape \[9, 5\]", id="pos-D"),
        pytest.param(dict(pos=pos.long()), "pos must have dtype", id="pos-int"),
        pytest.param(dict(pos=pos.to("meta")), "pos must be on cpu", id="pos-device"),
        pytest.param(dict(clones=0), "clones must be an int >= 1", id="clones-0"),
        pytest.param(dict(clones=1.5), "clones must be an int >= 1", id="clones-float"),
        pytest.param(dict(clones=True), "clones must be an int >= 1", id="clones-bool"),
        pytest.param(dict(clones=2), r"ids_keep must have shape \[4, \*\]", id="clones-rows"),
        pytest.param(dict(impl="cuda"), "impl must be one of", id="impl"),
    ]


@pytest.mark.parametrize("override,message", _bad_calls())
def test_bad_arguments_raise(override, message):
    args = dict(x=torch.randn(2, 9, 5), ids_keep=make_ids(6, 9, 4), pos=torch.randn(9, 5), clones=3)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        gather_tokens(**args)


def test_check_ids_false_skips_only_the_range_check(monkeypatch):
    module = importlib.import_module("d2v2.kernels.gather_tokens")
    x, ids = torch.randn(2, 6, 4), torch.tensor([[0, 5], [1, 2], [3, 4], [0, 1]])

    def no_sync_allowed(*_args):
        raise AssertionError("range check ran")

    monkeypatch.setattr(module, "check_index_range", no_sync_allowed)
    assert torch.equal(gather_tokens(x, ids, clones=2, impl="torch", check_ids=False), gather_tokens_ref(x, ids, None, 2))
    with pytest.raises(AssertionError, match="range check ran"):
        gather_tokens(x, ids, clones=2, impl="torch")
    with pytest.raises(ValueError, match="ids_keep"):  # the cheap checks stay
        gather_tokens(x, ids.float(), clones=2, impl="torch", check_ids=False)
