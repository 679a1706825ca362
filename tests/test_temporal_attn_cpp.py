"""Temporal attention in depthvid._C (CPU) against the torch reference: output and dq, dk, dv."""
from __future__ import annotations

import pytest
import torch
from _extension_checks import DTYPES, check_attention, random_tensors, requires_extension

from depthvid.ops import temporal_attention

pytestmark = requires_extension


def check(q, k, v, grad_out, num_frames):
    def torch_backend(q, k, v, num_frames):
        return temporal_attention(q, k, v, num_frames, backend="torch")

    check_attention(temporal_attention, torch_backend, q, k, v, grad_out, num_frames)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_frames", [1, 2, 3, 5, 9], ids=["F1-one-frame", "F2", "F3", "F5", "F9-two-lane-groups"])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
def test_matches_torch(dtype, num_frames, head_dim):
    check(*random_tensors((2 * num_frames, 2, 19, head_dim), dtype), num_frames)  # 2 videos, 19 tokens


def test_two_threads_and_model_layout_views():
    """(B*F, N, H, D).transpose(1, 2) views, as the processors pass them, on two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tensors = random_tensors((8, 37, 3, 64), torch.float32)
        check(*(t.transpose(1, 2) for t in tensors), num_frames=4)
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_are_rejected_by_name():
    q = torch.randn(6, 2, 8, 16)
    with pytest.raises(RuntimeError, match="temporal_attn_fwd: num_frames=4 must be >= 1 and divide"):
        torch.ops.depthvid.temporal_attn_fwd(q, q, q, 4, 0.25)
    with pytest.raises(RuntimeError, match="grad_out must have q's shape and dtype"):
        torch.ops.depthvid.temporal_attn_bwd(q.half(), q, q, q, q[..., 0], 3, 0.25)
