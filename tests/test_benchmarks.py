"""The benchmarks never run in CI (pytest's testpaths is tests/), so what could silently rot there
is checked here cheaply: every benchmark file still collects, the baselines they time compute the
same thing as our ops, and the peak-memory counter counts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from baselines import (  # noqa: E402
    flex_sparse_causal_attention,
    sparse_causal_block_mask,
    tav_pseudo3d_conv,
    tav_sparse_causal_attention,
    tav_temporal_attention,
)
from harness import peak_memory_bytes  # noqa: E402

from depthvid.ops import pseudo3d_conv, sparse_causal_attention, temporal_attention  # noqa: E402


def test_every_benchmark_file_collects():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for path in BENCHMARKS.glob("bench_*.py"):
        assert f"benchmarks/{path.name}::" in result.stdout, f"{path.name} collected no benchmark"


@pytest.mark.parametrize("frames", [1, 2, 5], ids=["one frame", "two frames", "odd frames"])
def test_tune_a_video_attention_is_our_attention(frames):
    q, k, v = (torch.randn(2 * frames, 3, 40, 16) for _ in range(3))  # batch 2, ragged tokens
    scale = 16**-0.5
    want = sparse_causal_attention(q, k, v, frames, backend="torch")
    for materialise in (False, True):
        torch.testing.assert_close(tav_sparse_causal_attention(q, k, v, frames, scale, materialise), want)
    torch.testing.assert_close(tav_temporal_attention(q, k, v, frames, scale), temporal_attention(q, k, v, frames))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("frames", [1, 2, 5], ids=["one frame", "two frames", "odd frames"])
def test_flex_attention_block_mask_is_sparse_causal(frames, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    import baselines

    monkeypatch.setattr(baselines, "compiled_flex_attention", lambda: flex_attention)  # eager: seconds, not a compile
    q, k, v = (torch.randn(2 * frames, 2, 32, 16) for _ in range(3))
    block_mask = sparse_causal_block_mask(2, frames, 32, "cpu")
    got = flex_sparse_causal_attention(q, k, v, frames, 16**-0.5, block_mask)
    torch.testing.assert_close(got, sparse_causal_attention(q, k, v, frames, backend="torch"))


def test_tune_a_video_conv_is_our_conv():
    x, weight, bias = torch.randn(2, 8, 3, 9, 9), torch.randn(6, 8, 3, 3), torch.randn(6)
    torch.testing.assert_close(tav_pseudo3d_conv(x, weight, bias, 2, 1), pseudo3d_conv(x, weight, bias, 2, 1))


def test_peak_memory_counts_live_tensors():
    size = 2**20  # floats: 4 MiB each

    def two_alive_then_one():
        a = torch.ones(size)
        b = a * 2  # a and b alive: 8 MiB
        del a
        return (b + 1).sum()  # b and b + 1: 8 MiB again, never 12

    assert peak_memory_bytes(two_alive_then_one) == pytest.approx(8 * 2**20, rel=1e-3)


def test_paper_scale_flop_count_on_the_meta_device():
    """bench_paper_scale's lower bound: the full-size step's FLOPs, counted without allocating."""
    from bench_paper_scale import step_flops

    full, selective, without = step_flops("full"), step_flops("selective"), step_flops("off")
    assert 15 < without["tflop"] < selective["tflop"] < full["tflop"] < 30, (without, selective, full)
    recomputed = full["tflop"] - without["tflop"]
    forward = full["tflop_by_op"]["aten.convolution"] / 2  # convs run twice: forward, recompute
    assert recomputed > forward, "checkpointing recomputes at least the convolutions' forward"
    # selective checkpointing keeps the 3x3 convs' outputs: only the 1x1 shortcuts run again
    convs_rerun = selective["tflop_by_op"]["aten.convolution"] - without["tflop_by_op"]["aten.convolution"]
    assert 0 < convs_rerun < 0.1 * forward, (selective, without)
