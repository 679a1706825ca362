"""The Python side of depthvid._C, the C++/CUDA extension built by ``pip install .``.

Importing this package loads ``depthvid._C`` if it was built (which registers the ``torch.ops.depthvid``
ops and their CPU/CUDA kernels) and registers each op's fake kernel and autograd formula, one file
per op. The private wrappers (``sparse_causal_attn_cpp``, ...) are called only by depthvid.ops.
"""
from __future__ import annotations

import torch

try:
    from depthvid import _C
except ImportError as error:  # not built (skipped, failed, or build isolation) or built for another torch
    _C = None
    _load_error: str | None = f"{error}"
else:
    _load_error = None

INSTALL_HINT = (
    "build it with `pip install torch setuptools wheel ninja && pip install --no-build-isolation .` "
    "(see README)"
)


def build_info() -> dict:
    """What depthvid._C was built with: {"built", "cuda", "cuda_archs", "openmp", "torch", "error"}
    (openmp: its CPU kernels run on torch's threads; without it, on one)."""
    if _C is None:
        return {"built": False, "cuda": False, "cuda_archs": [], "openmp": False, "torch": None, "error": _load_error}
    error = None
    if _C.torch_version != torch.__version__:
        error = f"depthvid._C was built for torch {_C.torch_version} but torch {torch.__version__} runs; rebuild it"
    archs = [arch for arch in _C.cuda_archs.replace(",", ";").split(";") if arch]
    return {"built": True, "cuda": bool(_C.with_cuda), "cuda_archs": archs, "openmp": bool(_C.with_openmp),
            "torch": _C.torch_version, "error": error}


def available() -> bool:
    """True when the ops of depthvid._C can be called in this process."""
    info = build_info()
    return info["built"] and info["error"] is None


def unavailable_reason() -> str:
    """One line saying why depthvid._C cannot be used, and what to do."""
    info = build_info()
    return f"depthvid._C unavailable ({info['error']}); {INSTALL_HINT}"


if _C is not None:
    # fake kernels and autograd, registered once per op
    from depthvid.extension import pseudo3d_conv, sparse_causal_attn, temporal_attn  # noqa: F401
