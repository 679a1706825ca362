"""The pseudo-3D conv with the C++ prologue/epilogue: torch.ops.depthvid.group_norm_silu(_bwd) and
conv_epilogue around ATen's conv2d. Fake kernels, autograd, private wrapper."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from depthvid.ops.pseudo3d_conv import fold_frames, unfold_frames


@torch.library.register_fake("depthvid::group_norm_silu")
def _group_norm_silu_fake(x, num_groups, weight, bias, eps):
    batch, channels, frames, height, width = x.shape
    stats = x.new_empty((batch * frames, num_groups), dtype=torch.float32)
    return x.new_empty((batch * frames, channels, height, width)), stats, torch.empty_like(stats)


@torch.library.register_fake("depthvid::group_norm_silu_bwd")
def _group_norm_silu_bwd_fake(grad, x, mean, rstd, num_groups, weight, bias):
    def grad_of(param):
        return x.new_empty((0,)) if param is None else torch.empty_like(param)

    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_of(weight), grad_of(bias)


def _group_norm_silu_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.num_groups = num_groups


def _group_norm_silu_backward(ctx, grad, grad_mean, grad_rstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.depthvid.group_norm_silu_bwd(grad, x, mean, rstd, ctx.num_groups, weight, bias)
    return dx, None, dweight if weight is not None else None, dbias if bias is not None else None, None


torch.library.register_autograd(
    "depthvid::group_norm_silu", _group_norm_silu_backward, setup_context=_group_norm_silu_setup
)


@torch.library.register_fake("depthvid::conv_epilogue")
def _conv_epilogue_fake(conv, num_frames, temb, residual, output_scale):
    frames_total, channels, height, width = conv.shape
    return conv.new_empty((frames_total // num_frames, channels, num_frames, height, width))


def _conv_epilogue_setup(ctx, inputs, output):
    conv, num_frames, temb, residual, output_scale = inputs
    ctx.num_frames, ctx.output_scale = num_frames, output_scale
    ctx.temb_dim = None if temb is None else temb.dim()
    ctx.has_residual = residual is not None


def _conv_epilogue_backward(ctx, grad):
    grad = grad / ctx.output_scale  # (B, C, F, H, W)
    grad_temb = None
    if ctx.temb_dim == 2:  # (B, C)
        grad_temb = grad.sum((2, 3, 4))
    elif ctx.temb_dim == 3:  # (B, F, C)
        grad_temb = grad.sum((3, 4)).transpose(1, 2)
    return fold_frames(grad), None, grad_temb, grad if ctx.has_residual else None, None


torch.library.register_autograd("depthvid::conv_epilogue", _conv_epilogue_backward, setup_context=_conv_epilogue_setup)


def pseudo3d_conv_cpp(x, weight, bias, stride, padding, norm=None, temb=None, residual=None, output_scale=1.0):
    """x (B, C_in, F, H, W) -> (B, C_out, F, H_out, W_out): C++ prologue, ATen conv2d, C++ epilogue."""
    num_frames = x.shape[2]
    if norm is None:
        h = fold_frames(x)  # (B, C, F, H, W) -> (B*F, C, H, W)
    else:
        h, _, _ = torch.ops.depthvid.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    conv = F.conv2d(h, weight, bias, stride=stride, padding=padding)
    if temb is None and residual is None and output_scale == 1.0:
        return unfold_frames(conv, num_frames)
    return torch.ops.depthvid.conv_epilogue(conv, num_frames, temb, residual, float(output_scale))
