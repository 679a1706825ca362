"""depthvid._C as a whole: it is built by the README's install, reports its build, every op passes
torch.library.opcheck (schema, fake kernel, autograd registration), and the inflated UNet gives
the torch backend's output and gradients with backend "cpp"."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from _extension_checks import opcheck_cases, requires_extension
from test_inflate import make_inputs, randomize_temporal

from depthvid import extension
from depthvid.models import mark_trainable, trainable_parameters
from depthvid.ops import GroupNormSiLU, pseudo3d_conv, sparse_causal_attention, temporal_attention, use_backend


@pytest.mark.skipif(os.environ.get("DEPTHVID_SKIP_EXTENSION") == "1", reason="DEPTHVID_SKIP_EXTENSION=1 install")
def test_the_install_built_the_extension_for_this_torch():
    info = extension.build_info()
    assert info["built"], info["error"]
    assert info["error"] is None and info["torch"] == torch.__version__
    assert info["cuda"] == bool(info["cuda_archs"])
    assert info["openmp"], "built without -fopenmp: every CPU kernel would run on one thread"


@requires_extension
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_the_extension_uses_the_shared_cxx_runtime_and_its_errors_arrive_whole():
    """A statically linked libstdc++ (a g++ wrapper adding -static-libstdc++) gives the extension
    its own C++ runtime: its TORCH_CHECK errors segfaulted on an H100 machine and came out cut
    short here ("temporal_attn_fwd: num_frames="). setup.py links the shared one explicitly."""
    from depthvid import _C

    dynamic = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic
    q = torch.randn(6, 2, 8, 16)
    with pytest.raises(RuntimeError) as raised:
        torch.ops.depthvid.temporal_attn_fwd(q, q, q, 4, 0.25)
    assert str(raised.value).startswith("temporal_attn_fwd: num_frames=4 must be >= 1 and divide q.size(0)=6")


def test_build_info_without_the_extension_says_what_to_do():
    """In a process where depthvid._C cannot load, build_info says why and the cpp backend falls
    back to torch with one warning naming the install command."""
    script = (
        "import sys, warnings, torch; sys.modules['depthvid._C'] = None\n"  # makes `from depthvid import _C` fail
        "from depthvid import extension; from depthvid.ops import temporal_attention\n"
        "info = extension.build_info(); assert not info['built'] and 'depthvid._C' in info['error'], info\n"
        "q = torch.randn(2, 1, 3, 4)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    temporal_attention(q, q, q, 2, backend='cpp'); temporal_attention(q, q, q, 2, backend='cpp')\n"
        "print([str(w.message) for w in caught])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (message,) = eval(result.stdout.strip().splitlines()[-1])
    assert "depthvid._C unavailable" in message and "--no-build-isolation" in message and "using 'torch'" in message


@pytest.fixture
def fake_cuda_build(monkeypatch):
    """A CUDA build of depthvid._C as build_info reports it, Triton importable, and a maker of fake
    CUDA tensors: the backend choice on CUDA, rehearsed without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from depthvid.ops import _backend

    monkeypatch.setattr(_backend, "cpp_available", lambda: True)
    monkeypatch.setattr(extension, "build_info", lambda: {"built": True, "cuda": True})
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    _backend._warn_once.cache_clear()

    def cuda_tensor(dtype):
        with FakeTensorMode(allow_non_fake_inputs=True):
            return torch.empty(2, 3, device="cuda", dtype=dtype)

    return cuda_tensor


def test_cpp_on_cuda_follows_the_autocast_dtype_not_the_input_dtype(fake_cuda_build):
    """Under fp16 autocast an op gets fp32 inputs (GroupNorm's output, the latents) and runs in
    fp16, so the CUDA kernels apply; with autocast off fp32 has none and Triton runs instead. Seen
    on an H100: `depthvid tune --backend cpp` fell back to Triton for every conv."""
    from depthvid.ops import _backend

    x = fake_cuda_build(torch.float32)
    previous = torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)  # torch.autocast("cuda") turns itself off without a GPU
    torch.set_autocast_dtype("cuda", torch.float16)
    try:
        assert _backend._available_backend("cpp", x) == "cpp"
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.set_autocast_dtype("cuda", previous)
    with pytest.warns(RuntimeWarning, match=r"no C\+\+/CUDA kernel for this device and dtype; using .triton."):
        assert _backend._available_backend("cpp", x) == "triton"


def test_auto_on_cuda_picks_the_measured_fastest_backend_per_op(fake_cuda_build):
    from depthvid.ops import _backend

    half, single = fake_cuda_build(torch.float16), fake_cuda_build(torch.float32)
    assert _backend._available_backend(None, half, "sparse_causal_attention") == "triton"
    assert _backend._available_backend(None, half, "temporal_attention") == "cpp"
    assert _backend._available_backend(None, single, "temporal_attention") == "triton"  # no fp32 CUDA kernel
    assert _backend._available_backend(None, half, "pseudo3d_conv") == "torch"
    assert _backend._available_backend(None, torch.empty(2, dtype=torch.float16), "sparse_causal_attention") == "torch"
    with use_backend("triton"):
        assert _backend._available_backend(None, half, "pseudo3d_conv") == "triton"


@requires_extension
def test_auto_on_cpu_takes_the_extension_only_where_the_cpu_benchmark_shows_it_wins(monkeypatch):
    from depthvid.ops import _backend

    x = torch.empty(2)
    assert _backend._available_backend(None, x, "temporal_attention") == "cpp"
    assert _backend._available_backend(None, x, "sparse_causal_attention") == "torch"
    assert _backend._available_backend(None, x, "pseudo3d_conv") == "torch"
    monkeypatch.setattr(_backend, "cpp_available", lambda: False)  # a machine where the build failed
    assert _backend._available_backend(None, x, "temporal_attention") == "torch"


@requires_extension
def test_opcheck_every_op():
    cases = opcheck_cases()
    checked = {op.name() for op, _ in cases}
    registered = {f"depthvid::{name}" for name in dir(torch.ops.depthvid) if not name.startswith("_")}
    assert registered <= checked | {"depthvid::name"}, f"ops without an opcheck: {registered - checked}"
    for op, args in cases:
        torch.library.opcheck(op, args)


@requires_extension
def test_ops_trace_through_torch_compile():
    """The fake kernels let dynamo trace the ops without graph breaks."""
    q = torch.randn(4, 2, 8, 16)
    x = torch.randn(1, 4, 2, 5, 5)
    weight = torch.randn(3, 4, 3, 3)

    def model(q, x):
        attn = sparse_causal_attention(q, q, q, 2, backend="cpp") + temporal_attention(q, q, q, 2, backend="cpp")
        conv = pseudo3d_conv(x, weight, None, backend="cpp", norm=GroupNormSiLU(2, None, None), output_scale=2.0)
        return attn, conv

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(q, x), model(q, x)):
        torch.testing.assert_close(got, want)


@requires_extension
def test_cpp_backend_gives_the_torch_output_and_gradients_on_the_tiny_pipeline(tiny_pipeline_dir, monkeypatch):
    """The model calls the ops with backend=None, so use_backend("cpp") switches every op inside it."""
    from diffusers import UNet2DConditionModel

    from depthvid import inflate_unet

    calls = {}
    for name in ("sparse_causal_attn_fwd", "temporal_attn_fwd", "group_norm_silu", "conv_epilogue"):
        op = getattr(torch.ops.depthvid, name)

        def counted(*args, _name=name, _op=op):
            calls[_name] = calls.get(_name, 0) + 1
            return _op(*args)

        monkeypatch.setattr(torch.ops.depthvid, name, counted)

    video_unet = inflate_unet(UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet"))
    randomize_temporal(video_unet)
    mark_trainable(video_unet)
    sample, timesteps, text = make_inputs(dict(video_unet.unet.config), batch=1, num_frames=3)
    results = {}
    for backend in ("torch", "cpp"):
        video_unet.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = video_unet(sample, timesteps, text)
            out.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in trainable_parameters(video_unet).items()}
        results[backend] = out.detach(), grads
    assert set(calls) == {"sparse_causal_attn_fwd", "temporal_attn_fwd", "group_norm_silu", "conv_epilogue"}
    (out_torch, grads_torch), (out_cpp, grads_cpp) = results["torch"], results["cpp"]
    assert torch.isfinite(out_torch).all() and out_torch.abs().amax() > 0
    torch.testing.assert_close(out_cpp, out_torch, atol=1e-5, rtol=1e-4)
    assert grads_cpp.keys() == grads_torch.keys() and len(grads_torch) > 0
    for name, grad in grads_torch.items():
        torch.testing.assert_close(grads_cpp[name], grad, atol=1e-5, rtol=1e-4, msg=name)
