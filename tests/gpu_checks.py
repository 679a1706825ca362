"""The Triton kernels against the torch reference at Stable-Diffusion-sized shapes, on a CUDA device.

``python tests/gpu_checks.py`` (TRITON_INTERPRET unset) runs every case in ``GPU_CASES`` in every
dtype on the GPU and prints one JSON line per compared tensor; it exits non-zero if any fails.
test_kernels_on_gpu.py runs it that way when CUDA is present, and runs the same ``check`` on
``TINY_CASES`` with CPU tensors under the interpreter, so this logic is tested everywhere.

A check runs the op three times on the same inputs: the torch reference in fp64 (the truth), the
torch reference in the dtype, and the Triton backend in the dtype; it backpropagates the same
output gradient through each. For the output and every input gradient, the Triton error must be
at most FACTOR times the torch backend's own error in that dtype, plus two ulps of the largest
exact value (for tensors the torch backend happens to get exact).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable

import torch

from depthvid.ops import GroupNormSiLU, pseudo3d_conv, sparse_causal_attention, temporal_attention

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernels round softmax probabilities (and their gradients) to the input dtype before the
# second matmul, as GPU flash kernels do; bf16 keeps 8 mantissa bits, hence its larger factor.
FACTOR = {torch.float32: 4.0, torch.float16: 3.0, torch.bfloat16: 5.0}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple  # of the differentiable inputs, in the order ``run`` takes them
    run: Callable  # run(backend, *inputs) -> output


def attention_case(op, batch, frames, heads, tokens, head_dim) -> Case:
    shape = (batch * frames, heads, tokens, head_dim)
    return Case(
        f"{op.__name__}-B{batch}-F{frames}-H{heads}-N{tokens}-D{head_dim}",
        (shape, shape, shape),
        lambda backend, q, k, v: op(q, k, v, frames, backend=backend),
    )


def conv_case(batch, c_in, c_out, frames, height, width, stride=1, groups=None, temb=False, residual=False) -> Case:
    """A 3x3 pseudo-3D conv, optionally with the GroupNorm+SiLU prologue (``groups``) and epilogues."""
    h_out, w_out = (height - 1) // stride + 1, (width - 1) // stride + 1
    shapes = [(batch, c_in, frames, height, width), (c_out, c_in, 3, 3), (c_out,)]
    shapes += [(c_in,), (c_in,)] if groups else []
    shapes += [(batch, c_out)] if temb else []
    shapes += [(batch, c_out, frames, h_out, w_out)] if residual else []

    def run(backend, x, weight, bias, *extras):
        extras = list(extras)
        norm = GroupNormSiLU(groups, extras.pop(0), extras.pop(0)) if groups else None
        time_bias = extras.pop(0) if temb else None
        skip = extras.pop(0) if residual else None
        return pseudo3d_conv(
            x, weight, bias, stride, 1, backend, norm=norm, temb=time_bias, residual=skip,
            output_scale=2.0 if residual else 1.0,
        )

    extras = (f"-GN{groups}" if groups else "") + ("-temb" if temb else "") + ("-residual" if residual else "")
    return Case(f"pseudo3d_conv-B{batch}-C{c_in}to{c_out}-F{frames}-{height}x{width}-s{stride}{extras}", tuple(shapes), run)


def check(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> list[dict]:
    """One report per compared tensor (the output, then each input's gradient)."""
    generator = torch.Generator(device).manual_seed(seed)
    inputs = [torch.randn(shape, device=device, generator=generator) for shape in case.shapes]
    results, grad_out = {}, None
    for label, backend, run_dtype in (("exact", "torch", torch.float64), ("torch", "torch", dtype), ("triton", "triton", dtype)):
        leaves = [t.to(run_dtype, copy=True).requires_grad_() for t in inputs]  # fresh leaves per run
        out = case.run(backend, *leaves)
        if grad_out is None:
            grad_out = torch.randn(out.shape, device=device, generator=generator)
        out.backward(grad_out.to(run_dtype))
        results[label] = [out.detach().double()] + [leaf.grad.double() for leaf in leaves]
    reports = []
    for index, (exact, reference, triton_result) in enumerate(zip(results["exact"], results["torch"], results["triton"])):
        torch_error = (reference - exact).abs().max().item()
        triton_error = (triton_result - exact).abs().max().item()
        bound = FACTOR[dtype] * torch_error + 2 * torch.finfo(dtype).eps * exact.abs().max().item()
        reports.append({
            "case": case.name, "dtype": str(dtype).removeprefix("torch."),
            "tensor": "output" if index == 0 else f"grad of input {index - 1}",
            "triton_error": triton_error, "torch_error": torch_error, "ok": triton_error <= bound,
        })
    return reports


GPU_CASES = [
    # SD2-depth's attn1 at 512x512: 64-dim heads, 4096 / 1024 / 256 tokens (level 0 is left to the
    # benchmarks: its fp64 reference would hold 8 x 5 x 4096 x 8192 scores)
    attention_case(sparse_causal_attention, 1, 8, 10, 1024, 64),
    attention_case(sparse_causal_attention, 1, 8, 20, 256, 64),
    attention_case(sparse_causal_attention, 2, 5, 8, 1000, 40),  # ragged N, SD1.x head dim
    attention_case(sparse_causal_attention, 1, 3, 4, 333, 80),
    attention_case(sparse_causal_attention, 1, 1, 4, 256, 160),
    attention_case(temporal_attention, 1, 8, 10, 1024, 64),
    attention_case(temporal_attention, 2, 24, 4, 250, 40),  # two frame chunks, ragged N
    attention_case(temporal_attention, 1, 5, 4, 77, 160),
    attention_case(temporal_attention, 1, 1, 2, 64, 80),
    attention_case(temporal_attention, 1, 32, 2, 64, 64),
    # the second half of SD's level-0 ResnetBlock2D at 512x512, a level-3 one, a downsampler, a ragged one
    conv_case(1, 320, 320, 8, 64, 64, groups=32, residual=True),
    conv_case(1, 1280, 1280, 8, 8, 8, groups=32, temb=True),
    conv_case(1, 320, 320, 8, 64, 64, stride=2),
    conv_case(2, 64, 96, 3, 17, 23, groups=8, temb=True, residual=True),
]

TINY_CASES = [
    attention_case(sparse_causal_attention, 2, 3, 2, 17, 40),
    attention_case(temporal_attention, 1, 5, 2, 9, 80),
    conv_case(1, 8, 6, 3, 5, 7, groups=2, temb=True, residual=True),
    conv_case(1, 4, 4, 2, 6, 6, stride=2),
]


def main() -> int:
    failed = 0
    for case in GPU_CASES:
        for dtype in DTYPES:
            for report in check(case, dtype, "cuda"):
                failed += not report["ok"]
                print(json.dumps(report), flush=True)
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
