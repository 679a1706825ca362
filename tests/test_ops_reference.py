"""The torch reference of each op against a direct, written-out formula (outputs and gradients).

The explicit formulas run in float64 and are the ground truth; the reference runs in the
dtype under test. fp16 on CPU is compared to that fp64 truth with an fp16 tolerance.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depthvid.ops import GroupNormSiLU, pseudo3d_conv, sparse_causal_attention, temporal_attention

# max |actual - exact| allowed, as a fraction of max |exact| (fp16: ~10 units of its 4.9e-4 roundoff)
TOLERANCES = {torch.float32: 2e-6, torch.float16: 5e-3}
FRAMES = [1, 2, 3, 5]  # one frame; frames 0 and 1 only (both see frame 0); first f >= 2; several
BATCHES = [1, 2]
DTYPES = [torch.float32, torch.float16]
HEADS, TOKENS, HEAD_DIM = 2, 7, 8  # odd token count


def explicit_softmax(scores):
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return weights / weights.sum(dim=-1, keepdim=True)


def sparse_causal_explicit(q, k, v, num_frames, scale):
    """Tune-A-Video's form: frame f's keys are cat(frame 0, frame max(f-1, 0)), frame 0 duplicated for f < 2."""
    batch = q.shape[0] // num_frames
    rows = []
    for b in range(batch):
        for f in range(num_frames):
            first, previous = b * num_frames, b * num_frames + max(f - 1, 0)
            keys = torch.cat([k[first], k[previous]], dim=-2)  # (H, 2N, D)
            values = torch.cat([v[first], v[previous]], dim=-2)
            scores = scale * q[b * num_frames + f] @ keys.transpose(-1, -2)  # (H, N, 2N)
            rows.append(explicit_softmax(scores) @ values)
    return torch.stack(rows)


def temporal_explicit(q, k, v, num_frames, scale):
    """out[b, f, h, n] = sum_g softmax_g(scale * q[b,f,h,n] . k[b,g,h,n]) v[b,g,h,n]."""
    # (B*F, H, N, D) -> (B, F, H, N, D)
    q5, k5, v5 = (t.unflatten(0, (-1, num_frames)) for t in (q, k, v))
    scores = scale * torch.einsum("bfhnd,bghnd->bhnfg", q5, k5)
    out = torch.einsum("bhnfg,bghnd->bfhnd", explicit_softmax(scores), v5)
    return out.flatten(0, 1)


def leaves(dtype, *shapes):
    """Random tensors of ``dtype`` that require grad, and float64 copies of them that do too."""
    rounded = [torch.randn(shape).to(dtype) for shape in shapes]
    low = [t.clone().requires_grad_() for t in rounded]
    exact = [t.double().requires_grad_() for t in rounded]  # the same values, exactly
    return low, exact


def assert_close_to_exact(actual, exact, dtype):
    """Max error relative to the tensor's scale: low-precision error grows with the magnitudes summed."""
    assert actual.dtype == dtype and actual.shape == exact.shape
    error = (actual.double() - exact.detach()).abs().max().item()
    scale = max(exact.detach().abs().max().item(), 1.0)
    assert error <= TOLERANCES[dtype] * scale, f"max error {error:.3g} > {TOLERANCES[dtype]} * {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_frames", FRAMES)
@pytest.mark.parametrize(
    "op, explicit",
    [(sparse_causal_attention, sparse_causal_explicit), (temporal_attention, temporal_explicit)],
    ids=["sparse_causal", "temporal"],
)
def test_attention_reference_matches_explicit_formula(op, explicit, num_frames, batch, dtype):
    torch.manual_seed(0)
    shape = (batch * num_frames, HEADS, TOKENS, HEAD_DIM)
    (q, k, v), (q64, k64, v64) = leaves(dtype, shape, shape, shape)
    grad_out = torch.randn(shape)

    out = op(q, k, v, num_frames, backend="torch")
    expected = explicit(q64, k64, v64, num_frames, HEAD_DIM**-0.5)
    assert out.dtype == dtype and out.shape == shape
    assert_close_to_exact(out, expected, dtype)

    out.backward(grad_out.to(dtype))
    expected.backward(grad_out.to(dtype).double())
    for name, low, exact in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert low.grad is not None, name
        assert_close_to_exact(low.grad, exact.grad, dtype)


@pytest.mark.parametrize("num_frames", [3, 5])
def test_sparse_causal_explicit_scale_is_used(num_frames):
    torch.manual_seed(1)
    q, k, v = (torch.randn(num_frames, HEADS, TOKENS, HEAD_DIM, dtype=torch.float64) for _ in range(3))
    out = sparse_causal_attention(q, k, v, num_frames, scale=0.3, backend="torch")
    torch.testing.assert_close(out, sparse_causal_explicit(q, k, v, num_frames, 0.3))
    assert not torch.allclose(out, sparse_causal_explicit(q, k, v, num_frames, HEAD_DIM**-0.5))


def test_sparse_causal_frame_rows_only_see_frames_0_and_previous():
    """Changing frame 2's keys changes frame 3 only (frame 3 is the only one that attends to it)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(5, HEADS, TOKENS, HEAD_DIM, dtype=torch.float64) for _ in range(3))
    before = sparse_causal_attention(q, k, v, 5, backend="torch")
    k2 = k.clone()
    k2[2] += 1.0
    after = sparse_causal_attention(q, k2, v, 5, backend="torch")
    changed = [(before[f] - after[f]).abs().max().item() > 1e-9 for f in range(5)]
    assert changed == [False, False, False, True, False]


def groupnorm_silu_by_hand(x, num_groups, weight, bias, eps):
    """nn.GroupNorm + SiLU applied to every frame of (B, C, F, H, W) separately."""
    norm = nn.GroupNorm(num_groups, x.shape[1], eps=eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    frames = [F.silu(norm(x[:, :, f])) for f in range(x.shape[2])]
    return torch.stack(frames, dim=2)


CONV_CASES = [
    pytest.param(1, 1, 1, id="stride1-pad1"),
    pytest.param(2, 1, 1, id="stride2-pad1 (downsampler)"),
    pytest.param(1, 0, 1, id="stride1-pad0"),
    pytest.param(1, 1, 0, id="no-bias"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_frames", FRAMES)
@pytest.mark.parametrize("stride, padding, with_bias", CONV_CASES)
def test_pseudo3d_conv_reference_matches_conv3d(stride, padding, with_bias, num_frames, batch, dtype):
    torch.manual_seed(0)
    c_in, c_out, height, width = 3, 4, 5, 7  # odd channels and sizes
    (x, weight, bias), (x64, weight64, bias64) = leaves(
        dtype, (batch, c_in, num_frames, height, width), (c_out, c_in, 3, 3), (c_out,)
    )
    if not with_bias:
        bias = bias64 = None
    out = pseudo3d_conv(x, weight, bias, stride, padding, backend="torch")
    expected = F.conv3d(x64, weight64[:, :, None], bias64, stride=(1, stride, stride), padding=(0, padding, padding))
    assert out.shape == expected.shape
    assert_close_to_exact(out, expected, dtype)

    grad_out = torch.randn(expected.shape)
    out.backward(grad_out.to(dtype))
    expected.backward(grad_out.to(dtype).double())
    checked = [("x", x, x64), ("weight", weight, weight64)] + ([("bias", bias, bias64)] if with_bias else [])
    for name, low, exact in checked:
        assert low.grad is not None, name
        assert_close_to_exact(low.grad, exact.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("temb_shape", ["per-video (B, C)", "per-frame (B, F, C)"])
@pytest.mark.parametrize("batch, num_frames", [(1, 1), (2, 3)])
def test_pseudo3d_conv_reference_extras_match_by_hand(batch, num_frames, temb_shape, dtype):
    torch.manual_seed(0)
    c_in, c_out, height, width, groups, eps, output_scale = 4, 6, 5, 7, 2, 1e-5, 1.7
    temb_dims = (batch, c_out) if temb_shape.startswith("per-video") else (batch, num_frames, c_out)
    (x, weight, bias, gamma, beta, temb, residual), exact = leaves(
        dtype,
        (batch, c_in, num_frames, height, width),
        (c_out, c_in, 3, 3),
        (c_out,),
        (c_in,),
        (c_in,),
        temb_dims,
        (batch, c_out, num_frames, height, width),
    )
    x64, weight64, bias64, gamma64, beta64, temb64, residual64 = exact

    norm = GroupNormSiLU(groups, gamma, beta, eps)
    out = pseudo3d_conv(
        x, weight, bias, 1, 1, backend="torch", norm=norm, temb=temb, residual=residual, output_scale=output_scale
    )

    h = groupnorm_silu_by_hand(x64, groups, gamma64.detach(), beta64.detach(), eps)
    h = F.conv3d(h, weight64[:, :, None], bias64, padding=(0, 1, 1))
    if temb64.dim() == 2:
        h = h + temb64[:, :, None, None, None]  # the same bias on every frame
    else:
        h = h + temb64.permute(0, 2, 1)[:, :, :, None, None]  # (B, F, C) -> (B, C, F, 1, 1)
    expected = (h + residual64) / output_scale
    assert_close_to_exact(out, expected, dtype)

    grad_out = torch.randn(expected.shape)
    out.backward(grad_out.to(dtype))
    expected.backward(grad_out.to(dtype).double())
    checked = [("x", x, x64), ("weight", weight, weight64), ("temb", temb, temb64), ("residual", residual, residual64)]
    for name, low, high in checked:
        assert low.grad is not None, name
        assert_close_to_exact(low.grad, high.grad, dtype)
