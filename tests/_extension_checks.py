"""Shared by the depthvid._C tests: skip-if-unbuilt marker, the dtype-aware comparison and the
attention ops' output-and-gradient check."""
from __future__ import annotations

import pytest
import torch

from depthvid import extension

# The extension is built by the README's install command; test_extension.py fails (not skips)
# when it is missing there. The per-op tests skip so a DEPTHVID_SKIP_EXTENSION=1 install still tests.
requires_extension = pytest.mark.skipif(not extension.available(), reason=extension.unavailable_reason())

# fp32: against the torch backend directly, (atol, rtol). The C++ kernels accumulate in fp32 and
# use a polynomial exp (relative error < 2e-7).
FP32_TOLERANCE = (2e-5, 2e-5)
# bf16: against an fp64 reference, the C++ max error may be this many times the torch backend's
# own bf16 max error (both round inputs and outputs to bf16; the largest ratio seen is 2.2, on a
# GroupNorm weight gradient).
BF16_ERROR_RATIO = 3.0

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def assert_close_to_torch(names, got, want, exact=None):
    """got/want: lists of tensors from the cpp and torch backends; exact: the fp64 torch results
    (needed for bf16, where the bound is relative to torch's own error)."""
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype} {tuple(g.shape)} vs {w.dtype} {tuple(w.shape)}"
    if got[0].dtype == torch.float32:
        atol, rtol = FP32_TOLERANCE
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
        return
    for name, g, w, ref in zip(names, got, want, exact):
        cpp_error = (g.double() - ref).abs().max().item()
        torch_error = (w.double() - ref).abs().max().item()
        bound = BF16_ERROR_RATIO * torch_error + 1e-6
        assert cpp_error <= bound, f"{name}: max error {cpp_error:.3g} > {bound:.3g} (torch's {torch_error:.3g})"


def random_tensors(shape, dtype, count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]


def attention_results(op, q, k, v, grad_out, num_frames):
    """[out, dq, dk, dv] of ``op(q, k, v, num_frames)``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = op(q, k, v, num_frames)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


def check_attention(op, reference, q, k, v, grad_out, num_frames):
    """The public attention ``op`` on the cpp backend against ``reference(q, k, v, num_frames)``
    in the same dtype (and in fp64 for the bf16 bounds)."""
    got = attention_results(lambda *args: op(*args, backend="cpp"), q, k, v, grad_out, num_frames)
    want = attention_results(reference, q, k, v, grad_out, num_frames)
    exact = None
    if q.dtype != torch.float32:
        exact = attention_results(reference, *(t.double() for t in (q, k, v, grad_out)), num_frames)
    assert_close_to_torch(("out", "dq", "dk", "dv"), got, want, exact)
