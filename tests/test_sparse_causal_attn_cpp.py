"""Sparse-causal attention in depthvid._C (CPU) against the torch reference: output and dq, dk, dv."""
from __future__ import annotations

import pytest
import torch
from _extension_checks import DTYPES, check_attention, random_tensors, requires_extension

from depthvid.ops import sparse_causal_attention
from depthvid.ops.sparse_causal_attn import sparse_causal_attention_concat

pytestmark = requires_extension


def concat_reference(q, k, v, num_frames):
    """The definition: SDPA over cat(frame 0, frame f-1), any strides (an independent formulation
    from the CPU torch backend's log-sum-exp merge)."""
    return sparse_causal_attention_concat(q, k, v, num_frames, q.shape[-1] ** -0.5)


def check(q, k, v, grad_out, num_frames):
    check_attention(sparse_causal_attention, concat_reference, q, k, v, grad_out, num_frames)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_frames",
    [
        pytest.param(1, id="F1-one-frame"),
        pytest.param(2, id="F2-frame0-keys-only"),
        pytest.param(3, id="F3-first-two-key-frame-query"),
        pytest.param(5, id="F5"),
    ],
)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
def test_matches_torch(dtype, num_frames, head_dim):
    batch = 2  # two videos: frame 0 of each is a separate key frame
    check(*random_tensors((batch * num_frames, 2, 33, head_dim), dtype), num_frames)  # 33: ragged tokens


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_blocks_ragged(dtype):
    """600 tokens: several forward key blocks (512) and backward blocks (128), none full at the end,
    so the online-softmax rescaling and the block loops' tails are exercised."""
    check(*random_tensors((3, 1, 600, 40), dtype), num_frames=3)


def test_two_threads_sum_frame0_gradients():
    """Frame 0's dK/dV are accumulated per thread and summed: run with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(*random_tensors((10, 3, 47, 64), torch.float32), num_frames=5)
    finally:
        torch.set_num_threads(threads)


def test_model_layout_views_and_non_unit_head_dim_stride():
    """The attention processors pass (B*F, N, H, D).transpose(1, 2) views; a non-unit head_dim
    stride is copied once. Both give the contiguous result."""
    rows, heads, tokens, head_dim = 6, 2, 21, 40
    q, k, v, grad_out = random_tensors((rows, tokens, heads, head_dim), torch.float32)
    views = [t.transpose(1, 2) for t in (q, k, v, grad_out)]  # (B*F, H, N, D), strides (N*H*D, D, H*D, 1)
    assert not views[0].is_contiguous()
    check(*views, num_frames=3)
    strided = [torch.randn(rows, heads, tokens, head_dim * 2)[..., ::2] for _ in range(3)]
    assert strided[0].stride(-1) == 2
    check(*strided, views[3], num_frames=3)


def test_bad_arguments_are_rejected_by_name():
    q = torch.randn(6, 2, 8, 16)
    with pytest.raises(RuntimeError, match="num_frames=4 must be >= 1 and divide q.size\\(0\\)=6"):
        torch.ops.depthvid.sparse_causal_attn_fwd(q, q, q, 4, 0.25)
    with pytest.raises(RuntimeError, match="q, k, v must have the same shape"):
        torch.ops.depthvid.sparse_causal_attn_fwd(q, q[:, :1], q, 3, 0.25)
    with pytest.raises(RuntimeError, match="q, k, v must have the same dtype"):
        torch.ops.depthvid.sparse_causal_attn_fwd(q, q.double(), q, 3, 0.25)
    out, lse = torch.ops.depthvid.sparse_causal_attn_fwd(q, q, q, 3, 0.25)
    with pytest.raises(RuntimeError, match="lse must be \\(batch\\*frames, heads, tokens\\) = \\(6, 2, 8\\)"):
        torch.ops.depthvid.sparse_causal_attn_bwd(q, q, q, q, out, lse[:, :1], 3, 0.25)
