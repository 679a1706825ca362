"""The one place that decides which backend runs an op, and how a non-torch backend is called.

``backend=None`` means: the backend set by :func:`use_backend` if any, else the fastest backend
for the op that runs on the tensor's device (:data:`CUDA_AUTO`, measured on an H100;
:data:`CPU_AUTO`), else the torch reference. An explicit backend that cannot run here falls back
to the next one with a single warning, never a crash.

Self-check: the first use of a non-torch backend for an (op, device, compute dtype) in a process
runs that op on small random inputs with that backend and with the torch reference (output and
input gradients, well under a second); an exception or a mismatch warns once, naming the op, and
the op runs on torch for the rest of the process. ``DEPTHVID_SELF_CHECK=0`` turns it off (the
tests of the kernels themselves, benchmarks). Ops register their check with
:func:`register_self_check`; nothing here is specific to one backend.

Autocast: kernels take one dtype. :func:`call_backend` casts an op's floating tensors to the
autocast dtype when autocast is on for their device (what torch's own matmul-like ops do) and
runs the backend with autocast off; autograd casts the gradients back to each input's dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import threading
import time
import warnings
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cpp")

_default_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "depthvid_default_backend", default=None
)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def cpp_available() -> bool:
    from depthvid import extension

    return extension.available()


def _cpp_runs_on(tensor: torch.Tensor) -> bool:
    """depthvid._C has CPU kernels always; CUDA kernels (fp16/bf16 tensor-core tiles) only when built with CUDA."""
    from depthvid import extension

    if not cpp_available():
        return False
    if tensor.device.type == "cpu":
        return True
    # compute_dtype, not tensor.dtype: under fp16 autocast an op gets fp32 inputs (GroupNorm's
    # output, the latents) and casts them itself before the kernel runs
    return tensor.is_cuda and extension.build_info()["cuda"] and compute_dtype(tensor) in (torch.float16, torch.bfloat16)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Make ``backend`` the default for every op called with ``backend=None`` in this context.

    This is how a whole model (which always passes ``backend=None``) is switched, e.g. to run
    the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
    token = _default_backend.set(backend)
    try:
        yield
    finally:
        _default_backend.reset(token)


def resolve_backend(backend: str | None, tensor: torch.Tensor, op: str | None = None) -> str:
    """Return the backend that will actually run ``op`` on ``tensor`` (torch when the chosen
    backend failed its self-check for this op, device and compute dtype)."""
    backend = _available_backend(backend, tensor, op)
    if backend != "torch" and op is not None and self_check_enabled():
        if not _passes_self_check(op, backend, tensor.device, compute_dtype(tensor)):
            return "torch"
    return backend


# backend=None on CUDA, per op: the first that runs, from the op benchmarks on an H100 (fp16 and
# bf16, SD2-depth's shapes at 8 x 512x512, forward + backward; benchmarks/README.md). Sparse-causal:
# Triton takes 0.40-0.62x torch's time at levels 1-3 and 1.16-1.28x at level 0, about 0.8x over
# the UNet's 16 attention layers, at 0.2-0.4x the memory. Temporal: depthvid._C's CUDA kernel takes
# 0.54-0.90x Triton's time at every level. Conv: cuDNN (torch) takes 0.3-0.8x Triton's time
# everywhere, fused or not.
CUDA_AUTO = {
    "sparse_causal_attention": ("triton",),
    "temporal_attention": ("cpp", "triton"),
    "pseudo3d_conv": ("torch",),
}


# backend=None on CPU, per op, from the CPU benchmarks (fp32, 2 threads; benchmarks/README.md).
# Temporal: depthvid._C takes 0.39-0.61x the time of torch's transpose + SDPA + transpose forward +
# backward (0.21-0.37x forward) at every UNet level, in the layout the processors pass (8 x 512x512,
# bench_temporal_attn.py). Sparse-causal stays torch: depthvid._C takes 0.94-1.02x the
# time of torch's two flash calls merged by log-sum-exp, both being MKL's sgemm (pass
# backend="cpp" for its 0.54x memory). Conv stays torch: with the GroupNorm+SiLU/temb/residual
# fused, depthvid._C takes 0.93-1.00x torch's forward + backward at levels 0-2 but 1.26x at level 3
# (the conv itself is oneDNN in both).
CPU_AUTO = {
    "temporal_attention": ("cpp",),
}


def _auto_backend(tensor: torch.Tensor, op: str | None) -> str:
    if tensor.device.type == "cpu":
        return "cpp" if "cpp" in CPU_AUTO.get(op, ()) and _cpp_runs_on(tensor) else "torch"
    if not tensor.is_cuda:
        return "torch"
    for backend in CUDA_AUTO.get(op, ("triton",)):
        if (backend == "cpp" and _cpp_runs_on(tensor)) or (backend == "triton" and triton_available()):
            return backend
    return "torch"


def _available_backend(backend: str | None, tensor: torch.Tensor, op: str | None = None) -> str:
    if backend is None:
        backend = _default_backend.get()
    if backend is None:
        return _auto_backend(tensor, op)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
    if backend == "cpp" and not _cpp_runs_on(tensor):
        from depthvid import extension

        fallback = "triton" if tensor.is_cuda and triton_available() else "torch"
        reason = extension.unavailable_reason() if not cpp_available() else "no C++/CUDA kernel for this device and dtype"
        _warn_once(f"depthvid: {reason}; using {fallback!r}")
        return fallback
    if backend == "triton" and not triton_available():
        _warn_once("depthvid: triton is not installed; using the torch backend")
        return "torch"
    return backend


# ---------------------------------------------------------------------------- autocast boundary


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a kernel runs in for this op input: the autocast dtype under autocast, else its own."""
    device_type = tensor.device.type
    if tensor.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def call_backend(implementation: Callable, *args, **kwargs):
    """``implementation(*args, **kwargs)`` with, under autocast, every fp16/bf16/fp32 tensor among
    the arguments cast to the autocast dtype and autocast off inside (its torch parts then run in
    the dtypes given). The casts are autograd ops: each input's gradient comes back in its dtype."""
    device_type = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).device.type
    if not torch.is_autocast_enabled(device_type):
        return implementation(*args, **kwargs)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(value):
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return value.to(dtype)
        return value

    with torch.autocast(device_type, enabled=False):
        return implementation(*map(cast, args), **{name: cast(value) for name, value in kwargs.items()})


# ---------------------------------------------------------------------------- self-check


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    """How to check one op: ``run(backend, *inputs)`` on random inputs of ``shapes`` (all differentiable)."""

    op: str
    shapes: tuple
    run: Callable


@dataclasses.dataclass(frozen=True)
class SelfCheckResult:
    op: str
    backend: str
    device: str
    dtype: str
    ok: bool
    detail: str  # worst relative error and tensor, or the exception
    seconds: float


_SELF_CHECKS: dict[str, SelfCheck] = {}
_self_check_results: dict[tuple, SelfCheckResult | None] = {}  # None: running (its own calls pass)
# max |backend - reference| / max(1, max |reference|) per compute dtype. A wrong index, frame or
# tile gives errors of order 1; correct kernels are 10-100x below these (rounding of P/dS to the
# dtype, fp32 accumulation in a different order).
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def register_self_check(op: str, shapes: tuple, run: Callable) -> None:
    _SELF_CHECKS[op] = SelfCheck(op, shapes, run)


def registered_self_checks() -> list[str]:
    return list(_SELF_CHECKS)


def self_check_enabled() -> bool:
    return os.environ.get("DEPTHVID_SELF_CHECK", "1") != "0"


def _passes_self_check(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    key = (op, backend, str(device), dtype)
    if key not in _self_check_results:
        _self_check_results[key] = None
        result = _in_own_thread(run_self_check, op, backend, device, dtype)
        _self_check_results[key] = result
        if not result.ok:
            warnings.warn(
                f"depthvid: backend {backend!r} failed its self-check for {op} on {device} in {dtype} "
                f"({result.detail}); {op} runs on the torch backend for the rest of this run",
                RuntimeWarning, stacklevel=4,
            )
    result = _self_check_results[key]
    return result is None or result.ok


def _in_own_thread(function: Callable, *args):
    """``function(*args)`` run in a new thread. Autograd's saved-tensor hooks, grad mode and
    autocast are per thread, so a self-check run there leaves no trace in the caller's autograd
    graph. Run in the caller's thread inside a gradient-checkpointed forward, the check's own
    saved tensors were counted by torch.utils.checkpoint, whose recomputation (the check having
    run) saved fewer: "A different number of tensors was saved" on the first tuning step."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="depthvid-self-check")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_self_check(op: str, backend: str, device: torch.device | str, dtype: torch.dtype) -> SelfCheckResult:
    """Run ``op`` with ``backend`` and with torch on the same small inputs and compare the output
    and every input gradient (the reference in fp32 from the same rounded inputs)."""
    check, device = _SELF_CHECKS[op], torch.device(device)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator).to(device, dtype) for shape in check.shapes]
    ok, detail = True, ""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            results, grad_out = {}, None
            for name, run_backend, run_dtype in (("backend", backend, dtype), ("reference", "torch", torch.float32)):
                leaves = [t.detach().to(run_dtype, copy=True).requires_grad_() for t in inputs]
                out = check.run(run_backend, *leaves)
                if grad_out is None:
                    grad_out = torch.randn(out.shape, generator=generator).to(device, dtype)
                out.backward(grad_out.to(out.dtype))
                results[name] = [out.detach().float()] + [leaf.grad.float() for leaf in leaves]
        labels = ["output"] + [f"grad of input {i}" for i in range(len(inputs))]
        errors = [
            ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
            for got, want in zip(results["backend"], results["reference"])
        ]
        worst = max(range(len(errors)), key=lambda i: errors[i] if errors[i] == errors[i] else float("inf"))
        ok = errors[worst] <= SELF_CHECK_TOLERANCE[dtype]  # NaN fails
        detail = f"max relative error {errors[worst]:.2g} in the {labels[worst]}"
    except Exception as error:  # a kernel that cannot compile or launch here fails its check
        first_line = (str(error).strip().splitlines() or [""])[0]
        ok, detail = False, f"{type(error).__name__}: {first_line[:200]}"
    return SelfCheckResult(op, backend, str(device), str(dtype).removeprefix("torch."), ok, detail,
                           time.perf_counter() - started)


def reset_self_checks() -> None:
    """Forget every self-check result (tests)."""
    _self_check_results.clear()
