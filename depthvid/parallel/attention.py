"""Frame-parallel attention: the video processors' ``attend`` step, exact across frame windows.

Each rank holds q, k, v of its frame window, ``(batch*local_frames, heads, tokens, head_dim)``
(row = b * local_frames + f), and must return what the single-process op returns for those rows.

- Sparse-causal: frame f attends to frames 0 and f-1. A rank receives frame 0's and frame
  (start-1)'s keys/values (one all_to_all), runs the op on [context frames, window] and keeps
  the window's rows: the op's own rule gives every row exactly its single-process keys.
- Temporal: each token attends over all F frames. One all_to_all makes the ranks token-sharded
  (all frames, tokens/N of them), the op runs unchanged, a second all_to_all switches back.

Convolutions, per-frame GroupNorm and cross attention never mix frames: they stay local.
"""
from __future__ import annotations

import math

import torch

from depthvid.models.attention import SparseCausalAttnProcessor, TemporalAttnProcessor
from depthvid.models.video_unet import VideoUNet
from depthvid.ops import sparse_causal_attention, temporal_attention
from depthvid.parallel.collectives import all_to_all
from depthvid.parallel.frames import FrameSplit, even_windows


def _check_local_frames(split: FrameSplit, num_frames: int, owner: str) -> None:
    if num_frames != split.local_frames:
        raise ValueError(
            f"{owner}: got {num_frames} frames, but rank {split.rank}'s window {split.window} holds "
            f"{split.local_frames}; call the UNet on split.shard(sample)"
        )


def sparse_causal_attention_sharded(q, k, v, split: FrameSplit, scale: float) -> torch.Tensor:
    """:func:`depthvid.ops.sparse_causal_attention` for the rows of this rank's frame window.

    q, k, v: (batch*local_frames, heads, tokens, head_dim) -> same shape.
    """
    frames = split.local_frames
    # (B*F_local, H, N, D) -> (B, F_local, H, N, D)
    q5, k5, v5 = (t.unflatten(0, (-1, frames)) for t in (q, k, v))
    # keys and values travel together: (B, F_local, 2, H, N, D) -> context (B, 0|1|2, 2, H, N, D)
    context = split.context_frames(torch.stack((k5, v5), dim=2), dim=1, first=True)
    extra = context.shape[1]
    # [frame 0, frame start-1, window]: the op's rule "frame 0 and the previous row" is then right
    # for every window row; the context rows' queries are zeros and their outputs are dropped
    keys = torch.cat((context[:, :, 0], k5), dim=1)
    values = torch.cat((context[:, :, 1], v5), dim=1)
    queries = torch.cat((q5.new_zeros((q5.shape[0], extra, *q5.shape[2:])), q5), dim=1)
    out = sparse_causal_attention(
        queries.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), frames + extra, scale=scale, backend=None
    )
    return out.unflatten(0, (-1, frames + extra))[:, extra:].flatten(0, 1)


def frames_to_tokens(x: torch.Tensor, split: FrameSplit) -> torch.Tensor:
    """(B, local_frames, ..., N, D) -> (B, all_frames, ..., this rank's share of N, D); differentiable."""
    token_windows = even_windows(x.shape[-2], split.world_size)
    blocks = [x[..., w.start:w.stop, :].reshape(-1) for w in token_windows]
    mine = len(token_windows[split.rank])
    # from rank r: (B, F_r, ..., mine, D)
    shapes = [(x.shape[0], len(w), *x.shape[2:-2], mine, x.shape[-1]) for w in split.windows]
    received = all_to_all(torch.cat(blocks), [b.numel() for b in blocks], [math.prod(s) for s in shapes], split.group)
    parts = received.split([math.prod(s) for s in shapes])
    return torch.cat([part.view(shape) for part, shape in zip(parts, shapes)], dim=1)


def tokens_to_frames(x: torch.Tensor, split: FrameSplit, tokens: int) -> torch.Tensor:
    """The inverse of :func:`frames_to_tokens`: (B, F, ..., share, D) -> (B, local_frames, ..., tokens, D)."""
    token_windows = even_windows(tokens, split.world_size)
    blocks = [x[:, w.start:w.stop].reshape(-1) for w in split.windows]
    # from rank r: (B, F_local, ..., its token share, D)
    shapes = [(x.shape[0], split.local_frames, *x.shape[2:-2], len(w), x.shape[-1]) for w in token_windows]
    received = all_to_all(torch.cat(blocks), [b.numel() for b in blocks], [math.prod(s) for s in shapes], split.group)
    parts = received.split([math.prod(s) for s in shapes])
    return torch.cat([part.view(shape) for part, shape in zip(parts, shapes)], dim=-2)


def temporal_attention_sharded(q, k, v, split: FrameSplit, scale: float) -> torch.Tensor:
    """:func:`depthvid.ops.temporal_attention` for the rows of this rank's frame window.

    q, k, v: (batch*local_frames, heads, tokens, head_dim) -> same shape.
    """
    tokens = q.shape[2]
    # (B*F_local, H, N, D) -> (B, F_local, 3, H, N, D) -> all frames, a share of the tokens
    qkv = frames_to_tokens(torch.stack([t.unflatten(0, (-1, split.local_frames)) for t in (q, k, v)], dim=2), split)
    q_all, k_all, v_all = (t.flatten(0, 1) for t in qkv.unbind(2))  # each (B*F, H, share, D)
    out = temporal_attention(q_all, k_all, v_all, split.num_frames, scale=scale, backend=None)
    # (B*F, H, share, D) -> (B, F, H, share, D) -> (B, F_local, H, N, D) -> (B*F_local, H, N, D)
    return tokens_to_frames(out.unflatten(0, (-1, split.num_frames)), split, tokens).flatten(0, 1)


class FrameParallelSparseCausalAttnProcessor(SparseCausalAttnProcessor):
    """:class:`SparseCausalAttnProcessor` on one rank's frame window (see :func:`shard_video_unet`)."""

    def __init__(self, split: FrameSplit):
        self.split = split

    def attend(self, query, key, value, num_frames, scale):
        _check_local_frames(self.split, num_frames, type(self).__name__)
        return sparse_causal_attention_sharded(query, key, value, self.split, scale)


class FrameParallelTemporalAttnProcessor(TemporalAttnProcessor):
    """:class:`TemporalAttnProcessor` on one rank's frame window (see :func:`shard_video_unet`)."""

    def __init__(self, split: FrameSplit):
        self.split = split

    def attend(self, query, key, value, num_frames, scale):
        _check_local_frames(self.split, num_frames, type(self).__name__)
        return temporal_attention_sharded(query, key, value, self.split, scale)


def shard_video_unet(video_unet: VideoUNet, split: FrameSplit) -> VideoUNet:
    """Make ``video_unet`` (in place) compute one rank's frame window of ``split``; returns it.

    Afterwards call it with ``split.shard(sample)`` — (batch, C, local_frames, H, W) — on every
    rank together; it returns that window of the single-process output. Backward (tuning) also
    runs on every rank together and leaves each rank the gradient of its partial loss: sum the
    trainable gradients with ``split.all_reduce_grads``. A one-rank split changes nothing.
    """
    if not split.is_parallel:
        return video_unet
    for module in video_unet.modules():
        processor = getattr(module, "processor", None)
        # a model sharded before (another frame count) is sharded again with this split
        if isinstance(processor, SparseCausalAttnProcessor):
            module.set_processor(FrameParallelSparseCausalAttnProcessor(split))
        elif isinstance(processor, TemporalAttnProcessor):
            module.set_processor(FrameParallelTemporalAttnProcessor(split))
    return video_unet
