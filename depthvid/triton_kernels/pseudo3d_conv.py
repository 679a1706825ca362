"""Pseudo-3D (1 x kh x kw) convolution in Triton: an implicit GEMM with a fused GroupNorm+SiLU
prologue and a bias / time-embedding / residual / output-scale epilogue.

Every frame is convolved on its own, so the conv is a GEMM per frame:

    M = H_out * W_out output pixels, N = C_out, K = C_in * kh * kw,
    out[m, n] = sum_k silu(group_norm(x))[pixel(m) shifted by tap(k), channel(k)] * weight[n, k]

``x`` is read in place through its five strides, never unfolded (im2col) or copied; the model's
non-contiguous (1, C, B*F, H, W) view of a (B*F, C, H, W) tensor works as is. Padding is a load
mask, so the zero border is applied *after* the prologue, as in the reference.

What runs where
---------------
forward   ``_group_norm_stats_kernel`` (only with ``norm``): two passes over each (b, f, group)
          -> per-(frame, channel) ``scale = rstd * gamma`` and ``shift = beta - mean * scale``
          (fp32, (B*F, C_in)), so the conv's prologue is one FMA + SiLU per loaded element.
          ``_pseudo3d_conv_fwd_kernel``: prologue on the loaded tile, tl.dot, fp32 accumulator,
          epilogue ``(acc + bias + temb + residual) / output_scale`` stored in x's dtype.
backward  ``_pseudo3d_conv_bwd_dx_kernel``: dL/d(conv input) as a transposed implicit GEMM
          (M = input pixels, N = C_in, K = C_out * kh * kw), with the 1/output_scale folded in.
          Not fused, in torch: the GroupNorm+SiLU backward (autograd on a recomputation of the
          prologue from the saved x), dWeight (``torch.nn.grad.conv2d_weight``, weights are frozen
          while tuning), and the reductions for dBias / dTemb (sums of grad_out) and dResidual.
          Saved for backward: x and the weights only; no normalised activation is kept.

Cost (C_in = C_out = C, 3x3, stride 1, P = B*F*H*W pixels, elements of x's dtype)
---------------------------------------------------------------------------------
FLOPs: 2 * P * C * C * 9 in both; the prologue adds ~6 * P * C * 9 * ceil(C / BLOCK_N) (it is
redone for every tap and every N block: ~2% of the GEMM for BLOCK_N = 128).

DRAM traffic, forward with norm + temb + residual (the diffusers ResnetBlock2D second half):
  torch reference   group_norm reads x twice, writes h1; silu reads h1, writes h2; conv reads h2,
                    writes y; +temb, +residual and /scale each read and rewrite y (+ reads the
                    residual): 6 P*C (input side) + 8 P*C (output side) = 14 P*C, plus 2 P*C of
                    transient memory (h1, h2) and 3 P*C more held by autograd (x, h1/h2 inputs).
  this kernel       stats reads x twice, the conv reads x once (halo re-reads hit L2) and the
                    residual once, writes out once: 5 P*C, no transient activation; autograd
                    holds x only.
  Without extras both are 2 P*C (read x, write out; torch fuses the bias).
Backward (dx only): the dX kernel reads grad_out and writes dh (2 P*C); the torch GroupNorm+SiLU
recompute/backward adds ~8 P*C. With stride 2, the dX kernel masks 3/4 of its taps to zero
(each input pixel receives from one output parity), spending 4x the needed MMA work there;
SD has only three stride-2 convs.

Launch shape: grid (pixel blocks of one frame, C_out blocks, B*F); one flat K loop over
(tap, channel block), so a block never straddles two frames and the pipeliner sees one loop.
Configs (``pick_conv_config``): BLOCK_M = 128 (fp16/bf16) or 64 (fp32), BLOCK_N = 128 or 64,
BLOCK_K = 64 (fp16/bf16) or 32 (fp32). Shared memory, registers and spills per configuration: ``python tests/gpu_binaries.py``.

Layouts (what makes the main loop's loads 16 bytes wide): activations are read channels-last, so
a tap's (pixels, channels) tile is contiguous along K and a tap shift moves by whole pixels (C
elements); the launchers copy x (and grad_out) to channels-last only when it is not already, and
write their outputs channels-last, so a chain of convs copies once. The weight is read from a
(kh, kw, C_in, C_out) copy (:func:`gemm_weight`, made once per weight version), contiguous along
C_out. Compiled for sm_80 with a real launch's specialisation, the fp16 forward's main loop is
cp.async 16-byte copies feeding mma.sync (before: 2-byte scalar loads at strides 9 and 9*C_in).

GPU notes (not timed: no GPU here). fp32 dots use input_precision="ieee" to match the fp32
reference (slower than TF32 tensor cores). 8x8 frames (SD's deepest level) fill half a BLOCK_M tile.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from depthvid.errors import UserError
from depthvid.triton_kernels._common import Launch, check_tensors, dot, fp32_dot, interpreting

_STATS_BLOCK = 1024  # elements of one (b, f, group) reduced per step
_STATS_BLOCK_C = 64  # channels of one group whose scale/shift are written per step


@triton.jit
def _group_norm_stats_kernel(
    x_ptr,  # (B, C, F, H, W), any strides
    gamma_ptr,  # (C,); unused unless HAS_AFFINE
    beta_ptr,  # (C,); unused unless HAS_AFFINE
    scale_ptr,  # (B*F, C) fp32, contiguous (out)
    shift_ptr,  # (B*F, C) fp32, contiguous (out)
    num_frames,
    channels,
    height,
    width,
    group_size,
    eps,
    stride_xb,
    stride_xc,
    stride_xf,
    stride_xh,
    stride_xw,
    HAS_AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    frame_row = tl.program_id(0)  # b * F + f
    group = tl.program_id(1)
    b = frame_row // num_frames
    f = frame_row % num_frames
    first_channel = group * group_size
    x_group = x_ptr + b.to(tl.int64) * stride_xb + f.to(tl.int64) * stride_xf + first_channel.to(tl.int64) * stride_xc
    pixels = height * width
    count = group_size * pixels

    # -- mean: fp32 partial sums per lane, reduced once at the end --
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, count, BLOCK):
        e = start + tl.arange(0, BLOCK)  # flat index over (h, w, channel in group): x is channels-last
        c = e % group_size
        p = e // group_size
        vals = tl.load(x_group + c * stride_xc + (p // width) * stride_xh + (p % width) * stride_xw, mask=e < count, other=0.0)
        acc += vals.to(tl.float32)
    mean = tl.sum(acc, axis=0) / count

    # -- variance: a second pass over centred values (no E[x^2] - E[x]^2 cancellation) --
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, count, BLOCK):
        e = start + tl.arange(0, BLOCK)
        c = e % group_size
        p = e // group_size
        mask = e < count
        vals = tl.load(x_group + c * stride_xc + (p // width) * stride_xh + (p % width) * stride_xw, mask=mask, other=0.0)
        centred = tl.where(mask, vals.to(tl.float32) - mean, 0.0)
        acc += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / count + eps)

    # -- fold the affine into one FMA for the conv's prologue: z = x * scale + shift --
    for c0 in range(0, group_size, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < group_size
        if HAS_AFFINE:
            gamma = tl.load(gamma_ptr + first_channel + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + first_channel + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        else:
            gamma = tl.full((BLOCK_C,), 1.0, tl.float32)
            beta = tl.zeros((BLOCK_C,), tl.float32)
        scale = rstd * gamma
        out_offs = frame_row * channels + first_channel + offs_c
        tl.store(scale_ptr + out_offs, scale, mask=mask_c)
        tl.store(shift_ptr + out_offs, beta - mean * scale, mask=mask_c)


@triton.jit
def _tap_and_channels(step, channel_blocks, kernel_w, BLOCK_K: tl.constexpr):
    """Step ``step`` of a conv kernel's flat K loop over (tap, channel block): the tap's (row,
    column) and the block's BLOCK_K reduction channels."""
    tap = step // channel_blocks
    i = tap // kernel_w
    j = tap - i * kernel_w
    offs_k = (step - tap * channel_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    return i, j, offs_k


@triton.jit
def _weight_tile(w_cols, i, j, offs_k, mask_k, mask_n, stride_wh, stride_ww, stride_wk):
    """The (BLOCK_K, BLOCK_N) weight tile of tap (i, j): rows ``offs_k`` at stride ``stride_wk``
    (C_in for the forward, C_out for dX), columns the pointers ``w_cols``; zero where masked."""
    w_offs = (i * stride_wh + j * stride_ww) + offs_k * stride_wk
    return tl.load(w_offs[:, None] + w_cols[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)


@triton.jit
def _pseudo3d_conv_fwd_kernel(
    x_ptr,  # (B, C_in, F, H, W), any strides
    weight_ptr,  # (C_out, C_in, kernel_h, kernel_w), any strides
    bias_ptr,  # (C_out,); unused unless HAS_BIAS
    norm_scale_ptr,  # (B*F, C_in) fp32, contiguous; unused unless HAS_NORM
    norm_shift_ptr,  # (B*F, C_in) fp32, contiguous; unused unless HAS_NORM
    temb_ptr,  # (B, F, C_out) through strides, stride_tf = 0 for a (B, C_out) temb; unused unless HAS_TEMB
    residual_ptr,  # (B, C_out, F, H_out, W_out), any strides; unused unless HAS_RESIDUAL
    out_ptr,  # (B, C_out, F, H_out, W_out), any strides (out)
    num_frames,
    c_in,
    height,
    width,
    c_out,
    height_out,
    width_out,
    stride_xb,
    stride_xc,
    stride_xf,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_tb,
    stride_tf,
    stride_tc,
    stride_rb,
    stride_rc,
    stride_rf,
    stride_rh,
    stride_rw,
    stride_ob,
    stride_oc,
    stride_of,
    stride_oh,
    stride_ow,
    conv_stride,
    padding,
    output_scale,
    kernel_h,
    kernel_w,
    HAS_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_TEMB: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot operands need every dim >= 16 on GPU")
    tl.static_assert(BLOCK_M >= 16, "tl.dot operands need every dim >= 16 on GPU")
    # grid: (pixel blocks of one frame, C_out blocks, B*F); a block never straddles two frames,
    # so (b, f) and the prologue's per-frame statistics are scalars / vectors, not gathers
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    frame_row = tl.program_id(2)  # b * F + f
    b = frame_row // num_frames
    f = frame_row % num_frames

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel oh * W_out + ow
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel
    mask_m = offs_m < height_out * width_out
    mask_n = offs_n < c_out
    oh = offs_m // width_out
    ow = offs_m % width_out
    # tap (i, j) of output pixel (oh, ow) reads input pixel (oh * s - p + i, ow * s - p + j):
    # inside the frame when row_lo <= i < row_hi and col_lo <= j < col_hi (zero padding
    # otherwise); rows past the frame's last pixel get an empty range
    row_lo = tl.where(mask_m, padding - oh * conv_stride, kernel_h)
    row_hi = height + padding - oh * conv_stride
    col_lo = padding - ow * conv_stride
    col_hi = width + padding - ow * conv_stride
    x_frame = x_ptr + b.to(tl.int64) * stride_xb + f.to(tl.int64) * stride_xf
    x_pixels = x_frame + (oh * conv_stride - padding) * stride_xh + (ow * conv_stride - padding) * stride_xw
    w_cols = weight_ptr + offs_n * stride_wo
    norm_row = frame_row * c_in

    # fp32 accumulator whatever the input dtype
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat K loop over (tap, channel block): a single A and B load per step, so the software
    # pipeliner multi-buffers two tiles (not two per tap) and compiles one loop, not one per tap
    channel_blocks = tl.cdiv(c_in, BLOCK_K)
    for step in range(0, kernel_h * kernel_w * channel_blocks):
        i, j, offs_k = _tap_and_channels(step, channel_blocks, kernel_w, BLOCK_K)  # offs_k: input channels
        mask_k = offs_k < c_in
        inside = (i >= row_lo) & (i < row_hi) & (j >= col_lo) & (j < col_hi)
        x_mask = inside[:, None] & mask_k[None, :]
        x_offs = (i * stride_xh + j * stride_xw) + offs_k * stride_xc
        x_tile = tl.load(x_pixels[:, None] + x_offs[None, :], mask=x_mask, other=0.0)
        if HAS_NORM:
            # -- prologue: GroupNorm affine as one FMA, then SiLU, in fp32 --
            norm_scale = tl.load(norm_scale_ptr + norm_row + offs_k, mask=mask_k, other=0.0)
            norm_shift = tl.load(norm_shift_ptr + norm_row + offs_k, mask=mask_k, other=0.0)
            z = x_tile.to(tl.float32) * norm_scale[None, :] + norm_shift[None, :]
            # the conv zero-pads the normalised input: padding stays 0 after the prologue
            x_tile = tl.where(x_mask, z * tl.sigmoid(z), 0.0).to(weight_ptr.dtype.element_ty)
        w_tile = _weight_tile(w_cols, i, j, offs_k, mask_k, mask_n, stride_wh, stride_ww, stride_wc)
        acc += dot(x_tile, w_tile, FP32_DOT)

    # -- epilogue: (conv + bias + temb + residual) / output_scale, one rounding to out's dtype --
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_TEMB:
        temb = tl.load(temb_ptr + b * stride_tb + f * stride_tf + offs_n * stride_tc, mask=mask_n, other=0.0)
        acc += temb.to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        residual_frame = residual_ptr + b.to(tl.int64) * stride_rb + f.to(tl.int64) * stride_rf
        residual = tl.load(
            residual_frame + (oh * stride_rh + ow * stride_rw)[:, None] + offs_n[None, :] * stride_rc,
            mask=out_mask,
            other=0.0,
        )
        acc += residual.to(tl.float32)
    acc = acc / output_scale
    out_frame = out_ptr + b.to(tl.int64) * stride_ob + f.to(tl.int64) * stride_of
    tl.store(
        out_frame + (oh * stride_oh + ow * stride_ow)[:, None] + offs_n[None, :] * stride_oc,
        acc.to(out_ptr.dtype.element_ty),
        mask=out_mask,
    )


@triton.jit
def _pseudo3d_conv_bwd_dx_kernel(
    grad_out_ptr,  # (B, C_out, F, H_out, W_out), any strides
    weight_ptr,  # (C_out, C_in, kernel_h, kernel_w), any strides
    grad_in_ptr,  # (B, C_in, F, H, W), any strides (out): dL/d(conv input)
    num_frames,
    c_in,
    height,
    width,
    c_out,
    height_out,
    width_out,
    stride_gb,
    stride_gc,
    stride_gf,
    stride_gh,
    stride_gw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_ib,
    stride_ic,
    stride_if,
    stride_ih,
    stride_iw,
    conv_stride,
    padding,
    output_scale,
    kernel_h,
    kernel_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot operands need every dim >= 16 on GPU")
    tl.static_assert(BLOCK_M >= 16, "tl.dot operands need every dim >= 16 on GPU")
    # transposed implicit GEMM: M = input pixels of one frame, N = C_in, K = C_out * kh * kw
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    frame_row = tl.program_id(2)  # b * F + f
    b = frame_row // num_frames
    f = frame_row % num_frames

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixel ih * W + iw
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel
    mask_m = offs_m < height * width
    mask_n = offs_n < c_in
    ih = offs_m // width
    iw = offs_m % width
    # rows past the frame's last pixel get a negative row so that no tap hits them
    ih_padded = tl.where(mask_m, ih + padding, -1)
    iw_padded = iw + padding
    grad_out_frame = grad_out_ptr + b.to(tl.int64) * stride_gb + f.to(tl.int64) * stride_gf
    w_cols = weight_ptr + offs_n * stride_wc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    channel_blocks = tl.cdiv(c_out, BLOCK_K)
    for step in range(0, kernel_h * kernel_w * channel_blocks):
        i, j, offs_k = _tap_and_channels(step, channel_blocks, kernel_w, BLOCK_K)  # offs_k: output channels
        mask_k = offs_k < c_out
        # tap (i, j) of output pixel (oh, ow) read input (oh * s - p + i, ow * s - p + j), so input
        # pixel (ih, iw) receives from oh = (ih + p - i) / s when that is a whole number in range
        oh_times_s = ih_padded - i
        ow_times_s = iw_padded - j
        oh = oh_times_s // conv_stride
        ow = ow_times_s // conv_stride
        hit = (
            (oh_times_s >= 0)
            & (ow_times_s >= 0)
            & (oh_times_s % conv_stride == 0)
            & (ow_times_s % conv_stride == 0)
            & (oh < height_out)
            & (ow < width_out)
        )
        g_tile = tl.load(
            grad_out_frame + (oh * stride_gh + ow * stride_gw)[:, None] + (offs_k * stride_gc)[None, :],
            mask=hit[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_tile = _weight_tile(w_cols, i, j, offs_k, mask_k, mask_n, stride_wh, stride_ww, stride_wo)
        acc += dot(g_tile, w_tile, FP32_DOT)

    # -- epilogue: the forward divided the sum by output_scale --
    acc = acc / output_scale
    grad_in_frame = grad_in_ptr + b.to(tl.int64) * stride_ib + f.to(tl.int64) * stride_if
    tl.store(
        grad_in_frame + (ih * stride_ih + iw * stride_iw)[:, None] + offs_n[None, :] * stride_ic,
        acc.to(grad_in_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ConvConfig:
    """Block sizes and launch options of one conv kernel launch."""

    BLOCK_M: int  # pixels of one frame
    BLOCK_N: int  # output channels (input channels for dX)
    BLOCK_K: int  # reduction channels per tap
    num_warps: int
    num_stages: int


def pick_conv_config(n_channels: int, dtype: torch.dtype) -> ConvConfig:
    """The one config for a conv GEMM whose N dimension has ``n_channels`` channels.

    A pure function of the shape: the interpreter cannot autotune, and few configs keep the
    GPU compile check short. SD's channel counts are 320, 640 and 1280: BLOCK_N = 128 where it
    divides them, else 64 (320 = 5 x 64, and the 4-channel conv_out). 8x8 frames (SD's deepest
    level at a 64x64 latent) fill half of a BLOCK_M = 128 tile.

    Sized with ptxas -v on sm_80/sm_90 so that no configuration spills registers, the fused
    forward (prologue + temb + residual epilogue) included: fp16/bf16 run 128 x BLOCK_N x 64 tiles
    on 8 warps (4 warps at BLOCK_N = 64 spilled in the fused epilogue on sm_90). fp32 runs
    true-fp32 ("ieee") dots on CUDA cores, which hold more per thread: 64 x BLOCK_N x 32 tiles
    (128-pixel tiles spilled in the fused forward), BLOCK_N / 16 warps.
    """
    block_n = 128 if n_channels % 128 == 0 else 64
    if dtype == torch.float32:
        return ConvConfig(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=32, num_warps=block_n // 16, num_stages=3)
    return ConvConfig(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=64, num_warps=8, num_stages=3)


# ----------------------------------------------------------------------------- layouts


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) with unit channel stride, copying only when it is not already: the GEMM's
    K (channels) is then the contiguous axis of every tap's tile, which a GPU loads 16 bytes at a time."""
    if t.stride(1) == 1:
        return t
    # (B, C, F, H, W) -> (B, F, H, W, C) contiguous -> viewed back as (B, C, F, H, W)
    return t.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)


def _empty_channels_last(batch, channels, frames, height, width, like: torch.Tensor) -> torch.Tensor:
    # (B, F, H, W, C) -> (B, C, F, H, W): the next conv reads it without a copy
    return torch.empty(batch, frames, height, width, channels, dtype=like.dtype, device=like.device).permute(0, 4, 1, 2, 3)


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the kernels read it: a (kh, kw, C_in, C_out) contiguous copy viewed as
    (C_out, C_in, kh, kw), so the forward's (C_in, C_out) tile of a tap is contiguous along C_out
    and the dX kernel's (C_out, C_in) tile along C_out: both load 16 bytes at a time.

    Computed once per weight version and cached on the tensor (a frozen weight is permuted once
    per run; a weight cast per call under autocast is permuted per call, like the cast itself).
    """
    if weight.stride(0) == 1:
        return weight
    key = (weight._version, weight.data_ptr(), weight.dtype)
    cached = getattr(weight, "_depthvid_gemm_weight", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    # (C_out, C_in, kh, kw) -> (kh, kw, C_in, C_out) contiguous -> viewed as (C_out, C_in, kh, kw)
    permuted = weight.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    weight._depthvid_gemm_weight = (key, permuted)
    return permuted


# ----------------------------------------------------------------------------- launchers


def _stats_launch(x, gamma, beta, scale, shift, num_groups: int, eps: float) -> Launch:
    batch, channels, num_frames, height, width = x.shape
    has_affine = gamma is not None
    return Launch(
        _group_norm_stats_kernel, (batch * num_frames, num_groups),
        (x, gamma if has_affine else scale, beta if has_affine else scale, scale, shift,
         num_frames, channels, height, width, channels // num_groups, eps, *x.stride()),
        dict(HAS_AFFINE=has_affine, BLOCK=_STATS_BLOCK, BLOCK_C=_STATS_BLOCK_C, num_warps=4, num_stages=1),
    )


def group_norm_scale_shift(x, num_groups: int, gamma, beta, eps: float):
    """Per-(frame, channel) GroupNorm as an FMA: ``group_norm(x) = x * scale + shift``.

    Args:
        x: (B, C, F, H, W), any strides; statistics per (b, f, group) as in the reference.
        gamma, beta: (C,) or both None (no affine), any float dtype.

    Returns:
        scale, shift: (B*F, C) fp32, contiguous.
    """
    batch, channels, num_frames = x.shape[:3]
    scale = torch.empty(batch * num_frames, channels, device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    _stats_launch(x, gamma, beta, scale, shift, num_groups, eps)()
    return scale, shift


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _fwd_launch(x, weight, bias, norm_scale, norm_shift, temb, residual, out, stride, padding, output_scale) -> Launch:
    batch, c_in, num_frames, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    height_out, width_out = out.shape[-2:]
    if temb is not None and temb.dim() == 2:
        temb_strides = (temb.stride(0), 0, temb.stride(1))  # the same row for every frame
    elif temb is not None:
        temb_strides = temb.stride()
    else:
        temb_strides = (0, 0, 0)
    cfg = pick_conv_config(c_out, x.dtype)
    return Launch(
        _pseudo3d_conv_fwd_kernel,
        (triton.cdiv(height_out * width_out, cfg.BLOCK_M), triton.cdiv(c_out, cfg.BLOCK_N), batch * num_frames),
        (x, weight, *(t if t is not None else out for t in (bias, norm_scale, norm_shift, temb, residual)), out,
         num_frames, c_in, height, width, c_out, height_out, width_out,
         *x.stride(), *weight.stride(), *temb_strides,
         *(residual.stride() if residual is not None else (0,) * 5), *out.stride(),
         stride, padding, float(output_scale), kh, kw),
        dict(HAS_BIAS=bias is not None, HAS_NORM=norm_scale is not None, HAS_TEMB=temb is not None,
             HAS_RESIDUAL=residual is not None, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
             FP32_DOT=fp32_dot(x.dtype, not interpreting()), num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def pseudo3d_conv_fwd(x, weight, bias, stride, padding, norm_scale, norm_shift, temb, residual, output_scale):
    """Launch the fused forward.

    Args:
        x: (B, C_in, F, H, W), any strides (copied to channels-last unless it is).
        weight: (C_out, C_in, kh, kw); bias: (C_out,) or None.
        norm_scale, norm_shift: (B*F, C_in) fp32 from :func:`group_norm_scale_shift`, or None.
        temb: (B, C_out), (B, F, C_out) or None; residual: (B, C_out, F, H_out, W_out) or None.

    Returns:
        (B, C_out, F, H_out, W_out) in x's dtype, channels-last: a view of a contiguous
        (B, F, H_out, W_out, C_out) buffer.
    """
    x = _channels_last(x)
    batch, _, num_frames, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    out = _empty_channels_last(batch, c_out, num_frames, _output_size(height, kh, stride, padding),
                               _output_size(width, kw, stride, padding), like=x)
    _fwd_launch(x, gemm_weight(weight), bias, norm_scale, norm_shift, temb, residual, out,
                stride, padding, output_scale)()
    return out


def _bwd_dx_launch(grad_out, weight, grad_in, stride, padding, output_scale) -> Launch:
    batch, c_in, num_frames, height, width = grad_in.shape
    c_out, _, kh, kw = weight.shape
    height_out, width_out = grad_out.shape[-2:]
    cfg = pick_conv_config(c_in, grad_out.dtype)
    return Launch(
        _pseudo3d_conv_bwd_dx_kernel,
        (triton.cdiv(height * width, cfg.BLOCK_M), triton.cdiv(c_in, cfg.BLOCK_N), batch * num_frames),
        (grad_out, weight, grad_in, num_frames, c_in, height, width, c_out, height_out, width_out,
         *grad_out.stride(), *weight.stride(), *grad_in.stride(), stride, padding, float(output_scale), kh, kw),
        dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
             FP32_DOT=fp32_dot(grad_out.dtype, not interpreting()), num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def pseudo3d_conv_bwd_dx(grad_out, weight, input_shape, stride, padding, output_scale):
    """Gradient of the conv (and of the /output_scale) with respect to the conv's input.

    Args:
        grad_out: (B, C_out, F, H_out, W_out), any strides (copied to channels-last unless it is).
        weight: (C_out, C_in, kh, kw).
        input_shape: (B, C_in, F, H, W) of the conv's input.

    Returns:
        (B, C_in, F, H, W) in grad_out's dtype, channels-last.
    """
    grad_out = _channels_last(grad_out)
    grad_in = _empty_channels_last(*input_shape, like=grad_out)
    _bwd_dx_launch(grad_out, gemm_weight(weight), grad_in, stride, padding, output_scale)()
    return grad_in


def gpu_launches() -> list[Launch]:
    """Every kernel at every GPU configuration (:func:`pick_conv_config`), launched as the inflated
    UNet launches it, from meta tensors, for the GPU compile check: SD2's level-0 and level-1
    ResnetBlock2D convs at a 64x64 latent and 8 frames (320 channels -> BLOCK_N 64, 640 -> 128),
    channels-last activations, the permuted weight; with every extra (norm, temb, residual) and none."""
    launches = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for channels, size in ((320, 64), (640, 32)):

            def video(c=channels):  # the model's (1, C, B*F, H, W) view of channels-last activations
                return _empty_channels_last(1, c, 8, size, size, like=torch.empty(0, dtype=dtype, device="meta"))

            weight = gemm_weight(torch.empty(channels, channels, 3, 3, dtype=dtype, device="meta"))
            bias = torch.empty(channels, dtype=dtype, device="meta")
            stats = torch.empty(8, channels, device="meta")
            temb = torch.empty(1, 8, channels, dtype=dtype, device="meta")
            label = f"C{channels}-{str(dtype).removeprefix('torch.')}"
            plain = _fwd_launch(video(), weight, None, None, None, None, None, video(), 1, 1, 1.0)
            plain.label = label + "-plain"
            fused = _fwd_launch(video(), weight, bias, stats, stats, temb, video(), video(), 1, 1, 2.0)
            fused.label = label + "-norm-temb-residual"
            dx = _bwd_dx_launch(video(), weight, video(), 1, 1, 2.0)
            dx.label = label
            launches += [plain, fused, dx]
        launches += _edge_conv_launches(dtype)
        x = _empty_channels_last(1, 320, 8, 64, 64, like=torch.empty(0, dtype=dtype, device="meta"))
        stats = torch.empty(8, 320, device="meta")
        gamma = torch.empty(320, dtype=dtype, device="meta")
        group_norm = _stats_launch(x, gamma, gamma, stats, stats, 32, 1e-5)
        group_norm.label = f"C320-G32-{str(dtype).removeprefix('torch.')}"
        launches.append(group_norm)
    return launches


def _edge_conv_launches(dtype: torch.dtype) -> list[Launch]:
    """The UNet's other conv shapes, each its own binary: the stride-2 downsampler (stride is a
    constexpr only when it is 1), conv_in (latents + depth: 5 input channels) and conv_out (4 output
    channels), at a 64x64 latent and 8 frames."""
    def video(channels, size):
        return _empty_channels_last(1, channels, 8, size, size, like=torch.empty(0, dtype=dtype, device="meta"))

    def weight(c_out, c_in):
        return gemm_weight(torch.empty(c_out, c_in, 3, 3, dtype=dtype, device="meta"))

    name = str(dtype).removeprefix("torch.")
    launches = {
        f"C320-stride2-{name}": _fwd_launch(video(320, 64), weight(320, 320), None, None, None, None, None,
                                            video(320, 32), 2, 1, 1.0),
        f"C320-stride2-{name}-dx": _bwd_dx_launch(video(320, 32), weight(320, 320), video(320, 64), 2, 1, 1.0),
        f"conv_in-C5-{name}": _fwd_launch(video(5, 64), weight(320, 5), None, None, None, None, None,
                                          video(320, 64), 1, 1, 1.0),
        f"conv_out-C4-{name}": _fwd_launch(video(320, 64), weight(4, 320), None, None, None, None, None,
                                           video(4, 64), 1, 1, 1.0),
        f"conv_out-C4-{name}-dx": _bwd_dx_launch(video(4, 64), weight(4, 320), video(320, 64), 1, 1, 1.0),
    }
    for label, launch in launches.items():
        launch.label = label
    return list(launches.values())


# ----------------------------------------------------------------------------- autograd


def _frames_as_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W)"""
    return x.transpose(1, 2).flatten(0, 1)


def _prologue(x, num_groups, norm_weight, norm_bias, eps):
    """The forward's GroupNorm+SiLU (fp32 math, rounded to x's dtype): (B, C, F, H, W) -> same."""
    as_fp32 = [t.float() if t is not None else None for t in (norm_weight, norm_bias)]
    # contiguous: torch 2.13's CPU group_norm backward segfaults on a channels-last input that
    # needs no gradient when its weight needs one
    h = F.silu(F.group_norm(_frames_as_batch(x).float().contiguous(), num_groups, *as_fp32, eps)).to(x.dtype)
    # (B*F, C, H, W) -> (B, C, F, H, W)
    return h.unflatten(0, (-1, x.shape[2])).transpose(1, 2)


class Pseudo3dConvFunction(torch.autograd.Function):
    """Fused forward; backward = Triton dX + torch for the prologue, dWeight and the reductions."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm_weight, norm_bias, temb, residual, num_groups, eps, stride, padding, output_scale):
        norm_scale = norm_shift = None
        x = _channels_last(x)  # read by the statistics and the conv, saved for backward
        if num_groups is not None:
            norm_scale, norm_shift = group_norm_scale_shift(x, num_groups, norm_weight, norm_bias, eps)
        out = pseudo3d_conv_fwd(x, weight, bias, stride, padding, norm_scale, norm_shift, temb, residual, output_scale)
        ctx.save_for_backward(x, weight, norm_weight, norm_bias)
        ctx.conv = (num_groups, eps, stride, padding, output_scale)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.temb_meta = (temb.dim(), temb.dtype) if temb is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, norm_weight, norm_bias = ctx.saved_tensors
        num_groups, eps, stride, padding, output_scale = ctx.conv
        need_x, need_w, need_b, need_nw, need_nb, need_temb, need_res = ctx.needs_input_grad[:7]
        grad_x = grad_w = grad_b = grad_nw = grad_nb = grad_temb = grad_res = None

        # -- epilogue terms: each was added to the sum that was divided by output_scale --
        if need_b:
            grad_b = (grad_out.sum(dim=(0, 2, 3, 4), dtype=torch.float32) / output_scale).to(ctx.bias_dtype)
        if need_temb:
            temb_dim, temb_dtype = ctx.temb_meta
            per_frame = grad_out.sum(dim=(3, 4), dtype=torch.float32) / output_scale  # (B, C_out, F)
            grad_temb = (per_frame.sum(2) if temb_dim == 2 else per_frame.transpose(1, 2)).to(temb_dtype)
        if need_res:
            grad_res = grad_out / output_scale

        # -- prologue: recompute silu(group_norm(x)) with torch autograd when anything needs it --
        conv_input = x
        prologue_inputs = []
        if num_groups is not None and (need_x or need_w or need_nw or need_nb):
            with torch.enable_grad():
                x_ = x.detach().requires_grad_(need_x)
                nw_ = norm_weight.detach().requires_grad_(need_nw) if norm_weight is not None else None
                nb_ = norm_bias.detach().requires_grad_(need_nb) if norm_bias is not None else None
                conv_input = _prologue(x_, num_groups, nw_, nb_, eps)
            prologue_inputs = [t for t in (x_, nw_, nb_) if t is not None and t.requires_grad]

        # -- conv input: Triton transposed implicit GEMM, then back through the prologue --
        if need_x or need_nw or need_nb:
            grad_h = pseudo3d_conv_bwd_dx(grad_out, weight, x.shape, stride, padding, output_scale)
            if num_groups is None:
                grad_x = grad_h
            else:
                grads = iter(torch.autograd.grad(conv_input, prologue_inputs, grad_h))
                grad_x = next(grads) if need_x else None
                grad_nw = next(grads) if need_nw else None
                grad_nb = next(grads) if need_nb else None

        # -- weight: torch (weights are frozen while tuning) --
        if need_w:
            grad_w = torch.nn.grad.conv2d_weight(
                _frames_as_batch(conv_input.detach()), weight.shape, _frames_as_batch(grad_out) / output_scale,
                stride, padding,
            )
        return grad_x, grad_w, grad_b, grad_nw, grad_nb, grad_temb, grad_res, None, None, None, None, None


# ----------------------------------------------------------------------------- entry point


def _check_inputs(x, weight, bias, stride, padding, norm, temb, residual, output_scale):
    """UserError for what the kernels cannot run; x (5D) and weight's C_in are checked by the op."""
    name = "pseudo3d_conv(backend='triton')"
    check_tensors(name, x=x, weight=weight, bias=bias, temb=temb, residual=residual)
    if not isinstance(stride, int) or stride < 1:
        raise UserError(f"{name}: stride must be an int >= 1, got {stride!r}; SD uses 1 (or 2 to downsample)")
    if not isinstance(padding, int) or padding < 0:
        raise UserError(f"{name}: padding must be an int >= 0, got {padding!r}; SD's 3x3 convs use 1")
    if output_scale == 0:
        raise UserError(f"{name}: output_scale must be non-zero, got {output_scale!r}; use 1.0 for no scaling")
    batch, _, num_frames, height, width = x.shape
    c_out, c_in, kh, kw = weight.shape
    height_out = _output_size(height, kh, stride, padding)
    width_out = _output_size(width, kw, stride, padding)
    if height_out < 1 or width_out < 1:
        raise UserError(
            f"{name}: a {kh}x{kw} kernel with padding {padding} does not fit the {height}x{width} frames; "
            "use larger frames or more padding"
        )
    expected = {
        "weight": (weight, weight.shape),
        "bias": (bias, (c_out,)),
        "temb": (temb, (batch, c_out) if temb is None or temb.dim() == 2 else (batch, num_frames, c_out)),
        "residual": (residual, (batch, c_out, num_frames, height_out, width_out)),
    }
    if norm is not None:
        if norm.num_groups < 1 or c_in % norm.num_groups:
            raise UserError(
                f"{name}: norm.num_groups must divide C_in={c_in}, got {norm.num_groups}; use a divisor such as 32 for SD"
            )
        expected["norm.weight"] = (norm.weight, (c_in,))
        expected["norm.bias"] = (norm.bias, (c_in,))
        if (norm.weight is None) != (norm.bias is None):
            raise UserError(f"{name}: norm.weight and norm.bias must both be tensors or both be None")
    for arg, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(shape):
            wanted = f"{(batch, c_out)} or {(batch, num_frames, c_out)}" if arg == "temb" else f"{tuple(shape)}"
            raise UserError(f"{name}: {arg} must have shape {wanted}, got {tuple(tensor.shape)}; fix the caller's {arg}")
        if tensor.device != x.device:
            raise UserError(f"{name}: {arg} is on {tensor.device} but x is on {x.device}; move it to {x.device}")


def pseudo3d_conv_triton(x, weight, bias, stride, padding, norm, temb, residual, output_scale):
    """Triton backend of :func:`depthvid.ops.pseudo3d_conv`, differentiable in every tensor.

    Args:
        x: (B, C_in, F, H, W), any strides. weight: (C_out, C_in, kh, kw). bias: (C_out,) or None.
        norm: a depthvid.ops.GroupNormSiLU (num_groups, weight, bias, eps: GroupNorm with statistics
            per (b, f, group), then SiLU, applied to x first; weight and bias in any float dtype), or None.
        temb: (B, C_out) or (B, F, C_out) or None. residual: (B, C_out, F, H_out, W_out) or None.
        output_scale: the sum is divided by it.

    Returns:
        (B, C_out, F, H_out, W_out) in x's dtype.
    """
    _check_inputs(x, weight, bias, stride, padding, norm, temb, residual, output_scale)
    if norm is None:
        num_groups, norm_weight, norm_bias, eps = None, None, None, 0.0
    else:
        num_groups, norm_weight, norm_bias, eps = norm.num_groups, norm.weight, norm.bias, norm.eps
    return Pseudo3dConvFunction.apply(
        x, weight, bias, norm_weight, norm_bias, temb, residual, num_groups, eps, stride, padding, output_scale
    )
