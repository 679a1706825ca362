"""The first-use self-check of non-torch backends (depthvid.ops._backend) and `depthvid doctor`.

The fallback path is driven by making a Triton launcher wrong on purpose (monkeypatch): the op
must warn once, name the op, and return the torch result from then on.
"""
import warnings

import pytest
import torch

from depthvid.cli import main
from depthvid.ops import _backend, sparse_causal_attention, temporal_attention
from depthvid.triton_kernels import sparse_causal_attn, temporal_attn


@pytest.fixture
def self_check_on(monkeypatch):
    monkeypatch.setenv("DEPTHVID_SELF_CHECK", "1")  # conftest.py turns it off for the kernel tests
    _backend.reset_self_checks()
    yield
    _backend.reset_self_checks()


def qkv(frames=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * frames, 2, 9, 16, generator=generator) for _ in range(3)]


def test_a_wrong_kernel_warns_once_naming_the_op_and_torch_runs_instead(self_check_on, monkeypatch):
    calls = []
    right = temporal_attn.temporal_attn_triton

    def off_by_a_bit(q, k, v, num_frames, scale):
        calls.append(num_frames)
        return right(q, k, v, num_frames, scale) * 1.05  # 5% off: the kind of error a bad index gives on a GPU

    monkeypatch.setattr(temporal_attn, "temporal_attn_triton", off_by_a_bit)
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match=r"failed its self-check for temporal_attention on cpu in torch.float32"):
        first = temporal_attention(q, k, v, 3, backend="triton")
    calls_during_check = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (op, backend, device, dtype): no second warning
        second = temporal_attention(q, k, v, 3, backend="triton")
    reference = temporal_attention(q, k, v, 3, backend="torch")
    assert calls_during_check == 1 and len(calls) == 1  # only the self-check ran the broken launcher
    assert torch.equal(first, reference) and torch.equal(second, reference)


def test_a_kernel_that_raises_falls_back_per_dtype(self_check_on, monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sparse_causal_attn, "sparse_causal_attn_triton", broken)
    q, k, v = qkv(seed=1)
    with pytest.warns(RuntimeWarning, match=r"sparse_causal_attention .*RuntimeError: CUDA error"):
        out = sparse_causal_attention(q, k, v, 3, backend="triton")
    torch.testing.assert_close(out, sparse_causal_attention(q, k, v, 3, backend="torch"), rtol=0, atol=0)
    # under autocast the kernel would run in bf16: a new (op, backend, device, dtype), checked on its own
    with pytest.warns(RuntimeWarning, match=r"sparse_causal_attention on cpu in torch.bfloat16"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sparse_causal_attention(q, k, v, 3, backend="triton")


def test_the_switch_turns_the_check_off(monkeypatch):
    monkeypatch.setenv("DEPTHVID_SELF_CHECK", "0")
    _backend.reset_self_checks()
    monkeypatch.setattr(temporal_attn, "temporal_attn_triton", lambda q, k, v, num_frames, scale: q * 0)
    q, k, v = qkv()
    assert not temporal_attention(q, k, v, 3, backend="triton").any()  # nothing checked it


def test_doctor_reports_versions_backends_and_a_passing_self_check_per_op_and_dtype(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "triton 3." in out
    assert "device: cpu" in out and "interpreter" in out
    assert "cpp     not built" in out or ("cpp     built" in out and "CPU kernels on torch's threads" in out)
    self_checks = out.split("self-check on", 1)[1]
    checks = [line.split() for line in self_checks.splitlines() if line.startswith("  triton ")]
    assert {(op, dtype) for _, op, dtype, *_ in checks} == {
        (op, dtype) for op in ("sparse_causal_attention", "temporal_attention", "pseudo3d_conv")
        for dtype in ("float32", "float16", "bfloat16")
    }
    assert all(verdict == "ok" for _, _, _, verdict, *_ in checks), out


def test_first_use_inside_a_checkpointed_forward_leaves_checkpointing_intact(self_check_on):
    """The first tuning step runs each op's self-check inside a gradient-checkpointed block. The
    check's own autograd work must not be counted there: the recomputation (check already done)
    would save fewer tensors and torch.utils.checkpoint would refuse the backward."""
    q, k, v = (t.requires_grad_() for t in qkv())

    def block(q, k, v):
        return temporal_attention(q, k, v, 3, backend="triton") * 2

    out = torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=False)
    out.sum().backward()
    checked = _backend._self_check_results[("temporal_attention", "triton", "cpu", torch.float32)]
    assert checked is not None and checked.ok, checked
    want = [torch.autograd.grad((temporal_attention(q, k, v, 3, backend="torch") * 2).sum(), t)[0] for t in (q, k, v)]
    for got, expected in zip((q.grad, k.grad, v.grad), want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
