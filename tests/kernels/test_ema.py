"""ema_: the interpreted multi-tensor Triton kernel against ema_ref, and ema_ref against plain math."""

import pytest
import torch

from d2v2.kernels.ema import _CHUNK, ema_, ema_ref
from tests.helpers import assert_close, lowp_tolerance


def _pairs(specs):
    """Teacher and student lists from (shape, teacher dtype, student dtype) specs."""
    teacher = [torch.randn(shape).to(t_dtype) for shape, t_dtype, _ in specs]
    student = [torch.randn(shape).to(s_dtype) for shape, _, s_dtype in specs]
    return teacher, student


def _expected(teacher, student, decay):
    """The update in float64 from the inputs as stored."""
    return [decay * t.double() + (1 - decay) * s.double() for t, s in zip(teacher, student)]


def _assert_updated(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        atol, rtol = lowp_tolerance(a.dtype)
        assert_close(a, e.to(a.dtype), atol=atol, rtol=rtol, name=f"teacher[{i}]")


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# Awkward mix for one call: several chunks with a ragged tail, sizes off the 8-element alignment,
# every dtype pairing, a scalar-like tensor and an empty one.
MIXED_SPECS = [
    ((2 * _CHUNK + 37,), F32, F32),  # three chunks, ragged tail
    ((48, 64), F32, BF16),  # fp32 teacher, bf16 student
    ((3, 5), BF16, F32),  # 15 elements: not a multiple of 8 -> unaligned launch
    ((7,), F16, F16),
    ((2, 3, 4), BF16, BF16),
    ((1,), F32, F16),
    ((0, 4), F32, F32),  # empty: skipped
]


@pytest.mark.parametrize("decay", [0.9, 0.0], ids=["decay0.9", "decay0"])
def test_ref_matches_plain_math(decay):
    teacher, student = _pairs([((5, 9), F32, F32), ((4,), BF16, F32)])
    expected = _expected(teacher, student, decay)
    ema_ref(teacher, student, decay)
    _assert_updated(teacher, expected)


def test_ref_tensor_decay_matches_plain_math():
    teacher, student = _pairs([((5, 9), F32, F32)])
    expected = _expected(teacher, student, 0.99)
    ema_ref(teacher, student, torch.tensor(0.99, dtype=torch.float64))
    _assert_updated(teacher, expected)


@pytest.mark.parametrize(
    "decay",
    [0.999, torch.tensor(0.75), torch.tensor(0.999, dtype=torch.float64)],
    ids=["float", "tensor-fp32", "tensor-fp64"],
)
def test_triton_matches_ref_mixed_dtypes(decay):
    teacher, student = _pairs(MIXED_SPECS)
    plain = _expected(teacher, student, float(decay))
    expected = [t.clone() for t in teacher]
    ema_ref(expected, student, decay)
    ema_(teacher, student, decay, impl="triton")
    for i, (a, e) in enumerate(zip(teacher, expected)):
        # fp32 teachers: the same fp32 operations as the reference. bf16/fp16: at most one rounding
        # apart (Triton's interpreter truncates fp32 -> bf16 where PyTorch rounds to nearest).
        atol, rtol = (1e-6, 1e-6) if a.dtype == F32 else lowp_tolerance(a.dtype)
        assert_close(a, e, atol=atol, rtol=rtol, name=f"teacher[{i}] {a.dtype}")
    _assert_updated(teacher, plain)


@pytest.mark.parametrize(
    "decay", [0.999, torch.tensor(0.999, dtype=torch.float64)], ids=["float", "tensor-fp64"]
)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_minus_decay_formed_before_rounding(decay, impl):
    # As the reference's add_(s, alpha=1 - decay): 1 - 0.999 in float64, then rounded to fp32, which
    # differs from 1 - fp32(0.999) by about 1e-5 relative.
    teacher, student = [torch.zeros(16)], [torch.ones(16)]
    ema_(teacher, student, decay, impl=impl)
    assert_close(teacher[0], torch.full((16,), 1 - 0.999, dtype=torch.float32), atol=0, rtol=1e-7)


def test_triton_unaligned_and_noncontiguous_student():
    # Two launches: an aligned pair, and a pair whose teacher starts 4 bytes into its allocation.
    base = torch.randn(65)
    teacher = [torch.randn(8, 8), base[1:]]
    student = [torch.randn(8, 8).T, torch.randn(64)]  # the first is non-contiguous: copied by ema_
    expected = _expected(teacher, student, 0.5)
    first = base[0].clone()
    ema_(teacher, student, 0.5, impl="triton")
    _assert_updated(teacher, expected)
    assert torch.equal(base[0], first)


def test_triton_leaves_neighbours_untouched():
    base = torch.randn(40)
    before = base.clone()
    ema_([base[3:21]], [torch.zeros(18)], 0.0, impl="triton")
    assert torch.equal(base[:3], before[:3]) and torch.equal(base[21:], before[21:])
    assert torch.equal(base[3:21], torch.zeros(18))


def test_repeated_steps_with_cached_tables():
    teacher_a, student_a = _pairs([((300,), F32, F32), ((33,), BF16, BF16)])
    teacher_b, student_b = _pairs([((100,), F32, F32)])
    expected_a, expected_b = [t.clone() for t in teacher_a], [t.clone() for t in teacher_b]
    for step, decay in enumerate([0.9, 0.8, 0.7]):
        ema_(teacher_a, student_a, decay, impl="triton")
        ema_(teacher_b, student_b, decay, impl="triton")
        ema_ref(expected_a, student_a, decay)
        ema_ref(expected_b, student_b, decay)
        student_a[0].add_(1.0)  # students change between steps, in place as an optimizer would
    for a, e in zip(teacher_a + teacher_b, expected_a + expected_b):
        atol, rtol = (1e-6, 1e-6) if a.dtype == F32 else lowp_tolerance(a.dtype)
        assert_close(a, e, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_decay_one_is_a_no_op(impl):
    teacher, student = _pairs([((10,), F32, F32), ((6,), BF16, F32)])
    student[0][0] = float("nan")  # would poison the teacher if any arithmetic ran
    before = [t.clone() for t in teacher]
    ema_(teacher, student, 1.0, impl=impl)
    for t, b in zip(teacher, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_parameters_updated_under_no_grad(impl):
    teacher = [torch.nn.Parameter(torch.randn(12))]
    student = [torch.nn.Parameter(torch.randn(12))]
    expected = _expected(teacher, student, 0.5)
    version = teacher[0]._version
    with torch.no_grad():
        ema_(teacher, student, 0.5, impl=impl)
    _assert_updated(teacher, expected)
    assert teacher[0]._version > version  # autograd knows the tensor changed in place


def test_empty_lists_are_a_no_op():
    assert ema_([], [], 0.5, impl="triton") is None


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda: ([torch.zeros(3)], [], 0.5), "same length"),
        (lambda: (torch.zeros(3), torch.zeros(3), 0.5), "sequences of tensors"),
        (lambda: ([torch.zeros(3)], [torch.zeros(4)], 0.5), r"same shape, got \[3\] and \[4\]"),
        (lambda: ([torch.zeros(4, 3).T], [torch.zeros(3, 4)], 0.5), "teacher\\[0\\] must be contiguous"),
        (lambda: ([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3)], 0.5), "teacher\\[0\\] must have dtype"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)], 0.5), "student\\[0\\] must have dtype"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.5), "student\\[0\\] must be on cpu"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], 1.5), r"decay must lie in \[0, 1\]"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], -0.1), r"decay must lie in \[0, 1\]"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], "0.9"), "decay must be a float or a 0-dim tensor"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], True), "decay must be a float or a 0-dim tensor"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], torch.tensor([0.9])), "decay must be 0-D"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], torch.tensor(1)), "decay must have dtype"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], torch.tensor(0.9, device="meta")), "decay must be on cpu"),
        (lambda: ([torch.zeros(3, requires_grad=True)], [torch.zeros(3)], 0.5), "requires grad"),
    ],
    ids=[
        "lengths", "single-tensors", "shapes", "noncontiguous-teacher", "int-teacher", "fp64-student", "device",
        "decay-high", "decay-low", "decay-str", "decay-bool", "decay-1d", "decay-int-tensor", "decay-device",
        "teacher-requires-grad",
    ],
)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_arguments_raise(make_args, match, impl):
    with pytest.raises(ValueError, match=match):
        ema_(*make_args(), impl=impl)


def test_bad_impl_raises():
    with pytest.raises(ValueError, match="impl must be one of"):
        ema_([torch.zeros(3)], [torch.zeros(3)], 0.5, impl="cuda")
