"""Editing k = 1 and k = 4 prompts: one DDIM inversion shared by all prompts against one per prompt.

    pytest benchmarks/bench_editing.py --benchmark-only

  per-prompt        for each prompt in turn: DDIM-invert the clip, sample, decode (one edit run per
                    prompt, as Tune-A-Video edits)
  one-inversion     invert once, sample the k prompts as one batch, decode them (`depthvid edit`
                    with k prompts); for k = 1 it is the same work as per-prompt, so not repeated
  cached-inversion  the inverted latents read from the run's cache (a later `depthvid edit`)
The real code path: depthvid.editing.ddim_invert / ddim_sample (guidance 12.5) and
depthvid.loading.decode_latents, at EDIT_SCALE with EDIT_STEPS DDIM steps: 50 on CUDA, 3 on CPU,
where the ratios change little with the step count (all UNet work scales with it; only the
decode, the same in every implementation, does not: it pulls the ratios towards 1). Report.py
gives one-inversion / per-prompt for k = 4: target <= 0.75, which is what counting UNet
evaluations alone gives, (1 + 2k) / 3k with k = 4.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from depthvid.editing import ddim_invert, ddim_sample, default_videos_per_call
from depthvid.loading import decode_latents
from depthvid.tuning import autocast
from harness import (
    DEVICE,
    FRAMES,
    ON_CUDA,
    PIPELINE_SCALE,
    SCALE_CHOSEN,
    PipelineScale,
    build_scheduler,
    build_text_encoder,
    build_vae,
    build_video_unet,
    caption_ids,
    encode_caption,
    encode_clip,
    make_clip,
    run_benchmark,
)

# the model of the other pipeline benchmarks (harness.PIPELINE_SCALE), on CPU at 128x128: three
# rounds of the five cases below are ~300 UNet evaluations (batch-1 equivalents) at 3 steps
EDIT_SCALE = PIPELINE_SCALE if ON_CUDA or SCALE_CHOSEN else PipelineScale(
    "sd2-depth/4-width 8x128x128 fp32", 4, 128, FRAMES, torch.float32)
EDIT_STEPS = 50 if ON_CUDA else 3
GUIDANCE = 12.5
_per_prompt_videos: dict[int, torch.Tensor] = {}  # k -> per-prompt's videos, which the others must equal
CASES = [(1, "per-prompt"), (1, "cached-inversion"), (4, "per-prompt"), (4, "one-inversion"), (4, "cached-inversion")]


@pytest.fixture(scope="module")
def edit_inputs():
    """The tuned model stand-in (a freshly inflated UNet), VAE, clip latents, depth and embeddings."""
    scale = EDIT_SCALE
    vae, text_encoder = build_vae(scale), build_text_encoder()
    video_unet = build_video_unet(scale).eval().requires_grad_(False)
    if ON_CUDA:
        video_unet.to(scale.dtype)
    embeds = encode_caption(text_encoder, caption_ids(5), torch.float32)  # 4 prompts + the empty one
    del text_encoder
    inputs = SimpleNamespace(
        video_unet=video_unet,
        vae=vae,
        scheduler_config=build_scheduler().config,
        latents=encode_clip(vae, make_clip(scale), torch.float32),
        depth=torch.rand(1, 1, scale.frames, scale.latent_size, scale.latent_size, device=DEVICE) * 2 - 1,
        prompts=embeds[:4],
        empty=embeds[4:],
    )
    make_edit(inputs, inputs.prompts[:1], inputs.latents)()  # warm-up: one sampling step and a decode
    return inputs


def make_edit(inputs, prompts: torch.Tensor, inversion: torch.Tensor | None):
    """One `depthvid edit`: invert (unless ``inversion`` is given), sample every prompt, decode.

    Returns the decoded videos (P, F, 3, H, W).
    """
    def edit():
        with autocast(DEVICE, EDIT_SCALE.dtype):
            noise = inversion
            if noise is None:
                noise = ddim_invert(inputs.video_unet, inputs.scheduler_config, inputs.latents, inputs.depth,
                                    inputs.empty, EDIT_STEPS, progress=False)
            latents = ddim_sample(inputs.video_unet, inputs.scheduler_config, noise, inputs.depth, prompts,
                                  inputs.empty, EDIT_STEPS, GUIDANCE, progress=False,
                                  videos_per_call=default_videos_per_call(DEVICE))
        return decode_latents(SimpleNamespace(vae=inputs.vae), latents)

    return edit


@pytest.mark.parametrize(("prompts", "implementation"), CASES, ids=[f"k{k}-{name}" for k, name in CASES])
def test_editing(benchmark, edit_inputs, prompts, implementation):
    inputs, embeds = edit_inputs, edit_inputs.prompts[:prompts]
    if implementation == "per-prompt":
        edits = [make_edit(inputs, embeds[i : i + 1], None) for i in range(prompts)]

        def run():
            return torch.cat([edit() for edit in edits])
    else:
        inversion = None
        if implementation == "cached-inversion":
            with autocast(DEVICE, EDIT_SCALE.dtype):
                inversion = ddim_invert(inputs.video_unet, inputs.scheduler_config, inputs.latents, inputs.depth,
                                        inputs.empty, EDIT_STEPS, progress=False)
        run = make_edit(inputs, embeds, inversion)

    benchmark.group = f"editing k={prompts} {EDIT_SCALE.label} {EDIT_STEPS} steps"
    # the fixture warmed the model up; every case is long enough for its first call to count
    videos, _ = run_benchmark(benchmark, run, budget_s=0.0, min_rounds=3, warm_up=False)
    assert videos.shape == (prompts, EDIT_SCALE.frames, 3, EDIT_SCALE.size, EDIT_SCALE.size)
    assert torch.isfinite(videos).all(), f"{implementation}: the edit is not finite"
    if implementation == "per-prompt":
        _per_prompt_videos[prompts] = videos
    elif prompts in _per_prompt_videos:  # batching the prompts must not change any edit
        torch.testing.assert_close(videos, _per_prompt_videos[prompts], atol=2e-3, rtol=0)
    benchmark.extra_info.update(
        op="editing",
        case=f"k={prompts} {EDIT_SCALE.label} {EDIT_STEPS} steps",
        implementation=implementation,
        ours=implementation != "per-prompt",
        device=str(DEVICE),
        prompts=prompts,
        steps=EDIT_STEPS,
    )
