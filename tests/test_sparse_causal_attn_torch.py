"""The torch backend of sparse-causal attention on CPU (two flash calls merged by log-sum-exp)
against Tune-A-Video's concatenated formulation: outputs and q/k/v gradients."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from depthvid.ops import sparse_causal_attention
from depthvid.ops.sparse_causal_attn import sparse_causal_attention_concat

FP32_TOLERANCE = (2e-6, 2e-5)  # (atol, rtol): the two formulations sum in different orders
# bf16/fp16: the merge's max error against an fp64 truth may be this many times the concatenated
# formulation's own error in that dtype (measured: <= 1.5 for bf16, <= 1.3 for fp16)
LOW_PRECISION_ERROR_RATIO = 2.5


def random_qkv_grad(rows, heads, tokens, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, tokens, head_dim, generator=generator).to(dtype) for _ in range(4)]


def output_and_grads(attention, q, k, v, grad_out, num_frames):
    """[out, dq, dk, dv] of ``attention(q, k, v, num_frames, scale)``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, num_frames, q.shape[-1] ** -0.5)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


def merged(q, k, v, num_frames, scale):
    return sparse_causal_attention(q, k, v, num_frames, scale=scale, backend="torch")


def assert_merge_matches_concat(q, k, v, grad_out, num_frames):
    names = ("out", "dq", "dk", "dv")
    got = output_and_grads(merged, q, k, v, grad_out, num_frames)
    want = output_and_grads(sparse_causal_attention_concat, q, k, v, grad_out, num_frames)
    for name, g in zip(names, got):
        assert g.dtype == q.dtype and g.shape == q.shape, name
    if q.dtype == torch.float32:
        atol, rtol = FP32_TOLERANCE
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
        return
    exact = output_and_grads(sparse_causal_attention_concat, *(t.double() for t in (q, k, v, grad_out)), num_frames)
    for name, g, w, x in zip(names, got, want, exact):
        error = (g.double() - x).abs().max().item()
        concat_error = (w.double() - x).abs().max().item()
        bound = LOW_PRECISION_ERROR_RATIO * concat_error + 1e-6
        assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g} (concat's {concat_error:.3g})"


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_frames",
    [
        pytest.param(1, id="F1-one-frame"),
        pytest.param(2, id="F2-frame0-keys-only"),
        pytest.param(3, id="F3-first-merged-frame"),
        pytest.param(5, id="F5"),
    ],
)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(2, id="B2-strided-frame-slices")])
def test_merge_matches_concat_over_frames(batch, num_frames, dtype):
    q, k, v, grad_out = random_qkv_grad(batch * num_frames, 2, 33, 64, dtype)  # ragged tokens
    assert_merge_matches_concat(q, k, v, grad_out, num_frames)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "head_dim, tokens",
    [
        pytest.param(40, 17, id="D40-N17"),
        pytest.param(64, 130, id="D64-N130-past-one-kv-block"),
        pytest.param(80, 7, id="D80-N7"),
        pytest.param(160, 40, id="D160-N40"),
    ],
)
def test_merge_matches_concat_head_dims(head_dim, tokens, dtype):
    q, k, v, grad_out = random_qkv_grad(2 * 3, 1, tokens, head_dim, dtype, seed=1)
    assert_merge_matches_concat(q, k, v, grad_out, num_frames=3)


def test_merge_is_exact_in_float64():
    # fp64 runs through the same flash calls; the merge keeps the inputs' precision
    q, k, v, grad_out = random_qkv_grad(4, 2, 9, 16, torch.float64, seed=2)
    got = output_and_grads(merged, q, k, v, grad_out, 4)
    want = output_and_grads(sparse_causal_attention_concat, q, k, v, grad_out, 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_diffusers_layout_and_broadcast_grad():
    # the processor's q/k/v are transposed views of (B*F, N, H, D); a broadcast upstream gradient
    torch.manual_seed(3)
    num_frames, heads, tokens, head_dim = 4, 2, 33, 40
    q, k, v = (torch.randn(num_frames, tokens, heads, head_dim).transpose(1, 2) for _ in range(3))
    grad_out = torch.randn(num_frames, heads, 1, head_dim).expand(num_frames, heads, tokens, head_dim)
    assert not q.is_contiguous() and grad_out.stride(2) == 0
    assert_merge_matches_concat(q, k, v, grad_out, num_frames)


class TokenLengths(TorchDispatchMode):
    """Records dim -2 (tokens) of every 4-d tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.lengths = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                self.lengths.add(t.shape[-2])
        return result


@pytest.mark.parametrize("attention, builds_2n", [(merged, False), (sparse_causal_attention_concat, True)])
def test_concatenated_keys_are_never_built(attention, builds_2n):
    tokens = 11
    q, k, v, grad_out = random_qkv_grad(5, 2, tokens, 16, torch.float32, seed=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with TokenLengths() as seen:
        out = attention(q, k, v, 5, 0.25)
        torch.autograd.grad(out, (q, k, v), grad_out)
    assert (2 * tokens in seen.lengths) == builds_2n, seen.lengths


@pytest.mark.parametrize(
    "layout",
    [
        "head_dim_stride_2",  # every other element of a wider buffer
        "heads_innermost",  # (B*F, N, D, H) storage permuted to (B*F, H, N, D)
        "tokens_innermost",  # (B*F, H, D, N) storage transposed
    ],
)
def test_merge_handles_a_non_unit_head_dim_stride(layout):
    rows, heads, tokens, head_dim = 5, 2, 33, 40
    generator = torch.Generator().manual_seed(1)

    def make():
        if layout == "head_dim_stride_2":
            return torch.randn(rows, heads, tokens, 2 * head_dim, generator=generator)[..., ::2]
        if layout == "heads_innermost":
            return torch.randn(rows, tokens, head_dim, heads, generator=generator).permute(0, 3, 1, 2)
        return torch.randn(rows, heads, head_dim, tokens, generator=generator).transpose(-1, -2)

    q, k, v, grad_out = make(), make(), make(), make()
    assert q.stride(-1) != 1
    assert_merge_matches_concat(q, k, v, grad_out, num_frames=5)
