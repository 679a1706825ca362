"""Surgery on tiny stock UNets: what was swapped, equivalence with the 2D model, training set."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from depthvid.errors import UserError
from depthvid.models import (
    FusedResnetBlock2D,
    PerFrameAttnProcessor,
    PseudoConv3d,
    SparseCausalAttnProcessor,
    TemporalAttnProcessor,
    VideoTransformerBlock,
    VideoUNet,
    inflate_unet,
    mark_trainable,
    trainable_parameters,
    trainable_state_dict,
)
from depthvid.testing import SD2_DEPTH_UNET_CONFIG

TINY = dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8)
CONFIGS = {
    # SD2-depth's shape: 4 latent + 1 depth channels, linear projections, per-level head counts
    "sd2_depth": dict(
        TINY,
        in_channels=5,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    ),
    # SD1.5's shape: 4 channels, conv projections, one head count, another text width
    "sd15": dict(
        TINY,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=8,
        use_linear_projection=False,
    ),
    # other block types: added-KV attention, a cross-attention-only attn1, scale-shift resnets
    "mixed_blocks": dict(
        TINY,
        in_channels=4,
        out_channels=4,
        down_block_types=("SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        only_cross_attention=(True, False),
        cross_attention_dim=16,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
    ),
}


def make_unet(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIGS[name]).eval()


def make_inputs(config, batch=2, num_frames=3, identical=False, seed=1):
    """sample (B, C_in, F, 8, 8), per-video timesteps (B,), text (B, 5, D)."""
    generator = torch.Generator().manual_seed(seed)
    frames = 1 if identical else num_frames
    sample = torch.randn(batch, config["in_channels"], frames, 8, 8, generator=generator)
    sample = sample.expand(-1, -1, num_frames, -1, -1)
    text = torch.randn(batch, 5, config["cross_attention_dim"], generator=generator)
    return sample, torch.tensor([10, 700])[:batch], text


def per_frame_2d(unet, sample, timesteps, text):
    """Run the 2D UNet on every frame: -> (B, C_out, F, H, W)."""
    with torch.no_grad():
        frames = [unet(sample[:, :, f], timesteps, text).sample for f in range(sample.shape[2])]
    return torch.stack(frames, dim=2)


def randomize_temporal(video_unet: VideoUNet, seed=3):
    """Stand-in for tuning: give the zero-initialised temporal output projections values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in video_unet.modules():
            if isinstance(module, VideoTransformerBlock):
                nn.init.normal_(module.attn_temp.to_out[0].weight, std=0.2)
                nn.init.normal_(module.attn_temp.to_out[0].bias, std=0.2)


def count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("name", CONFIGS)
def test_identical_frames_equal_the_2d_unet_on_every_frame(name):
    unet_2d = make_unet(name)
    video_unet = inflate_unet(copy.deepcopy(unet_2d))
    sample, timesteps, text = make_inputs(CONFIGS[name], identical=True)
    with torch.no_grad():
        out = video_unet(sample, timesteps, text)
    assert out.shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(out, per_frame_2d(unet_2d, sample, timesteps, text), atol=1e-5, rtol=1e-5)


def test_other_videos_match_2d_on_frame_0_only():
    """Frame 0 attends only to itself; later frames see frame 0's keys, so they differ."""
    unet_2d = make_unet("sd2_depth")
    video_unet = inflate_unet(copy.deepcopy(unet_2d))
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"])
    with torch.no_grad():
        out = video_unet(sample, timesteps, text)
    expected = per_frame_2d(unet_2d, sample, timesteps, text)
    torch.testing.assert_close(out[:, :, 0], expected[:, :, 0], atol=1e-5, rtol=1e-5)
    assert (out[:, :, 1:] - expected[:, :, 1:]).abs().amax() > 1e-3


def test_without_sparse_causal_any_video_equals_2d_per_frame():
    """GroupNorm statistics are per frame and convs never mix frames: only attn1 couples frames."""
    unet_2d = make_unet("sd2_depth")
    video_unet = inflate_unet(copy.deepcopy(unet_2d), sparse_causal=False)
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"])
    with torch.no_grad():
        out = video_unet(sample, timesteps, text)
    torch.testing.assert_close(out, per_frame_2d(unet_2d, sample, timesteps, text), atol=1e-5, rtol=1e-5)


def test_sparse_causal_is_causal_until_temporal_attention_is_tuned():
    video_unet = inflate_unet(make_unet("sd2_depth"))
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"], num_frames=5)
    with torch.no_grad():
        full, prefix = video_unet(sample, timesteps, text), video_unet(sample[:, :, :3], timesteps, text)
        torch.testing.assert_close(full[:, :, :3], prefix, atol=1e-5, rtol=1e-5)
        randomize_temporal(video_unet)
        full, prefix = video_unet(sample, timesteps, text), video_unet(sample[:, :, :3], timesteps, text)
    assert (full[:, :, :3] - prefix).abs().amax() > 1e-3  # temporal attention sees later frames


@pytest.mark.parametrize("num_frames", [8, 3, 1])
def test_any_frame_count_runs_and_videos_in_a_batch_are_independent(num_frames):
    video_unet = inflate_unet(make_unet("sd2_depth"))
    randomize_temporal(video_unet)  # as if tuned on some other frame count
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"], num_frames=num_frames)
    with torch.no_grad():
        batched = video_unet(sample, timesteps, text)
        alone = [video_unet(sample[b : b + 1], timesteps[b], text[b : b + 1]) for b in range(2)]
    assert batched.shape == (2, 4, num_frames, 8, 8)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_swapped_modules(name):
    unet = make_unet(name)
    convs = [m for m in unet.modules() if type(m) is nn.Conv2d]
    convs_3x3 = [m for m in convs if m.kernel_size == (3, 3)]
    conv_1x1_weights = {id(m.weight) for m in convs if m.kernel_size == (1, 1)}
    conv_3x3_weights = {id(m.weight) for m in convs_3x3}
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    self_attn1 = {id(b.attn1) for b in blocks if not b.only_cross_attention}
    attentions_before = count(unet, Attention)
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    plain_resnets = {  # GroupNorm -> SiLU -> conv halves, temb added (not scale-shift), no resampling
        id(m) for m in resnets if m.time_embedding_norm == "default" and m.upsample is None and m.downsample is None
    }
    state_dict_names = set(unet.state_dict())

    video_unet = inflate_unet(unet)
    pseudo = [m for m in video_unet.modules() if isinstance(m, PseudoConv3d)]
    assert len(pseudo) == len(convs_3x3) > 0
    assert {id(m.weight) for m in pseudo} == conv_3x3_weights  # the same Parameters, not copies
    assert {id(m.weight) for m in video_unet.modules() if type(m) is nn.Conv2d} == conv_1x1_weights
    assert isinstance(video_unet.unet.conv_in, nn.Conv2d)
    assert {id(m) for m in video_unet.modules() if isinstance(m, FusedResnetBlock2D)} == plain_resnets
    assert count(video_unet, ResnetBlock2D) == len(resnets)
    resnet_names = {name for name in state_dict_names if ".resnets." in name}  # kept by the fused class
    assert resnet_names and resnet_names <= {name.removeprefix("unet.") for name in video_unet.state_dict()}

    assert count(video_unet, VideoTransformerBlock) == len(blocks) > 0
    assert count(video_unet, Attention) == attentions_before + len(blocks)  # one attn_temp per block
    for module in video_unet.modules():
        if isinstance(module, VideoTransformerBlock):
            assert isinstance(module.attn_temp.processor, TemporalAttnProcessor)
            assert not module.attn_temp.to_out[0].weight.any() and not module.attn_temp.to_out[0].bias.any()
        elif isinstance(module, BasicTransformerBlock):
            expected_attn1 = SparseCausalAttnProcessor if id(module.attn1) in self_attn1 else PerFrameAttnProcessor
            assert type(module.attn1.processor) is expected_attn1
            assert module.attn2 is None or type(module.attn2.processor) is PerFrameAttnProcessor
    processors = [m.processor for m in video_unet.modules() if isinstance(m, Attention)]
    assert sum(isinstance(p, SparseCausalAttnProcessor) for p in processors) == len(self_attn1)

    text = repr(video_unet)
    assert "PseudoConv3d" in text and "VideoTransformerBlock" in text and "attn_temp" in text
    assert "sparse_causal=True, temporal=True, pseudo3d=True" in text
    assert video_unet.config is video_unet.unet.config
    assert video_unet.dtype == torch.float32 and video_unet.device.type == "cpu"


def test_flags_off_swap_nothing_but_still_equal_2d():
    unet_2d = make_unet("sd15")
    video_unet = inflate_unet(copy.deepcopy(unet_2d), sparse_causal=False, temporal=False, pseudo3d=False)
    assert count(video_unet, PseudoConv3d) == count(video_unet, VideoTransformerBlock) == 0
    assert video_unet.inflation == {"sparse_causal": False, "temporal": False, "pseudo3d": False}
    processors = [m.processor for m in video_unet.modules() if isinstance(m, Attention)]
    assert processors and all(isinstance(p, PerFrameAttnProcessor) for p in processors)
    sample, timesteps, text = make_inputs(CONFIGS["sd15"])
    with torch.no_grad():
        out = video_unet(sample, timesteps, text)
    torch.testing.assert_close(out, per_frame_2d(unet_2d, sample, timesteps, text), atol=1e-5, rtol=1e-5)


def test_bad_input_is_rejected_by_name():
    video_unet = inflate_unet(make_unet("sd2_depth"))
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"])
    with pytest.raises(UserError, match="already inflated"):
        inflate_unet(video_unet.unet)
    with pytest.raises(UserError, match="unet: expected a diffusers UNet2DConditionModel"):
        inflate_unet(nn.Linear(2, 2))
    with pytest.raises(UserError, match="sample: expected 5 channels"):
        video_unet(sample[:, :4], timesteps, text)
    with pytest.raises(UserError, match="sample"):
        video_unet(sample[:, :, 0], timesteps, text)
    with pytest.raises(UserError, match="timestep"):
        video_unet(sample, torch.tensor([1, 2, 3]), text)
    with pytest.raises(UserError, match="encoder_hidden_states"):
        video_unet(sample, timesteps, text[:1])
    with pytest.raises(ValueError, match="num_frames"):  # the inner UNet called without VideoUNet
        video_unet.unet(sample[:, :, 0], timesteps, text)


def test_only_the_trainable_set_learns():
    video_unet = inflate_unet(make_unet("sd2_depth"))
    num_trainable = mark_trainable(video_unet)
    trainable = trainable_parameters(video_unet)
    suffixes = ("attn1.to_q.weight", "attn2.to_q.weight")
    assert all(name.endswith(suffixes) or ".attn_temp." in name or ".norm_temp." in name for name in trainable)
    assert num_trainable == sum(p.numel() for p in trainable.values()) > 0
    assert {n for n, p in video_unet.named_parameters() if p.requires_grad} == set(trainable)
    assert trainable_state_dict(video_unet).keys() == trainable.keys()

    frozen_before = {n: p.detach().clone() for n, p in video_unet.named_parameters() if n not in trainable}
    trainable_before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(video_unet.parameters(), lr=1e-2, weight_decay=1e-2)
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"])
    video_unet(sample, timesteps, text).square().mean().backward()
    with_grad = {n for n, p in video_unet.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    optimizer.step()

    for name, before in frozen_before.items():
        assert torch.equal(video_unet.get_parameter(name), before), name
    changed = {n for n, p in trainable.items() if not torch.equal(p, trainable_before[n])}
    # attn_temp's q/k/v/norm get zero gradient while to_out is zero (weight decay still moves them)
    assert any(n.endswith("attn1.to_q.weight") for n in changed)
    assert any(n.endswith("attn2.to_q.weight") for n in changed)
    assert any(n.endswith("attn_temp.to_out.0.weight") for n in changed)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    video_unet = inflate_unet(make_unet("sd2_depth"))
    randomize_temporal(video_unet)  # so that every trainable parameter gets a nonzero gradient
    mark_trainable(video_unet)
    sample, timesteps, text = make_inputs(CONFIGS["sd2_depth"])
    calls = []
    for module in video_unet.modules():
        if isinstance(module, VideoTransformerBlock):
            # a pre-hook: recomputation stops early once it has what backward needs
            module.register_forward_pre_hook(lambda *args: calls.append(1))

    def loss_and_grads():
        video_unet.zero_grad()
        calls.clear()
        loss = video_unet(sample, timesteps, text).square().mean()
        forward_calls = len(calls)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in video_unet.named_parameters() if p.requires_grad}
        return loss.detach(), grads, len(calls) - forward_calls

    loss_plain, grads_plain, recomputed_plain = loss_and_grads()
    video_unet.enable_gradient_checkpointing()
    loss_ckpt, grads_ckpt, recomputed_ckpt = loss_and_grads()
    video_unet.disable_gradient_checkpointing()

    assert recomputed_plain == 0 and recomputed_ckpt == count(video_unet, VideoTransformerBlock)
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert grad.abs().amax() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-7, rtol=1e-5)


def test_full_sd2_depth_unet_inflates_on_the_meta_device():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_DEPTH_UNET_CONFIG)
    total_2d = sum(p.numel() for p in unet.parameters())
    video_unet = inflate_unet(unet)
    total = sum(p.numel() for p in video_unet.parameters())
    trainable = mark_trainable(video_unet)
    print(f"SD2-depth UNet: 2D {total_2d:,}, inflated {total:,}, trainable {trainable:,}")

    assert {p.device.type for p in video_unet.parameters()} == {"meta"}
    assert abs(total_2d - 866e6) < 1e6
    # per transformer block of width d: attn1.to_q, attn2.to_q (d*d each, no bias), attn_temp
    # q/k/v/out (4 d*d + an out bias d) and norm_temp (2 d) -> 6 d^2 + 3 d
    widths = [320] * 5 + [640] * 5 + [1280] * 6  # 2 down + 3 up blocks per level, +1 mid block
    assert trainable == sum(6 * d * d + 3 * d for d in widths)
    # temporal layers add 4 d^2 + 3 d per block to the 2D count
    assert total - total_2d == sum(4 * d * d + 3 * d for d in widths)


def test_new_layers_follow_the_unet_dtype():
    video_unet = inflate_unet(make_unet("sd2_depth").to(torch.float16))
    assert video_unet.dtype == torch.float16
    assert {p.dtype for p in video_unet.parameters()} == {torch.float16}


def test_triton_backend_gives_the_torch_output_and_gradients_on_the_tiny_pipeline(tiny_pipeline_dir, monkeypatch):
    """The model calls the ops with backend=None, so use_backend switches every op inside it
    (the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, set in conftest.py)."""
    import importlib

    from depthvid.ops import use_backend

    launches = {}
    for op in ("sparse_causal_attn", "temporal_attn", "pseudo3d_conv"):
        module = importlib.import_module(f"depthvid.triton_kernels.{op}")
        launcher = getattr(module, f"{op}_triton")

        def counted(*args, _op=op, _launcher=launcher):
            launches[_op] = launches.get(_op, 0) + 1
            return _launcher(*args)

        monkeypatch.setattr(module, f"{op}_triton", counted)

    video_unet = inflate_unet(UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet"))
    randomize_temporal(video_unet)
    mark_trainable(video_unet)
    config = dict(video_unet.unet.config)
    sample, timesteps, text = make_inputs(config, batch=1, num_frames=3)
    results = {}
    for backend in ("torch", "triton"):
        video_unet.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = video_unet(sample, timesteps, text)
            out.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in trainable_parameters(video_unet).items()}
        results[backend] = out.detach(), grads
    assert set(launches) == {"sparse_causal_attn", "temporal_attn", "pseudo3d_conv"}  # only under "triton"
    (out_torch, grads_torch), (out_triton, grads_triton) = results["torch"], results["triton"]
    assert torch.isfinite(out_torch).all() and out_torch.abs().amax() > 0
    torch.testing.assert_close(out_triton, out_torch, atol=1e-5, rtol=1e-4)
    assert grads_triton.keys() == grads_torch.keys() and len(grads_torch) > 0
    for name, grad in grads_torch.items():
        torch.testing.assert_close(grads_triton[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shortcut", [False, True], ids=["identity-shortcut", "conv-shortcut"])
def test_fused_resnet_block_equals_the_stock_block(backend, shortcut):
    """Output and every gradient (input, temb, all weights) match diffusers' own forward."""
    from depthvid.ops import use_backend

    torch.manual_seed(0)
    stock = ResnetBlock2D(in_channels=8, out_channels=12 if shortcut else 8, temb_channels=6, groups=4,
                          output_scale_factor=2.0 if shortcut else 1.0).train()
    with torch.no_grad():  # GroupNorm starts at weight 1, bias 0: make the affine part count
        for norm in (stock.norm1, stock.norm2):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    fused = copy.deepcopy(stock)
    for name in ("conv1", "conv2"):
        setattr(fused, name, PseudoConv3d.from_conv2d(getattr(fused, name)))
    fused.__class__ = FusedResnetBlock2D
    x, temb = torch.randn(6, 8, 5, 7), torch.randn(6, 6)  # 6 = batch*frames; ragged 5x7 frames
    results = []
    for block, block_backend in ((stock, "torch"), (fused, backend)):
        inputs = [x.clone().requires_grad_(), temb.clone().requires_grad_()]
        with use_backend(block_backend):
            out = block(*inputs)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {name: p.grad for name, p in block.named_parameters()}
        results.append((out.detach(), inputs[0].grad, inputs[1].grad, grads))
    (out, dx, dtemb, grads), (out_fused, dx_fused, dtemb_fused, grads_fused) = results
    assert out.shape == (6, 12 if shortcut else 8, 5, 7)
    torch.testing.assert_close(out_fused, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_fused, dx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dtemb_fused, dtemb, atol=1e-5, rtol=1e-5)
    assert grads_fused.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_fused[name], grad, atol=1e-5, rtol=1e-5, msg=name)
