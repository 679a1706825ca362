"""Sparse-causal attention: the Triton kernels (interpreted on CPU) against the torch reference.

The GPU binaries of every launch configuration are checked in test_gpu_binaries.py.
"""
from __future__ import annotations

import pytest
import torch

from depthvid.errors import UserError
from depthvid.triton_kernels import sparse_causal_attn as sca
from depthvid.ops import sparse_causal_attention

# fp32 is compared with the torch backend directly: (atol, rtol).
FP32_TOLERANCE = (2e-5, 2e-5)
# fp16/bf16 are compared with an fp64 reference: the kernel's max error may be this many times the
# torch backend's own max error in that dtype. The kernel rounds P (and dS) to the input dtype before
# their matmuls, as GPU flash kernels do, while torch's CPU kernels keep them in fp32; measured
# ratios: fp16 <= 1.0, bf16 <= 3.3 (bf16 keeps 8 mantissa bits).
LOW_PRECISION_ERROR_RATIO = {torch.float16: 2.0, torch.bfloat16: 5.0}

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),  # in the interpreter, bf16 tl.dot operands are upcast (FP32_DOT)
]


def random_qkv_grad(rows, heads, tokens, head_dim, dtype, seed=0):
    """q, k, v and an output gradient, each (rows, heads, tokens, head_dim) in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, tokens, head_dim, generator=generator).to(dtype) for _ in range(4)]


def output_and_grads(q, k, v, grad_out, num_frames, backend):
    """[out, dq, dk, dv] of sparse_causal_attention on ``backend``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = sparse_causal_attention(q, k, v, num_frames, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


def assert_matches_reference(q, k, v, grad_out, num_frames, triton_results=None):
    """Check the Triton [out, dq, dk, dv] (by default from the public op) against the torch backend."""
    names = ("out", "dq", "dk", "dv")
    if triton_results is None:
        triton_results = output_and_grads(q, k, v, grad_out, num_frames, "triton")
    torch_results = output_and_grads(q, k, v, grad_out, num_frames, "torch")
    for name, got, want in zip(names, triton_results, torch_results):
        assert got.dtype == q.dtype and got.shape == q.shape, name
    if q.dtype == torch.float32:
        atol, rtol = FP32_TOLERANCE
        for name, got, want in zip(names, triton_results, torch_results):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
        return
    exact = output_and_grads(*(t.double() for t in (q, k, v, grad_out)), num_frames, "torch")
    for name, got, want, ref in zip(names, triton_results, torch_results, exact):
        triton_error = (got.double() - ref).abs().max().item()
        torch_error = (want.double() - ref).abs().max().item()
        bound = LOW_PRECISION_ERROR_RATIO[q.dtype] * torch_error + 1e-6
        assert triton_error <= bound, f"{name}: max error {triton_error:.3g} > {bound:.3g} (torch's {torch_error:.3g})"


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param(17, id="N17-ragged-one-tile"),
        pytest.param(33, id="N33-ragged-two-tiles"),
    ],
)
@pytest.mark.parametrize(
    "num_frames",
    [
        pytest.param(1, id="F1-one-frame"),
        pytest.param(2, id="F2-frame0-keys-only"),
        pytest.param(3, id="F3-first-two-segment-frame"),
        pytest.param(5, id="F5"),
    ],
)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(2, id="B2")])
def test_matches_torch_over_frames_and_batches(batch, num_frames, tokens):
    q, k, v, grad_out = random_qkv_grad(batch * num_frames, 2, tokens, 64, torch.float32)
    assert_matches_reference(q, k, v, grad_out, num_frames)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_matches_torch_low_precision(dtype):
    q, k, v, grad_out = random_qkv_grad(2 * 5, 1, 33, 64, dtype, seed=5)
    assert_matches_reference(q, k, v, grad_out, num_frames=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "head_dim",
    [
        pytest.param(40, id="D40-padded-to-64"),
        pytest.param(80, id="D80-padded-to-128"),
        pytest.param(160, id="D160-padded-to-256"),
    ],
)
def test_matches_torch_odd_head_dims(head_dim, dtype):
    q, k, v, grad_out = random_qkv_grad(3, 1, 40, head_dim, dtype, seed=1)
    assert_matches_reference(q, k, v, grad_out, num_frames=3)


def test_strided_inputs_and_grad():
    # diffusers' layout: (B*F, N, H, D) viewed as (B*F, H, N, D) through a transpose, and an
    # upstream gradient that is a broadcast (stride 0 along tokens)
    torch.manual_seed(2)
    num_frames, heads, tokens, head_dim = 3, 2, 33, 40
    q, k, v = (torch.randn(num_frames, tokens, heads, head_dim).transpose(1, 2) for _ in range(3))
    grad_out = torch.randn(num_frames, heads, 1, head_dim).expand(num_frames, heads, tokens, head_dim)
    assert not q.is_contiguous() and grad_out.stride(2) == 0
    # head dim 40: the strides are multiples of 8 elements, not 16, and the kernels are told so
    config = sca.launch_config(head_dim, q.dtype, on_gpu=False)
    launch = sca._fwd_launch(q, k, v, torch.empty_like(q), torch.empty(q.shape[:3]), num_frames, 1.0, config, False)
    assert launch.kwargs["STRIDE_UNIT"] == 8
    assert_matches_reference(q, k, v, grad_out, num_frames)


def reference_log_sum_exp(q, k, num_frames, scale):
    """(B*F, H, N): logsumexp over each query's keys (frame 0, plus frame f-1 for f >= 2)."""
    rows = []
    for row in range(q.shape[0]):
        frame = row % num_frames
        first = row - frame
        keys = k[first] if frame < 2 else torch.cat([k[first], k[row - 1]], dim=-2)
        rows.append(torch.logsumexp(scale * q[row] @ keys.transpose(-1, -2), dim=-1))
    return torch.stack(rows)


def test_saved_log_sum_exp():
    q, k, v, _ = random_qkv_grad(2 * 3, 2, 33, 64, torch.float32, seed=3)
    out, lse = sca.sparse_causal_attn_fwd(q, k, v, num_frames=3, scale=0.3)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(lse, reference_log_sum_exp(q, k, 3, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "head_dim, dtype, tokens",
    [
        pytest.param(64, torch.float16, 130, id="D64-fp16-tiles-128x64"),
        pytest.param(160, torch.float32, 70, id="D160-fp32-tiles-32x32-16x32"),
    ],
)
def test_gpu_tile_sizes_in_interpreter(head_dim, dtype, tokens):
    # the GPU configurations run here too, so their tile loops and ragged edges are checked
    config = sca.launch_config(head_dim, dtype, on_gpu=True)
    assert tokens % config.fwd.block_m and tokens > config.fwd.block_m
    num_frames, scale = 3, head_dim**-0.5
    q, k, v, grad_out = random_qkv_grad(num_frames, 1, tokens, head_dim, dtype, seed=4)
    out, lse = sca.sparse_causal_attn_fwd(q, k, v, num_frames, scale, config)
    dq, dk, dv = sca.sparse_causal_attn_bwd(grad_out, q, k, v, out, lse, num_frames, scale, config)
    assert_matches_reference(q, k, v, grad_out, num_frames, triton_results=[out, dq, dk, dv])


@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param(lambda q: q.to(torch.float64), "one dtype", id="float64"),
        pytest.param(lambda q: q.new_zeros(*q.shape[:3], 300), "head_dim", id="head-dim-300"),
    ],
)
def test_bad_inputs_raise_user_error(change, match):
    q = change(torch.zeros(2, 1, 4, 16))
    with pytest.raises(UserError, match=match):
        sca.sparse_causal_attn_triton(q, q, q, num_frames=2, scale=1.0)


def test_cpu_tensors_without_interpreter_raise_user_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.zeros(2, 1, 4, 16)
    with pytest.raises(UserError, match="TRITON_INTERPRET"):
        sca.sparse_causal_attn_triton(q, q, q, num_frames=2, scale=1.0)


def test_gpu_launches_cover_every_gpu_configuration():
    # tests/test_gpu_binaries.py compiles exactly these for sm_80 and sm_90
    configs = sca.launch_configs()
    assert {(config.block_d, config.dtype.itemsize) for config in configs} == set(sca._GPU_CONFIGS)
    assert len(sca.gpu_launches()) == 3 * len(configs)
