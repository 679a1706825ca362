"""One tuning step: depthvid's tuner against a Tune-A-Video-style step, same model, same run.

    pytest benchmarks/bench_tuning_step.py --benchmark-only

  depthvid   the step of `depthvid tune`: noise-prediction + temporal loss on the clip's latents,
             depth and caption embedding computed once; our attention (the device's default
             backend); backward through the trainable set; AdamW
  tav-style  the same model, loss and optimizer, but every step VAE-encodes the clip and encodes
             the caption (Tune-A-Video's training loop), and sparse-causal / temporal attention
             build explicit score matrices (Tune-A-Video's default attention)

Scale (harness.PIPELINE_SCALE): on CPU an SD2-depth-shaped UNet and VAE at 1/4 width with SD2's
text encoder, 8 frames of 256x256, fp32; on CUDA the full SD2-depth architecture (random weights)
at 8 frames of 512x512 in fp16. Gradient checkpointing on in both. extra_info: peak_mb, the tensor
memory one step adds (weights and optimizer state excluded), and the loss. Report.py gives the
ratio depthvid / tav-style (target <= 0.5).
"""
from __future__ import annotations

import pytest
import torch

from baselines import use_tav_attention
from harness import (
    DEVICE,
    ON_CUDA,
    PIPELINE_SCALE,
    build_text_encoder,
    build_vae,
    build_video_unet,
    caption_ids,
    encode_caption,
    encode_clip,
    make_clip,
    make_tuner,
    peak_memory_bytes,
    run_benchmark,
)

VARIANTS = ("depthvid", "tav-style")


@pytest.fixture(scope="module")
def encoders():
    return build_vae(PIPELINE_SCALE), build_text_encoder()


def make_step(variant: str, vae, text_encoder):
    """A no-argument callable running one tuning step of ``variant``; returns the loss."""
    scale = PIPELINE_SCALE
    video_unet = build_video_unet(scale, seed=0)  # the same weights for both variants
    if variant == "tav-style":
        use_tav_attention(video_unet)
    tune_step = make_tuner(video_unet, scale)
    clip, ids = make_clip(scale), caption_ids()
    depth = torch.rand(1, 1, scale.frames, scale.latent_size, scale.latent_size, device=DEVICE) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    cached = {"latents": encode_clip(vae, clip, torch.float32), "depth": depth,
              "prompt_embeds": encode_caption(text_encoder, ids, torch.float32)}

    def step():
        if variant == "depthvid":
            return tune_step(cached, generator)
        batch = {"latents": encode_clip(vae, clip, scale.dtype), "depth": depth,
                 "prompt_embeds": encode_caption(text_encoder, ids, scale.dtype)}
        return tune_step(batch, generator)

    return step


@pytest.mark.parametrize("variant", VARIANTS)
def test_tuning_step(benchmark, variant, encoders):
    step = make_step(variant, *encoders)
    benchmark.group = f"tuning step {PIPELINE_SCALE.label}"
    loss, _ = run_benchmark(benchmark, step, budget_s=20.0 if not ON_CUDA else 10.0)
    assert torch.isfinite(loss), f"{variant}: the loss is {loss.item()}"
    benchmark.extra_info.update(
        op="tuning_step",
        case=PIPELINE_SCALE.label,
        implementation=variant,
        ours=variant == "depthvid",
        device=str(DEVICE),
        loss=loss.item(),
        peak_mb=peak_memory_bytes(step) / 2**20,  # a step after the first: the optimizer state exists
    )
