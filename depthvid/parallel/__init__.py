"""Past one process: frame parallelism for one long video, on torch.distributed.

Launched by torchrun (or accelerate launch), ``depthvid tune|edit`` split the frames of the video
over the ranks (gloo on CPU, NCCL on CUDA) and give the single-process result;
``depthvid batch`` (depthvid.batch) spreads whole jobs over the ranks instead.
"""
from depthvid.parallel.attention import shard_video_unet
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
