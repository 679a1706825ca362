"""Benchmark: depthvid._C's CPU attention kernels against the pure-torch formulations, 2 threads.

Run: .venv/bin/pytest benchmarks/bench_attention_cpp.py --benchmark-enable
Shape: SD2-depth's first level at 512x512 with 8 frames (B*F = 8, H = 5, N = 4096, D = 64), fp32,
forward + backward. Each case times its own variant with pytest-benchmark and stores in
``benchmark.extra_info`` the time ratio against the reference timed in the same process
(min of ``REPEATS`` runs each, interleaved) and, for sparse-causal attention, the peak RSS one
forward + backward adds, measured in a fresh subprocess per variant.

Variants (issue 11's targets in brackets):
  sparse-causal  concat   SDPA over cat(frame 0, frame f-1) for f >= 2 (sparse_causal_attention_concat)
                 lse      the torch backend on CPU: two flash calls merged by their log-sum-exp
                 cpp      depthvid._C  [time <= 0.7x concat and <= 1.0x lse; peak memory <= 0.6x concat]
  temporal       torch    transpose + SDPA + transpose (the torch reference)
                 cpp      depthvid._C  [time <= 0.7x torch]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from depthvid import extension
from depthvid.ops import sparse_causal_attention, temporal_attention
from depthvid.ops.sparse_causal_attn import sparse_causal_attention_concat

SHAPE = dict(frames=8, heads=5, tokens=4096, head_dim=64)
THREADS = 2
REPEATS = 3
def sparse_variant(name):
    if name == "concat":
        return lambda q, k, v, frames: sparse_causal_attention_concat(q, k, v, frames, q.shape[-1] ** -0.5)
    backend = {"lse": "torch", "cpp": "cpp"}[name]  # on CPU the torch backend is the LSE merge
    return lambda q, k, v, frames: sparse_causal_attention(q, k, v, frames, backend=backend)


def temporal_variant(name):
    return lambda q, k, v, frames: temporal_attention(q, k, v, frames, backend=name)


def make_step(op, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (SHAPE["frames"], SHAPE["heads"], SHAPE["tokens"], SHAPE["head_dim"])
    q, k, v, grad_out = (torch.randn(shape, generator=generator) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def step():
        out = op(*leaves, SHAPE["frames"])
        return out, torch.autograd.grad(out, leaves, grad_out)

    return step


def best_time(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def compare(variants):
    """{name: min seconds over REPEATS interleaved runs} and the results of the first variant's step."""
    steps = {name: make_step(op) for name, op in variants.items()}
    results = {name: steps[name]() for name in steps}  # warm-up, and results to compare
    times = {name: [] for name in steps}
    for _ in range(REPEATS):
        for name, step in steps.items():
            times[name].append(best_time(step))
    return {name: min(ts) for name, ts in times.items()}, results


def peak_rss_mb(variant: str) -> float:
    """Peak RSS one sparse-causal fwd+bwd of ``variant`` adds to the process, in a fresh process.

    The peak (VmHWM) is reset just before the step (``/proc/self/clear_refs``), so memory the imports
    and input setup touched and freed does not hide the step's own peak."""
    script = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import bench_attention_cpp as b\n"
        f"torch.set_num_threads({THREADS}); step = b.make_step(b.sparse_variant({variant!r}))\n"
        "def kib(field): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field))\n"
        "open('/proc/self/clear_refs', 'w').write('5'); before = kib('VmRSS:'); step()\n"
        "print((kib('VmHWM:') - before) / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not extension.available(), reason=extension.unavailable_reason())


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


def test_sparse_causal_attn_cpp(benchmark):
    seconds, results = compare({name: sparse_variant(name) for name in ("concat", "lse", "cpp")})
    for name in ("lse", "cpp"):  # a fast wrong kernel is no result
        for got, want in zip([results[name][0], *results[name][1]], [results["concat"][0], *results["concat"][1]]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    memory = {name: peak_rss_mb(name) for name in ("concat", "lse", "cpp")}
    benchmark.extra_info.update(
        seconds=seconds,
        peak_rss_mb=memory,
        cpp_vs_concat_time=seconds["cpp"] / seconds["concat"],
        cpp_vs_lse_time=seconds["cpp"] / seconds["lse"],
        cpp_vs_concat_memory=memory["cpp"] / memory["concat"],
    )
    print(json.dumps(benchmark.extra_info, indent=1))
    benchmark.pedantic(make_step(sparse_variant("cpp")), rounds=1, iterations=1)


def test_temporal_attn_cpp(benchmark):
    seconds, results = compare({name: temporal_variant(name) for name in ("torch", "cpp")})
    for got, want in zip([results["cpp"][0], *results["cpp"][1]], [results["torch"][0], *results["torch"][1]]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    benchmark.extra_info.update(seconds=seconds, cpp_vs_torch_time=seconds["cpp"] / seconds["torch"])
    print(json.dumps(benchmark.extra_info, indent=1))
    benchmark.pedantic(make_step(temporal_variant("cpp")), rounds=1, iterations=1)
