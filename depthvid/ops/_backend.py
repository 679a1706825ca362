"""The one place that decides which backend runs an op.

``backend=None`` means: the backend set by :func:`use_backend` if any, else Triton for CUDA
tensors (when triton imports), else the torch reference. An explicit backend that cannot run
here falls back to the next one with a single warning, never a crash.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

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
    try:
        from depthvid import _C  # noqa: F401
    except ImportError:
        return False
    return True


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


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Return the backend that will actually run an op on ``tensor``."""
    if backend is None:
        backend = _default_backend.get()
    if backend is None:
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
    if backend == "cpp" and not (cpp_available() and tensor.is_cuda):
        fallback = "triton" if tensor.is_cuda and triton_available() else "torch"
        _warn_once(f"depthvid: C++/CUDA extension unavailable for this tensor; using {fallback!r}")
        return fallback
    if backend == "triton" and not triton_available():
        _warn_once("depthvid: triton is not installed; using the torch backend")
        return "torch"
    return backend
