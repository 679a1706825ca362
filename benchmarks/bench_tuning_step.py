"""Benchmark: one tuning step of an SD2-depth-shaped video UNet on CPU, against the same model
with its attention materialised the way Tune-A-Video computes it.

Run: .venv/bin/pytest benchmarks/bench_tuning_step.py --benchmark-enable   (a few minutes, CPU)

The peer figures in DESIGN.md (Tune-A-Video's own code on this kind of machine, fp32, gradient
checkpointing on): 10.7 s and 2.0 GB peak RSS for one step at 1/4 of SD2-depth's width with
8 frames of 256x256; 280 s and 22.8 GB at full size and 512x512. This benchmark builds that 1/4
width model and times a step (noise-prediction + temporal loss, backward through the trainable
set, gradient checkpointing on) for each variant:

  depthvid       our VideoUNet as `depthvid tune` runs it on CPU (fp32)
  depthvid-bf16  the same under bf16 autocast (`depthvid tune --precision bf16`)
  materialised   the same model whose sparse-causal and temporal attention build explicit score
                 matrices, with frame 0's keys duplicated for frames 0 and 1 (Tune-A-Video's way)

Peak memory is per process, so each variant also runs in a subprocess (this file as a script)
that reports how far one step raises the peak RSS above the built model's. The memory test
asserts depthvid's step needs less than the materialised one's; times are recorded as ratios.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import pytest
import torch

from depthvid.models import SparseCausalAttnProcessor, TemporalAttnProcessor, inflate_unet, mark_trainable
from depthvid.testing import SD2_DEPTH_UNET_CONFIG, SD2_SCHEDULER_CONFIG
from depthvid.tuning import training_loss

FRAMES, LATENT_SIZE, TEXT_TOKENS, TEXT_DIM = 8, 32, 77, 1024  # 8 frames of 256x256
QUARTER_WIDTH_SD2_DEPTH = dict(  # SD2-depth's UNet at 1/4 of its channels
    SD2_DEPTH_UNET_CONFIG,
    sample_size=LATENT_SIZE,
    block_out_channels=tuple(channels // 4 for channels in SD2_DEPTH_UNET_CONFIG["block_out_channels"]),
    norm_num_groups=16,  # 32 groups do not divide 80 channels; heads stay (5, 10, 20, 20): 16-dim at this width
)
VARIANTS = ("materialised", "depthvid", "depthvid-bf16")  # the reference first: the others report ratios to it


class MaterialisedSparseCausal(SparseCausalAttnProcessor):
    """Every frame f attends to cat(frame 0, frame max(f-1, 0)): 2N keys, an explicit (2N x N) score matrix."""

    def attend(self, query, key, value, num_frames, scale):
        previous = (torch.arange(num_frames) - 1).clamp(min=0)

        def per_frame_keys(t):  # (B*F, H, N, D) -> (B*F, H, 2N, D)
            t = t.unflatten(0, (-1, num_frames))
            return torch.cat([t[:, [0] * num_frames], t[:, previous]], dim=-2).flatten(0, 1)

        scores = query @ per_frame_keys(key).transpose(-1, -2) * scale
        return scores.softmax(dim=-1) @ per_frame_keys(value)


class MaterialisedTemporal(TemporalAttnProcessor):
    """Attention over frames through an explicit (F x F) score matrix per token."""

    def attend(self, query, key, value, num_frames, scale):
        def frames_last(t):  # (B*F, H, N, D) -> (B, H, N, F, D)
            return t.unflatten(0, (-1, num_frames)).permute(0, 2, 3, 1, 4)

        q, k, v = frames_last(query), frames_last(key), frames_last(value)
        out = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1) @ v
        return out.permute(0, 3, 1, 2, 4).flatten(0, 1)


def build(variant: str):
    """One tuning step of ``variant``'s freshly built, seeded model, as a no-argument callable."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    video_unet = inflate_unet(UNet2DConditionModel(**QUARTER_WIDTH_SD2_DEPTH))
    if variant == "materialised":
        for module in video_unet.modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, SparseCausalAttnProcessor):
                module.set_processor(MaterialisedSparseCausal())
            elif isinstance(processor, TemporalAttnProcessor):
                module.set_processor(MaterialisedTemporal())
    mark_trainable(video_unet)
    video_unet.enable_gradient_checkpointing()
    video_unet.train()
    scheduler = DDIMScheduler(**SD2_SCHEDULER_CONFIG)
    batch = {
        "latents": torch.randn(1, 4, FRAMES, LATENT_SIZE, LATENT_SIZE),
        "depth": torch.rand(1, 1, FRAMES, LATENT_SIZE, LATENT_SIZE) * 2 - 1,
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM),
    }
    dtype = torch.bfloat16 if variant == "depthvid-bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)

    def step():
        video_unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, _, _ = training_loss(video_unet, scheduler, batch, generator, temporal_weight=0.01)
        loss.backward()
        return loss.item()

    return step


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM on Linux (getrusage's ru_maxrss survives exec,
    so a child of a big pytest process would inherit the parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_in_subprocess(variant: str) -> dict:
    """{"step_peak_bytes", "seconds"} of one step of ``variant`` in a fresh process."""
    result = subprocess.run(
        [sys.executable, __file__, variant], capture_output=True, text=True, timeout=1800, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def step_times():
    return {}  # variant -> seconds per step, filled by test_tuning_step_speed


@pytest.mark.parametrize("variant", VARIANTS)
def test_tuning_step_speed(benchmark, variant, step_times):
    step = build(variant)
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
    step_times[variant] = benchmark.stats.stats.mean
    benchmark.extra_info["seconds_per_step"] = step_times[variant]
    if variant != "materialised" and "materialised" in step_times:
        benchmark.extra_info["speedup_vs_materialised"] = step_times["materialised"] / step_times[variant]


def test_tuning_step_peak_memory(benchmark):
    measured = {variant: measure_in_subprocess(variant) for variant in VARIANTS}
    reference = measured["materialised"]["step_peak_bytes"]
    for variant, numbers in measured.items():
        benchmark.extra_info[f"{variant}_step_peak_mb"] = numbers["step_peak_bytes"] / 2**20
        if variant != "materialised":
            benchmark.extra_info[f"{variant}_memory_ratio_vs_materialised"] = numbers["step_peak_bytes"] / reference
    benchmark.pedantic(lambda: None, rounds=1)  # the numbers are in extra_info; nothing to time here
    assert measured["depthvid"]["step_peak_bytes"] < reference


if __name__ == "__main__":
    step = build(sys.argv[1])
    baseline = peak_rss_bytes()  # the built model (and its 2D weights)
    started = time.perf_counter()
    step()
    seconds = time.perf_counter() - started
    print(json.dumps({"step_peak_bytes": peak_rss_bytes() - baseline, "seconds": seconds}))
