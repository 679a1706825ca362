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

import contextlib
import dataclasses
import os

import torch
import triton
import triton.language as tl

from depthvid.errors import UserError

LOG2E = 1.4426950408889634  # log2(e): softmax in exp2 units
MAX_BLOCK_F = 16  # query frames per chunk; more frames run as several chunks
MAX_HEAD_DIM = 256  # BLOCK_D = 256 already fills the register slab with 8 query frames
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


KERNELS = {"fwd": _temporal_attn_fwd_kernel, "bwd": _temporal_attn_bwd_kernel}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_rounds_bf16_down(tensor: torch.Tensor) -> bool:
    """The interpreter converts fp32 -> bf16 by truncation (a GPU rounds to nearest even), so on
    CPU bf16 tensors run through the kernels as fp32 and torch rounds the results."""
    return tensor.dtype == torch.bfloat16 and _interpreting()


def _device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


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
    if _interpreter_rounds_bf16_down(q):
        out, lse = temporal_attn_fwd(q.float(), k.float(), v.float(), num_frames, scale)
        return out.to(q.dtype), lse
    rows, heads, tokens, head_dim = q.shape
    out = torch.empty((rows, heads, tokens, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((rows, heads, tokens), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    config = pick_config(num_frames, head_dim, backward=False)
    grid = (triton.cdiv(tokens, config.BLOCK_N), heads, rows // num_frames)
    with _device_guard(q):
        _temporal_attn_fwd_kernel[grid](
            q, k, v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            num_frames, tokens, head_dim, scale * LOG2E,
            **config.constexprs, num_warps=config.num_warps,
        )
    return out, lse


def temporal_attn_bwd(q, k, v, out, lse, grad_out, num_frames: int, scale: float):
    """Run the backward kernel.

    Args:
        q, k, v, out, grad_out: (batch*frames, heads, tokens, head_dim), any strides, one dtype.
        lse: (batch*frames, heads, tokens) fp32 from :func:`temporal_attn_fwd`.

    Returns:
        dq, dk, dv: (batch*frames, heads, tokens, head_dim), contiguous, q's dtype.
    """
    if _interpreter_rounds_bf16_down(q):
        grads = temporal_attn_bwd(*(t.float() for t in (q, k, v, out)), lse, grad_out.float(), num_frames, scale)
        return tuple(g.to(q.dtype) for g in grads)
    rows, heads, tokens, head_dim = q.shape
    dq, dk, dv = (torch.empty((rows, heads, tokens, head_dim), dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    config = pick_config(num_frames, head_dim, backward=True)
    grid = (triton.cdiv(tokens, config.BLOCK_N), heads, rows // num_frames)
    with _device_guard(q):
        _temporal_attn_bwd_kernel[grid](
            q, k, v, out, grad_out, lse, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *lse.stride(),
            *dq.stride(),
            num_frames, tokens, head_dim, scale, scale * LOG2E,
            **config.constexprs, num_warps=config.num_warps,
        )
    return dq, dk, dv


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
    """Temporal attention with the fused Triton kernels; differentiable in q, k and v.

    Args:
        q, k, v: (batch*frames, heads, tokens, head_dim), frames of one video contiguous, one
            dtype out of float16, bfloat16, float32, one device (CUDA, or CPU under
            TRITON_INTERPRET=1).
        num_frames: frames per video.
        scale: softmax scale.

    Returns:
        (batch*frames, heads, tokens, head_dim) in q's dtype.
    """
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise UserError(
            f"temporal_attention: q, k, v dtypes must be one of float16/bfloat16/float32 for "
            f"backend='triton', got {q.dtype}, {k.dtype}, {v.dtype}; cast them or use backend='torch'"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise UserError(
            f"temporal_attention: head_dim must be <= {MAX_HEAD_DIM} for backend='triton', got "
            f"{q.shape[-1]}; use more heads or backend='torch'"
        )
    if not (q.device == k.device == v.device):
        raise UserError(
            f"temporal_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; "
            "move them to the same device"
        )
    if not q.is_cuda and not _interpreting():
        raise UserError(
            f"temporal_attention: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got "
            f"device {q.device}; move the tensors to a GPU or use backend='torch'"
        )
    return TemporalAttnFunction.apply(q, k, v, num_frames, scale)
