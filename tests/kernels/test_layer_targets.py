"""layer_targets: the Triton kernel (interpreted) against layer_targets_ref, and the reference against
PyTorch's own instance_norm / layer_norm, forward and gradients, for every per-layer x final order."""

import importlib
import pytest
import torch
import torch.nn.functional as F

from d2v2.kernels.layer_targets import NORMS, layer_targets, layer_targets_ref
from tests.helpers import assert_close, lowp_tolerance

# The module itself: the package re-exports the function under the same name.
layer_targets_module = importlib.import_module("d2v2.kernels.layer_targets")

ORDERS = [(per_layer, final) for per_layer in NORMS for final in NORMS]
RECIPES = [("instance", "layer"), ("instance", None), ("layer", "instance")]  # images, audio/text-base, text-large


def independent_targets(layers, per_layer, final, eps=1e-5):
    """The same math from PyTorch's own norms (needs N > 1: F.instance_norm rejects one element)."""

    def norm(x, kind):  # x [B, N, D] fp32
        if kind == "instance":
            return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
        if kind == "layer":
            return F.layer_norm(x, x.shape[-1:], eps=eps)
        return x

    return norm(torch.stack([norm(layer.float(), per_layer) for layer in layers]).mean(0), final)


def make_layers(k, shape, dtype=torch.float32):
    # An offset and a per-channel scale, so that every norm has something to remove.
    scale = torch.rand(shape[-1]) * 3 + 0.5
    return [(torch.randn(shape) * scale + 2.0).to(dtype) for _ in range(k)]


@pytest.fixture
def small_tile(monkeypatch):
    """Shrink the tile so small shapes take the two-pass path and span several blocks of the free axis."""
    monkeypatch.setattr(layer_targets_module, "_TILE", 64)


# --- the reference against PyTorch's norms ------------------------------------------------------------


@pytest.mark.parametrize("per_layer,final", ORDERS)
def test_ref_matches_torch_norms_forward_and_grad(per_layer, final):
    layers = [t.requires_grad_() for t in make_layers(3, (2, 9, 12))]
    weight = torch.randn(2, 9, 12)  # a generic upstream gradient
    ours = layer_targets_ref(layers, per_layer, final)
    grads = torch.autograd.grad((ours * weight).sum(), layers)
    theirs = independent_targets(layers, per_layer, final)
    expected_grads = torch.autograd.grad((theirs * weight).sum(), layers)
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5, name="targets")
    for i, (grad, expected) in enumerate(zip(grads, expected_grads)):
        assert_close(grad, expected, atol=1e-4, rtol=1e-4, name=f"grad layers[{i}]")


def test_ref_single_element_norms_give_zeros():
    # N = 1: instance norm centres each value on itself; D = 1: the same for layer norm.
    assert torch.equal(layer_targets_ref(make_layers(2, (3, 1, 5)), "instance", None), torch.zeros(3, 1, 5))
    assert torch.equal(layer_targets_ref(make_layers(2, (3, 4, 1)), "layer", None), torch.zeros(3, 4, 1))


# --- the Triton kernel against the reference ----------------------------------------------------------


@pytest.mark.parametrize("per_layer,final", ORDERS)
@pytest.mark.parametrize("tile", ["default", "small"])
def test_triton_matches_ref_every_order(per_layer, final, tile, request, monkeypatch):
    if tile == "small":
        request.getfixturevalue("small_tile")
    launches = []
    launch = layer_targets_module._launch_fwd
    monkeypatch.setattr(layer_targets_module, "_launch_fwd", lambda *a: launches.append(a) or launch(*a))
    # N = 7 odd, D = 24 not a power of two, k = 3
    layers = make_layers(3, (2, 7, 24))
    out = layer_targets(layers, per_layer, final, impl="triton")
    # A small tile cannot span both N and D, so the mixed orders add an in-place final-norm pass.
    mixed = {per_layer, final} == {"instance", "layer"}
    assert len(launches) == (2 if mixed and tile == "small" else 1)
    assert out.dtype == torch.float32 and out.shape == (2, 7, 24)
    assert_close(out, layer_targets_ref(layers, per_layer, final), atol=1e-5, rtol=1e-5, name="targets")


@pytest.mark.parametrize("per_layer,final", RECIPES)
def test_triton_stacked_input_matches_list(per_layer, final, small_tile):
    # [k, B, N, D] in one tensor: the layers are addressed by a uniform stride rather than a table.
    stacked = torch.stack(make_layers(4, (2, 13, 20)))
    out = layer_targets(stacked, per_layer, final, eps=1e-3, impl="triton")
    assert_close(out, layer_targets_ref(list(stacked), per_layer, final, eps=1e-3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "layout",
    [
        "time_first_views",  # transposes of [N, B, D] tensors: shared non-contiguous strides, no copy
        "mixed_strides",  # one non-contiguous layer among contiguous ones: made contiguous
        "reversed_stack",  # views of a stack in reverse order: a negative layer stride
        "repeated_tensor",  # the same tensor twice: a zero layer stride
        "uneven_views_aligned",  # unevenly spaced views of one buffer: an offset table, 16-aligned
        "uneven_views_unaligned",  # the same with offsets that are not multiples of 16
    ],
)
def test_triton_layer_layouts(layout):
    base = make_layers(3, (2, 11, 10))
    numel = base[0].numel()
    buffer = torch.randn(5 * numel)
    starts = (0, 2 * numel + 32, 3 * numel + 48) if layout == "uneven_views_aligned" else (0, 3 * numel + 3, numel + 1)
    if layout == "time_first_views":
        layers = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in base]
    elif layout == "mixed_strides":
        layers = [base[0], base[1].transpose(0, 1).contiguous().transpose(0, 1), base[2]]
    elif layout == "reversed_stack":
        layers = list(torch.stack(base).unbind(0))[::-1]
    elif layout == "repeated_tensor":
        layers = [base[0], base[0], base[1]]
    else:
        layers = [buffer[start : start + numel].view(2, 11, 10) for start in starts]
    out = layer_targets(layers, "instance", "layer", impl="triton")
    assert_close(out, layer_targets_ref(layers, "instance", "layer"), atol=1e-5, rtol=1e-5)


def test_layer_addressing_prefers_a_stride_then_an_aligned_table():
    buffer = torch.zeros(1024)
    views = lambda *starts: [buffer[s : s + 8] for s in starts]  # noqa: E731
    table, stride, _ = layer_targets_module._layer_addressing(views(0, 40, 80), buffer.device)
    assert table is None and stride == 40
    table, stride, _ = layer_targets_module._layer_addressing(views(80, 40, 0), buffer.device)
    assert table is None and stride == -40
    # Uneven offsets need a table; when all are multiples of 16 it counts in units of 16 elements.
    table, _, unit = layer_targets_module._layer_addressing(views(0, 32, 96), buffer.device)
    assert table.tolist() == [0, 2, 6] and unit == 16
    table, _, unit = layer_targets_module._layer_addressing(views(16, 3, 40), buffer.device)
    assert table.tolist() == [0, -13, 24] and unit == 1


@pytest.mark.parametrize(
    "shape,k,per_layer,final",
    [
        ((1, 1, 6), 2, "instance", "layer"),  # N = 1: the instance norm gives zeros, then LN of zeros
        ((2, 5, 1), 2, "layer", None),  # D = 1: the layer norm gives zeros
        ((3, 37, 5), 1, "instance", "layer"),  # k = 1, N prime and larger than D
        ((1, 6, 33), 5, "layer", "instance"),  # B = 1, D = 33 just past a power of two
    ],
)
def test_triton_awkward_shapes(shape, k, per_layer, final, small_tile):
    layers = make_layers(k, shape)
    out = layer_targets(layers, per_layer, final, impl="triton")
    assert_close(out, layer_targets_ref(layers, per_layer, final), atol=1e-5, rtol=1e-5)


def test_triton_empty_batch():
    out = layer_targets([torch.randn(0, 4, 8)] * 2, impl="triton")
    assert out.shape == (0, 4, 8) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_layer,final", RECIPES)
def test_triton_low_precision_inputs(dtype, per_layer, final):
    full = make_layers(3, (2, 9, 24))
    layers = [t.to(dtype) for t in full]
    out = layer_targets(layers, per_layer, final, impl="triton")
    assert out.dtype == torch.float32
    # The kernel upcasts exactly, so against the reference on the same values only fp32 rounding differs;
    # against the fp32 originals the error is the inputs' rounding.
    assert_close(out, layer_targets_ref(layers, per_layer, final), atol=1e-5, rtol=1e-5, name="same inputs")
    atol, rtol = lowp_tolerance(dtype)
    assert_close(out, layer_targets_ref(full, per_layer, final), atol=atol, rtol=rtol, name="fp32 originals")


@pytest.mark.parametrize("per_layer,final", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_matches_ref(per_layer, final, dtype):
    layers = [t.to(dtype) for t in make_layers(3, (2, 7, 12))]
    weight = torch.randn(2, 7, 12)
    # Only some layers require grad: the others must get None and cost nothing.
    triton_in = [t.clone().requires_grad_(i != 1) for i, t in enumerate(layers)]
    ref_in = [t.clone().requires_grad_(i != 1) for i, t in enumerate(layers)]
    (layer_targets(triton_in, per_layer, final, impl="triton") * weight).sum().backward()
    (layer_targets_ref(ref_in, per_layer, final) * weight).sum().backward()
    assert triton_in[1].grad is None
    for i in (0, 2):
        assert triton_in[i].grad.dtype == dtype
        assert_close(triton_in[i].grad, ref_in[i].grad, atol=1e-5, rtol=1e-5, name=f"grad layers[{i}]")


def test_triton_backward_to_stacked_input():
    stacked = torch.stack(make_layers(3, (2, 6, 10))).requires_grad_()
    weight = torch.randn(2, 6, 10)
    (grad,) = torch.autograd.grad((layer_targets(stacked, impl="triton") * weight).sum(), stacked)
    (expected,) = torch.autograd.grad((layer_targets_ref(list(stacked), "instance", "layer") * weight).sum(), stacked)
    assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_runs_the_reference():
    layers = make_layers(2, (2, 5, 8))
    assert torch.equal(layer_targets(layers), layer_targets_ref(layers, "instance", "layer"))


# --- bad arguments ---------------------------------------------------------------------------------------


def _ok():
    return make_layers(2, (2, 5, 8))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layers=[]), "at least one layer"),
        (dict(layers=torch.zeros(0, 2, 5, 8)), "at least one layer"),
        (dict(layers=torch.zeros(2, 5, 8)), "layers must be 4-D"),
        (dict(layers="not tensors"), "list or tuple"),
        (dict(layers=[torch.zeros(2, 5, 8), "x"]), "layers\\[1\\] must be a torch.Tensor"),
        (dict(layers=[torch.zeros(2, 5, 8), torch.zeros(5, 8)]), "layers\\[1\\] must be 3-D"),
        (dict(layers=[torch.zeros(2, 5, 8), torch.zeros(2, 5, 9)]), "layers\\[1\\] must have shape \\[2, 5, 8\\]"),
        (dict(layers=[torch.zeros(2, 5, 8), torch.zeros(2, 5, 8).half()]), "layers\\[1\\] must have dtype"),
        (dict(layers=[torch.zeros(2, 5, 8, dtype=torch.int32)]), "layers\\[0\\] must have dtype"),
        (dict(layers=[torch.zeros(2, 5, 8), torch.zeros(2, 5, 8, device="meta")]), "layers\\[1\\] must be on cpu"),
        (dict(layers=[torch.zeros(2, 0, 8)]), "N >= 1 and D >= 1"),
        (dict(layers=[torch.zeros(2, 5, 0)]), "N >= 1 and D >= 1"),
        (dict(layers=[torch.zeros(1, 65537, 1)], final=None), "N must be <= 65536"),
        (dict(per_layer="batch"), "per_layer must be one of"),
        (dict(final="Layer"), "final must be one of"),
        (dict(eps=0.0), "eps must be a positive finite number"),
        (dict(eps=-1e-5), "eps must be a positive finite number"),
        (dict(eps=float("nan")), "eps must be a positive finite number"),
        (dict(eps=True), "eps must be a positive finite number"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    kwargs = {"layers": _ok(), **kwargs}
    with pytest.raises(ValueError, match=message):
        layer_targets(**kwargs)


def test_explicit_triton_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        layer_targets(_ok(), impl="triton")
