"""Memory defaults chosen from the work's size and the machine's memory, not from the device type.

The estimate is deliberately simple: the activations a UNet keeps for backward grow with the frames
times the channel-pixels of its levels (channels x latent pixels, summed over the levels of
``block_out_channels``). The constants were measured on CPU in fp32 (peak RSS of one tuning step,
minus the built model) on SD2-depth's UNet at 1/4 width, 8 frames of 256x256: 1.16 GiB without
gradient checkpointing, 0.51 GiB with it. The same count predicts 18.6 GiB of activations at full
width and 8 x 512x512, where a step without checkpointing was measured to run out of memory at
21.5 GB (weights included).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import dataclass

import torch

# bytes kept for backward per (frame x channel x latent pixel of every level), per byte of the
# compute dtype: 1.165 GiB / (8 frames x 148,480 channel-pixels x 4 bytes) = 263 without
# checkpointing; checkpointing keeps block inputs plus one block being recomputed
SAVED_TENSORS_PER_CHANNEL_PIXEL = 263
# what a checkpointed step keeps, as shares of that estimate (measured the same way): full
# checkpointing 0.44 at 1/4 width (0.51 of 1.16 GiB) and 0.11 at paper scale, so the larger one;
# the outputs selective checkpointing keeps besides (depthvid.models.recompute): 0.04 at paper
# scale (0.69 GiB: 7.43 against 6.74 GiB peak), nothing at 1/4 width where no op is dear enough
CHECKPOINTED_SHARE = 0.44
KEPT_SHARE = 0.04
# the share of the available memory a tuning step may plan to use (the rest: allocator slack,
# the loaded modules' transients, the other processes' growth)
MEMORY_HEADROOM = 0.75


def channel_pixels(unet_config, height: int, width: int) -> int:
    """Sum over the UNet's levels of channels x latent pixels, for one frame of height x width."""
    latent_h, latent_w = height // 8, width // 8
    return sum(
        channels * max(latent_h >> level, 1) * max(latent_w >> level, 1)
        for level, channels in enumerate(unet_config["block_out_channels"])
    )


def activation_bytes(unet_config, frames: int, height: int, width: int, *, batch: int = 1,
                     dtype: torch.dtype = torch.float32) -> int:
    """Estimated bytes a tuning step keeps for backward without gradient checkpointing."""
    element = torch.finfo(dtype).bits // 8
    return batch * frames * channel_pixels(unet_config, height, width) * element * SAVED_TENSORS_PER_CHANNEL_PIXEL


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory this process can still take on ``device``: free GPU memory, or MemAvailable on Linux
    (physical memory elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class TuningPlan:
    gradient_checkpointing: bool
    selective: bool  # checkpointing may keep the outputs that are dear to recompute
    activation_bytes: int  # estimated without checkpointing
    budget_bytes: int  # MEMORY_HEADROOM x the memory available when the plan was made

    def checkpointing(self, on: bool | None = None) -> str:
        """"off", "selective" or "full": the plan's choice, or its kind of checkpointing when ``on``
        (a user's --gradient-checkpointing) decides whether to checkpoint."""
        on = self.gradient_checkpointing if on is None else on
        return ("selective" if self.selective else "full") if on else "off"


def tuning_plan(unet_config, frames: int, height: int, width: int, *, batch: int = 1,
                dtype: torch.dtype = torch.float32, available_bytes: int | None = None,
                device: torch.device | str = "cpu") -> TuningPlan:
    """Checkpoint gradients exactly when a step without it would not fit in the available memory,
    selectively (keeping attention and 3x3 conv outputs) where that still fits.

    Args:
        unet_config: the (2D) UNet's config; only ``block_out_channels`` is read.
        frames, height, width, batch: the work (pixels; latents are 8x smaller).
        dtype: the compute dtype (autocast's), which sets the activations' element size.
        available_bytes: memory left with the UNet loaded; default: measured on ``device`` now.
    """
    if available_bytes is None:
        available_bytes = available_memory_bytes(device)
    needed = activation_bytes(unet_config, frames, height, width, batch=batch, dtype=dtype)
    budget = int(MEMORY_HEADROOM * available_bytes)
    return TuningPlan(gradient_checkpointing=needed > budget,
                      selective=(CHECKPOINTED_SHARE + KEPT_SHARE) * needed <= budget,
                      activation_bytes=needed, budget_bytes=budget)


# glibc's mallopt parameter and the size from which every allocation gets its own mapping
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def return_freed_tensors_to_the_system() -> bool:
    """Make glibc give every allocation of 1 MiB or more its own mapping, unmapped when freed.

    By default glibc raises that threshold each time a large block is freed (up to 32 MiB), after
    which activations freed in backward stay in the heap and the next phase's tensors land beside
    them: peak RSS grows although the live tensors do not. Measured on a CPU tuning step of the
    1/4-width SD2-depth UNet (8 x 256x256, checkpointing): 0.47 GiB -> 0.27 GiB above the model.
    Process-wide and idempotent; returns False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
