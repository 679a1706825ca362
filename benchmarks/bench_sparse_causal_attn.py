"""Benchmark: sparse-causal attention, Triton kernels vs the torch reference, on a CUDA device.

Run: .venv/bin/pytest benchmarks/bench_sparse_causal_attn.py --benchmark-enable
Skipped without CUDA. Each case times the Triton backend with pytest-benchmark, times both backends
with triton.testing.do_bench in the same run, and stores in ``benchmark.extra_info``: torch_ms,
triton_ms, speedup (torch_ms / triton_ms), triton_tflops and each backend's peak extra memory.
"""
from __future__ import annotations

import pytest
import torch

from depthvid.ops import sparse_causal_attention

# (label, batch, frames, heads, tokens, head_dim): SD2-depth's attn1 layers at 512x512 (64x64
# latents) with the paper's 8 frames, then UNets whose head dims need padding.
SHAPES = [
    ("sd2-level0", 1, 8, 5, 4096, 64),
    ("sd2-level1", 1, 8, 10, 1024, 64),
    ("sd2-level2", 1, 8, 20, 256, 64),
    ("head-dim-40", 1, 8, 8, 4096, 40),
    ("head-dim-80", 1, 8, 8, 1024, 80),
    ("head-dim-160", 1, 8, 8, 256, 160),
]
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_flops(batch, frames, heads, tokens, head_dim, mode):
    """Matmul FLOPs of the op (no duplicated frame-0 keys); backward counted as 5 matmuls (2.5x forward)."""
    # query frames 0 and 1 see N keys, frames >= 2 see 2N
    keys = tokens * (min(frames, 2) + 2 * max(frames - 2, 0))
    forward = 4 * batch * heads * tokens * keys * head_dim
    return forward if mode == "fwd" else forward * 7 // 2


def make_inputs(batch, frames, heads, tokens, head_dim, dtype, device):
    """q, k, v (requiring grad) and an output gradient, each (batch*frames, heads, tokens, head_dim)."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (
        torch.randn(batch * frames, heads, tokens, head_dim, generator=generator, device=device, dtype=dtype)
        for _ in range(4)
    )
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad_out


def make_step(backend, mode, q, k, v, grad_out, frames):
    """A no-argument callable running one forward (and backward) of ``backend``."""

    def step():
        out = sparse_causal_attention(q, k, v, frames, backend=backend)
        if mode == "fwd+bwd":
            torch.autograd.grad(out, (q, k, v), grad_out)

    return step


def peak_extra_memory_mb(step):
    """Peak CUDA memory allocated by one call of ``step`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the interpreter would time Python, not the kernels"
)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[shape[0] for shape in SHAPES])
def test_sparse_causal_attn_speed(benchmark, shape, dtype_name, mode):
    from triton.testing import do_bench

    _, batch, frames, heads, tokens, head_dim = shape
    inputs = make_inputs(batch, frames, heads, tokens, head_dim, DTYPES[dtype_name], "cuda")
    triton_step = make_step("triton", mode, *inputs, frames)
    torch_step = make_step("torch", mode, *inputs, frames)

    out = sparse_causal_attention(*inputs[:3], frames, backend="triton")
    want = sparse_causal_attention(*inputs[:3], frames, backend="torch")
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)  # a fast wrong kernel is no result

    triton_ms, torch_ms = do_bench(triton_step), do_bench(torch_step)
    benchmark.extra_info.update(
        triton_ms=triton_ms,
        torch_ms=torch_ms,
        speedup=torch_ms / triton_ms,
        triton_tflops=attention_flops(batch, frames, heads, tokens, head_dim, mode) / triton_ms / 1e9,
        triton_peak_mb=peak_extra_memory_mb(triton_step),
        torch_peak_mb=peak_extra_memory_mb(torch_step),
    )

    def synchronized_step():
        triton_step()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized_step, rounds=10, warmup_rounds=2)
