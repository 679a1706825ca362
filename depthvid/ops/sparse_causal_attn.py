"""Sparse-causal attention: frame f attends to the tokens of frame 0 and frame f-1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from depthvid.ops._backend import resolve_backend


def check_video_attention_inputs(q, k, v, num_frames: int, name: str) -> None:
    """Validate the shared (batch*frames, heads, tokens, head_dim) layout of the attention ops."""
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be (batch*frames, heads, tokens, head_dim), got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{name}: q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if num_frames < 1 or q.shape[0] % num_frames:
        raise ValueError(f"{name}: num_frames={num_frames} must be >= 1 and divide q.shape[0]={q.shape[0]}")


def sparse_causal_attention_torch(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """Reference: SDPA of each frame against frame 0 (frames 0, 1) or cat(frame 0, frame f-1)."""
    batch = q.shape[0] // num_frames
    # (B*F, H, N, D) -> (B, F, H, N, D)
    q5, k5, v5 = (t.unflatten(0, (batch, num_frames)) for t in (q, k, v))

    def attend(queries, keys, values):  # (B, F', H, N, D) x (B, F', H, M, D)
        out = F.scaled_dot_product_attention(
            queries.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), scale=scale
        )
        return out.unflatten(0, queries.shape[:2])

    head = min(num_frames, 2)  # frames 0 and 1 see only frame 0
    outs = [attend(q5[:, :head], k5[:, :1].expand_as(q5[:, :head]), v5[:, :1].expand_as(q5[:, :head]))]
    if num_frames > 2:
        first_k = k5[:, :1].expand_as(k5[:, 2:])
        first_v = v5[:, :1].expand_as(v5[:, 2:])
        # keys of frame f >= 2: frame 0's tokens then frame f-1's -> (B, F-2, H, 2N, D)
        keys = torch.cat([first_k, k5[:, 1:-1]], dim=-2)
        values = torch.cat([first_v, v5[:, 1:-1]], dim=-2)
        outs.append(attend(q5[:, 2:], keys, values))
    return torch.cat(outs, dim=1).flatten(0, 1)


def sparse_causal_attention(q, k, v, num_frames: int, scale: float | None = None, backend: str | None = None):
    """Sparse-causal attention over the frames of each video.

    Args:
        q, k, v: (batch*frames, heads, tokens, head_dim); the frames of one video are
            contiguous (row = b * num_frames + f).
        num_frames: frames per video.
        scale: softmax scale, default head_dim ** -0.5.
        backend: None (best for the device), "torch", "triton" or "cpp".

    Returns:
        (batch*frames, heads, tokens, head_dim): for frame f, softmax(scale * q_f K^T) V with
        K, V the tokens of frame 0 and frame f-1 (just frame 0 for f in {0, 1}).
    """
    check_video_attention_inputs(q, k, v, num_frames, "sparse_causal_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend(backend, q)
    if backend == "triton":
        from depthvid.triton_kernels.sparse_causal_attn import sparse_causal_attn_triton

        return sparse_causal_attn_triton(q, k, v, num_frames, scale)
    return sparse_causal_attention_torch(q, k, v, num_frames, scale)
