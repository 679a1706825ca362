"""torch.ops.depthvid.sparse_causal_attn_{fwd,bwd}: fake kernels, autograd, private wrapper."""
from __future__ import annotations

import torch


@torch.library.register_fake("depthvid::sparse_causal_attn_fwd")
def _fwd_fake(q, k, v, num_frames, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("depthvid::sparse_causal_attn_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, num_frames, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, num_frames, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.num_frames, ctx.scale = num_frames, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.depthvid.sparse_causal_attn_bwd(grad_out, q, k, v, out, lse, ctx.num_frames, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("depthvid::sparse_causal_attn_fwd", _backward, setup_context=_setup_context)


def sparse_causal_attn_cpp(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """(batch*frames, heads, tokens, head_dim) -> same; the lse output is internal to autograd."""
    out, _ = torch.ops.depthvid.sparse_causal_attn_fwd(q, k, v, num_frames, scale)
    return out
