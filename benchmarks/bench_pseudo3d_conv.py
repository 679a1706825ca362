"""The pseudo-3D (1x3x3) conv at SD2-depth's shapes (8 frames of 512x512): each depthvid backend
that runs on this device against Tune-A-Video's rearrange-conv-rearrange.

    pytest benchmarks/bench_pseudo3d_conv.py --benchmark-only

The input is what the inflated UNet hands the op: a (1, C, B*F, H, W) view of the folded
(B*F, C, H, W) batch (no copy). Implementations (one benchmark each, grouped by case):
  torch / cpp / triton  depthvid.ops.pseudo3d_conv with that backend (triton on CUDA only)
  tav                   Tune-A-Video's InflatedConv3d on its contiguous (B, C, F, H, W) video:
                        "b c f h w -> (b f) c h w" copy, conv2d, copy back (plain conv only)
"fused" adds ResnetBlock2D's GroupNorm+SiLU prologue and temb/residual epilogue, timed where two
of our backends can be compared (Tune-A-Video normalises over the whole clip, a different op). Backward is to x only: the
weights are frozen during tuning. extra_info: peak_mb, tflops (conv FLOPs / median time).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from baselines import tav_pseudo3d_conv
from depthvid.models.video_unet import as_video
from depthvid.ops import GroupNormSiLU, pseudo3d_conv
from harness import (
    DEVICE,
    ON_CUDA,
    OP_DTYPES,
    FRAMES,
    assert_same_result,
    op_backends,
    reference_result,
    run_benchmark,
)

BACKENDS = op_backends()
IMPLEMENTATIONS = [*BACKENDS, "tav"]
MODES = ("fwd", "fwd+bwd")
_references: dict[tuple, list[torch.Tensor]] = {}


@dataclass(frozen=True)
class ConvShape:
    label: str
    batch: int
    c_in: int
    c_out: int
    size: int  # latent height = width
    stride: int = 1


# one video of 8 frames at 512x512 -> 64x64 latents: each UNet level's 3x3 conv, a downsampler,
# and conv_in under classifier-free guidance (two copies of the video)
SHAPES = [
    ConvShape("level0-320ch-64x64", 1, 320, 320, 64),
    ConvShape("level1-640ch-32x32", 1, 640, 640, 32),
    ConvShape("level2-1280ch-16x16", 1, 1280, 1280, 16),
    ConvShape("level3-1280ch-8x8", 1, 1280, 1280, 8),
    ConvShape("down-320ch-64x64-stride2", 1, 320, 320, 64, stride=2),
    ConvShape("conv_in-5ch-64x64-cfg", 2, 5, 320, 64),
]


def conv_flops(shape: ConvShape, mode: str) -> int:
    size_out = (shape.size - 1) // shape.stride + 1
    forward = 2 * shape.batch * FRAMES * shape.c_out * size_out**2 * shape.c_in * 9
    return forward if mode == "fwd" else 2 * forward  # + the gradient to x


def make_args(shape: ConvShape, dtype, fused: bool, requires_grad: bool) -> tuple[dict, torch.Tensor]:
    """pseudo3d_conv's arguments and an output gradient, seeded: the same for every implementation."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, device=DEVICE) * scale).to(dtype)

    folded = rand(shape.batch * FRAMES, shape.c_in, shape.size, shape.size)  # the UNet's (B*F, C, H, W)
    size_out = (shape.size - 1) // shape.stride + 1
    args = dict(
        x=as_video(folded.requires_grad_(requires_grad)),  # (1, C, B*F, H, W) view
        weight=rand(shape.c_out, shape.c_in, 3, 3, scale=(9 * shape.c_in) ** -0.5),
        bias=rand(shape.c_out),
        stride=shape.stride,
        padding=1,
    )
    if fused:
        groups = 32 if shape.c_in % 32 == 0 else 1
        args.update(
            norm=GroupNormSiLU(groups, rand(shape.c_in) + 1, rand(shape.c_in)),
            temb=rand(1, shape.batch * FRAMES, shape.c_out),  # per frame, as FusedResnetBlock2D passes it
            residual=rand(1, shape.c_out, shape.batch * FRAMES, size_out, size_out),
        )
    return args, rand(1, shape.c_out, shape.batch * FRAMES, size_out, size_out)


def as_folded_video(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (C, B, F, H, W) -> (1, C, B*F, H, W), the layout our op returns."""
    return video.transpose(0, 1).flatten(1, 2)[None]


def conv_step(implementation: str, args: dict, backward: bool, grad_out: torch.Tensor, leaf: torch.Tensor):
    """One forward (and the gradient to the input) of ``implementation``; returns [out(, dx)]."""
    if implementation == "tav":
        # Tune-A-Video keeps videos contiguous as (B, C, F, H, W): the copy into that layout is
        # made once, outside the timing, as its previous layer would have left it
        # (1, C, B*F, H, W) -> (C, B, F, H, W) -> (B, C, F, H, W)
        video = args["x"].detach()[0].unflatten(1, (-1, FRAMES)).transpose(0, 1).contiguous().requires_grad_(backward)

        def step():
            out = tav_pseudo3d_conv(video, args["weight"], args["bias"], args["stride"], args["padding"])
            if not backward:
                return [as_folded_video(out)]
            grad = torch.autograd.grad(out, video, grad_out[0].unflatten(1, (-1, FRAMES)).transpose(0, 1))[0]
            return [as_folded_video(out.detach()), as_folded_video(grad)]

        return step

    def step():
        out = pseudo3d_conv(**args, backend=implementation)
        if not backward:
            return [out]
        return [out.detach(), *torch.autograd.grad(out, leaf, grad_out)]

    return step


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype_name", list(OP_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[s.label for s in SHAPES])
def test_pseudo3d_conv(benchmark, shape, dtype_name, fused, mode, implementation):
    if implementation == "tav" and fused:
        pytest.skip("Tune-A-Video's GroupNorm spans the whole clip: not the same op as the fused one")
    if fused and len(BACKENDS) == 1:
        pytest.skip(f"only depthvid's {BACKENDS[0]} backend runs here: no other one to compare the fused op with")
    dtype = OP_DTYPES[dtype_name]
    backward = mode == "fwd+bwd"
    args, grad_out = make_args(shape, dtype, fused, requires_grad=backward)
    leaf = args["x"]
    step = conv_step(implementation, args, backward, grad_out, leaf)
    variant = "fused" if fused else "plain"
    benchmark.group = f"pseudo3d_conv {shape.label} {dtype_name} {variant} {mode}"
    result, peak = run_benchmark(benchmark, step, budget_s=2.0 if not ON_CUDA else 1.0, measure_memory=True)
    reference = reference_result(_references, (shape, dtype_name, fused, mode), implementation, result,
                                 conv_step("torch", args, backward, grad_out, leaf))
    assert_same_result(result, reference, dtype, implementation)
    del result, reference
    benchmark.extra_info.update(
        op="pseudo3d_conv",
        case=f"{shape.label} {dtype_name} {variant} {mode}",
        implementation=implementation,
        ours=implementation in BACKENDS,
        device=str(DEVICE),
        tflops=conv_flops(shape, mode) / benchmark.stats.stats.median / 1e12,
        peak_mb=peak / 2**20,
    )
