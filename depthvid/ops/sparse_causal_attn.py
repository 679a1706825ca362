"""Sparse-causal attention: frame f attends to the tokens of frame 0 and frame f-1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from depthvid.ops._backend import call_backend, register_self_check, resolve_backend


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


def sparse_causal_attention_concat(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """Tune-A-Video's formulation: SDPA of each frame against cat(frame 0, frame f-1) (frame 0 for
    frames 0 and 1). Materialises the concatenated keys/values; the reference for the LSE merge."""
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


_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _first_frame(t: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, H, N, D) -> frame 0 of each video broadcast to every frame: a stride-0 view, no copy."""
    batch = t.shape[0] // num_frames
    return t.unflatten(0, (batch, num_frames))[:, :1].expand(-1, num_frames, -1, -1, -1).flatten(0, 1)


def _frames(t: torch.Tensor, num_frames: int, first: int, last: int) -> torch.Tensor:
    """Frames first..last-1 of every video: (B*F, ...) -> (B*(last-first), ...); a view when B == 1."""
    return t.unflatten(0, (-1, num_frames))[:, first:last].flatten(0, 1)


class SparseCausalAttnLSEFunction(torch.autograd.Function):
    """Sparse-causal attention on CPU as two flash-attention calls merged by log-sum-exp.

    Block A: every frame's queries against frame 0's keys. Block B: the queries of frames f >= 2
    against frame f-1's keys. Softmax over the union of both key sets is exact when the blocks'
    normalised outputs are weighted by their share of the total exponential mass:
    ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.
    Backward gives each block the merged out and lse (so its softmax rows are the full rows) and
    sums the blocks' gradients: the ring-attention pattern. No (2N)-long key tensor is ever built.
    """

    @staticmethod
    def forward(ctx, q, k, v, num_frames: int, scale: float):
        # aten's CPU flash kernel reads the head dim as if its stride were 1, whatever the strides say
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = _flash_fwd(q, _first_frame(k, num_frames), _first_frame(v, num_frames), scale=scale)
        if num_frames > 2:
            out_b, lse_b = _flash_fwd(
                _frames(q, num_frames, 2, num_frames),
                _frames(k, num_frames, 1, num_frames - 1),
                _frames(v, num_frames, 1, num_frames - 1),
                scale=scale,
            )
            # -- merge frames f >= 2 in fp32 (at least): (B*(F-2), H, N[, D]) blocks of the (B*F, ...) results
            out_a, lse_a = _frames(out, num_frames, 2, num_frames), _frames(lse, num_frames, 2, num_frames)
            merged_lse = torch.logaddexp(lse_a, lse_b)
            wide = torch.promote_types(out.dtype, torch.float32)
            merged = out_a.to(wide) * (lse_a - merged_lse).exp().unsqueeze(-1)
            merged += out_b.to(wide) * (lse_b - merged_lse).exp().unsqueeze(-1)
            out, lse = out.clone(), lse.clone()  # _frames is a copy when batch > 1: write via views
            out.unflatten(0, (-1, num_frames))[:, 2:] = merged.to(out.dtype).unflatten(0, (-1, num_frames - 2))
            lse.unflatten(0, (-1, num_frames))[:, 2:] = merged_lse.unflatten(0, (-1, num_frames - 2))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.num_frames, ctx.scale = num_frames, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        num_frames, scale = ctx.num_frames, ctx.scale
        batch = q.shape[0] // num_frames
        grad_out = grad_out.contiguous()
        # -- block A: every frame against frame 0; frame 0's dk/dv sum over the frames that read it
        dq, dk_a, dv_a = _flash_bwd(
            grad_out, q, _first_frame(k, num_frames), _first_frame(v, num_frames), out, lse, 0.0, False, scale=scale
        )
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        # (B*F, H, N, D) -> (B, F, H, N, D)
        dq5, dk5, dv5 = (t.unflatten(0, (batch, num_frames)) for t in (dq, dk, dv))
        dk5[:, 0] = dk_a.unflatten(0, (batch, num_frames)).sum(1)
        dv5[:, 0] = dv_a.unflatten(0, (batch, num_frames)).sum(1)
        if num_frames > 2:
            # -- block B: frames f >= 2 against frame f-1
            def later(t):
                return _frames(t, num_frames, 2, num_frames)

            dq_b, dk_b, dv_b = _flash_bwd(
                later(grad_out), later(q), _frames(k, num_frames, 1, num_frames - 1),
                _frames(v, num_frames, 1, num_frames - 1), later(out), later(lse), 0.0, False, scale=scale,
            )
            dq5[:, 2:] += dq_b.unflatten(0, (batch, num_frames - 2))
            dk5[:, 1:-1] += dk_b.unflatten(0, (batch, num_frames - 2))
            dv5[:, 1:-1] += dv_b.unflatten(0, (batch, num_frames - 2))
        return dq, dk, dv, None, None


def sparse_causal_attention_torch(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """The torch backend: the exact log-sum-exp merge of two flash calls on CPU (see
    :class:`SparseCausalAttnLSEFunction`), the concatenated formulation elsewhere."""
    if q.device.type == "cpu":
        return SparseCausalAttnLSEFunction.apply(q, k, v, num_frames, scale)
    return sparse_causal_attention_concat(q, k, v, num_frames, scale)


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
    backend = resolve_backend(backend, q, "sparse_causal_attention")
    if backend == "cpp":
        from depthvid.extension.sparse_causal_attn import sparse_causal_attn_cpp

        return call_backend(sparse_causal_attn_cpp, q, k, v, num_frames, scale)
    if backend == "triton":
        from depthvid.triton_kernels.sparse_causal_attn import sparse_causal_attn_triton

        return call_backend(sparse_causal_attn_triton, q, k, v, num_frames, scale)
    return sparse_causal_attention_torch(q, k, v, num_frames, scale)


# two videos of 3 frames (frame 0 alone, frame 0 + f-1), ragged tokens, SD's 64-dim heads
register_self_check(
    "sparse_causal_attention", ((6, 2, 24, 64),) * 3,
    lambda backend, q, k, v: sparse_causal_attention(q, k, v, 3, backend=backend),
)
