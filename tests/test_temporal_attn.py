"""Temporal attention: the Triton kernels (run by the interpreter on CPU) against the torch reference.
The GPU binaries of every launch configuration are checked in test_gpu_binaries.py."""
from __future__ import annotations

import pytest
import torch

from depthvid.errors import UserError
from depthvid.triton_kernels import temporal_attn as kernel_module
from depthvid.ops import temporal_attention

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# fp32: compared with the torch reference directly. fp16/bf16: the kernel's max error against an
# fp64 reference may be at most `factor` times torch's own max error in that dtype, plus `atol`
# (one ulp at 1.0) for outputs where torch happens to be exact.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(factor=2.0, atol=torch.finfo(torch.float16).eps),
    torch.bfloat16: dict(factor=2.0, atol=torch.finfo(torch.bfloat16).eps),
}

# Under the interpreter the launchers pick the GPU tiles: BLOCK_T = 32 tokens at head dims 40/64
# (BLOCK_D 64), 16 at 80 (BLOCK_D 128), 8 at 160 (BLOCK_D 256). Token counts are not multiples of
# BLOCK_T, so the last tile of each (video, head) is ragged.
SHAPES = {  # label: (batch, frames, heads, tokens, head_dim)
    "one frame, head dim 64, three tiles": (2, 1, 2, 70, 64),
    "two frames, head dim 40, two tiles": (1, 2, 2, 37, 40),
    "three frames, head dim 160, three tiles": (1, 3, 1, 21, 160),
    "five frames, head dim 80, two tiles": (1, 5, 2, 19, 80),
    "eight frames, two videos, head dim 40, one partial tile": (2, 8, 1, 9, 40),
    "eight frames, head dim 160, two tiles": (1, 8, 1, 13, 160),
}


def make_inputs(batch, frames, heads, tokens, head_dim, dtype, diffusers_layout=False):
    """Random q, k, v (requiring grad) and an output gradient, all (batch*frames, heads, tokens, head_dim).

    With ``diffusers_layout`` they are the non-contiguous views an attention processor makes:
    (B*F, N, H*D) -> (B*F, N, H, D) -> transpose(1, 2).
    """
    shape = (batch * frames, heads, tokens, head_dim)
    if diffusers_layout:
        flat = [torch.randn(batch * frames, tokens, heads * head_dim) for _ in range(3)]
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2).to(dtype) for t in flat)
    else:
        q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(shape).to(dtype)
    return q, k, v, grad_out


def forward_and_grads(q, k, v, grad_out, frames, backend):
    out = temporal_attention(q, k, v, frames, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_matches_reference(q, k, v, grad_out, frames):
    """Check out, dq, dk, dv of backend="triton" against backend="torch" at q's dtype."""
    dtype = q.dtype
    triton_results = forward_and_grads(q, k, v, grad_out, frames, "triton")
    torch_results = forward_and_grads(q, k, v, grad_out, frames, "torch")
    names = ("out", "dq", "dk", "dv")
    for name, actual in zip(names, triton_results):
        assert actual.dtype == dtype and actual.shape == q.shape, name
    if dtype == torch.float32:
        for name, actual, expected in zip(names, triton_results, torch_results):
            torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")
        return
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_results = forward_and_grads(*exact, grad_out.double(), frames, "torch")
    tol = TOLERANCES[dtype]
    for name, actual, lowp, expected in zip(names, triton_results, torch_results, exact_results):
        error = (actual.double() - expected).abs().max().item()
        torch_error = (lowp.double() - expected).abs().max().item()
        bound = tol["factor"] * torch_error + tol["atol"]
        if dtype == torch.bfloat16:
            # the kernels really run in bf16 here, and the interpreter converts fp32 -> bf16 by
            # truncation where a GPU rounds to nearest: up to one more ulp of the largest value
            bound += torch.finfo(dtype).eps * expected.abs().max().item()
        assert error <= bound, f"{name}: max error {error:.3g} vs fp64 > {bound:.3g} (torch {dtype}: {torch_error:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_torch_reference(shape, dtype):
    torch.manual_seed(0)
    batch, frames, heads, tokens, head_dim = shape
    q, k, v, grad_out = make_inputs(*shape, dtype)
    assert_matches_reference(q, k, v, grad_out, frames)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_strided_inputs_and_broadcast_gradient(dtype):
    # the (B*F, N, H*D)-backed layout attention processors produce, read in place through strides,
    # and an expanded (stride 0) output gradient such as out.sum() gives
    torch.manual_seed(0)
    batch, frames, heads, tokens, head_dim = 1, 4, 2, 7, 40
    q, k, v, _ = make_inputs(batch, frames, heads, tokens, head_dim, dtype, diffusers_layout=True)
    assert not q.is_contiguous()
    grad_out = torch.tensor(0.5, dtype=dtype).expand(q.shape)
    assert_matches_reference(q, k, v, grad_out, frames)


def test_default_scale_is_inverse_sqrt_head_dim_and_explicit_scale_is_used():
    torch.manual_seed(0)
    q, k, v, _ = make_inputs(1, 3, 1, 5, 64, torch.float32)
    default = temporal_attention(q, k, v, 3, backend="triton")
    explicit = temporal_attention(q, k, v, 3, scale=64**-0.5, backend="triton")
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)
    sharp = temporal_attention(q, k, v, 3, scale=2.0, backend="triton")
    torch.testing.assert_close(sharp, temporal_attention(q, k, v, 3, scale=2.0, backend="torch"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sharp, default, atol=1e-3)


def test_empty_token_axis():
    q, k, v, _ = make_inputs(1, 2, 1, 0, 64, torch.float32)
    out = temporal_attention(q, k, v, 2, backend="triton")
    assert out.shape == q.shape


@pytest.mark.parametrize(
    "dtypes, head_dim, match",
    [
        ((torch.float64,) * 3, 64, "float16/bfloat16/float32"),  # unsupported dtype
        ((torch.float16, torch.float32, torch.float32), 64, "float16/bfloat16/float32"),  # mixed dtypes
        ((torch.float32,) * 3, 320, "head_dim must be <= 256"),  # head dim beyond the register slab
    ],
    ids=["float64", "mixed dtypes", "head dim 320"],
)
def test_bad_inputs_raise_user_error(dtypes, head_dim, match):
    q, k, v = (torch.randn(2, 1, 3, head_dim, dtype=dtype) for dtype in dtypes)
    with pytest.raises(UserError, match=match):
        temporal_attention(q, k, v, 2, backend="triton")


def test_cpu_tensors_without_interpreter_raise_user_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, _ = make_inputs(1, 2, 1, 3, 64, torch.float32)
    with pytest.raises(UserError, match="needs CUDA tensors"):
        temporal_attention(q, k, v, 2, backend="triton")


@pytest.mark.parametrize("head_dim", [1, 16, 40, 64, 80, 128, 160, 256])
def test_pick_config_respects_gpu_block_rules(head_dim):
    config = kernel_module.pick_config(head_dim)
    for block in (config.BLOCK_T, config.BLOCK_D):
        assert block & (block - 1) == 0, f"{config}: blocks must be powers of 2"
    assert max(head_dim, 64) <= config.BLOCK_D < 2 * max(head_dim, 64)
    assert config.BLOCK_T * config.BLOCK_D == 2048  # 16 fp32 registers per thread per tile at 4 warps
    assert config.num_warps == 4


def test_gpu_launches_cover_every_launch_configuration():
    # tests/test_gpu_binaries.py compiles exactly these for sm_80 and sm_90: every BLOCK_D, both
    # kernels, and head dim 40's 8-element stride unit
    launched = {(launch.kernel, launch.kwargs["BLOCK_D"], launch.kwargs["STRIDE_UNIT"]) for launch in kernel_module.gpu_launches()}
    for kernel in (kernel_module._temporal_attn_fwd_kernel, kernel_module._temporal_attn_bwd_kernel):
        for head_dim in range(1, kernel_module.MAX_HEAD_DIM + 1):
            assert (kernel, kernel_module.pick_config(head_dim).BLOCK_D, 1) in launched
        assert (kernel, 64, 8) in launched


def test_strides_in_units_of_eight_elements_at_head_dim_40():
    # the model's (B*F, N, H*D) projections viewed as (B*F, H, N, D) with D = 40: every stride but
    # the last is a multiple of 8 elements, not 16, and the kernels are told so
    q, k, v, _ = make_inputs(1, 2, 8, 5, 40, torch.float16, diffusers_layout=True)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    launch = kernel_module._fwd_launch(q, k, v, out, lse, 2, 0.125)
    assert launch.kwargs["STRIDE_UNIT"] == 8
    assert launch.args[5:9] == (5 * 320 // 8, 40 // 8, 320 // 8, 1)  # q's (b, h, n) strides / 8, then d
