"""Pseudo-3D (1x3x3) convolution: a 2D conv applied to every frame of a (B, C, F, H, W) video.

Optional fused extras mirror a diffusers ResnetBlock2D half:
``out = (conv(silu(group_norm(x))) + bias + temb + residual) / output_scale``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from depthvid.ops._backend import call_backend, register_self_check, resolve_backend


@dataclass(frozen=True)
class GroupNormSiLU:
    """Prologue: GroupNorm with statistics per (batch, frame, group), affine, then SiLU."""

    num_groups: int
    weight: torch.Tensor | None  # (C_in,)
    bias: torch.Tensor | None  # (C_in,)
    eps: float = 1e-5


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W)"""
    return x.transpose(1, 2).flatten(0, 1)


def unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W)"""
    return x.unflatten(0, (-1, num_frames)).transpose(1, 2)


def pseudo3d_conv_torch(x, weight, bias, stride, padding, norm=None, temb=None, residual=None, output_scale=1.0):
    """Reference: fold frames into the batch, run the 2D ops, unfold."""
    num_frames = x.shape[2]
    h = fold_frames(x)
    if norm is not None:
        h = F.silu(F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps))
    h = unfold_frames(F.conv2d(h, weight, bias, stride=stride, padding=padding), num_frames)
    if temb is not None:
        # (B, C_out) -> (B, C_out, 1, 1, 1); (B, F, C_out) -> (B, C_out, F, 1, 1)
        h = h + (temb[:, :, None, None, None] if temb.dim() == 2 else temb.transpose(1, 2)[..., None, None])
    if residual is not None:
        h = h + residual
    if output_scale != 1.0:
        h = h / output_scale
    return h


def pseudo3d_conv(
    x,
    weight,
    bias=None,
    stride: int = 1,
    padding: int = 1,
    backend: str | None = None,
    *,
    norm: GroupNormSiLU | None = None,
    temb: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    output_scale: float = 1.0,
):
    """1x3x3 convolution of every frame, with optional fused GroupNorm+SiLU / temb / residual.

    Args:
        x: (B, C_in, F, H, W).
        weight: (C_out, C_in, kh, kw) — a 2D conv kernel (3x3 in SD UNets).
        bias: (C_out,) or None.
        stride, padding: spatial only; frames are never mixed.
        backend: None (best for the device), "torch", "triton" or "cpp".
        norm: GroupNorm (per frame) + SiLU applied to ``x`` before the conv.
        temb: (B, C_out) or (B, F, C_out) added after the conv (time-embedding bias).
        residual: (B, C_out, F, H_out, W_out) added after that.
        output_scale: the sum is divided by it (diffusers' output_scale_factor).

    Returns:
        (B, C_out, F, H_out, W_out); with no extras it equals
        ``F.conv3d(x, weight[:, :, None], bias, stride=(1, s, s), padding=(0, p, p))``.
    """
    if x.dim() != 5:
        raise ValueError(f"pseudo3d_conv: x must be (B, C, F, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"pseudo3d_conv: weight must be (C_out, C_in={x.shape[1]}, kh, kw), got {tuple(weight.shape)}"
        )
    backend = resolve_backend(backend, x, "pseudo3d_conv")
    if backend == "cpp":
        from depthvid.extension.pseudo3d_conv import pseudo3d_conv_cpp

        return call_backend(pseudo3d_conv_cpp, x, weight, bias, stride, padding, norm, temb, residual, output_scale)
    if backend == "triton":
        from depthvid.triton_kernels.pseudo3d_conv import pseudo3d_conv_triton

        return call_backend(pseudo3d_conv_triton, x, weight, bias, stride, padding, norm, temb, residual, output_scale)
    return pseudo3d_conv_torch(x, weight, bias, stride, padding, norm, temb, residual, output_scale)


def _fused_resnet_half(backend, x, weight, bias, norm_weight, norm_bias, temb, residual):
    norm = GroupNormSiLU(4, norm_weight, norm_bias)
    return pseudo3d_conv(x, weight, bias, 1, 1, backend, norm=norm, temb=temb, residual=residual, output_scale=2.0)


# a diffusers ResnetBlock2D half (GroupNorm+SiLU, conv, temb, residual) on 3 frames of 6x5, 16 channels
register_self_check(
    "pseudo3d_conv", ((1, 16, 3, 6, 5), (16, 16, 3, 3), (16,), (16,), (16,), (1, 16), (1, 16, 3, 6, 5)),
    _fused_resnet_half,
)
