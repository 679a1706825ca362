"""Fused temporal attention (forward + backward) in Triton.

Temporal attention is attention across the F frames of one video at every (batch, head, token)
position: q, k, v are (B*F, H, N, D) and out[b, f, h, n] = softmax_f'(scale * q[b,f,h,n] .
k[b,f',h,n]) @ v[b,:,h,n]. It is B*H*N independent attention problems of length F (8 to 32): a
batch of tiny F x F attentions, not one long one.

Kernel design
-------------
One program owns a tile of BLOCK_T tokens x BLOCK_D (padded head dim) of one (b, h), for all F
frames. It reads the (B*F, H, N, D) tensors in place through their strides (no transpose copy):
every load is one frame's (BLOCK_T, BLOCK_D) tile, contiguous along D, which a GPU reads 16 bytes
at a time. The forward loops over the query frames i and, inside, streams the key/value frames
j with an online softmax; the K/V tiles of a program (2 x F tiles of 4 KB in fp16, 8 KB in fp32)
are re-read F times, from L1/L2, so k and v come from DRAM once. Scores are elementwise
products reduced over D, not ``tl.dot``: per token the matmuls are (F x D) @ (D x F) with F as
small as 1-8, below the 16-row minimum of a tensor-core tile, and the op is memory-bound anyway
(see the numbers below). The softmax uses exp2 with the scale folded into log2(e) (one multiply
per score), and everything is accumulated in fp32 whatever the input dtype. The forward saves the
log-sum-exp (LSE, in log2 units, fp32, (B*F, H, N)); the backward recomputes the probabilities
from it.

The backward needs no atomics and is deterministic, because a program owns every frame of its
tokens. It runs two loops over frame pairs in one program: (1) per query frame i, delta_i =
rowsum(dO_i * O_i) (stored to a (B*F, H, N) fp32 scratch) and dQ_i = scale * sum_j dS_ij K_j;
(2) per key frame j, dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij Q_i, reading delta_i
back. P and dP are recomputed in both loops (14 F^2 D FLOPs per token instead of 10), which keeps
two fp32 tiles of accumulators per loop instead of F of them: registers do not grow with F, any
F runs in one program, and no partial dK/dV is written and re-read.

Tiles and launch options (:func:`pick_config`) are a pure function of the head dim: BLOCK_D is
the next power of 2 >= 64 (40 -> 64, 80 -> 128, 160 -> 256; masked lanes load zeros and are never
stored) and BLOCK_T = 2048 / BLOCK_D tokens (32 at head dim 64, 8 at 160) at 4 warps: 16 fp32
elements of each tile per thread, which ptxas -v compiles to 72-186 registers and no spills on
sm_80/sm_90 in every dtype (4096-element tiles spill in the fp32 backward at head dim 160). The head dim is a constexpr so that the lane mask is known to be constant over
each 8-element vector, and the strides arrive divided by STRIDE_UNIT (see
``_common.stride_unit``) so that head dim 40's 8-element-aligned rows are known to be 16-byte
aligned.

Memory traffic and FLOPs (per call; X = B*F*H*N*D elements of e bytes, T = B*F*H*N rows)
-----------------------------------------------------------------------------------------
Useful FLOPs: forward 4*F*F*D per (b, h, n) (2F^2D for QK^T, 2F^2D for PV) plus F^2 exp;
backward 10*F*F*D (recompute S, dP, dV, dK, dQ) plus F^2 exp; this kernel spends 14*F*F*D and
2 F^2 exp in the backward (P and dP are recomputed in both loops).

Triton, forward:  reads q, k, v (3Xe), writes out (Xe) and LSE (4T bytes)     -> 4Xe + 4T.
Triton, backward: reads q, k, v, out, dout (5Xe), LSE (4T), writes dq, dk, dv (3Xe) and delta
                  (4T, read back once)                                         -> 8Xe + 12T.
(Re-reads of a program's own tiles in the frame-pair loops are assumed to hit L1/L2.)
Torch reference (depthvid.ops.temporal_attn.temporal_attention_torch): permuted views to
(B, H, N, F, D), SDPA over F, then ``permute(...).reshape`` back, which is a full copy:
forward 4Xe (SDPA) + 2Xe (copy) = 6Xe; backward 8Xe (SDPA) + 2Xe for the output-gradient layout
copy, plus a further 2Xe per input SDPA makes contiguous -> 10Xe or more. On a GPU the SDPA
kernels tile the F axis by 64-128 rows, so with F = 8 over 90% of each tile's tensor-core work is
padding, and the math fallback materialises (B*H*N, F, F) scores.

Arithmetic intensity of the Triton forward in fp16 is 4F^2D / 8FD = F/2 FLOP/byte (4 at F = 8,
16 at F = 32), under the fp32 CUDA-core ridge of an H100 (~67 TFLOP/s / 3.35 TB/s = 20) and about
at an A100's (~19.5 / 1.6-2 = 10-12) for F >= 24: the kernel is bandwidth-bound in the range the
method uses (8-24 frames), so its expected time is ~4Xe / bandwidth vs >= 6Xe for the reference
(about 1.5x fewer bytes forward, 1.25x backward), before counting the reference's tile padding.
For F >= 24 on A100-class parts a ``tl.dot`` variant (3D batched dot, F padded to 16/32) would
be the next step. No GPU timing was possible when this was written; see
benchmarks/bench_temporal_attn.py.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from depthvid.triton_kernels._common import (
    LOG2E, FusedAttentionFunction, Launch, attention_meta_inputs, check_attention_inputs, stride_unit, unit_strides,
)

MAX_HEAD_DIM = 256  # BLOCK_D = 256 leaves 8 tokens per 2048-element tile
COMPILED_HEAD_DIMS = (40, 64, 80, 160)  # every BLOCK_D, and 40's unaligned rows


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _frame_tile(ptr, first_row, head, offs_t, offs_d, stride_b, stride_h, stride_n, stride_d, STRIDE_UNIT: tl.constexpr):
    """Pointers to the (BLOCK_T, BLOCK_D) tile of row ``first_row`` (b*F + 0) of a (B*F, H, N, D)
    tensor, and the step in elements from one frame's tile to the next. The launcher divided the
    b, h, n strides by STRIDE_UNIT: multiplying back here tells Triton that every tile row starts
    STRIDE_UNIT-aligned (16-byte vectors at head dim 40)."""
    frame_step = stride_b * STRIDE_UNIT
    rows = (head * stride_h + offs_t[:, None] * stride_n) * STRIDE_UNIT
    return ptr + first_row * frame_step + rows + offs_d[None, :] * stride_d, frame_step


@triton.jit
def _temporal_attn_fwd_kernel(
    q_ptr,  # (B*F, H, N, D)
    k_ptr,  # (B*F, H, N, D)
    v_ptr,  # (B*F, H, N, D)
    o_ptr,  # (B*F, H, N, D)
    lse_ptr,  # (B*F, H, N) fp32, contiguous, log2 units
    stride_qb, stride_qh, stride_qn, stride_qd,  # b, h, n strides divided by STRIDE_UNIT
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_frames, n_heads, n_tokens,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads the head dim: it must cover HEAD_DIM")

    pid_t = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    first_row = (tl.program_id(2) * num_frames).to(tl.int64)  # row of this video's frame 0 in B*F

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < n_tokens
    mask = mask_t[:, None] & (offs_d < HEAD_DIM)[None, :]  # (BLOCK_T, BLOCK_D)
    # frame 0's tiles; frame j's are j * *_step elements further on
    q_tile, q_step = _frame_tile(q_ptr, first_row, head, offs_t, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, STRIDE_UNIT)
    k_tile, k_step = _frame_tile(k_ptr, first_row, head, offs_t, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, STRIDE_UNIT)
    v_tile, v_step = _frame_tile(v_ptr, first_row, head, offs_t, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, STRIDE_UNIT)
    o_tile, o_step = _frame_tile(o_ptr, first_row, head, offs_t, offs_d, stride_ob, stride_oh, stride_on, stride_od, STRIDE_UNIT)
    lse_row = lse_ptr + (first_row * n_heads + head) * n_tokens + offs_t  # frame i: + i * n_heads * n_tokens

    for i in range(0, num_frames):
        q = tl.load(q_tile + i * q_step, mask=mask, other=0.0).to(tl.float32)
        # -- online softmax over the key frames; fp32 running max, sum and output. Padded tokens
        # load zeros, score 0 and are never stored --
        m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for j in range(0, num_frames):
            k = tl.load(k_tile + j * k_step, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_tile + j * v_step, mask=mask, other=0.0).to(tl.float32)
            s = tl.sum(q * k, axis=1) * qk_scale  # (BLOCK_T,), log2 units
            m_new = tl.maximum(m, s)
            alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
            p = tl.exp2(s - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v
            m = m_new
        # -- epilogue: normalise, store out and the LSE the backward recomputes P from --
        tl.store(o_tile + i * o_step, (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_row + i * n_heads * n_tokens, m + tl.log2(l), mask=mask_t)


@triton.jit
def _temporal_attn_bwd_kernel(
    q_ptr,  # (B*F, H, N, D)
    k_ptr,  # (B*F, H, N, D)
    v_ptr,  # (B*F, H, N, D)
    o_ptr,  # (B*F, H, N, D) forward output
    do_ptr,  # (B*F, H, N, D) gradient of the output
    lse_ptr,  # (B*F, H, N) fp32, contiguous, log2 units
    delta_ptr,  # (B*F, H, N) fp32, contiguous: scratch, written and read back here
    dq_ptr,  # (B*F, H, N, D)
    dk_ptr,  # (B*F, H, N, D), same strides as dq
    dv_ptr,  # (B*F, H, N, D), same strides as dq
    stride_qb, stride_qh, stride_qn, stride_qd,  # b, h, n strides divided by STRIDE_UNIT
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    num_frames, n_heads, n_tokens,
    scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):
    """With P = softmax(scale * Q K^T) per token and dO the output gradient:
    dV_j = sum_i P_ij dO_i,  dP_ij = dO_i . V_j,  dS_ij = P_ij (dP_ij - delta_i) with
    delta_i = dO_i . O_i,  dQ_i = scale * sum_j dS_ij K_j,  dK_j = scale * sum_i dS_ij Q_i."""
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads the head dim: it must cover HEAD_DIM")

    pid_t = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    first_row = (tl.program_id(2) * num_frames).to(tl.int64)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < n_tokens
    mask = mask_t[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_tile, q_step = _frame_tile(q_ptr, first_row, head, offs_t, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, STRIDE_UNIT)
    k_tile, k_step = _frame_tile(k_ptr, first_row, head, offs_t, offs_d, stride_kb, stride_kh, stride_kn, stride_kd, STRIDE_UNIT)
    v_tile, v_step = _frame_tile(v_ptr, first_row, head, offs_t, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, STRIDE_UNIT)
    o_tile, o_step = _frame_tile(o_ptr, first_row, head, offs_t, offs_d, stride_ob, stride_oh, stride_on, stride_od, STRIDE_UNIT)
    do_tile, do_step = _frame_tile(do_ptr, first_row, head, offs_t, offs_d, stride_dob, stride_doh, stride_don, stride_dod, STRIDE_UNIT)
    # dk and dv share dq's strides (the launcher allocates all three alike)
    dq_tile, dq_step = _frame_tile(dq_ptr, first_row, head, offs_t, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd, STRIDE_UNIT)
    dk_tile, _ = _frame_tile(dk_ptr, first_row, head, offs_t, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd, STRIDE_UNIT)
    dv_tile, _ = _frame_tile(dv_ptr, first_row, head, offs_t, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd, STRIDE_UNIT)
    stat_offs = (first_row * n_heads + head) * n_tokens + offs_t  # frame i: + i * frame_stat_stride
    frame_stat_stride = n_heads * n_tokens

    # -- 1. per query frame i: delta_i, then dQ_i = scale * sum_j dS_ij K_j --
    # Padded tokens have q = do = o = 0, so dS = 0 there; they are never stored.
    for i in range(0, num_frames):
        q = tl.load(q_tile + i * q_step, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_tile + i * do_step, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_tile + i * o_step, mask=mask, other=0.0).to(tl.float32)
        delta = tl.sum(do * o, axis=1)  # (BLOCK_T,)
        tl.store(delta_ptr + stat_offs + i * frame_stat_stride, delta, mask=mask_t)
        lse = tl.load(lse_ptr + stat_offs + i * frame_stat_stride, mask=mask_t, other=0.0)
        dq = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for j in range(0, num_frames):
            k = tl.load(k_tile + j * k_step, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_tile + j * v_step, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp2(tl.sum(q * k, axis=1) * qk_scale - lse)
            ds = p * (tl.sum(do * v, axis=1) - delta)
            dq += ds[:, None] * k
        tl.store(dq_tile + i * dq_step, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)

    # delta was stored by this program's threads in the layout of a (BLOCK_T,) reduction; the
    # loads below may map its elements to other threads of the block
    tl.debug_barrier()

    # -- 2. per key frame j: dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij Q_i --
    for j in range(0, num_frames):
        k = tl.load(k_tile + j * k_step, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_tile + j * v_step, mask=mask, other=0.0).to(tl.float32)
        dk = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for i in range(0, num_frames):
            q = tl.load(q_tile + i * q_step, mask=mask, other=0.0).to(tl.float32)
            do = tl.load(do_tile + i * do_step, mask=mask, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + stat_offs + i * frame_stat_stride, mask=mask_t, other=0.0)
            delta = tl.load(delta_ptr + stat_offs + i * frame_stat_stride, mask=mask_t, other=0.0)
            p = tl.exp2(tl.sum(q * k, axis=1) * qk_scale - lse)
            ds = p * (tl.sum(do * v, axis=1) - delta)
            dv += p[:, None] * do
            dk += ds[:, None] * q
        tl.store(dk_tile + j * dq_step, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_tile + j * dq_step, dv.to(dv_ptr.dtype.element_ty), mask=mask)


# -- launch configuration -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemporalAttnConfig:
    """Tile sizes and warps for one launch; a pure function of the head dim."""

    BLOCK_T: int  # tokens per program
    BLOCK_D: int  # head dim padded to a power of 2
    num_warps: int


# fp32 elements of one (BLOCK_T, BLOCK_D) tile. The forward holds four tiles in registers (q,
# acc, k, v), the backward six (q, do, dq, k, v, o; then k, v, dk, dv, q, do): at 4 warps a
# 2048-element tile is 16 fp32 registers per thread per tile. Tokens need not fill a tl.dot
# tile (no tl.dot here), so BLOCK_T goes down to 8 at BLOCK_D = 256.
_TILE_ELEMENTS = 2048
_NUM_WARPS = 4


def pick_config(head_dim: int) -> TemporalAttnConfig:
    """The launch configuration for one call (no autotuning: the interpreter cannot autotune).
    Any frame count runs in one program, so only the head dim matters."""
    # head dims below 64 (40, test-sized models) share the 64 block, so that COMPILED_HEAD_DIMS
    # reach every block width the launchers can pick: 40 -> 64, 80 -> 128, 160 -> 256
    block_d = max(64, triton.next_power_of_2(head_dim))
    return TemporalAttnConfig(_TILE_ELEMENTS // block_d, block_d, _NUM_WARPS)


def _launch(kernel, pointers, strided, scalars, num_frames: int) -> Launch:
    """The launch both kernels share: grid (token tiles, heads, videos), the ``strided`` tensors'
    strides divided by their common STRIDE_UNIT, then (num_frames, heads, tokens, *scalars)."""
    rows, heads, tokens, head_dim = strided[0].shape
    config = pick_config(head_dim)
    unit = stride_unit(*strided)
    return Launch(
        kernel, (triton.cdiv(tokens, config.BLOCK_T), heads, rows // num_frames),
        (*pointers, *unit_strides(unit, *strided), num_frames, heads, tokens, *scalars),
        dict(HEAD_DIM=head_dim, BLOCK_T=config.BLOCK_T, BLOCK_D=config.BLOCK_D, STRIDE_UNIT=unit,
             num_warps=config.num_warps),
    )


def _fwd_launch(q, k, v, out, lse, num_frames: int, scale: float) -> Launch:
    return _launch(_temporal_attn_fwd_kernel, (q, k, v, out, lse), (q, k, v, out), (scale * LOG2E.value,), num_frames)


def _bwd_launch(q, k, v, out, lse, delta, grad_out, dq, dk, dv, num_frames: int, scale: float) -> Launch:
    # dk and dv are allocated like dq: the kernel takes dq's strides for all three
    return _launch(_temporal_attn_bwd_kernel, (q, k, v, out, grad_out, lse, delta, dq, dk, dv),
                   (q, k, v, out, grad_out, dq), (scale, scale * LOG2E.value), num_frames)


# -- launchers ----------------------------------------------------------------------------------


def temporal_attn_fwd(q, k, v, num_frames: int, scale: float):
    """Run the forward kernel.

    Args:
        q, k, v: (batch*frames, heads, tokens, head_dim), any strides, one dtype.
        num_frames: frames per video.
        scale: softmax scale.

    Returns:
        out: (batch*frames, heads, tokens, head_dim), contiguous, q's dtype.
        lse: (batch*frames, heads, tokens) fp32, log-sum-exp of the scaled scores in log2 units.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel():
        _fwd_launch(q, k, v, out, lse, num_frames, scale)()
    return out, lse


def temporal_attn_bwd(grad_out, q, k, v, out, lse, num_frames: int, scale: float):
    """Run the backward kernel.

    Args:
        grad_out: (batch*frames, heads, tokens, head_dim), gradient of ``out``, any strides.
        q, k, v, out: as given to / returned by :func:`temporal_attn_fwd`, q's dtype.
        lse: (batch*frames, heads, tokens) fp32 contiguous, from :func:`temporal_attn_fwd`.

    Returns:
        dq, dk, dv: (batch*frames, heads, tokens, head_dim), contiguous, q's dtype.
    """
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty_like(lse)
    if dq.numel():
        _bwd_launch(q, k, v, out, lse, delta, grad_out, dq, dk, dv, num_frames, scale)()
    return dq, dk, dv


def gpu_launches(frames: int = 8, tokens: int = 4096) -> list[Launch]:
    """Both kernels at every head dim of COMPILED_HEAD_DIMS (every BLOCK_D, and 40's 8-element
    aligned rows) in every dtype, launched as the model launches them (q, k, v are (B*F, N, H, D)
    projections viewed as (B*F, H, N, D)), from meta tensors, for the GPU compile check. The frame
    count is a runtime loop bound, so one count covers every F."""
    launches = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in COMPILED_HEAD_DIMS:
            heads = 5 if head_dim == 64 else 8
            q, k, v, out, grad_out, dq, dk, dv, lse, delta = attention_meta_inputs(
                frames, tokens, heads, head_dim, dtype, count=8
            )
            label = f"D{head_dim}-F{frames}-{str(dtype).removeprefix('torch.')}"
            for launch in (_fwd_launch(q, k, v, out, lse, frames, 0.125),
                           _bwd_launch(q, k, v, out, lse, delta, grad_out, dq, dk, dv, frames, 0.125)):
                launch.label = label
                launches.append(launch)
    return launches


# -- entry point ------------------------------------------------------------------------------


def temporal_attn_triton(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """Temporal attention with the fused Triton kernels; differentiable in q and k and v.

    Args:
        q, k, v: (batch*frames, heads, tokens, head_dim), frames of one video contiguous, one
            dtype out of float16, bfloat16, float32, one device (CUDA, or CPU under
            TRITON_INTERPRET=1).
        num_frames: frames per video.
        scale: softmax scale.

    Returns:
        (batch*frames, heads, tokens, head_dim) in q's dtype.
    """
    check_attention_inputs("temporal_attention", q, k, v, MAX_HEAD_DIM)
    return FusedAttentionFunction.apply(temporal_attn_fwd, temporal_attn_bwd, q, k, v, num_frames, float(scale))
