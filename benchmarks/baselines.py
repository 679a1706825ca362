"""The alternatives our ops and pipeline are measured against, written out here (never shipped).

Tune-A-Video's formulation (its UNet3D code, re-expressed on our tensors layout):
  * sparse-causal attention gathers, for every frame, the keys and values of frame 0 and frame
    max(f-1, 0) into a new (2N)-token tensor -- frames 0 and 1 attend to frame 0 twice -- and
    runs ordinary attention over it: materialised scores (its default) or a memory-efficient
    kernel (its xformers option; SDPA here);
  * temporal attention rearranges "(b f) n c -> (b n) f c" into a copy, attends with
    materialised scores and rearranges back;
  * every conv rearranges "b c f h w -> (b f) c h w" into a copy, runs conv2d and rearranges back.
FlexAttention (torch.nn.attention.flex_attention) expresses "frame 0 and frame f-1" as a block
mask over the whole (F*N)-token sequence and generates fused kernels: the strongest maintained
alternative to our own GPU kernels.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from depthvid.models import SparseCausalAttnProcessor, TemporalAttnProcessor


def tav_frame_keys(t: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, H, N, D) -> (B*F, H, 2N, D): frame 0's tokens then frame max(f-1, 0)'s, for every frame f."""
    previous = (torch.arange(num_frames) - 1).clamp(min=0)
    t = t.unflatten(0, (-1, num_frames))  # (B*F, H, N, D) -> (B, F, H, N, D)
    return torch.cat([t[:, [0] * num_frames], t[:, previous]], dim=-2).flatten(0, 1)


def materialised_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v through an explicit score matrix (Tune-A-Video's default path)."""
    scores = torch.baddbmm(
        torch.empty(q.shape[:-2].numel(), q.shape[-2], k.shape[-2], dtype=q.dtype, device=q.device),
        q.flatten(0, -3), k.flatten(0, -3).transpose(-1, -2), beta=0, alpha=scale,
    )  # (B*F*H, N, M)
    out = scores.softmax(dim=-1).to(v.dtype) @ v.flatten(0, -3)
    return out.unflatten(0, q.shape[:-2])


def tav_sparse_causal_attention(q, k, v, num_frames: int, scale: float, materialise: bool) -> torch.Tensor:
    """Tune-A-Video's sparse-causal attention: concatenated K/V per frame, then plain attention.

    q, k, v: (B*F, H, N, D) -> (B*F, H, N, D).
    """
    keys, values = tav_frame_keys(k, num_frames), tav_frame_keys(v, num_frames)
    if materialise:
        return materialised_attention(q, keys, values, scale)
    return F.scaled_dot_product_attention(q, keys, values, scale=scale)


def tav_sparse_causal_score_bytes(batch, frames, heads, tokens, element_size: int) -> int:
    """Bytes of the score matrix the materialised path builds: (B*F*H, N, 2N)."""
    return batch * frames * heads * tokens * 2 * tokens * element_size


def tav_temporal_attention(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """Tune-A-Video's temporal attention: rearranged copies, materialised (F x F) scores.

    q, k, v: (B*F, H, N, D) -> (B*F, H, N, D).
    """
    batch_frames, heads, tokens, head_dim = q.shape

    def frames_inner(t):  # (B*F, H, N, D) -> (B, F, H, N, D) -> (B*N, H, F, D), copied
        return t.unflatten(0, (-1, num_frames)).permute(0, 3, 2, 1, 4).reshape(-1, heads, num_frames, head_dim)

    out = materialised_attention(frames_inner(q), frames_inner(k), frames_inner(v), scale)
    # (B*N, H, F, D) -> (B, N, H, F, D) -> (B*F, H, N, D), copied
    return out.unflatten(0, (-1, tokens)).permute(0, 3, 2, 1, 4).reshape(batch_frames, heads, tokens, head_dim)


def tav_pseudo3d_conv(x, weight, bias, stride: int, padding: int) -> torch.Tensor:
    """Tune-A-Video's InflatedConv3d on a contiguous (B, C, F, H, W) video: rearrange, conv2d, rearrange."""
    batch, _, num_frames = x.shape[:3]
    # b c f h w -> (b f) c h w, copied
    frames = x.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, *x.shape[1:2], *x.shape[3:])
    out = F.conv2d(frames, weight, bias, stride=stride, padding=padding)
    # (b f) c h w -> b c f h w, copied
    return out.unflatten(0, (batch, num_frames)).permute(0, 2, 1, 3, 4).contiguous()


# ---------------------------------------------------------------- FlexAttention


def sparse_causal_block_mask(batch: int, frames: int, tokens: int, device):
    """FlexAttention's BlockMask for "frame 0 and frame f-1" over a (F*N)-token sequence.

    Built from its kv-block lists directly (create_block_mask would evaluate the mask on all
    (F*N)^2 pairs): with blocks no larger than a frame and dividing it, every block is full.
    """
    from torch.nn.attention.flex_attention import BlockMask

    block = min(128, tokens)
    if tokens % block:
        raise ValueError(f"tokens={tokens}: FlexAttention baseline needs blocks dividing a frame")
    per_frame = tokens // block
    rows = []
    for q_block in range(frames * per_frame):
        frame = q_block // per_frame
        kv_frames = [0] if frame < 2 else [0, frame - 1]
        rows.append([f * per_frame + i for f in kv_frames for i in range(per_frame)])
    width = frames * per_frame  # BlockMask wants one index slot per kv block
    indices = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        kv_frame, q_frame = kv_idx // tokens, q_idx // tokens
        return (kv_frame == 0) | (kv_frame == q_frame - 1)

    empty_counts = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(
        empty_counts[None, None].expand(batch, 1, -1),
        indices[None, None].expand(batch, 1, -1, -1),
        counts[None, None].expand(batch, 1, -1),
        indices[None, None].expand(batch, 1, -1, -1),
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(frames * tokens, frames * tokens),
    )


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_sparse_causal_attention(q, k, v, num_frames: int, scale: float, block_mask) -> torch.Tensor:
    """Sparse-causal attention as one FlexAttention call over each video's (F*N) tokens.

    q, k, v: (B*F, H, N, D) -> (B*F, H, N, D); the layout changes are copies.
    """
    batch_frames, heads, tokens, head_dim = q.shape

    def as_sequence(t):  # (B*F, H, N, D) -> (B, F, H, N, D) -> (B, H, F*N, D)
        return t.unflatten(0, (-1, num_frames)).transpose(1, 2).reshape(-1, heads, num_frames * tokens, head_dim)

    out = compiled_flex_attention()(as_sequence(q), as_sequence(k), as_sequence(v), block_mask=block_mask, scale=scale)
    # (B, H, F*N, D) -> (B, H, F, N, D) -> (B*F, H, N, D)
    return out.unflatten(2, (num_frames, tokens)).transpose(1, 2).reshape(batch_frames, heads, tokens, head_dim)


# ---------------------------------------------------------------- Tune-A-Video's attention in our model


class MaterialisedSparseCausal(SparseCausalAttnProcessor):
    """attn1 as Tune-A-Video computes it: concatenated K/V per frame, explicit (N x 2N) scores."""

    def attend(self, query, key, value, num_frames, scale):
        return tav_sparse_causal_attention(query, key, value, num_frames, scale, materialise=True)


class MaterialisedTemporal(TemporalAttnProcessor):
    """attn_temp as Tune-A-Video computes it: rearranged copies, explicit (F x F) scores."""

    def attend(self, query, key, value, num_frames, scale):
        return tav_temporal_attention(query, key, value, num_frames, scale)


def use_tav_attention(video_unet) -> None:
    """Switch every sparse-causal and temporal attention of ``video_unet`` to Tune-A-Video's way."""
    for module in video_unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, SparseCausalAttnProcessor):
            module.set_processor(MaterialisedSparseCausal())
        elif isinstance(processor, TemporalAttnProcessor):
            module.set_processor(MaterialisedTemporal())
