"""Temporal attention: at each token position, attention across the frames of one video."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from depthvid.ops._backend import call_backend, register_self_check, resolve_backend
from depthvid.ops.sparse_causal_attn import check_video_attention_inputs


def temporal_attention_torch(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """Reference: move frames next to head_dim and run SDPA over them."""
    batch, heads, tokens, head_dim = q.shape[0] // num_frames, *q.shape[1:]

    def frames_last(t):  # (B*F, H, N, D) -> (B, F, H, N, D) -> (B, H, N, F, D)
        return t.unflatten(0, (batch, num_frames)).permute(0, 2, 3, 1, 4)

    out = F.scaled_dot_product_attention(frames_last(q), frames_last(k), frames_last(v), scale=scale)
    # (B, H, N, F, D) -> (B, F, H, N, D) -> (B*F, H, N, D)
    return out.permute(0, 3, 1, 2, 4).reshape(batch * num_frames, heads, tokens, head_dim)


def temporal_attention(q, k, v, num_frames: int, scale: float | None = None, backend: str | None = None):
    """Self-attention across frames at every (head, token) position.

    Args:
        q, k, v: (batch*frames, heads, tokens, head_dim), frames of one video contiguous.
        num_frames: frames per video.
        scale: softmax scale, default head_dim ** -0.5.
        backend: None (best for the device), "torch", "triton" or "cpp".

    Returns:
        (batch*frames, heads, tokens, head_dim): out[b, f, h, n] = softmax over f' of
        scale * q[b, f, h, n] . k[b, f', h, n], applied to v[b, f', h, n].
    """
    check_video_attention_inputs(q, k, v, num_frames, "temporal_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend(backend, q, "temporal_attention")
    if backend == "cpp":
        from depthvid.extension.temporal_attn import temporal_attn_cpp

        return call_backend(temporal_attn_cpp, q, k, v, num_frames, scale)
    if backend == "triton":
        from depthvid.triton_kernels.temporal_attn import temporal_attn_triton

        return call_backend(temporal_attn_triton, q, k, v, num_frames, scale)
    return temporal_attention_torch(q, k, v, num_frames, scale)


# two videos of 5 frames, ragged tokens, SD's 64-dim heads
register_self_check(
    "temporal_attention", ((10, 2, 9, 64),) * 3,
    lambda backend, q, k, v: temporal_attention(q, k, v, 5, backend=backend),
)
