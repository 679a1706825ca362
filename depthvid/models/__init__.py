"""The video UNet: surgery on a stock diffusers UNet2DConditionModel, and its tuned-weights adapter."""
from depthvid.models.adapter import config_hash, load_adapter, save_adapter
from depthvid.models.attention import (
    PerFrameAttnProcessor,
    SparseCausalAttnProcessor,
    TemporalAttnProcessor,
    VideoTransformerBlock,
)
from depthvid.models.video_unet import (
    FusedResnetBlock2D,
    PseudoConv3d,
    VideoUNet,
    inflate_unet,
    mark_trainable,
    trainable_parameters,
    trainable_state_dict,
)

__all__ = [
    "FusedResnetBlock2D",
    "PerFrameAttnProcessor",
    "PseudoConv3d",
    "SparseCausalAttnProcessor",
    "TemporalAttnProcessor",
    "VideoTransformerBlock",
    "VideoUNet",
    "config_hash",
    "inflate_unet",
    "load_adapter",
    "mark_trainable",
    "save_adapter",
    "trainable_parameters",
    "trainable_state_dict",
]
