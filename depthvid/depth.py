"""Depth maps for the UNet's fifth input channel: estimated with DPT, or read from a depth video.

Depth here means DPT's output: relative inverse depth, large (bright) for near things. The UNet
takes it at latent size, scaled to [-1, 1]. diffusers scales every image on its own; for a video we
default to one scale for the whole clip, so that depth does not flicker from frame to frame.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from depthvid.errors import UserError
from depthvid.video import load_video, resize_and_crop, write_video

NORMALIZE_MODES = ("clip", "frame")


def _check_normalize(mode) -> None:
    if mode not in NORMALIZE_MODES:
        raise UserError(
            f"--depth-normalize {mode!r}: must be 'clip' (one scale for the whole video, no "
            "flicker) or 'frame' (each frame on its own, like diffusers)"
        )


def _check_size(name: str, size) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                   for s in size)
    ):
        raise UserError(f"{name}: expected (height, width), two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def normalize_depth(depth: torch.Tensor, mode: str = "clip") -> torch.Tensor:
    """Scale depth to [-1, 1]: ``2 * (d - min) / (max - min) - 1``.

    Args:
        depth: (F, 1, h, w), any range.
        mode: "clip" takes min and max over the whole clip (its nearest point is 1 and its farthest
            -1, frames keep their relative scale); "frame" takes them per frame (every frame spans
            [-1, 1], like diffusers' depth2img).

    Returns:
        (F, 1, h, w) in [-1, 1]; wherever max == min (constant depth) the result is 0.
    """
    _check_normalize(mode)
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise UserError(f"depth: expected (F, 1, h, w), got {tuple(depth.shape)}")
    dims = (0, 1, 2, 3) if mode == "clip" else (1, 2, 3)
    low = depth.amin(dim=dims, keepdim=True)
    high = depth.amax(dim=dims, keepdim=True)
    span = high - low
    # A span that is rounding noise relative to the values is treated as constant depth.
    eps = torch.finfo(depth.dtype).eps * torch.maximum(low.abs(), high.abs()).clamp(min=1.0)
    flat = span <= eps
    scaled = 2.0 * (depth - low) / torch.where(flat, torch.ones_like(span), span) - 1.0
    return torch.where(flat, torch.zeros_like(scaled), scaled)


def estimate_depth(
    depth_estimator,
    feature_extractor,
    frames: torch.Tensor,
    latent_size,
    normalize: str = "clip",
    *,
    batch_size: int = 4,
) -> torch.Tensor:
    """Run DPT on every frame and bring its depth to latent size, like diffusers' depth2img.

    Args:
        depth_estimator: a ``DPTForDepthEstimation`` (the pipeline's ``depth_estimator``). It runs
            in float32 and eval mode on its own device (DPT-Hybrid's batch norm misbehaves in
            fp16); a half-precision model is cast for the call and cast back.
        feature_extractor: the pipeline's ``DPTImageProcessor`` (resizes and normalises).
        frames: (F, 3, H, W) float in [0, 1].
        latent_size: (h, w), usually (H // 8, W // 8).
        normalize: "clip" or "frame", see ``normalize_depth``.
        batch_size: frames per DPT forward.

    Returns:
        depth: (F, 1, h, w) float32 in [-1, 1] on the estimator's device.
    """
    from PIL import Image

    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise UserError(f"frames: expected (F, 3, H, W) float in [0, 1], got {shape}")
    latent_size = _check_size("latent_size", latent_size)
    _check_normalize(normalize)

    parameter = next(depth_estimator.parameters())
    device, dtype, was_training = parameter.device, parameter.dtype, depth_estimator.training
    # The processor is fed what diffusers' pipeline usually gets: 8-bit RGB images.
    images = [Image.fromarray(a) for a in _to_uint8_hwc(frames)]
    chunks = []
    try:
        depth_estimator.to(torch.float32).eval()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                pixel_values = feature_extractor(
                    images=images[i : i + batch_size], return_tensors="pt"
                ).pixel_values
                predicted = depth_estimator(
                    pixel_values=pixel_values.to(device, torch.float32)
                ).predicted_depth  # (n, h_dpt, w_dpt)
                chunks.append(
                    F.interpolate(
                        predicted[:, None], size=latent_size, mode="bicubic", align_corners=False
                    )
                )
    finally:
        depth_estimator.to(dtype).train(was_training)
    return normalize_depth(torch.cat(chunks), normalize)


def _to_uint8_hwc(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) float in [0, 1] -> (F, H, W, 3) uint8."""
    array = frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def load_depth_video(
    path,
    num_frames: int | None,
    latent_size,
    *,
    sample: str = "uniform",
    start: int = 0,
    stride: int = 1,
    normalize: str = "clip",
    invert: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Read a precomputed depth video instead of running DPT.

    Frames are gray, near = bright (like DPT's inverse depth; ``invert=True`` for near = dark).
    Give the same ``num_frames``/``sample``/``start``/``stride`` as for the source video so frame i
    matches frame i; frames are scaled to cover ``latent_size`` and center-cropped, the same
    geometry ``load_video`` applies to the source.

    Returns:
        depth: (F, 1, h, w) float32 in [-1, 1] at latent_size (h, w).
    """
    latent_size = _check_size("latent_size", latent_size)
    _check_normalize(normalize)
    frames = load_video(
        path, num_frames, None, None, sample=sample, start=start, stride=stride, backend=backend
    )
    gray = frames.mean(dim=1, keepdim=True)  # (F, 3, H, W) -> (F, 1, H, W)
    if invert:
        gray = 1.0 - gray
    depth = torch.stack([resize_and_crop(frame, *latent_size) for frame in gray])
    return normalize_depth(depth, normalize)


def depth_to_frames(depth: torch.Tensor) -> torch.Tensor:
    """Depth (F, 1, h, w) in [-1, 1] -> gray frames (F, 3, h, w) in [0, 1], near = white."""
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise UserError(f"depth: expected (F, 1, h, w), got {tuple(depth.shape)}")
    return ((depth.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).expand(-1, 3, -1, -1)


def export_depth_video(depth: torch.Tensor, path, size=None, fps: float = 8) -> Path:
    """Write depth (F, 1, h, w) in [-1, 1] as a gray video (mp4/gif/PNG folder, see write_video).

    ``size``: (H, W) to upscale to (e.g. the source frames' size), or None for latent size.
    Returns the path written.
    """
    frames = depth_to_frames(depth)
    if size is not None:
        size = _check_size("size", size)
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    return write_video(frames.clamp(0.0, 1.0), path, fps=fps)
