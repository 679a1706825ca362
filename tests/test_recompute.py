"""Selective gradient checkpointing (depthvid.models.recompute): what it keeps, and that gradients
are those of a step without checkpointing while the kept ops are not run again in backward."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from depthvid.models import inflate_unet, mark_trainable, recompute
from depthvid.models.recompute import keep_dear_outputs, recompute_flops_per_element
from _extension_checks import requires_extension
from test_inflate import CONFIGS, make_inputs, make_unet, randomize_temporal

aten = torch.ops.aten


def meta(*shape):
    return torch.empty(*shape, device="meta")


def conv_args(in_channels, kernel):
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    return (meta(8, in_channels, 64, 64), meta(320, in_channels, kernel, kernel), None, [1, 1], [1, 1], [1, 1],
            False, [0, 0], 1)


def attention_args(queries, keys, heads=5, head_dim=64):
    return meta(8, heads, queries, head_dim), meta(8, heads, keys, head_dim), meta(8, heads, keys, head_dim)


@pytest.mark.parametrize("op, args, flops, kept", [
    # paper scale: 3x3 convs from 640 channels, self-attention at 64x64 latents (4096 tokens)
    (aten.convolution.default, conv_args(640, 3), 2 * 640 * 9, True),
    (aten._scaled_dot_product_flash_attention_for_cpu.default, attention_args(4096, 4096), 4 * 4096, True),
    (aten._scaled_dot_product_efficient_attention.default, attention_args(2048, 2048), 4 * 2048, True),
    # cheaper per element: 3x3 convs from 320 channels, 1x1 shortcuts, cross-attention to 77 text
    # tokens, self-attention at 32x32 latents
    (aten.convolution.default, conv_args(320, 3), 2 * 320 * 9, False),
    (aten.convolution.default, conv_args(640, 1), 2 * 640, False),
    (aten._scaled_dot_product_flash_attention_for_cpu.default, attention_args(4096, 77), 4 * 77, False),
    (aten._scaled_dot_product_flash_attention.default, attention_args(1024, 1024), 4 * 1024, False),
    # linears and everything else are not counted: always recomputed
    (aten.mm.default, (meta(32768, 320), meta(320, 2560)), 0, False),
    (aten.native_group_norm.default, (meta(8, 320, 64, 64), None, None, 8, 320, 4096, 32, 1e-5), 0, False),
])
def test_what_is_kept_is_what_costs_the_most_to_recompute_per_element(op, args, flops, kept):
    assert recompute_flops_per_element(op, args) == flops
    expected = CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE
    assert keep_dear_outputs(None, op, *args) == expected


def sparse_causal_op(backend):
    if backend == "cpp":
        return torch.ops.depthvid.sparse_causal_attn_fwd.default
    import depthvid.triton_kernels.sparse_causal_attn  # noqa: F401  (registers the op)

    return torch.ops.depthvid_triton.sparse_causal_attn_fwd.default


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_extension), "triton"])
def test_the_sparse_causal_ops_count_both_key_frames(backend):
    op = sparse_causal_op(backend)
    q, k, v = attention_args(4096, 4096)
    assert recompute_flops_per_element(op, (q, k, v, 8, 0.125)) == 4 * 2 * 4096
    assert keep_dear_outputs(None, op, q, k, v, 8, 0.125) == CheckpointPolicy.MUST_SAVE
    q, k, v = attention_args(256, 256)
    assert keep_dear_outputs(None, op, q, k, v, 8, 0.125) == CheckpointPolicy.PREFER_RECOMPUTE


class CountCalls(TorchDispatchMode):
    """Counts the calls of the given ops (default: convolution and CPU flash attention), per phase."""

    def __init__(self, counted=None):
        super().__init__()
        self.counted = counted or {aten.convolution.default: "conv",
                                   aten._scaled_dot_product_flash_attention_for_cpu.default: "attention"}
        self.phase, self.calls = "forward", {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.counted:
            key = (self.phase, self.counted[func])
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", ["off", "full", "selective"])
def test_selective_checkpointing_gives_the_gradients_of_no_checkpointing_without_rerunning_kept_ops(
        checkpointing, monkeypatch):
    monkeypatch.setattr(recompute, "KEEP_FLOPS_PER_ELEMENT", 1)  # the tiny UNet's ops are all cheap: keep them all
    video_unet = inflate_unet(make_unet("sd2_depth"))
    randomize_temporal(video_unet)
    mark_trainable(video_unet)
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"])

    def loss_and_grads():
        video_unet.zero_grad()
        counter = CountCalls()
        with counter:
            loss = video_unet(sample, timesteps, text).square().mean()
            counter.phase = "backward"
            loss.backward()
        grads = {n: p.grad.clone() for n, p in video_unet.named_parameters() if p.requires_grad}
        return loss.detach(), grads, counter.calls

    loss_plain, grads_plain, calls_plain = loss_and_grads()
    if checkpointing != "off":
        video_unet.enable_gradient_checkpointing(selective=checkpointing == "selective")
    loss, grads, calls = loss_and_grads()

    assert calls[("forward", "conv")] == calls_plain[("forward", "conv")] > 0
    assert calls[("forward", "attention")] == calls_plain[("forward", "attention")] > 0
    rerun_convs, rerun_attention = calls.get(("backward", "conv"), 0), calls.get(("backward", "attention"), 0)
    if checkpointing == "full":  # every resnet's two 3x3 convs and every block's attention run again
        assert rerun_convs > 0 and rerun_attention > 0
    else:
        assert rerun_convs == rerun_attention == 0
    torch.testing.assert_close(loss, loss_plain, atol=0, rtol=1e-6)
    assert grads.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert grad.abs().amax() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=1e-7, rtol=1e-5)


def test_selective_checkpointing_keeps_the_triton_sparse_causal_forward(monkeypatch):
    """The same under the Triton backend (in the interpreter): its forward is a dispatcher op, so
    selective checkpointing keeps its output rather than launching the kernel again."""
    from depthvid.ops import use_backend

    monkeypatch.setattr(recompute, "KEEP_FLOPS_PER_ELEMENT", 1)
    op = sparse_causal_op("triton")
    video_unet = inflate_unet(make_unet("sd2_depth"))
    randomize_temporal(video_unet)
    mark_trainable(video_unet)
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"], batch=1)
    blocks = sum(1 for m in video_unet.modules() if type(m).__name__ == "VideoTransformerBlock")

    def launches_and_grads(checkpointing):
        video_unet.disable_gradient_checkpointing()
        if checkpointing != "off":
            video_unet.enable_gradient_checkpointing(selective=checkpointing == "selective")
        video_unet.zero_grad()
        counter = CountCalls({op: "sparse-causal"})
        with use_backend("triton"), counter:
            loss = video_unet(sample, timesteps[:1], text).square().mean()
            counter.phase = "backward"
            loss.backward()
        grads = {n: p.grad.clone() for n, p in video_unet.named_parameters() if p.requires_grad}
        return counter.calls[("forward", "sparse-causal")], counter.calls.get(("backward", "sparse-causal"), 0), grads

    _, _, grads_plain = launches_and_grads("off")
    for checkpointing, relaunched in (("full", blocks), ("selective", 0)):
        forward, backward, grads = launches_and_grads(checkpointing)
        assert (forward, backward) == (blocks, relaunched), checkpointing
        for name, grad in grads_plain.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-7, rtol=1e-5, msg=f"{checkpointing}: {name}")
