"""Triton pseudo-3D conv vs the torch reference at SD2-depth's shapes (8 frames, 64x64 latent).

    .venv/bin/pytest benchmarks/bench_pseudo3d_conv.py --benchmark-enable

pytest-benchmark times the Triton op; the torch reference is timed in the same run with
triton.testing.do_bench, and benchmark.extra_info holds both medians and the speedup
(torch_ms / triton_ms). Needs a CUDA device: skipped otherwise (the interpreter says nothing
about GPU speed).
"""
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from depthvid.ops import GroupNormSiLU, pseudo3d_conv


@dataclass(frozen=True)
class BenchShape:
    batch: int
    c_in: int
    c_out: int
    frames: int
    size: int  # latent height = width
    stride: int = 1


# one video (batch 1) of 8 frames at 512x512 -> 64x64 latents; channels of SD2's UNet levels
SHAPES = [
    pytest.param(BenchShape(1, 320, 320, 8, 64), id="level0-320ch-64x64"),
    pytest.param(BenchShape(1, 640, 640, 8, 32), id="level1-640ch-32x32"),
    pytest.param(BenchShape(1, 1280, 1280, 8, 16), id="level2-1280ch-16x16"),
    pytest.param(BenchShape(1, 320, 320, 8, 64, stride=2), id="downsample-320ch-64x64"),
    pytest.param(BenchShape(2, 5, 320, 8, 64), id="conv_in-cfg-batch2"),
]


def make_args(shape: BenchShape, dtype, fused: bool, device="cuda"):
    """Conv arguments; ``fused`` adds ResnetBlock2D's GroupNorm+SiLU, temb, residual and scale."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    size_out = (shape.size + 2 - 3) // shape.stride + 1
    args = dict(
        x=rand(shape.batch, shape.c_in, shape.frames, shape.size, shape.size),
        weight=rand(shape.c_out, shape.c_in, 3, 3, scale=(9 * shape.c_in) ** -0.5),
        bias=rand(shape.c_out),
        stride=shape.stride,
        padding=1,
    )
    if fused:
        groups = 32 if shape.c_in % 32 == 0 else 1
        args.update(
            norm=GroupNormSiLU(groups, rand(shape.c_in) + 1, rand(shape.c_in)),
            temb=rand(shape.batch, shape.c_out),
            residual=rand(shape.batch, shape.c_out, shape.frames, size_out, size_out),
            output_scale=1.0,
        )
    return args


def step(args, backend: str, backward: bool, grad_out=None):
    """One forward (and the backward to x, the tuning case: weights frozen)."""
    out = pseudo3d_conv(**args, backend=backend)
    if backward:
        out.backward(grad_out)
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; Triton on CPU is the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pseudo3d_conv_speed(benchmark, shape, fused, backward, dtype):
    from triton.testing import do_bench

    args = make_args(shape, dtype, fused)
    args["x"].requires_grad_(backward)
    grad_out = torch.randn_like(step(args, "torch", False)) if backward else None
    run_triton = partial(step, args, "triton", backward, grad_out)
    run_torch = partial(step, args, "torch", backward, grad_out)

    clear = [args["x"]] if backward else None  # x.grad is reset between runs
    torch_ms = do_bench(run_torch, warmup=25, rep=200, grad_to_none=clear, return_mode="median")
    triton_ms = do_bench(run_triton, warmup=25, rep=200, grad_to_none=clear, return_mode="median")
    benchmark.extra_info.update(
        torch_ms=torch_ms, triton_ms=triton_ms, speedup=torch_ms / triton_ms, device=torch.cuda.get_device_name()
    )

    def synchronized():
        run_triton()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized, rounds=20, warmup_rounds=3)
