"""What the three Triton kernel files share, declared once: dtype and device checks, the device
guard, the interpreter's bf16 workaround, LOG2E, the STRIDE_UNIT stride
alignment (:func:`stride_unit`) and :class:`Launch` (one kernel launch as a
launcher makes it, which the GPU compile check rebuilds from meta tensors).

Interpreter facts (TRITON_INTERPRET=1, triton 3.9, measured): fp16 loads, arithmetic and tl.dot
are exact; bf16 loads and conversions are exact, but bf16 arithmetic and tl.dot on bf16 operands
are silently wrong, and fp32 -> bf16 conversions truncate (a GPU rounds to nearest even). So
every kernel converts loaded tiles to fp32 before arithmetic, and a ``FP32_DOT`` constexpr (set
for bf16 under the interpreter, and for fp32 everywhere) upcasts the dot operands: bf16 data
really is bf16 in memory and is rounded to bf16 where a GPU rounds it (by truncation here, so
bf16 tests allow one more ulp).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from depthvid.errors import UserError

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E): softmax in exp2 units
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpret_like_a_gpu_build() -> None:
    """The interpreter checks every int32 add/sub/mul for overflow, which a GPU build does only
    with debug=True; measured here it was over half the interpreted time of the conv kernels.
    Switch it off like a GPU build (DEPTHVID_INTERPRETER_OVERFLOW_CHECKS=1 keeps it)."""
    if not interpreting() or os.environ.get("DEPTHVID_INTERPRETER_OVERFLOW_CHECKS") == "1":
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


_interpret_like_a_gpu_build()


def device_guard(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def fp32_dot(dtype: torch.dtype, on_gpu: bool) -> bool:
    """FP32_DOT for a kernel whose tensors have ``dtype``: fp32 inputs get true fp32 products
    ("ieee", not TF32, like the reference); bf16 in the interpreter, whose bf16 dot is wrong."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not on_gpu)


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with an fp32 result; see :func:`fp32_dot` for FP32_DOT."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


def stride_unit(*tensors: torch.Tensor) -> int:
    """STRIDE_UNIT of a launch. Kernels that take it get every stride but the last of each tensor
    divided by it and multiply them back by the constexpr, so Triton knows that every (tokens,
    head_dim) tile row starts on a STRIDE_UNIT-element boundary. Triton's own specialisation only
    marks integers divisible by 16: head dim 40's strides (40, 8 * 40, ...) are multiples of 8
    elements, 16 bytes in fp16, which it cannot see, and those tiles would load without 128-bit
    vectors. The unit is the largest power of two below 16 that divides all those strides, and 1
    where they are all multiples of 16 (Triton sees that already; the binary stays the same)."""
    unit = 16
    for tensor in tensors:
        for stride in tensor.stride()[:-1]:
            while stride % unit:
                unit //= 2
    return 1 if unit == 16 else unit


def unit_strides(unit: int, *tensors: torch.Tensor) -> tuple[int, ...]:
    """The tensors' strides, flattened, as a STRIDE_UNIT kernel takes them (see :func:`stride_unit`):
    all but each tensor's last divided by ``unit``."""
    return tuple(
        stride // unit if dim < tensor.dim() - 1 else stride
        for tensor in tensors for dim, stride in enumerate(tensor.stride())
    )


def check_tensors(op: str, **tensors: torch.Tensor | None) -> None:
    """UserError unless the given tensors (None = absent) share one supported dtype and one device
    that Triton can run on here."""
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, tensor in present.items():
        if tensor.dtype not in SUPPORTED_DTYPES or tensor.dtype != first.dtype:
            got = ", ".join(f"{n}={t.dtype}" for n, t in present.items())
            raise UserError(
                f"{op}: backend='triton' needs {', '.join(present)} in one dtype out of float16/bfloat16/"
                f"float32, got {got}; cast them (or run under torch.autocast) or use backend='torch'"
            )
        if tensor.device != first.device:
            raise UserError(
                f"{op}: {name} is on {tensor.device} but {first_name} is on {first.device}; move it there"
            )
    if not first.is_cuda and not interpreting():
        raise UserError(
            f"{op}: backend='triton' needs CUDA tensors, got {first.device} tensors without TRITON_INTERPRET=1; "
            "move them to a GPU, set TRITON_INTERPRET=1 before triton is imported, or use backend='torch'"
        )


def check_attention_inputs(op: str, q, k, v, max_head_dim: int) -> None:
    """The Triton attention entry points' input checks: :func:`check_tensors` and the head dims
    their register tiles hold."""
    check_tensors(op, q=q, k=k, v=v)
    if not 1 <= q.shape[-1] <= max_head_dim:
        raise UserError(
            f"{op}: head_dim must be <= {max_head_dim} (and >= 1) for backend='triton', got {q.shape[-1]}; "
            "use more heads or backend='torch'"
        )


def attention_meta_inputs(frames: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, count: int):
    """``count`` meta tensors laid out as the model's attention inputs ((B*F, N, H, D) projections
    viewed as (B*F, H, N, D)) and two fp32 (B*F, H, N) statistics (LSE, delta): the arguments the
    attention kernels' ``gpu_launches`` launch with."""
    tensors = [torch.empty(frames, tokens, heads, head_dim, dtype=dtype, device="meta").transpose(1, 2) for _ in range(count)]
    stats = [torch.empty(frames, heads, tokens, device="meta") for _ in range(2)]
    return (*tensors, *stats)


class FusedAttentionFunction(torch.autograd.Function):
    """Autograd of a fused attention op, given its two launchers: ``fwd(q, k, v, num_frames,
    scale) -> (out, lse)`` and ``bwd(do, q, k, v, out, lse, num_frames, scale) -> (dq, dk, dv)``.
    Differentiable in q, k, v; saves q, k, v, out and the fp32 LSE for the backward."""

    @staticmethod
    def forward(ctx, fwd, bwd, q, k, v, num_frames: int, scale: float):
        out, lse = fwd(q, k, v, num_frames, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.num_frames, ctx.scale = bwd, num_frames, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(do, q, k, v, out, lse, ctx.num_frames, ctx.scale)
        return None, None, dq, dk, dv, None, None


@dataclasses.dataclass
class Launch:
    """One kernel launch exactly as a launcher makes it: grid, positional arguments, constexprs
    and launch options (num_warps, num_stages). Calling it launches on the first tensor's device;
    tests/_gpu_compile.py compiles the same arguments, built from meta tensors, for sm_80/sm_90."""

    kernel: triton.runtime.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    label: str = ""  # what the compile check prints for this configuration

    def __call__(self) -> None:
        device_of = next(arg for arg in self.args if isinstance(arg, torch.Tensor))
        with device_guard(device_of):
            self.kernel[self.grid](*self.args, **self.kwargs)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__
