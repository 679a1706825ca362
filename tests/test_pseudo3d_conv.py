"""Triton pseudo-3D conv (depthvid/triton_kernels/pseudo3d_conv.py) against the torch reference.

Runs the kernels on CPU tensors through TRITON_INTERPRET=1 (set in conftest.py); the GPU binaries
of every launch configuration are checked in test_gpu_binaries.py.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from depthvid.errors import UserError
from depthvid.triton_kernels import pseudo3d_conv as kernels
from depthvid.ops import GroupNormSiLU, pseudo3d_conv
from depthvid.ops.pseudo3d_conv import fold_frames

# fp32: the Triton output against the torch backend's, straight (atol, rtol).
# fp16 / bf16: max |triton - fp64 reference| <= factor * max |torch in that dtype - fp64
# reference| + atol, i.e. no worse than PyTorch's own error in that precision.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(factor=2.0, atol=2e-3),
    torch.bfloat16: dict(factor=2.0, atol=1.6e-2),
}


@dataclass(frozen=True)
class Case:
    batch: int
    c_in: int
    c_out: int
    frames: int
    height: int
    width: int
    stride: int = 1
    kernel: int = 3
    padding: int = 1
    groups: int = 2


CASES = [
    pytest.param(Case(2, 24, 20, 3, 5, 7), id="ragged-5x7-two-videos"),
    pytest.param(Case(1, 8, 12, 1, 6, 9, stride=2), id="one-frame-stride-2"),
    # C_in > BLOCK_K (64 in half precision, 32 in fp32), C_out > BLOCK_N = 64: two N blocks
    pytest.param(Case(1, 70, 72, 1, 4, 5, groups=5), id="channels-past-one-block"),
    pytest.param(Case(1, 6, 16, 3, 4, 3, stride=2, groups=3), id="odd-frames-stride-2"),
    pytest.param(Case(2, 16, 8, 1, 3, 5, kernel=1, padding=0), id="1x1-kernel"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXTRAS = ("norm", "bias", "temb", "temb_per_batch", "residual", "scale")


def make_inputs(case: Case, dtype, extras=EXTRAS, requires_grad=True, seed=0):
    """Random conv inputs, made in fp32 then cast, so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype).requires_grad_(requires_grad)

    h_out = (case.height + 2 * case.padding - case.kernel) // case.stride + 1
    w_out = (case.width + 2 * case.padding - case.kernel) // case.stride + 1
    fan_in = case.c_in * case.kernel**2
    args = dict(
        x=rand(case.batch, case.c_in, case.frames, case.height, case.width, scale=2.0, shift=0.5),
        weight=rand(case.c_out, case.c_in, case.kernel, case.kernel, scale=fan_in**-0.5),
        stride=case.stride,
        padding=case.padding,
    )
    if "norm" in extras:
        args["norm"] = GroupNormSiLU(case.groups, rand(case.c_in, scale=0.2, shift=1.0), rand(case.c_in, scale=0.2))
    if "bias" in extras:
        args["bias"] = rand(case.c_out)
    if "temb" in extras:
        args["temb"] = rand(case.batch, case.frames, case.c_out)
    if "temb_per_batch" in extras:
        args["temb"] = rand(case.batch, case.c_out)
    if "residual" in extras:
        args["residual"] = rand(case.batch, case.c_out, case.frames, h_out, w_out)
    if "scale" in extras:
        args["output_scale"] = 2.0
    return args


def leaves(args):
    """The tensors of a conv call that require grad, by name."""
    named = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    if "norm" in args:
        named["norm.weight"], named["norm.bias"] = args["norm"].weight, args["norm"].bias
    return {k: v for k, v in named.items() if v is not None and v.requires_grad}


def with_dtype(args, dtype):
    """The same call with every tensor cast (detached, re-marked as requiring grad)."""

    def cast(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)

    out = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if "norm" in args:
        norm = args["norm"]
        out["norm"] = GroupNormSiLU(norm.num_groups, cast(norm.weight), cast(norm.bias), norm.eps)
    return out


def run(args, backend, grad_out):
    """Output and the gradient of every leaf, for ``pseudo3d_conv(**args, backend=backend)``."""
    out = pseudo3d_conv(**args, backend=backend)
    named = leaves(args)
    grads = torch.autograd.grad(out, list(named.values()), grad_out.to(out.dtype)) if named else ()
    return {"out": out.detach(), **{f"grad {k}": g for k, g in zip(named, grads)}}


def assert_matches_reference(args, dtype, grad_seed=1):
    """Triton vs torch backend: the output and every gradient, with the dtype's tolerance."""
    out_shape = pseudo3d_conv(**with_dtype(args, torch.float32), backend="torch").shape
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(grad_seed))
    triton_result = run(args, "triton", grad_out)
    torch_result = run(with_dtype(args, dtype), "torch", grad_out)
    assert triton_result.keys() == torch_result.keys()
    tol = TOLERANCES[dtype]
    if dtype == torch.float32:
        for name, value in triton_result.items():
            assert value.dtype == dtype, name
            torch.testing.assert_close(value, torch_result[name], atol=tol["atol"], rtol=tol["rtol"], msg=name)
        return
    exact = run(with_dtype(args, torch.float64), "torch", grad_out.double())
    for name, value in triton_result.items():
        assert value.dtype == dtype, name
        triton_err = (value.double() - exact[name]).abs().max().item()
        torch_err = (torch_result[name].double() - exact[name]).abs().max().item()
        bound = tol["factor"] * torch_err + tol["atol"]
        assert triton_err <= bound, f"{name}: triton error {triton_err:.3g} > {bound:.3g} (torch's own {torch_err:.3g})"


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES)
def test_fused_conv_matches_reference(case, dtype):
    # norm + bias + per-frame temb + residual + output_scale, every tensor requiring grad
    assert_matches_reference(make_inputs(case, dtype, extras=("norm", "bias", "temb", "residual", "scale")), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", CASES)
def test_plain_conv_equals_conv3d(case, dtype):
    args = make_inputs(case, dtype, extras=(), requires_grad=False)
    out = pseudo3d_conv(**args, backend="triton")
    expected = F.conv3d(
        args["x"].double(),
        args["weight"].double()[:, :, None],
        stride=(1, case.stride, case.stride),
        padding=(0, case.padding, case.padding),
    )
    assert out.dtype == dtype and out.shape == expected.shape
    atol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=atol)


@pytest.mark.parametrize(
    "extras",
    [
        pytest.param(("norm",), id="norm-only"),
        pytest.param(("bias",), id="bias-only"),
        pytest.param(("temb_per_batch",), id="temb-per-batch"),
        pytest.param(("temb",), id="temb-per-frame"),
        pytest.param(("residual",), id="residual-only"),
        pytest.param(("scale", "bias"), id="output-scale"),
        pytest.param(("norm", "temb_per_batch", "residual", "scale"), id="resnet-block-half"),
    ],
)
def test_each_extra_alone(extras):
    assert_matches_reference(make_inputs(CASES[0].values[0], torch.float32, extras=extras), torch.float32)


def test_norm_without_affine():
    args = make_inputs(CASES[0].values[0], torch.float32, extras=("norm",))
    args["norm"] = GroupNormSiLU(args["norm"].num_groups, None, None, eps=1e-6)
    assert_matches_reference(args, torch.float32)


@pytest.mark.parametrize("trainable", [("x",), ("weight",), ("norm.weight", "bias")], ids="+".join)
def test_gradients_of_a_subset(trainable):
    # the tuning case: frozen conv and norm weights, only x needs a gradient (and the others)
    args = make_inputs(CASES[0].values[0], torch.float32, extras=("norm", "bias", "temb", "residual"))
    for name, tensor in leaves(args).items():
        tensor.requires_grad_(name in trainable)
    assert set(leaves(args)) == set(trainable)
    assert_matches_reference(args, torch.float32)


def test_broadcast_grad_out():
    # out.sum().backward() hands the kernel a grad_out with all-zero strides
    args = make_inputs(CASES[1].values[0], torch.float32, extras=("norm", "bias"))
    grads = {}
    for backend in ("triton", "torch"):
        pseudo3d_conv(**args, backend=backend).sum().backward()
        grads[backend] = {name: t.grad.clone() for name, t in leaves(args).items()}
        for t in leaves(args).values():
            t.grad = None
    for name, grad in grads["triton"].items():
        torch.testing.assert_close(grad, grads["torch"][name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_model_frame_view(dtype):
    # the model passes (1, C, B*F, H, W) views of (B*F, C, H, W) tensors, not contiguous videos
    batch, frames, c_in, c_out, height, width = 2, 3, 12, 20, 5, 6
    gen = torch.Generator().manual_seed(3)
    folded = torch.randn(batch * frames, c_in, height, width, generator=gen).to(dtype)
    residual = torch.randn(batch * frames, c_out, height, width, generator=gen).to(dtype)
    args = dict(
        x=folded.permute(1, 0, 2, 3)[None].requires_grad_(),
        weight=(torch.randn(c_out, c_in, 3, 3, generator=gen) / 10).to(dtype).requires_grad_(),
        bias=torch.randn(c_out, generator=gen).to(dtype),
        norm=GroupNormSiLU(4, torch.ones(c_in, dtype=dtype), torch.zeros(c_in, dtype=dtype)),
        temb=torch.randn(1, batch * frames, c_out, generator=gen).to(dtype),
        residual=residual.permute(1, 0, 2, 3)[None],
        output_scale=1.5,
    )
    assert not args["x"].is_contiguous()
    assert_matches_reference(args, dtype)
    # the result folds back to (B*F, C_out, H, W) without a copy, channels-last: the next conv
    # reads it as is (the reference's is contiguous)
    out = pseudo3d_conv(**args, backend="triton")
    assert fold_frames(out).is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- input errors


def bad_input(case=Case(1, 8, 4, 2, 5, 5), **changes):
    args = make_inputs(case, torch.float32, extras=("norm", "bias", "temb", "residual"), requires_grad=False)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(norm=GroupNormSiLU(3, None, None)), "num_groups must divide C_in=8"),
        (dict(temb=torch.zeros(1, 5)), r"temb must have shape \(1, 4\)"),
        (dict(residual=torch.zeros(1, 4, 2, 4, 4)), r"residual must have shape \(1, 4, 2, 5, 5\)"),
        (dict(bias=torch.zeros(4, dtype=torch.float16)), "bias=torch.float16"),
        (dict(stride=0), "stride must be an int >= 1"),
        (dict(padding=-1), "padding must be an int >= 0"),
        (dict(output_scale=0.0), "output_scale must be non-zero"),
        (dict(padding=0, weight=torch.zeros(4, 8, 7, 7)), "does not fit the 5x5 frames"),
    ],
)
def test_bad_input_raises_user_error(changes, message):
    with pytest.raises(UserError, match=message):
        pseudo3d_conv(**bad_input(**changes), backend="triton")


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="TRITON_INTERPRET"):
        pseudo3d_conv(**bad_input(), backend="triton")


# ----------------------------------------------------------------------------- layouts


def test_weight_is_permuted_once_per_version():
    weight = torch.randn(6, 4, 3, 3)
    permuted = kernels.gemm_weight(weight)
    assert permuted.stride(0) == 1 and torch.equal(permuted, weight)  # (kh, kw, C_in, C_out) storage
    assert kernels.gemm_weight(weight) is permuted  # cached while the weight is unchanged
    with torch.no_grad():
        weight.mul_(2)  # a new version: the copy must follow it
    assert torch.equal(kernels.gemm_weight(weight), weight)


def test_gpu_launches_cover_every_pick():
    # tests/test_gpu_binaries.py compiles exactly these for sm_80 and sm_90
    launched = {
        (launch.args[0].dtype, *(launch.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
        for launch in kernels.gpu_launches() if launch.name == "_pseudo3d_conv_fwd_kernel"
    }
    for dtype in DTYPES:
        for channels in (1, 4, 5, 16, 63, 64, 65, 128, 320, 640, 1280, 1920):
            cfg = kernels.pick_conv_config(channels, dtype)
            assert (dtype, cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K) in launched
