"""Past one process: frame parallelism for one long video, on torch.distributed.

Launched by torchrun (or accelerate launch), ``depthvid tune|edit`` split the frames of the video
over the ranks (gloo on CPU, NCCL on CUDA) and give the single-process result;
``depthvid batch`` (depthvid.batch) spreads whole jobs over the ranks instead.

``frames`` (windows, collectives) imports only torch; ``attention`` (the sharded model) imports
the models, so it is loaded on first use.
"""
from depthvid.parallel.frames import (
    FrameSplit,
    even_windows,
    frame_split,
    init_process_group,
    is_main_process,
    launched_world_size,
    single_process_frames,
)

__all__ = [
    "FrameSplit",
    "even_windows",
    "frame_split",
    "init_process_group",
    "is_main_process",
    "launched_world_size",
    "shard_video_unet",
    "single_process_frames",
]


def __getattr__(name):
    if name == "shard_video_unet":
        from depthvid.parallel.attention import shard_video_unet

        return shard_video_unet
    raise AttributeError(f"module 'depthvid.parallel' has no attribute {name!r}")
