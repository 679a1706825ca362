"""Sparse-causal attention at SD2-depth's shapes (8 frames of 512x512): each depthvid backend that
runs on this device against Tune-A-Video's formulation and, where it runs, FlexAttention.

    pytest benchmarks/bench_sparse_causal_attn.py --benchmark-only

Implementations (one benchmark each, grouped by case; report.py turns medians into ratios):
  torch / cpp / triton  depthvid.ops.sparse_causal_attention with that backend (triton on CUDA only)
  tav                   Tune-A-Video's concatenated K/V per frame (2N keys for every frame) + SDPA
  tav-materialised      the same with explicit scores (its default path); skipped where the scores
                        alone would not fit the memory cap
  flex                  one FlexAttention call with a "frame 0 and frame f-1" block mask (compiled);
                        forward only on CPU, where torch 2.13 has no FlexAttention backward
extra_info: peak_mb (tensor memory one call adds), tflops (useful matmul FLOPs / median time).
"""
from __future__ import annotations

import functools

import pytest
import torch

from baselines import (
    flex_sparse_causal_attention,
    sparse_causal_block_mask,
    tav_sparse_causal_attention,
    tav_sparse_causal_score_bytes,
)
from depthvid.ops import sparse_causal_attention
from harness import (
    DEVICE,
    ON_CUDA,
    OP_DTYPES,
    SD2_ATTN_SHAPES,
    AttnShape,
    assert_same_result,
    attention_step,
    make_attention_inputs,
    memory_cap_bytes,
    op_backends,
    reference_result,
    run_benchmark,
)

BACKENDS = op_backends()
IMPLEMENTATIONS = [*BACKENDS, "tav", "tav-materialised", "flex"]
MODES = ("fwd", "fwd+bwd")
# CPU FlexAttention compiles a C++ kernel per shape (about a minute each here): level 0, which
# carries most of the attention time, only
CPU_FLEX_SHAPES = ("level0-64x64",)
_references: dict[tuple, list[torch.Tensor]] = {}


def attention_flops(shape: AttnShape, mode: str) -> int:
    """Matmul FLOPs the op needs (no duplicated frame-0 keys); backward counted as 2.5x forward."""
    keys = shape.tokens * (min(shape.frames, 2) + 2 * max(shape.frames - 2, 0))  # per query frame, summed
    forward = 4 * shape.batch * shape.heads * shape.tokens * keys * shape.head_dim
    return forward if mode == "fwd" else forward * 7 // 2


def attend_with(implementation: str, shape: AttnShape):
    """(q, k, v) -> out for ``implementation``."""
    scale = shape.head_dim**-0.5
    if implementation in BACKENDS:
        return functools.partial(sparse_causal_attention, num_frames=shape.frames, backend=implementation)
    if implementation in ("tav", "tav-materialised"):
        materialise = implementation == "tav-materialised"
        return lambda q, k, v: tav_sparse_causal_attention(q, k, v, shape.frames, scale, materialise)
    block_mask = sparse_causal_block_mask(shape.batch, shape.frames, shape.tokens, DEVICE)
    return lambda q, k, v: flex_sparse_causal_attention(q, k, v, shape.frames, scale, block_mask)


def reason_to_skip(implementation: str, shape: AttnShape, dtype: torch.dtype, mode: str) -> str | None:
    if implementation == "flex" and not ON_CUDA:
        if mode != "fwd":
            return "FlexAttention has no CPU backward in this torch"
        if shape.label not in CPU_FLEX_SHAPES:
            return f"CPU FlexAttention compiles per shape (~1 min); timed on {', '.join(CPU_FLEX_SHAPES)} only"
    if implementation == "tav-materialised":
        # forward: scores + their softmax; backward keeps both and adds their gradients
        copies = 2 if mode == "fwd" else 4
        needed = copies * tav_sparse_causal_score_bytes(
            shape.batch, shape.frames, shape.heads, shape.tokens, torch.finfo(dtype).bits // 8
        )
        if needed > memory_cap_bytes():
            return f"its scores need ~{needed / 2**30:.1f} GiB, over the {memory_cap_bytes() / 2**30:.1f} GiB cap"
    return None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(OP_DTYPES))
@pytest.mark.parametrize("shape", SD2_ATTN_SHAPES, ids=[s.label for s in SD2_ATTN_SHAPES])
def test_sparse_causal_attn(benchmark, shape, dtype_name, mode, implementation):
    dtype = OP_DTYPES[dtype_name]
    reason = reason_to_skip(implementation, shape, dtype, mode)
    if reason:
        pytest.skip(reason)
    backward = mode == "fwd+bwd"
    inputs = make_attention_inputs(shape, dtype, requires_grad=backward)
    step = attention_step(attend_with(implementation, shape), *inputs, backward)
    benchmark.group = f"sparse_causal_attention {shape.label} {dtype_name} {mode}"
    # compiled FlexAttention on CPU makes its buffers in C++, out of the tensor counter's sight
    counted = not (implementation == "flex" and not ON_CUDA)
    result, peak = run_benchmark(benchmark, step, budget_s=4.0 if not ON_CUDA else 1.0, measure_memory=counted)
    reference = reference_result(_references, (shape, dtype_name, mode), implementation, result,
                                 attention_step(attend_with("torch", shape), *inputs, backward))
    assert_same_result(result, reference, dtype, implementation)
    del result, reference
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op="sparse_causal_attention",
        case=f"{shape.label} {dtype_name} {mode}",
        implementation=implementation,
        ours=implementation in BACKENDS,
        device=str(DEVICE),
        tflops=attention_flops(shape, mode) / median_s / 1e12,
        peak_mb=None if peak is None else peak / 2**20,
    )
