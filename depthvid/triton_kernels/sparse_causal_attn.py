"""Fused sparse-causal attention (forward + backward) in Triton.

Frame f of a video attends to the tokens of frame 0 and frame f-1; frames 0 and 1 attend to frame 0
only, once (Tune-A-Video concatenates frame 0 with itself there, which gives the same softmax).
Layout: q, k, v are (B*F, H, N, D) with any strides, row = b*F + f.
The launchers pass the strides in units of STRIDE_UNIT (``_common.stride_unit``), so that head
dim 40's tiles, whose rows are 8-element aligned, still load 16 bytes at a time.

Forward: flash attention (online softmax, exp2 with log2(e) folded into the scale, fp32
accumulators). One program per (query block of BLOCK_M tokens, row b*F+f, head h) streams the key
blocks of frame 0, then of frame f-1 when f >= 2. Both frames are addressed by index arithmetic on
the original k, v: no gather, no concatenated K/V in memory. The natural-log log-sum-exp of each
query row is saved (fp32, (B*F, H, N)) for the backward.

Backward (deterministic, no atomics), two kernels:
  1. dQ: one program per query block, same two key segments as the forward; it also writes
     delta = rowsum(dO * O) for its rows (the usual "preprocess" step, fused here).
  2. dK/dV: one program per key block of frame j, looping over the query frames that use frame j:
     frame 0 is used by every query frame 0..F-1, frame j >= 1 by query frame j+1 only (none when
     j = F-1). Both are contiguous ranges of query frames. The grid is frame-major so the frame-0
     programs, which do F times the work of the others, start first.

Cost. B videos, F >= 2 frames, H heads, N tokens, D head dim, s bytes per element. Query frames
0 and 1 see N keys, frames >= 2 see 2N: (2F - 2) N keys in all per (video, head).

  Matmul FLOPs           forward               backward
  this kernel            4 BHND (2F-2) N       14 BHND (2F-2) N   7 matmuls: QK^T and dO V^T are
                                                                  recomputed by both bwd kernels
  torch reference        4 BHND (2F-2) N       10 BHND (2F-2) N   SDPA's backward, 5 matmuls
  (Tune-A-Video's own code attends frames 0 and 1 to 2N duplicated keys: 4 BHND 2F N forward.)

  HBM bytes, in units of B*H*N*D*s, counting each tensor pass once (repeated reads of a K/V or
  Q/dO tile by neighbouring programs are assumed to hit L2):
  forward, this kernel: read q, k, v (3F) + write o (F)                        = 4F      (+ fp32 LSE)
  forward, torch reference: copy frame 0 and frame f-1 into per-frame K/V buffers (read 2(2F-2),
      write 2(2F-2)), SDPA reads q (F) and the buffers (2(2F-2)), writes o (F), then torch.cat of
      the per-segment outputs (read F, write F)                               = 16F - 12
  backward, this kernel: dQ kernel reads q, o, dO (3F), writes dq (F); dK/dV kernel reads k, v
      (2F) and q, dO once per (query frame, key frame) pair (2(2F-2)), writes dk, dv (2F)
                                                                              = 12F - 4 (+ LSE, delta)
  backward, torch reference: SDPA backward reads q, o, dO (3F) and the K/V buffers (2(2F-2)),
      writes dq (F) and buffer gradients (2(2F-2)); summing those back onto k, v reads 2(2F-2)
      and writes 2F                                                           = 18F - 12
  At F = 8: forward 32 vs 116 (3.6x less traffic), backward 92 vs 132 (1.4x less), and no
  (F-2) x 2N x D x H K/V buffers held in memory.

No GPU timing exists yet; benchmarks/bench_sparse_causal_attn.py measures it when CUDA is present.
Under TRITON_INTERPRET=1 (CPU tensors) the kernels run in the interpreter, where tl.dot on bf16
is wrong: there, bf16 operands are upcast to fp32 right before each tl.dot (FP32_DOT).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from depthvid.triton_kernels._common import (
    LOG2E, SUPPORTED_DTYPES, FusedAttentionFunction, Launch, attention_meta_inputs, check_attention_inputs, dot,
    fp32_dot, stride_unit, unit_strides,
)

MAX_HEAD_DIM = 256
# Head dims the GPU compile check covers: SD2's 64 and the padded 40, 80, 160 of other UNets. They
# reach every (block_d, dtype) entry of _GPU_CONFIGS, i.e. every configuration a launcher can pick.
COMPILED_HEAD_DIMS = (40, 64, 80, 160)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(ptr, row, head, offs_tokens, offs_d, stride_b, stride_h, stride_n, stride_d):
    """Pointers to the (tokens, head dim) tile of one row (b*F + f) and head of a (B*F, H, N, D) tensor."""
    return ptr + row * stride_b + head * stride_h + offs_tokens[:, None] * stride_n + offs_d[None, :] * stride_d


@triton.jit
def _load_tile_pair(a_frame_ptr, b_frame_ptr, tokens, offs_d, token_mask, d_mask,
                    stride_an, stride_ad, stride_bn, stride_bd):
    """The (tokens, head dim) tiles of two (N, D) frames (K and V, or Q and dO), zero where
    masked: the loads of the key loops (forward, dQ) and of the query loop (dK/dV)."""
    mask = token_mask[:, None] & d_mask[None, :]
    a = tl.load(a_frame_ptr + tokens[:, None] * stride_an + offs_d[None, :] * stride_ad, mask=mask, other=0.0)
    b = tl.load(b_frame_ptr + tokens[:, None] * stride_bn + offs_d[None, :] * stride_bd, mask=mask, other=0.0)
    return a, b


@triton.jit
def _fwd_key_frame(
    acc, m_i, l_i, q,
    k_frame_ptr, v_frame_ptr,  # k, v of one (key frame, head): (N, D) at strides (stride_*n, stride_*d)
    stride_kn, stride_kd, stride_vn, stride_vd,
    n_tokens, qk_scale,
    offs_n, offs_d, d_mask,
    BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Fold the N keys of one frame into the running (acc, m_i, l_i) of a query block."""
    for start_n in range(0, n_tokens, BLOCK_N):
        cols = start_n + offs_n
        col_mask = cols < n_tokens
        k, v = _load_tile_pair(k_frame_ptr, v_frame_ptr, cols, offs_d, col_mask, d_mask,
                               stride_kn, stride_kd, stride_vn, stride_vd)
        # scores in log2 units: qk_scale = scale * log2(e), so exp2 below is exp of the real scores
        qk = dot(q, tl.trans(k), FP32_DOT) * qk_scale
        qk = tl.where(col_mask[None, :], qk, float("-inf"))
        # -- online softmax update --
        # every block holds >= 1 valid key (start_n < n_tokens), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sparse_causal_attn_fwd_kernel(
    q_ptr,  # (B*F, H, N, D)
    k_ptr,  # (B*F, H, N, D)
    v_ptr,  # (B*F, H, N, D)
    o_ptr,  # (B*F, H, N, D)
    lse_ptr,  # (B*F, H, N) fp32, contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    n_heads, n_tokens, num_frames, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads the head dim: it must cover HEAD_DIM")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs every block dim >= 16")
    # the launcher divided every b, h, n stride by STRIDE_UNIT (_common.stride_unit): multiplying
    # back tells Triton that each tile row starts STRIDE_UNIT-aligned (16-byte vectors at head dim 40)
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    pid_m = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)  # b*F + f, int64 so row * stride cannot overflow
    head = tl.program_id(2).to(tl.int64)
    frame = row % num_frames
    first_row = row - frame  # frame 0 of the same video

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < n_tokens
    q = tl.load(_tile(q_ptr, row, head, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd),
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    # fp32 accumulators whatever the input dtype
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- keys of frame 0 (frames 0 and 1 see only these) --
    acc, m_i, l_i = _fwd_key_frame(
        acc, m_i, l_i, q,
        k_ptr + first_row * stride_kb + head * stride_kh, v_ptr + first_row * stride_vb + head * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, n_tokens, qk_scale,
        offs_n, offs_d, d_mask, BLOCK_N, FP32_DOT,
    )
    # -- keys of frame f-1, for f >= 2 --
    if frame >= 2:
        acc, m_i, l_i = _fwd_key_frame(
            acc, m_i, l_i, q,
            k_ptr + (row - 1) * stride_kb + head * stride_kh, v_ptr + (row - 1) * stride_vb + head * stride_vh,
            stride_kn, stride_kd, stride_vn, stride_vd, n_tokens, qk_scale,
            offs_n, offs_d, d_mask, BLOCK_N, FP32_DOT,
        )

    # -- epilogue: normalise, store o in the input dtype and the natural-log LSE --
    acc = acc / l_i[:, None]
    o_ptrs = _tile(o_ptr, row, head, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od)
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    lse = (m_i + tl.math.log2(l_i)) / LOG2E  # log2 units -> natural log
    tl.store(lse_ptr + (row * n_heads + head) * n_tokens + offs_m, lse, mask=row_mask)


@triton.jit
def _bwd_dq_key_frame(
    dq, q, do, lse2, delta,
    k_frame_ptr, v_frame_ptr,  # k, v of one (key frame, head): (N, D) at strides (stride_*n, stride_*d)
    stride_kn, stride_kd, stride_vn, stride_vd,
    n_tokens, qk_scale,
    offs_n, offs_d, d_mask,
    BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Add to dq (unscaled) the contribution of the N keys of one frame."""
    for start_n in range(0, n_tokens, BLOCK_N):
        cols = start_n + offs_n
        col_mask = cols < n_tokens
        k, v = _load_tile_pair(k_frame_ptr, v_frame_ptr, cols, offs_d, col_mask, d_mask,
                               stride_kn, stride_kd, stride_vn, stride_vd)
        # P recomputed from the saved LSE (lse2 = LSE * log2(e)): no running max needed
        qk = dot(q, tl.trans(k), FP32_DOT) * qk_scale
        p = tl.where(col_mask[None, :], tl.math.exp2(qk - lse2[:, None]), 0.0)
        # dS = P * (dO V^T - rowsum(dO * O)), the softmax backward
        dp = dot(do, tl.trans(v), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, FP32_DOT)
    return dq


@triton.jit
def _sparse_causal_attn_bwd_dq_kernel(
    q_ptr,  # (B*F, H, N, D)
    k_ptr,  # (B*F, H, N, D)
    v_ptr,  # (B*F, H, N, D)
    o_ptr,  # (B*F, H, N, D)
    do_ptr,  # (B*F, H, N, D)
    dq_ptr,  # (B*F, H, N, D)
    lse_ptr,  # (B*F, H, N) fp32, contiguous
    delta_ptr,  # (B*F, H, N) fp32, contiguous; written here
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    n_heads, n_tokens, num_frames, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads the head dim: it must cover HEAD_DIM")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs every block dim >= 16")
    # the launcher divided every b, h, n stride by STRIDE_UNIT (_common.stride_unit): multiplying
    # back tells Triton that each tile row starts STRIDE_UNIT-aligned (16-byte vectors at head dim 40)
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_dqb, stride_dqh, stride_dqn = stride_dqb * STRIDE_UNIT, stride_dqh * STRIDE_UNIT, stride_dqn * STRIDE_UNIT
    pid_m = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    frame = row % num_frames
    first_row = row - frame

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < n_tokens
    qd_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(_tile(q_ptr, row, head, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd),
                mask=qd_mask, other=0.0)
    do = tl.load(_tile(do_ptr, row, head, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod),
                 mask=qd_mask, other=0.0)
    o = tl.load(_tile(o_ptr, row, head, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od),
                mask=qd_mask, other=0.0)

    # -- preprocess: delta = rowsum(dO * O), kept for the dK/dV kernel --
    stat_offs = (row * n_heads + head) * n_tokens + offs_m
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + stat_offs, delta, mask=row_mask)
    lse2 = tl.load(lse_ptr + stat_offs, mask=row_mask, other=0.0) * LOG2E  # log2 units

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_key_frame(
        dq, q, do, lse2, delta,
        k_ptr + first_row * stride_kb + head * stride_kh, v_ptr + first_row * stride_vb + head * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, n_tokens, qk_scale,
        offs_n, offs_d, d_mask, BLOCK_N, FP32_DOT,
    )
    if frame >= 2:
        dq = _bwd_dq_key_frame(
            dq, q, do, lse2, delta,
            k_ptr + (row - 1) * stride_kb + head * stride_kh, v_ptr + (row - 1) * stride_vb + head * stride_vh,
            stride_kn, stride_kd, stride_vn, stride_vd, n_tokens, qk_scale,
            offs_n, offs_d, d_mask, BLOCK_N, FP32_DOT,
        )

    # S = scale * Q K^T, so dQ = scale * dS K
    dq_ptrs = _tile(dq_ptr, row, head, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd)
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_query_frame(
    dk, dv, k, v,
    q_frame_ptr, do_frame_ptr,  # q, dO of one (query frame, head): (N, D)
    lse_frame_ptr, delta_frame_ptr,  # LSE, delta of that (query frame, head): (N,) contiguous
    stride_qn, stride_qd, stride_don, stride_dod,
    n_tokens, qk_scale,
    offs_m, offs_d, d_mask,
    BLOCK_M: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Add to (dk, dv) of a key block the contribution of the N queries of one frame."""
    for start_m in range(0, n_tokens, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < n_tokens
        q, do = _load_tile_pair(q_frame_ptr, do_frame_ptr, rows, offs_d, row_mask, d_mask,
                                stride_qn, stride_qd, stride_don, stride_dod)
        lse2 = tl.load(lse_frame_ptr + rows, mask=row_mask, other=0.0) * LOG2E
        delta = tl.load(delta_frame_ptr + rows, mask=row_mask, other=0.0)
        # transposed scores, (BLOCK_N keys, BLOCK_M queries); padded queries get P = 0
        qk_t = dot(k, tl.trans(q), FP32_DOT) * qk_scale
        p_t = tl.where(row_mask[None, :], tl.math.exp2(qk_t - lse2[None, :]), 0.0)
        dv += dot(p_t.to(do.dtype), do, FP32_DOT)
        dp_t = dot(v, tl.trans(do), FP32_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, FP32_DOT)
    return dk, dv


@triton.jit
def _sparse_causal_attn_bwd_dkdv_kernel(
    q_ptr,  # (B*F, H, N, D)
    k_ptr,  # (B*F, H, N, D)
    v_ptr,  # (B*F, H, N, D)
    do_ptr,  # (B*F, H, N, D)
    dk_ptr,  # (B*F, H, N, D)
    dv_ptr,  # (B*F, H, N, D)
    lse_ptr,  # (B*F, H, N) fp32, contiguous
    delta_ptr,  # (B*F, H, N) fp32, contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_videos, n_heads, n_tokens, num_frames, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads the head dim: it must cover HEAD_DIM")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs every block dim >= 16")
    # the launcher divided every b, h, n stride by STRIDE_UNIT (_common.stride_unit): multiplying
    # back tells Triton that each tile row starts STRIDE_UNIT-aligned (16-byte vectors at head dim 40)
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_dkb, stride_dkh, stride_dkn = stride_dkb * STRIDE_UNIT, stride_dkh * STRIDE_UNIT, stride_dkn * STRIDE_UNIT
    stride_dvb, stride_dvh, stride_dvn = stride_dvb * STRIDE_UNIT, stride_dvh * STRIDE_UNIT, stride_dvn * STRIDE_UNIT
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    # frame-major grid axis: program_id(2) = frame * B + b, so the frame-0 programs launch first
    key_frame = tl.program_id(2) // n_videos
    video = (tl.program_id(2) % n_videos).to(tl.int64)
    first_row = video * num_frames
    key_row = first_row + key_frame

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    col_mask = offs_n < n_tokens
    kd_mask = col_mask[:, None] & d_mask[None, :]
    k = tl.load(_tile(k_ptr, key_row, head, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd),
                mask=kd_mask, other=0.0)
    v = tl.load(_tile(v_ptr, key_row, head, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd),
                mask=kd_mask, other=0.0)

    # query frames that read key frame j: all of 0..F-1 for j = 0, else only j+1 (none if j = F-1)
    query_lo = tl.where(key_frame == 0, 0, key_frame + 1)
    query_hi = tl.where(key_frame == 0, num_frames, tl.minimum(key_frame + 2, num_frames))

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for query_frame in range(query_lo, query_hi):
        q_row = first_row + query_frame
        stat_offs = (q_row * n_heads + head) * n_tokens
        dk, dv = _bwd_dkdv_query_frame(
            dk, dv, k, v,
            q_ptr + q_row * stride_qb + head * stride_qh, do_ptr + q_row * stride_dob + head * stride_doh,
            lse_ptr + stat_offs, delta_ptr + stat_offs,
            stride_qn, stride_qd, stride_don, stride_dod, n_tokens, qk_scale,
            offs_m, offs_d, d_mask, BLOCK_M, FP32_DOT,
        )

    # -- epilogue: S = scale * Q K^T, so dK = scale * dS^T Q; dV = P^T dO needs no scale --
    dk_ptrs = _tile(dk_ptr, key_row, head, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd)
    dv_ptrs = _tile(dv_ptr, key_row, head, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd)
    tl.store(dk_ptrs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a pure function of (head dim, dtype, device kind); no autotuning, since
# the interpreter cannot autotune over >= 2 configs and every GPU config must pass the compile check.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int  # query tokens per tile
    block_n: int  # key tokens per tile
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class SparseCausalAttnConfig:
    """What the launchers pick for one (head dim, dtype, device): the padded head dim and each kernel's tiles."""

    head_dim: int
    dtype: torch.dtype
    block_d: int
    fwd: KernelConfig
    bwd_dq: KernelConfig
    bwd_dkdv: KernelConfig


def _block_d(head_dim: int) -> int:
    # tl.dot needs power-of-2 dims >= 16; head dims below 64 (40, test-sized UNets) share the
    # 64 block so that COMPILED_HEAD_DIMS reach every block width: 40 -> 64, 80 -> 128, 160 -> 256.
    # Masked lanes load zeros and are never stored.
    return max(64, triton.next_power_of_2(head_dim))


# Not timed (no GPU was available to tune on): each entry is the largest tile found that compiles
# with no register spills and MMA in the main loops on sm_80 and sm_90 (python tests/gpu_binaries.py
# prints registers and spills; every entry fits the shared memory of an A100, 163 KB, and an H100,
# 227 KB). Keyed by (block_d, bytes per element) -> (fwd, bwd_dq, bwd_dkdv); head dim 40 shares the
# 64 block with SD's 64. What the search found:
# - fp16/bf16: 8 warps for 128-query forward tiles at block_d 64 (4 warps needed all 255 registers
#   at head dim 64 and spilled at 40), and for the dK/dV kernel, which holds two fp32 accumulators
#   next to its K and V tiles (4 warps spilled at every head dim).
# - fp32 runs true-fp32 ("ieee") dots on CUDA cores: a thread holds whole K rows of both operands,
#   so tiles shrink as block_d grows (16-query tiles from block_d 128 on). num_stages = 1 spilled
#   kilobytes in the block_d 256 dQ kernel where num_stages = 2 did not.
_GPU_CONFIGS = {
    (64, 2): (KernelConfig(128, 64, 8, 3), KernelConfig(128, 32, 4, 3), KernelConfig(32, 128, 8, 3)),
    (128, 2): (KernelConfig(128, 64, 8, 3), KernelConfig(64, 32, 4, 2), KernelConfig(32, 64, 8, 2)),
    (256, 2): (KernelConfig(64, 32, 8, 2), KernelConfig(32, 32, 4, 2), KernelConfig(32, 32, 8, 2)),
    (64, 4): (KernelConfig(32, 32, 4, 2), KernelConfig(64, 32, 8, 2), KernelConfig(16, 32, 4, 2)),
    (128, 4): (KernelConfig(16, 32, 8, 2), KernelConfig(16, 32, 4, 2), KernelConfig(16, 32, 4, 2)),
    (256, 4): (KernelConfig(32, 32, 8, 1), KernelConfig(16, 32, 4, 2), KernelConfig(16, 16, 4, 1)),
}
# The interpreter runs programs one by one; 32-token tiles make tests at N = 33..64 cross tile
# boundaries (multi-block online softmax, ragged last tile) while keeping the arrays small.
_INTERPRETER_CONFIG = KernelConfig(32, 32)


def launch_config(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> SparseCausalAttnConfig:
    """The configuration the launchers use for this head dim and dtype on a GPU or in the interpreter."""
    block_d = _block_d(head_dim)
    if on_gpu:
        fwd, bwd_dq, bwd_dkdv = _GPU_CONFIGS[block_d, 2 if dtype.itemsize == 2 else 4]
    else:
        fwd = bwd_dq = bwd_dkdv = _INTERPRETER_CONFIG
    return SparseCausalAttnConfig(head_dim, dtype, block_d, fwd, bwd_dq, bwd_dkdv)


def launch_configs(head_dims=COMPILED_HEAD_DIMS, dtypes=SUPPORTED_DTYPES) -> list[SparseCausalAttnConfig]:
    """Every GPU configuration the launchers can pick for these head dims and dtypes.

    With the defaults this covers every entry of the configuration table: another head dim differs
    only in the HEAD_DIM mask inside an already covered block width.
    """
    return [launch_config(head_dim, dtype, on_gpu=True) for head_dim in head_dims for dtype in dtypes]


# ----------------------------------------------------------------------------------------------
# Launchers: allocate outputs, build the grid, return tensors
# ----------------------------------------------------------------------------------------------


def _fwd_launch(q, k, v, out, lse, num_frames: int, scale: float, config: SparseCausalAttnConfig, on_gpu: bool):
    rows, heads, tokens, head_dim = q.shape
    cfg = config.fwd
    unit = stride_unit(q, k, v, out)
    return Launch(
        _sparse_causal_attn_fwd_kernel, (triton.cdiv(tokens, cfg.block_m), rows, heads),
        (q, k, v, out, lse, *unit_strides(unit, q, k, v, out), heads, tokens, num_frames, scale * LOG2E.value),
        dict(HEAD_DIM=head_dim, BLOCK_D=config.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
             FP32_DOT=fp32_dot(q.dtype, on_gpu), STRIDE_UNIT=unit, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def _bwd_launches(do, q, k, v, out, lse, delta, dq, dk, dv, num_frames: int, scale: float,
                  config: SparseCausalAttnConfig, on_gpu: bool) -> tuple[Launch, Launch]:
    rows, heads, tokens, head_dim = q.shape
    dq_cfg, dkdv_cfg = config.bwd_dq, config.bwd_dkdv
    videos = rows // num_frames
    # one STRIDE_UNIT for both kernels' tensors
    unit = stride_unit(q, k, v, out, do, dq, dk, dv)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=config.block_d, FP32_DOT=fp32_dot(q.dtype, on_gpu), STRIDE_UNIT=unit)
    dq_launch = Launch(
        _sparse_causal_attn_bwd_dq_kernel, (triton.cdiv(tokens, dq_cfg.block_m), rows, heads),
        (q, k, v, out, do, dq, lse, delta,
         *unit_strides(unit, q, k, v, out, do, dq),
         heads, tokens, num_frames, scale, scale * LOG2E.value),
        dict(common, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
             num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages),
    )
    # same stream, so it starts after the dq kernel has written delta; frame-major last axis
    dkdv_launch = Launch(
        _sparse_causal_attn_bwd_dkdv_kernel, (triton.cdiv(tokens, dkdv_cfg.block_n), heads, num_frames * videos),
        (q, k, v, do, dk, dv, lse, delta,
         *unit_strides(unit, q, k, v, do, dk, dv),
         videos, heads, tokens, num_frames, scale, scale * LOG2E.value),
        dict(common, BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n,
             num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages),
    )
    return dq_launch, dkdv_launch


def sparse_causal_attn_fwd(q, k, v, num_frames: int, scale: float, config: SparseCausalAttnConfig | None = None):
    """Forward launcher.

    Args:
        q, k, v: (batch*frames, heads, tokens, head_dim), same dtype and device, any strides.
        num_frames: frames per video. scale: softmax scale.
        config: override of :func:`launch_config` (tests use it to run GPU tile sizes in the interpreter).

    Returns:
        out: (batch*frames, heads, tokens, head_dim) in q's dtype, contiguous.
        lse: (batch*frames, heads, tokens) fp32, natural-log log-sum-exp of each query's scaled scores.
    """
    on_gpu = q.is_cuda
    config = config or launch_config(q.shape[-1], q.dtype, on_gpu)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _fwd_launch(q, k, v, out, lse, num_frames, scale, config, on_gpu)()
    return out, lse


def sparse_causal_attn_bwd(do, q, k, v, out, lse, num_frames: int, scale: float,
                           config: SparseCausalAttnConfig | None = None):
    """Backward launcher.

    Args:
        do: (batch*frames, heads, tokens, head_dim), gradient of ``out``, any strides.
        q, k, v, out: as given to / returned by :func:`sparse_causal_attn_fwd`.
        lse: (batch*frames, heads, tokens) fp32 contiguous, from :func:`sparse_causal_attn_fwd`.

    Returns:
        dq, dk, dv: (batch*frames, heads, tokens, head_dim) in q's dtype, contiguous.
    """
    on_gpu = q.is_cuda
    config = config or launch_config(q.shape[-1], q.dtype, on_gpu)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty_like(lse)
    for launch in _bwd_launches(do, q, k, v, out, lse, delta, dq, dk, dv, num_frames, scale, config, on_gpu):
        launch()
    return dq, dk, dv


def gpu_launches(frames: int = 8, tokens: int = 4096) -> list[Launch]:
    """Every kernel at every GPU configuration, launched as the model launches it: q, k, v are
    (B*F, N, H, D) projections viewed as (B*F, H, N, D) (SD2's 64-dim heads at a 64x64 latent,
    and the other head dims with 8 heads), built from meta tensors for the GPU compile check."""
    launches = []
    for config in launch_configs():
        heads = 5 if config.head_dim == 64 else 8
        q, k, v, out, do, dq, dk, dv, lse, delta = attention_meta_inputs(
            frames, tokens, heads, config.head_dim, config.dtype, count=8
        )
        label = f"D{config.head_dim}-{str(config.dtype).removeprefix('torch.')}"
        for launch in (_fwd_launch(q, k, v, out, lse, frames, 0.125, config, True),
                       *_bwd_launches(do, q, k, v, out, lse, delta, dq, dk, dv, frames, 0.125, config, True)):
            launch.label = label
            launches.append(launch)
    return launches


# ----------------------------------------------------------------------------------------------
# Autograd and entry point
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("depthvid_triton::sparse_causal_attn_fwd", mutates_args=())
def sparse_causal_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_causal_attn_fwd` as a dispatcher op: selective checkpointing sees only such
    ops, so this is what lets it keep the forward's output instead of launching it again."""
    return sparse_causal_attn_fwd(q, k, v, num_frames, scale)


@sparse_causal_attn_fwd_op.register_fake
def _fwd_fake(q, k, v, num_frames, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:3], dtype=torch.float32)


def sparse_causal_attn_triton(q, k, v, num_frames: int, scale: float) -> torch.Tensor:
    """Sparse-causal attention with the fused Triton kernels (called by depthvid.ops).

    Args:
        q, k, v: (batch*frames, heads, tokens, head_dim), float16/bfloat16/float32, any strides.
        num_frames: frames per video (rows b*num_frames .. b*num_frames + num_frames - 1 are video b).
        scale: softmax scale.

    Returns:
        (batch*frames, heads, tokens, head_dim) in the input dtype; differentiable in q, k, v.
    """
    check_attention_inputs("sparse_causal_attention", q, k, v, MAX_HEAD_DIM)
    return FusedAttentionFunction.apply(sparse_causal_attn_fwd_op, sparse_causal_attn_bwd, q, k, v, num_frames,
                                        float(scale))
