"""Temporal attention at SD2-depth's shapes (8 frames of 512x512): each depthvid backend that runs
on this device against Tune-A-Video's formulation.

    pytest benchmarks/bench_temporal_attn.py --benchmark-only

Implementations (one benchmark each, grouped by case; report.py turns medians into ratios):
  torch / cpp / triton  depthvid.ops.temporal_attention with that backend (triton on CUDA only)
  tav                   Tune-A-Video's attn_temp: "(b f) n c -> (b n) f c" copies, explicit
                        (F x F) scores, and the copy back
extra_info: peak_mb (tensor memory one call adds), gb_per_s (q, k, v, out and their gradients
read/written once, over the median time: the op is memory-bound).
"""
from __future__ import annotations

import functools

import pytest
import torch

from baselines import tav_temporal_attention
from depthvid.ops import temporal_attention
from harness import (
    DEVICE,
    ON_CUDA,
    OP_DTYPES,
    SD2_ATTN_SHAPES,
    AttnShape,
    assert_same_result,
    attention_step,
    make_attention_inputs,
    op_backends,
    reference_result,
    run_benchmark,
)

BACKENDS = op_backends()
IMPLEMENTATIONS = [*BACKENDS, "tav"]
MODES = ("fwd", "fwd+bwd")
_references: dict[tuple, list[torch.Tensor]] = {}


def bytes_moved(shape: AttnShape, dtype: torch.dtype, mode: str) -> int:
    """Least traffic: read q, k, v and write out; backward reads those and dout, writes dq, dk, dv."""
    tensor = shape.batch * shape.frames * shape.heads * shape.tokens * shape.head_dim * (torch.finfo(dtype).bits // 8)
    return 4 * tensor if mode == "fwd" else 4 * tensor + 8 * tensor


def attend_with(implementation: str, shape: AttnShape):
    if implementation in BACKENDS:
        return functools.partial(temporal_attention, num_frames=shape.frames, backend=implementation)
    return lambda q, k, v: tav_temporal_attention(q, k, v, shape.frames, shape.head_dim**-0.5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(OP_DTYPES))
@pytest.mark.parametrize("shape", SD2_ATTN_SHAPES, ids=[s.label for s in SD2_ATTN_SHAPES])
def test_temporal_attn(benchmark, shape, dtype_name, mode, implementation):
    dtype = OP_DTYPES[dtype_name]
    backward = mode == "fwd+bwd"
    inputs = make_attention_inputs(shape, dtype, requires_grad=backward)
    step = attention_step(attend_with(implementation, shape), *inputs, backward)
    benchmark.group = f"temporal_attention {shape.label} {dtype_name} {mode}"
    result, peak = run_benchmark(benchmark, step, budget_s=2.0 if not ON_CUDA else 1.0, measure_memory=True)
    reference = reference_result(_references, (shape, dtype_name, mode), implementation, result,
                                 attention_step(attend_with("torch", shape), *inputs, backward))
    assert_same_result(result, reference, dtype, implementation)
    del result, reference
    benchmark.extra_info.update(
        op="temporal_attention",
        case=f"{shape.label} {dtype_name} {mode}",
        implementation=implementation,
        ours=implementation in BACKENDS,
        device=str(DEVICE),
        gb_per_s=bytes_moved(shape, dtype, mode) / benchmark.stats.stats.median / 1e9,
        peak_mb=peak / 2**20,
    )
