"""Temporal attention: the fused Triton kernels vs the torch reference, on a CUDA GPU.

Run: ``pytest benchmarks/bench_temporal_attn.py --benchmark-enable``. Both backends are timed in
the same test with CUDA events (``triton.testing.do_bench``); the ratio is in ``extra_info``
(``speedup`` = torch time / triton time) next to the Triton kernel's achieved bandwidth.
Skipped without a CUDA device (the interpreter says nothing about GPU speed).
"""
from __future__ import annotations

import functools

import pytest
import torch

from depthvid.ops import temporal_attention

# SD2-depth's temporal attention at 512x512 (64x64 latents): tokens per frame and heads at each
# UNet level, 64-dim heads; 8 frames (the paper) and 24 (a long clip).
SHAPES = {  # label: (batch, frames, heads, tokens, head_dim)
    "level0-8f": (1, 8, 5, 4096, 64),
    "level1-8f": (1, 8, 10, 1024, 64),
    "level2-8f": (1, 8, 20, 256, 64),
    "level0-24f": (1, 24, 5, 4096, 64),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")


def make_inputs(batch, frames, heads, tokens, head_dim, dtype, device, requires_grad):
    """q, k, v as an attention processor makes them, (B*F, N, H*D) -> (B*F, H, N, D) views, and
    an output gradient (B*F, H, N, D)."""
    def view():
        flat = torch.randn(batch * frames, tokens, heads * head_dim, device=device, dtype=dtype)
        return flat.unflatten(-1, (heads, head_dim)).transpose(1, 2).requires_grad_(requires_grad)

    q, k, v = view(), view(), view()
    grad_out = torch.randn(batch * frames, heads, tokens, head_dim, device=device, dtype=dtype)
    return q, k, v, grad_out


def step(backend, q, k, v, grad_out, frames, mode):
    out = temporal_attention(q, k, v, frames, backend=backend)
    if mode == "fwd+bwd":
        torch.autograd.grad(out, (q, k, v), grad_out)
    return out


def bytes_moved(batch, frames, heads, tokens, head_dim, dtype, mode) -> int:
    """Bytes the Triton kernels read and write (the module docstring's 4Xe + 4T / 8Xe + 4T)."""
    elements = batch * frames * heads * tokens * head_dim
    rows = batch * frames * heads * tokens
    size = torch.finfo(dtype).bits // 8
    forward = 4 * elements * size + 4 * rows
    return forward if mode == "fwd" else forward + 8 * elements * size + 4 * rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the Triton kernels are timed on device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_temporal_attn_speed(benchmark, shape, dtype_name, mode):
    import triton.testing

    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    frames = shape[1]
    inputs = make_inputs(*shape, dtype=dtype, device="cuda", requires_grad=mode == "fwd+bwd")
    runs = {backend: functools.partial(step, backend, *inputs, frames, mode) for backend in ("triton", "torch")}
    torch.testing.assert_close(runs["triton"](), runs["torch"](), atol=2e-2, rtol=2e-2)

    ms = {backend: triton.testing.do_bench(run) for backend, run in runs.items()}
    benchmark.extra_info.update(
        triton_ms=ms["triton"],
        torch_ms=ms["torch"],
        speedup=ms["torch"] / ms["triton"],
        triton_gb_per_s=bytes_moved(*shape, dtype, mode) / (ms["triton"] * 1e-3) / 1e9,
    )

    def synchronized_triton():
        runs["triton"]()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized_triton, rounds=20, warmup_rounds=3)
