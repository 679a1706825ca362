"""The pseudo-3D conv with depthvid._C's GroupNorm+SiLU prologue and temb/residual epilogue (CPU)
against the torch reference: output and the gradients of x, weights, norm affine, temb, residual."""
from __future__ import annotations

import pytest
import torch
from _extension_checks import DTYPES, assert_close_to_torch, requires_extension

from depthvid.ops import GroupNormSiLU, pseudo3d_conv

pytestmark = requires_extension
NAMES = ("out", "dx", "dweight", "dbias", "dnorm_weight", "dnorm_bias", "dtemb", "dresidual")


def output_and_grads(inputs, backend, groups, output_scale, per_frame_temb, dtype):
    x, weight, bias, norm_weight, norm_bias, temb, residual = (
        None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs
    )
    norm = None if norm_weight is None else GroupNormSiLU(groups, norm_weight, norm_bias)
    out = pseudo3d_conv(x, weight, bias, 1, 1, backend, norm=norm, temb=temb, residual=residual,
                        output_scale=output_scale)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(dtype)
    leaves = [t for t in (x, weight, bias, norm_weight, norm_bias, temb, residual)]
    grads = torch.autograd.grad((out * weights).sum(), [t for t in leaves if t is not None])
    it = iter(grads)
    return [out.detach()] + [torch.zeros(()) if t is None else next(it) for t in leaves]


def make_inputs(batch, channels_in, channels_out, frames, height, width, fused, per_frame_temb, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    x = randn(batch, channels_in, frames, height, width)
    if not fused:
        return [x, randn(channels_out, channels_in, 3, 3) * 0.2, randn(channels_out), None, None, None, None]
    temb = randn(batch, frames, channels_out) if per_frame_temb else randn(batch, channels_out)
    return [
        x * 2 + 0.5,  # a mean and variance far from 0/1 exercise the normalisation
        randn(channels_out, channels_in, 3, 3) * 0.2,
        randn(channels_out),
        1 + 0.3 * randn(channels_in),
        0.3 * randn(channels_in),
        temb,
        randn(batch, channels_out, frames, height, width),
    ]


def check(inputs, dtype, groups=4, output_scale=1.0, per_frame_temb=False):
    got = output_and_grads(inputs, "cpp", groups, output_scale, per_frame_temb, dtype)
    want = output_and_grads(inputs, "torch", groups, output_scale, per_frame_temb, dtype)
    exact = None
    if dtype != torch.float32:
        exact = output_and_grads(inputs, "torch", groups, output_scale, per_frame_temb, torch.float64)
    assert_close_to_torch(NAMES, got, want, exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frames", [1, 2, 3, 5], ids=["F1", "F2", "F3", "F5"])
@pytest.mark.parametrize("per_frame_temb", [False, True], ids=["temb-per-video", "temb-per-frame"])
def test_fused_prologue_and_epilogue_match_torch(dtype, frames, per_frame_temb):
    inputs = make_inputs(2, 8, 6, frames, 9, 7, fused=True, per_frame_temb=per_frame_temb)  # ragged 9x7 frames
    check(inputs, dtype, output_scale=2.0, per_frame_temb=per_frame_temb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_conv_matches_torch(dtype):
    check(make_inputs(2, 5, 7, 3, 6, 6, fused=False, per_frame_temb=False), dtype)


def test_model_layout_view_and_no_affine():
    """The inflated model passes a (1, C, B*F, H, W) view of a (B*F, C, H, W) tensor; GroupNorm
    without affine parameters gets no weight/bias gradients."""
    frames_total, channels, height, width = 6, 8, 5, 7
    x = torch.randn(frames_total, channels, height, width).transpose(0, 1)[None]  # (1, C, B*F, H, W) view
    assert not x.is_contiguous()
    weight = torch.randn(4, channels, 3, 3)
    results = {}
    for backend in ("torch", "cpp"):
        leaf = x.detach().requires_grad_()
        out = pseudo3d_conv(leaf, weight, None, 1, 1, backend, norm=GroupNormSiLU(2, None, None))
        (grad,) = torch.autograd.grad(out.square().sum(), leaf)
        results[backend] = out.detach(), grad
    # the loss is a sum of squares over 1680 outputs: its gradients reach ~10, hence 1e-4
    torch.testing.assert_close(results["cpp"], results["torch"], atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_rejected_by_name():
    x = torch.randn(1, 6, 2, 4, 4)
    with pytest.raises(RuntimeError, match="num_groups=4 must divide the channels 6"):
        torch.ops.depthvid.group_norm_silu(x, 4, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="GroupNorm weight and bias must be \\(C,\\)"):
        torch.ops.depthvid.group_norm_silu(x, 3, torch.ones(5), None, 1e-5)
    conv = torch.randn(2, 6, 4, 4)
    with pytest.raises(RuntimeError, match="temb must be \\(B, C_out\\) or \\(B, F, C_out\\)"):
        torch.ops.depthvid.conv_epilogue(conv, 2, torch.randn(1, 5), None, 1.0)
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.depthvid.conv_epilogue(conv, 2, None, torch.randn(1, 6, 2, 4, 5), 1.0)
    h, mean, rstd = torch.ops.depthvid.group_norm_silu(x, 3, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean and rstd must be \\(B\\*F, num_groups\\) = \\(2, 3\\)"):
        torch.ops.depthvid.group_norm_silu_bwd(h, x, mean[:1], rstd, 3, None, None)
    with pytest.raises(RuntimeError, match="grad must be \\(B\\*F, C, H, W\\)"):
        torch.ops.depthvid.group_norm_silu_bwd(h[:1], x, mean, rstd, 3, None, None)
