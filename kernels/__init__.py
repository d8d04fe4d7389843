"""d2v2.kernels: the data2vec 2.0 hot path as Triton kernels with PyTorch references.

Every op takes ``impl="auto" | "triton" | "torch"``. ``auto`` runs the Triton kernel for CUDA
tensors when Triton is importable and the PyTorch reference otherwise; the environment variable
``D2V2_KERNELS=torch|triton`` overrides ``auto``. With ``TRITON_INTERPRET=1``, ``impl="triton"``
runs the real kernels on CPU tensors in Triton's interpreter. Every op is differentiable where its
inputs require grad, validates its arguments (ValueError naming the argument), computes in fp32
and accepts fp32, bf16 and fp16 inputs. Each op's module also holds its reference, ``<op>_ref``.

``HAS_TRITON``, ``triton_interpret()`` and ``resolve_impl(impl, *tensors)`` tell which implementation
an op would run, for tools that report it (``d2v2 info``, the benchmarks).

``trace_launches()``, ``compile_launch(launch, arch)``, ``load_launch(launch)``, ``ARCHS``, ``occupancy`` and
``ptxas_available()`` compile the kernels ahead of time for a GPU architecture without a GPU
(``d2v2 bench compile``; see ``_aot``).
"""

from ._aot import ARCHS, compile_launch, load_launch, occupancy, ptxas_available, trace_launches
from ._utils import HAS_TRITON, resolve_impl, tracing_launches, triton_interpret
from .attention import attention
from .conv_block1d import conv_block1d
from .conv_block2d import conv_block2d
from .ema import ema_
from .gather_tokens import gather_tokens
from .layer_targets import layer_targets
from .masked_regression_loss import masked_regression_loss
from .scatter_tokens import scatter_tokens

# The ops, each one file of this package; what the tests and the kernel bench cover op by op.
OPS = (
    "attention", "conv_block1d", "conv_block2d", "ema_", "gather_tokens", "layer_targets",
    "masked_regression_loss", "scatter_tokens",
)  # fmt: skip

__all__ = [
    "HAS_TRITON",
    "OPS",
    "resolve_impl",
    "triton_interpret",
    "tracing_launches",
    "trace_launches",
    "compile_launch",
    "load_launch",
    "occupancy",
    "ptxas_available",
    "ARCHS",
    *OPS,
]
