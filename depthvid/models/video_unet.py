"""Inflate a stock diffusers ``UNet2DConditionModel`` into a video UNet by module surgery.

No UNet code is forked: the stock blocks run unchanged on frames folded into the batch,
``(batch*frames, C, H, W)``, and three swaps make them frame-aware (see :func:`inflate_unet`).
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from depthvid.errors import UserError
from depthvid.models.attention import PerFrameAttnProcessor, SparseCausalAttnProcessor, VideoTransformerBlock
from depthvid.models.recompute import selective_checkpoint
from depthvid.ops import GroupNormSiLU, pseudo3d_conv
from depthvid.ops.pseudo3d_conv import fold_frames, unfold_frames


def as_video(x: torch.Tensor) -> torch.Tensor:
    """(B*F, C, H, W) -> (1, C, B*F, H, W): a view, no copy; the ops read it through its strides.

    A 1x3x3 conv and per-frame GroupNorm never mix frames, so the folded batch can be passed as
    one video of B*F frames and no frame count is needed.
    """
    return x.transpose(0, 1).unsqueeze(0)


class PseudoConv3d(nn.Conv2d):
    """A 3x3 ``nn.Conv2d`` run as a 1x3x3 video conv through :func:`depthvid.ops.pseudo3d_conv`.

    Shares its ``weight``/``bias`` Parameters with the conv it replaces and stays an
    ``nn.Conv2d`` for diffusers code that checks the type.
    x: (batch*frames, C_in, H, W) -> (batch*frames, C_out, H_out, W_out).
    """

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "PseudoConv3d":
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
            device="meta",  # placeholders only; the original Parameters are attached below
        )
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def video_conv(self, video: torch.Tensor, **fused) -> torch.Tensor:
        """The conv on a (B, C, F, H, W) video, with pseudo3d_conv's fused extras."""
        return pseudo3d_conv(video, self.weight, self.bias, self.stride[0], self.padding[0], backend=None, **fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.video_conv(as_video(x))[0].transpose(0, 1)  # (1, C_out, B*F, H', W') -> (B*F, ...)


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` with each half as one fused :func:`depthvid.ops.pseudo3d_conv`.

    ``norm1 -> SiLU -> conv1 -> + time embedding`` and ``norm2 -> SiLU -> conv2 -> + shortcut ->
    / output_scale_factor`` become two calls with a GroupNorm+SiLU prologue and a temb / residual
    epilogue: the same math, but the Triton backend never writes the normalised activations to
    memory nor keeps them for backward. Only ``forward`` differs from the stock block, so
    :func:`inflate_unet` switches a block's class in place: same Parameters, same state-dict names.
    """

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        if self.training and self.dropout.p > 0:  # dropout sits between norm2 and conv2
            return super().forward(input_tensor, temb)
        time_bias = None
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            time_bias = self.time_emb_proj(temb).unsqueeze(0)  # (B*F, C_out) -> (1, B*F, C_out)
        hidden = self.conv1.video_conv(as_video(input_tensor), norm=_group_norm_silu(self.norm1), temb=time_bias)
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        out = self.conv2.video_conv(
            hidden, norm=_group_norm_silu(self.norm2), residual=as_video(shortcut), output_scale=self.output_scale_factor
        )
        return out[0].transpose(0, 1)


def _group_norm_silu(norm: nn.GroupNorm) -> GroupNormSiLU:
    return GroupNormSiLU(norm.num_groups, norm.weight, norm.bias, norm.eps)


def can_fuse(module: nn.Module) -> bool:
    """True for a stock ``ResnetBlock2D`` whose halves are GroupNorm -> SiLU -> PseudoConv3d."""
    return (
        type(module) is ResnetBlock2D
        and module.time_embedding_norm == "default"
        and module.upsample is None
        and module.downsample is None
        and isinstance(module.nonlinearity, nn.SiLU)
        and all(type(norm) is nn.GroupNorm and norm.affine for norm in (module.norm1, module.norm2))
        and all(isinstance(conv, PseudoConv3d) for conv in (module.conv1, module.conv2))
    )


def is_pseudo3d_candidate(module: nn.Module) -> bool:
    """True for a plain square 3x3 ``nn.Conv2d`` that :class:`PseudoConv3d` can replace."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (3, 3)
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
        and module.padding[0] == module.padding[1]
        and module.stride[0] == module.stride[1]
    )


def _swap_modules(root: nn.Module, predicate, make) -> int:
    """Replace every submodule of ``root`` for which ``predicate`` holds by ``make(module)``."""
    targets = [(name, module) for name, module in root.named_modules() if predicate(module)]
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        setattr(root.get_submodule(parent_name), child_name, make(module))
    return len(targets)


class VideoUNet(nn.Module):
    """A surgically inflated ``UNet2DConditionModel`` that takes videos.

    Attributes:
        unet: the modified ``UNet2DConditionModel`` (frames folded into its batch).
        config: ``unet.config``.
        inflation: the flags :func:`inflate_unet` was called with.

    The frame count is a property of the input: a model tuned on 8 frames runs on 24.
    """

    def __init__(self, unet: UNet2DConditionModel, inflation: dict[str, bool]):
        super().__init__()
        self.unet = unet
        self.inflation = dict(inflation)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def enable_gradient_checkpointing(self, selective: bool = True) -> None:
        """Recompute activations in backward (diffusers' own checkpointing of the inner UNet).

        Each ``VideoTransformerBlock`` sits in its ``Transformer2DModel``'s block list, so its
        temporal attention is inside the checkpointed region with the spatial block. ``selective``
        keeps the outputs of attention and 3x3 convs (:mod:`depthvid.models.recompute`); False
        recomputes everything.
        """
        self.unet.enable_gradient_checkpointing(selective_checkpoint if selective else None)

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Predict the UNet's output (noise or v) for every frame.

        Args:
            sample: (batch, in_channels, frames, height, width) — for SD2-depth, 4 latent
                channels followed by the depth channel.
            timestep: an int, a 0-d tensor, or a (batch,) tensor; repeated for every frame.
            encoder_hidden_states: (batch, tokens, cross_attention_dim); repeated for every frame.

        Returns:
            (batch, out_channels, frames, height, width).
        """
        in_channels = self.config.in_channels
        if sample.dim() != 5:
            raise UserError(
                f"sample: expected (batch, {in_channels}, frames, height, width), got {tuple(sample.shape)}; "
                "stack the frames on dim 2"
            )
        if sample.shape[1] != in_channels:
            raise UserError(
                f"sample: expected {in_channels} channels on dim 1, got {tuple(sample.shape)}; "
                "SD2-depth takes the 4 latent channels followed by the depth map"
            )
        batch, _, num_frames = sample.shape[:3]
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch:
            raise UserError(
                f"encoder_hidden_states: expected (batch={batch}, tokens, dim), "
                f"got {tuple(encoder_hidden_states.shape)}; pass one text embedding per video"
            )
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch * num_frames)
        elif timesteps.shape == (batch,):
            timesteps = timesteps.repeat_interleave(num_frames)  # (B,) -> (B*F,), row = b*F + f
        else:
            raise UserError(
                f"timestep: expected an int, a 0-d tensor or shape ({batch},), got shape {tuple(timesteps.shape)}"
            )

        out = self.unet(
            fold_frames(sample),  # (B, C, F, H, W) -> (B*F, C, H, W)
            timesteps,
            encoder_hidden_states=encoder_hidden_states.repeat_interleave(num_frames, dim=0),  # (B*F, L, D)
            cross_attention_kwargs={"num_frames": num_frames},
            return_dict=False,
        )[0]
        return unfold_frames(out, num_frames)  # (B*F, C, H, W) -> (B, C, F, H, W)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.inflation.items())


def inflate_unet(
    unet: UNet2DConditionModel, *, sparse_causal: bool = True, temporal: bool = True, pseudo3d: bool = True
) -> VideoUNet:
    """Turn a 2D ``UNet2DConditionModel`` into a :class:`VideoUNet`, in place, reusing every weight.

    Args:
        unet: any ``UNet2DConditionModel`` (SD2-depth, SD1.x, ...); it is modified in place and
            becomes ``VideoUNet.unet`` (deep-copy it first to keep the 2D model).
        sparse_causal: ``attn1`` of every ``BasicTransformerBlock`` gets a
            :class:`SparseCausalAttnProcessor` (frame f attends to frames 0 and f-1). Blocks
            whose ``attn1`` is cross attention (``only_cross_attention``) are left per-frame.
        temporal: every ``BasicTransformerBlock`` becomes a :class:`VideoTransformerBlock`,
            adding a temporal attention whose output projection starts at zero.
        pseudo3d: every plain 3x3 ``nn.Conv2d`` (resnets, samplers, conv_in, conv_out) becomes a
            :class:`PseudoConv3d` sharing its weights; 1x1 convs are untouched. Stock
            ``ResnetBlock2D``s then run as :class:`FusedResnetBlock2D` (same math, fused ops).

    Every other attention (cross attention included) gets a :class:`PerFrameAttnProcessor`
    around its stock processor, so the ``num_frames`` that ``VideoUNet`` passes is accepted.

    ResNet GroupNorm statistics stay per frame, exactly as in the image model (Tune-A-Video
    shares them across the clip; that is not offered). Together with the zero-initialised
    temporal attention, this makes the freshly inflated model equal to the 2D model on every
    frame of a video whose frames are identical; on other videos only ``attn1`` differs (frame
    0 still matches). Do not call ``unet.set_attn_processor`` afterwards: it would replace the
    video processors.

    Returns:
        a ``VideoUNet`` taking (batch, C_in, frames, H, W) samples.
    """
    if not isinstance(unet, UNet2DConditionModel):
        raise UserError(f"unet: expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    if any(isinstance(m, (VideoTransformerBlock, PseudoConv3d)) for m in unet.modules()):
        raise UserError("unet: is already inflated; inflate a fresh UNet2DConditionModel")

    sparse_attn1 = set()
    if sparse_causal:
        blocks = (m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
        sparse_attn1 = {id(block.attn1) for block in blocks if not block.only_cross_attention}
    for module in unet.modules():
        if isinstance(module, Attention):
            if id(module) in sparse_attn1:
                module.set_processor(SparseCausalAttnProcessor())
            else:
                module.set_processor(PerFrameAttnProcessor(module.processor))

    if temporal:
        _swap_modules(unet, lambda m: isinstance(m, BasicTransformerBlock), VideoTransformerBlock)
    if pseudo3d:
        _swap_modules(unet, is_pseudo3d_candidate, PseudoConv3d.from_conv2d)
        for module in unet.modules():
            if can_fuse(module):
                module.__class__ = FusedResnetBlock2D  # only forward differs: same Parameters and names
    return VideoUNet(unet, {"sparse_causal": sparse_causal, "temporal": temporal, "pseudo3d": pseudo3d})


def trainable_parameters(video_unet: VideoUNet) -> dict[str, nn.Parameter]:
    """The tuned set, by ``video_unet.named_parameters()`` name: attn1.to_q, attn2.to_q, attn_temp, norm_temp.

    Independent of the current ``requires_grad`` flags.
    """
    modules: list[nn.Module] = []
    for module in video_unet.modules():
        if isinstance(module, BasicTransformerBlock):
            modules.append(module.attn1.to_q)
            if module.attn2 is not None:
                modules.append(module.attn2.to_q)
        elif isinstance(module, VideoTransformerBlock):
            modules += [module.attn_temp, module.norm_temp]
    wanted = {id(p) for module in modules for p in module.parameters()}
    return {name: p for name, p in video_unet.named_parameters() if id(p) in wanted}


def mark_trainable(video_unet: VideoUNet) -> int:
    """Freeze everything, then unfreeze exactly :func:`trainable_parameters`; return its element count."""
    video_unet.requires_grad_(False)
    params = trainable_parameters(video_unet)
    for p in params.values():
        p.requires_grad_(True)
    return sum(p.numel() for p in params.values())


def trainable_state_dict(video_unet: VideoUNet) -> dict[str, torch.Tensor]:
    """Detached tensors of the trainable set, keyed like ``video_unet.state_dict()``."""
    return {name: p.detach() for name, p in trainable_parameters(video_unet).items()}
