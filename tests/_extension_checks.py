"""Shared by the depthvid._C tests (and tools/check_cuda_build.py): skip-if-unbuilt marker, the
dtype-aware comparison, the attention ops' output-and-gradient check and the opcheck cases."""
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


def _requires_grad(*tensors):
    return [t.requires_grad_() for t in tensors]


def opcheck_cases():
    """[(op overload, args)] covering every op of torch.ops.depthvid, CPU tensors."""
    q, k, v = _requires_grad(*(torch.randn(6, 2, 9, 16) for _ in range(3)))
    x = torch.randn(2, 4, 3, 5, 6, requires_grad=True)
    norm_weight, norm_bias = _requires_grad(torch.rand(4) + 0.5, torch.randn(4))
    conv = torch.randn(6, 3, 5, 6, requires_grad=True)
    temb, residual = _requires_grad(torch.randn(2, 3, 3), torch.randn(2, 3, 3, 5, 6))
    ops = torch.ops.depthvid
    out, lse = ops.sparse_causal_attn_fwd(q, k, v, 3, 0.25)
    t_out, t_lse = ops.temporal_attn_fwd(q, k, v, 3, 0.25)
    h, mean, rstd = ops.group_norm_silu(x, 2, norm_weight, norm_bias, 1e-5)
    detached = [t.detach() for t in (q, k, v, out, lse, t_lse, x, mean, rstd, h)]
    dq, dk, dv, d_out, d_lse, d_tlse, dx, d_mean, d_rstd, dh = detached
    return [
        (ops.sparse_causal_attn_fwd.default, (q, k, v, 3, 0.25)),
        (ops.sparse_causal_attn_bwd.default, (torch.randn(6, 2, 9, 16), dq, dk, dv, d_out, d_lse, 3, 0.25)),
        (ops.temporal_attn_fwd.default, (q, k, v, 3, 0.25)),
        (ops.temporal_attn_bwd.default, (torch.randn(6, 2, 9, 16), dq, dk, dv, d_tlse, 3, 0.25)),
        (ops.group_norm_silu.default, (x, 2, norm_weight, norm_bias, 1e-5)),
        (ops.group_norm_silu.default, (x, 2, None, None, 1e-5)),
        (ops.group_norm_silu_bwd.default, (torch.randn_like(dh), dx, d_mean, d_rstd, 2, norm_weight.detach(), None)),
        (ops.conv_epilogue.default, (conv, 3, temb, residual, 2.0)),
        (ops.conv_epilogue.default, (conv, 3, None, None, 1.0)),
    ]
