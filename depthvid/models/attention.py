"""Attention processors and the temporal block that make a 2D UNet's attention frame-aware.

Every processor here sees hidden states with the frames folded into the batch,
``(batch*frames, tokens, channels)``, the frames of one video contiguous (row = b * F + f).
The frame count arrives explicitly as ``num_frames`` (``VideoUNet`` passes
``cross_attention_kwargs={"num_frames": F}``); it is never inferred from the batch size.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from depthvid.ops import sparse_causal_attention, temporal_attention


def _missing_num_frames(owner: str) -> ValueError:
    return ValueError(
        f"{owner}: num_frames is None; call the inflated UNet through VideoUNet, which passes "
        'cross_attention_kwargs={"num_frames": F}'
    )


class _VideoSelfAttnProcessor:
    """diffusers' AttnProcessor2_0 body for self-attention, with the attention step left to ``attend``."""

    def attend(self, query, key, value, num_frames: int, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        name = type(self).__name__
        if num_frames is None:
            raise _missing_num_frames(name)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{name}: is self-attention only; got encoder_hidden_states or attention_mask")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_frames, channel, height, width = hidden_states.shape
            # (B*F, C, H, W) -> (B*F, H*W, C)
            hidden_states = hidden_states.view(batch_frames, channel, height * width).transpose(1, 2)
        batch_frames = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B*F, N, heads*D) -> (B*F, heads, N, D)
        query, key, value = (
            t.view(batch_frames, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # -- the one change from the stock processor: attention across frames, not within one --
        hidden_states = self.attend(query, key, value, num_frames, attn.scale)

        # (B*F, heads, N, D) -> (B*F, N, heads*D)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_frames, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_frames, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SparseCausalAttnProcessor(_VideoSelfAttnProcessor):
    """Processor for ``attn1``: frame f's queries attend to the keys/values of frames 0 and f-1.

    Borrows ``attn.to_q/to_k/to_v/to_out``; the attention itself is
    :func:`depthvid.ops.sparse_causal_attention` with ``backend=None`` (see ``use_backend``).
    hidden_states: (batch*frames, tokens, channels) -> same shape.
    """

    def attend(self, query, key, value, num_frames, scale):
        return sparse_causal_attention(query, key, value, num_frames, scale=scale, backend=None)


class TemporalAttnProcessor(_VideoSelfAttnProcessor):
    """Processor for ``attn_temp``: at every token position, attention across the frames of a video.

    Calls :func:`depthvid.ops.temporal_attention` with ``backend=None``.
    hidden_states: (batch*frames, tokens, channels) -> same shape.
    """

    def attend(self, query, key, value, num_frames, scale):
        return temporal_attention(query, key, value, num_frames, scale=scale, backend=None)


class PerFrameAttnProcessor:
    """Wraps a stock processor so it accepts (and ignores) ``num_frames``.

    Used for cross attention (``attn2``) and every other attention the inflation leaves
    frame-independent: each row of the (batch*frames) batch is one frame, so the stock
    processor already does the right thing; the wrapper only keeps diffusers from warning
    about an unexpected ``num_frames`` kwarg.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        extra = {} if temb is None else {"temb": temb}
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.processor).__name__})"


class VideoTransformerBlock(nn.Module):
    """A diffusers ``BasicTransformerBlock`` followed by a residual temporal attention.

    ``h = block(h, ...); h = h + attn_temp(norm_temp(h))`` where ``attn_temp`` attends across
    frames at each token. ``attn_temp.to_out[0]`` (weight and bias) starts at zero, so a fresh
    ``VideoTransformerBlock`` computes exactly what ``block`` does.

    forward takes the block's own signature (positionally too, as diffusers' gradient
    checkpointing calls it) and reads ``num_frames`` from ``cross_attention_kwargs``.
    hidden_states: (batch*frames, tokens, dim) -> same shape.
    """

    def __init__(self, block: BasicTransformerBlock):
        super().__init__()
        self.block = block
        reference = next(block.parameters())
        # build the new layers where the block lives (a meta-device model stays on meta)
        with torch.device(reference.device):
            self.norm_temp = nn.LayerNorm(block.dim)
            self.attn_temp = Attention(
                query_dim=block.dim,
                heads=block.num_attention_heads,
                dim_head=block.attention_head_dim,
                dropout=block.dropout,
                bias=block.attention_bias,
                processor=TemporalAttnProcessor(),
            )
        nn.init.zeros_(self.attn_temp.to_out[0].weight)
        nn.init.zeros_(self.attn_temp.to_out[0].bias)
        self.norm_temp.to(reference.dtype)
        self.attn_temp.to(reference.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        num_frames = (cross_attention_kwargs or {}).get("num_frames")
        if num_frames is None:
            raise _missing_num_frames(type(self).__name__)
        hidden_states = self.block(
            hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            cross_attention_kwargs=cross_attention_kwargs,
            class_labels=class_labels,
            added_cond_kwargs=added_cond_kwargs,
        )
        return hidden_states + self.attn_temp(self.norm_temp(hidden_states), num_frames=num_frames)
