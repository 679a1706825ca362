"""Fused temporal attention (forward + backward) in Triton.

Temporal attention is attention across the F frames of one video at every (batch, head, token)
position: q, k, v are (B*F, H, N, D) and out[b, f, h, n] = softmax_f'(scale * q[b,f,h,n] .
k[b,f',h,n]) @ v[b,:,h,n]. It is B*H*N independent attention problems of length F (8 to 32): a
batch of tiny F x F attentions, not one long one.

Kernel design
-------------
One program owns BLOCK_N tokens of one (b, h) and ALL F frames of those tokens. It reads the
(B*F, H, N, D) tensors in place through their strides (no transpose copy), keeps the query frames
as a (BLOCK_F, BLOCK_N, BLOCK_D) fp32 slab in registers and streams the key/value frames one at a
time with an online softmax, so k and v are read from memory exactly once. Scores are computed
with elementwise products and a reduction over D, not ``tl.dot``: per token the matmuls are
(F x D) @ (D x F) with F as small as 1-8, below the 16-row minimum of a tensor-core tile, and the
op is memory-bound anyway (see the numbers below). The softmax uses exp2 with the scale folded
into log2(e) (one multiply per score), and everything is accumulated in fp32 whatever the input
dtype. The forward saves the log-sum-exp (LSE, in log2 units, fp32, (B*F, H, N)); the backward
recomputes the probabilities from it.

Because a program owns every frame of its tokens, the backward needs no atomics and is
deterministic: for each key frame j it reduces dK_j and dV_j over the query frames in registers
and stores them, while dQ accumulates in a register slab. Query frames are processed in chunks of
BLOCK_F = 8 or 16 (bounding registers for any F); with more frames than that the backward adds
each chunk's dK_j, dV_j to what the previous chunk stored (same program, so no race). Block sizes
are a pure function of (F, head_dim), sized so that ptxas -v reports 64-103 registers per
thread and no spills on sm_80/sm_90 (see ``pick_config``).

Head dims that are not a power of 2 (40, 80, 160) are padded to BLOCK_D = next power of 2 with
masked loads; query frames are padded to BLOCK_F; key frames are looped over exactly.

Memory traffic and FLOPs (per call; X = B*F*H*N*D elements of e bytes, T = B*F*H*N rows)
-----------------------------------------------------------------------------------------
Useful FLOPs, identical for both: forward 4*F*F*D per (b, h, n) (2F^2D for QK^T, 2F^2D for PV)
plus F^2 exp; backward 10*F*F*D (recompute S, dP, dV, dK, dQ) plus F^2 exp.

Triton, forward:  reads q, k, v (3Xe), writes out (Xe) and LSE (4T bytes)     -> 4Xe + 4T.
Triton, backward: reads q, k, v, out, dout (5Xe), LSE (4T), writes dq, dk, dv (3Xe)
                  -> 8Xe + 4T (+ a read-modify-write of dk, dv per extra BLOCK_F chunk).
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

from depthvid.errors import UserError
from depthvid.triton_kernels._common import LOG2E, Launch, check_tensors

MAX_BLOCK_F = 16  # query frames per chunk; more frames run as several chunks
MAX_HEAD_DIM = 256  # BLOCK_D = 256 already fills the register slab with 8 query frames


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _frame_tile(ptr, row, head, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d):
    """Pointers to the (BLOCK_N, BLOCK_D) tile of one frame: row ``row`` of B*F."""
    return ptr + row * stride_b + head * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d


@triton.jit
def _frames_slab(ptr, rows, head, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d):
    """Pointers to the (BLOCK_F, BLOCK_N, BLOCK_D) slab of several frames: rows (BLOCK_F,) of B*F."""
    return (ptr + rows[:, None, None] * stride_b + head * stride_h
            + offs_n[None, :, None] * stride_n + offs_d[None, None, :] * stride_d)


@triton.jit
def _temporal_attn_fwd_kernel(
    q_ptr,  # (B*F, H, N, D)
    k_ptr,  # (B*F, H, N, D)
    v_ptr,  # (B*F, H, N, D)
    o_ptr,  # (B*F, H, N, D)
    lse_ptr,  # (B*F, H, N) fp32, log2 units
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    num_frames, num_tokens, head_dim,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= 16, "BLOCK_D: pad the head dim to at least 16 (GPU vector loads)")
    tl.static_assert(BLOCK_F * BLOCK_N * BLOCK_D <= 2048, "larger fp32 slabs need > 100 registers/thread")

    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    first_row = (batch * num_frames).to(tl.int64)  # row of this video's frame 0 in B*F

    offs_f = tl.arange(0, BLOCK_F)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < num_tokens
    mask_nd = mask_n[:, None] & (offs_d < head_dim)[None, :]  # (BLOCK_N, BLOCK_D)
    # frame 0's key/value tiles; frame j is j * stride_kb (stride_vb) further on
    k_tile = _frame_tile(k_ptr, first_row, head, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_tile = _frame_tile(v_ptr, first_row, head, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)

    for f_start in range(0, num_frames, BLOCK_F):
        rows = first_row + f_start + offs_f  # (BLOCK_F,) rows of this chunk's query frames
        mask_f = f_start + offs_f < num_frames
        mask_fnd = mask_f[:, None, None] & mask_nd[None, :, :]  # (BLOCK_F, BLOCK_N, BLOCK_D)
        q_slab = _frames_slab(q_ptr, rows, head, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
        q = tl.load(q_slab, mask=mask_fnd, other=0.0).to(tl.float32)

        # -- online softmax over the key frames, for all query frames of the chunk at once --
        # fp32 running max, sum and output whatever the input dtype. Padded query frames and
        # tokens load zeros, score 0 and are never stored.
        m = tl.full((BLOCK_F, BLOCK_N), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_F, BLOCK_N), tl.float32)
        acc = tl.zeros((BLOCK_F, BLOCK_N, BLOCK_D), tl.float32)
        for j in range(0, num_frames):
            k = tl.load(k_tile + j * stride_kb, mask=mask_nd, other=0.0).to(tl.float32)
            v = tl.load(v_tile + j * stride_vb, mask=mask_nd, other=0.0).to(tl.float32)
            s = tl.sum(q * k[None, :, :], axis=2) * qk_scale  # (BLOCK_F, BLOCK_N), log2 units
            m_new = tl.maximum(m, s)
            alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
            p = tl.exp2(s - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, :, None] + p[:, :, None] * v[None, :, :]
            m = m_new

        # -- epilogue: normalise, store out and the LSE the backward recomputes P from --
        o_slab = _frames_slab(o_ptr, rows, head, offs_n, offs_d, stride_ob, stride_oh, stride_on, stride_od)
        tl.store(o_slab, (acc / l[:, :, None]).to(o_ptr.dtype.element_ty), mask=mask_fnd)
        lse_rows = lse_ptr + rows[:, None] * stride_lb + head * stride_lh + offs_n[None, :] * stride_ln
        tl.store(lse_rows, m + tl.log2(l), mask=mask_f[:, None] & mask_n[None, :])


@triton.jit
def _temporal_attn_bwd_kernel(
    q_ptr,  # (B*F, H, N, D)
    k_ptr,  # (B*F, H, N, D)
    v_ptr,  # (B*F, H, N, D)
    o_ptr,  # (B*F, H, N, D) forward output
    do_ptr,  # (B*F, H, N, D) gradient of the output
    lse_ptr,  # (B*F, H, N) fp32, log2 units
    dq_ptr,  # (B*F, H, N, D)
    dk_ptr,  # (B*F, H, N, D), same strides as dq
    dv_ptr,  # (B*F, H, N, D), same strides as dq
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    num_frames, num_tokens, head_dim,
    scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """With P = softmax(scale * Q K^T) per token and dO the output gradient:
    dV_j = sum_i P_ij dO_i,  dP_ij = dO_i . V_j,  dS_ij = P_ij (dP_ij - delta_i) with
    delta_i = dO_i . O_i,  dQ_i = scale * sum_j dS_ij K_j,  dK_j = scale * sum_i dS_ij Q_i."""
    tl.static_assert(BLOCK_D >= 16, "BLOCK_D: pad the head dim to at least 16 (GPU vector loads)")
    tl.static_assert(BLOCK_F * BLOCK_N * BLOCK_D <= 2048, "larger fp32 slabs need > 100 registers/thread")

    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    first_row = (batch * num_frames).to(tl.int64)

    offs_f = tl.arange(0, BLOCK_F)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < num_tokens
    mask_nd = mask_n[:, None] & (offs_d < head_dim)[None, :]  # (BLOCK_N, BLOCK_D)
    k_tile = _frame_tile(k_ptr, first_row, head, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_tile = _frame_tile(v_ptr, first_row, head, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)
    # dk and dv share dq's strides (the launcher allocates all three alike)
    dk_tile = _frame_tile(dk_ptr, first_row, head, offs_n, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd)
    dv_tile = _frame_tile(dv_ptr, first_row, head, offs_n, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd)

    for f_start in range(0, num_frames, BLOCK_F):
        rows = first_row + f_start + offs_f
        mask_f = f_start + offs_f < num_frames
        mask_fnd = mask_f[:, None, None] & mask_nd[None, :, :]
        q_slab = _frames_slab(q_ptr, rows, head, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
        o_slab = _frames_slab(o_ptr, rows, head, offs_n, offs_d, stride_ob, stride_oh, stride_on, stride_od)
        do_slab = _frames_slab(do_ptr, rows, head, offs_n, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
        lse_rows = lse_ptr + rows[:, None] * stride_lb + head * stride_lh + offs_n[None, :] * stride_ln
        q = tl.load(q_slab, mask=mask_fnd, other=0.0).to(tl.float32)
        do = tl.load(do_slab, mask=mask_fnd, other=0.0).to(tl.float32)
        o = tl.load(o_slab, mask=mask_fnd, other=0.0).to(tl.float32)
        delta = tl.sum(do * o, axis=2)  # (BLOCK_F, BLOCK_N)
        lse = tl.load(lse_rows, mask=mask_f[:, None] & mask_n[None, :], other=0.0)

        # Padded query frames and tokens have q = do = o = lse = 0, so P = 1 there but dO = 0
        # and dS = 1 * (0 - 0) = 0: they add nothing to dK_j, dV_j.
        dq = tl.zeros((BLOCK_F, BLOCK_N, BLOCK_D), tl.float32)
        for j in range(0, num_frames):
            k = tl.load(k_tile + j * stride_kb, mask=mask_nd, other=0.0).to(tl.float32)
            v = tl.load(v_tile + j * stride_vb, mask=mask_nd, other=0.0).to(tl.float32)
            p = tl.exp2(tl.sum(q * k[None, :, :], axis=2) * qk_scale - lse)  # (BLOCK_F, BLOCK_N)
            ds = p * (tl.sum(do * v[None, :, :], axis=2) - delta)
            dv = tl.sum(p[:, :, None] * do, axis=0)  # (BLOCK_N, BLOCK_D)
            dk = tl.sum(ds[:, :, None] * q, axis=0) * scale
            dq += ds[:, :, None] * k[None, :, :]
            # -- dK_j, dV_j: the first chunk stores, later chunks add to it (rows this program owns) --
            if f_start > 0:
                dv += tl.load(dv_tile + j * stride_dqb, mask=mask_nd, other=0.0).to(tl.float32)
                dk += tl.load(dk_tile + j * stride_dqb, mask=mask_nd, other=0.0).to(tl.float32)
            tl.store(dv_tile + j * stride_dqb, dv.to(dv_ptr.dtype.element_ty), mask=mask_nd)
            tl.store(dk_tile + j * stride_dqb, dk.to(dk_ptr.dtype.element_ty), mask=mask_nd)

        dq_slab = _frames_slab(dq_ptr, rows, head, offs_n, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd)
        tl.store(dq_slab, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_fnd)


# -- launch configuration -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemporalAttnConfig:
    """Block sizes and warps for one launch; a pure function of (num_frames, head_dim)."""

    BLOCK_F: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int

    @property
    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_F": self.BLOCK_F, "BLOCK_N": self.BLOCK_N, "BLOCK_D": self.BLOCK_D}


# fp32 elements per (BLOCK_F, BLOCK_N, BLOCK_D) register slab. The forward holds two slabs (q,
# acc), the backward three (q, do, dq, plus o until delta is formed). Measured with ptxas -v on
# sm_80/sm_90 at 8 warps, these budgets compile to 64-103 registers per thread with no spills;
# doubling the forward's costs ~140 (half the resident warps), and 2-4 warps need 150-255 or spill.
_SLAB_ELEMENTS = {"fwd": 2048, "bwd": 1024}
_NUM_WARPS = 8


def pick_config(num_frames: int, head_dim: int, backward: bool) -> TemporalAttnConfig:
    """The launch configuration for one call (no autotuning: the interpreter cannot autotune).

    Query frames are padded to 8 or 16 (a chunk; more frames run as several chunks), the head
    dim to the next power of 2, and BLOCK_N fills the slab budget.
    """
    budget = _SLAB_ELEMENTS["bwd" if backward else "fwd"]
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_block_f = max(8, min(MAX_BLOCK_F, budget // block_d))
    block_f = min(max(triton.next_power_of_2(num_frames), 8), max_block_f)
    block_n = max(budget // (block_f * block_d), 1)
    return TemporalAttnConfig(block_f, block_n, block_d, _NUM_WARPS)


def launch_configs(
    head_dims=(40, 64, 80, 160), max_frames: int = 2 * MAX_BLOCK_F
) -> dict[str, list[TemporalAttnConfig]]:
    """Every configuration the launchers can pick for these head dims and 1..max_frames frames.

    Frames beyond 16 reuse the 16-frame chunk configurations, so the default covers every F.
    Returns {"fwd": [...], "bwd": [...]} without duplicates; the GPU compile test compiles
    exactly these.
    """
    configs = {"fwd": [], "bwd": []}
    for name, backward in (("fwd", False), ("bwd", True)):
        for head_dim in head_dims:
            for frames in range(1, max_frames + 1):
                config = pick_config(frames, head_dim, backward)
                if config not in configs[name]:
                    configs[name].append(config)
    return configs


def _fwd_launch(q, k, v, out, lse, num_frames: int, scale: float) -> Launch:
    rows, heads, tokens, head_dim = q.shape
    config = pick_config(num_frames, head_dim, backward=False)
    return Launch(
        _temporal_attn_fwd_kernel, (triton.cdiv(tokens, config.BLOCK_N), heads, rows // num_frames),
        (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
         num_frames, tokens, head_dim, scale * LOG2E.value),
        dict(config.constexprs, num_warps=config.num_warps),
    )


def _bwd_launch(q, k, v, out, lse, grad_out, dq, dk, dv, num_frames: int, scale: float) -> Launch:
    rows, heads, tokens, head_dim = q.shape
    config = pick_config(num_frames, head_dim, backward=True)
    return Launch(
        _temporal_attn_bwd_kernel, (triton.cdiv(tokens, config.BLOCK_N), heads, rows // num_frames),
        (q, k, v, out, grad_out, lse, dq, dk, dv,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *lse.stride(), *dq.stride(),
         num_frames, tokens, head_dim, scale, scale * LOG2E.value),
        dict(config.constexprs, num_warps=config.num_warps),
    )


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


def temporal_attn_bwd(q, k, v, out, lse, grad_out, num_frames: int, scale: float):
    """Run the backward kernel.

    Args:
        q, k, v, out, grad_out: (batch*frames, heads, tokens, head_dim), any strides, one dtype.
        lse: (batch*frames, heads, tokens) fp32 from :func:`temporal_attn_fwd`.

    Returns:
        dq, dk, dv: (batch*frames, heads, tokens, head_dim), contiguous, q's dtype.
    """
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel():
        _bwd_launch(q, k, v, out, lse, grad_out, dq, dk, dv, num_frames, scale)()
    return dq, dk, dv


def gpu_launches(tokens: int = 4096) -> list[Launch]:
    """Every configuration of :func:`launch_configs` in every dtype, launched as the model launches
    it (q, k, v are (B*F, N, H, D) projections viewed as (B*F, H, N, D)), from meta tensors, for the
    GPU compile check. The frame count is the smallest one that picks the configuration; head
    dims 64, 80 and 160 reach every BLOCK_D (40 shares 64's, see :func:`launch_configs`)."""
    launches = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 80, 160):
            seen = set()
            for frames in range(1, 2 * MAX_BLOCK_F + 1):
                configs = (pick_config(frames, head_dim, backward=False), pick_config(frames, head_dim, backward=True))
                if configs in seen:
                    continue
                seen.add(configs)
                heads = 5 if head_dim == 64 else 8
                q, k, v, out, grad_out, dq, dk, dv = (
                    torch.empty(frames, tokens, heads, head_dim, dtype=dtype, device="meta").transpose(1, 2)
                    for _ in range(8)
                )
                lse = torch.empty(q.shape[:3], device="meta")
                label = f"D{head_dim}-F{frames}-{str(dtype).removeprefix('torch.')}"
                for launch in (_fwd_launch(q, k, v, out, lse, frames, 0.125),
                               _bwd_launch(q, k, v, out, lse, grad_out, dq, dk, dv, frames, 0.125)):
                    launch.label = label
                    launches.append(launch)
    return launches


# -- autograd -----------------------------------------------------------------------------------


class TemporalAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, num_frames: int, scale: float):
        out, lse = temporal_attn_fwd(q, k, v, num_frames, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.num_frames, ctx.scale = num_frames, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = temporal_attn_bwd(q, k, v, out, lse, grad_out, ctx.num_frames, ctx.scale)
        return dq, dk, dv, None, None


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
    check_tensors("temporal_attention", q=q, k=k, v=v)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise UserError(
            f"temporal_attention: head_dim must be <= {MAX_HEAD_DIM} for backend='triton', got "
            f"{q.shape[-1]}; use more heads or backend='torch'"
        )
    return TemporalAttnFunction.apply(q, k, v, num_frames, scale)
