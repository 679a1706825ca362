"""Benchmark: frame parallelism on CPU (gloo) — time per UNet pass, peak memory per rank, bytes moved.

Run: .venv/bin/python benchmarks/bench_frame_parallel.py            (prints the README table)
     .venv/bin/pytest benchmarks/bench_frame_parallel.py --benchmark-enable

For N = 1, 2, 4 ranks (one thread each) and several frame counts, an SD2-depth-shaped video UNet
at 1/4 width on 128x128 frames (16x16 latents) runs
  - an edit pass: one forward without gradients (what DDIM inversion/sampling call 2x50 times),
  - a tuning pass: training_loss forward + backward through the trainable set,
on each rank's frame window, and reports per rank the seconds per pass, how far the tuning pass
raised the peak RSS above the built model's, and the bytes each rank sent through all_to_all
(counted from the split sizes, i.e. computed from the shapes: see benchmarks/README.md).
Ranks meet through a FileStore: nothing listens on a port.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from depthvid.testing import SD2_DEPTH_UNET_CONFIG, SD2_SCHEDULER_CONFIG

RANKS = (1, 2, 4)
FRAME_COUNTS = (8, 16, 32)
LATENT_SIZE, TEXT_TOKENS, TEXT_DIM = 16, 77, 1024
QUARTER_WIDTH_SD2_DEPTH = dict(
    SD2_DEPTH_UNET_CONFIG,
    sample_size=LATENT_SIZE,
    block_out_channels=tuple(channels // 4 for channels in SD2_DEPTH_UNET_CONFIG["block_out_channels"]),
    norm_num_groups=16,
)


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024


def _rank_main(rank: int, world: int, init_file: str, frame_counts, out_file: str) -> None:
    torch.set_num_threads(1)
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from depthvid.models import inflate_unet, mark_trainable
    from depthvid.parallel import FrameSplit, shard_video_unet
    from depthvid.parallel import collectives
    from depthvid.tuning import training_loss

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sent = [0]
    exchange = collectives._exchange

    def counting_exchange(send, send_counts, recv_counts, group):
        rows = sum(count for dest, count in enumerate(send_counts) if dest != rank)
        sent[0] += rows * send[0].numel() * send.element_size() if send.shape[0] else 0
        return exchange(send, send_counts, recv_counts, group)

    collectives._exchange = counting_exchange
    torch.manual_seed(0)
    video_unet = inflate_unet(UNet2DConditionModel(**QUARTER_WIDTH_SD2_DEPTH))
    mark_trainable(video_unet)
    scheduler = DDIMScheduler(**SD2_SCHEDULER_CONFIG)
    baseline = _peak_rss()
    results = []
    for frames in frame_counts:
        split = FrameSplit(frames, rank, world)
        shard_video_unet(video_unet, split)
        generator = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(1, 4, frames, LATENT_SIZE, LATENT_SIZE, generator=generator),
                 "depth": torch.rand(1, 1, frames, LATENT_SIZE, LATENT_SIZE, generator=generator),
                 "prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator)}
        sample = split.shard(torch.cat([batch["latents"], batch["depth"]], dim=1))

        def edit_pass():
            with torch.no_grad():
                video_unet(sample, 500, batch["prompt_embeds"])

        def tune_pass():
            video_unet.zero_grad(set_to_none=True)
            loss, _, _ = training_loss(video_unet, scheduler, batch, generator, 0.01, split)
            loss.backward()
            split.all_reduce_grads(p for p in video_unet.parameters() if p.requires_grad)

        timings = {}
        for name, run in (("edit", edit_pass), ("tune", tune_pass)):
            run()  # warm-up
            sent[0] = 0
            split.barrier()
            started = time.perf_counter()
            run()
            split.barrier()
            timings[name] = (time.perf_counter() - started, sent[0])
        results.append({"ranks": world, "rank": rank, "frames": frames, "window": len(split.window),
                        "edit_seconds": timings["edit"][0], "tune_seconds": timings["tune"][0],
                        "edit_bytes_sent": timings["edit"][1], "tune_bytes_sent": timings["tune"][1],
                        "tune_peak_bytes": _peak_rss() - baseline})
    with open(f"{out_file}.{rank}", "w") as handle:
        json.dump(results, handle)
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, frame_counts=FRAME_COUNTS) -> list[dict]:
    """Per-rank results of ``world`` ranks for each frame count (fresh processes)."""
    with tempfile.TemporaryDirectory() as folder:
        out_file = os.path.join(folder, "results")
        mp.spawn(_rank_main, args=(world, os.path.join(folder, "rendezvous"), frame_counts, out_file),
                 nprocs=world, join=True)
        return [row for rank in range(world) for row in json.load(open(f"{out_file}.{rank}"))]


def table(rows: list[dict]) -> str:
    """Markdown: one line per (ranks, frames), the slowest rank's time and the largest rank's memory."""
    lines = ["| ranks | frames | window | edit pass s | tune pass s | tune peak MB/rank | sent MB/rank edit | sent MB/rank tune |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["ranks"], r["frames"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for ranks, frames in keys:
        group = [r for r in rows if r["ranks"] == ranks and r["frames"] == frames]
        lines.append(
            f"| {ranks} | {frames} | {max(r['window'] for r in group)} "
            f"| {max(r['edit_seconds'] for r in group):.2f} | {max(r['tune_seconds'] for r in group):.2f} "
            f"| {max(r['tune_peak_bytes'] for r in group) / 2**20:.0f} "
            f"| {max(r['edit_bytes_sent'] for r in group) / 2**20:.2f} | {max(r['tune_bytes_sent'] for r in group) / 2**20:.2f} |"
        )
    return "\n".join(lines)


def test_frame_parallel_memory_per_rank_falls_with_ranks(benchmark):
    rows = benchmark.pedantic(lambda: [row for world in RANKS for row in measure(world, (FRAME_COUNTS[-1],))],
                              rounds=1, iterations=1)
    peak = {world: max(r["tune_peak_bytes"] for r in rows if r["ranks"] == world) for world in RANKS}
    seconds = {world: max(r["tune_seconds"] for r in rows if r["ranks"] == world) for world in RANKS}
    benchmark.extra_info.update({f"peak_MB_{w}_ranks": peak[w] / 2**20 for w in RANKS})
    benchmark.extra_info.update({f"tune_seconds_{w}_ranks": seconds[w] for w in RANKS})
    assert peak[4] < peak[2] < peak[1]


if __name__ == "__main__":
    all_rows = [row for world in RANKS for row in measure(world)]
    print(table(all_rows))
    print(json.dumps(all_rows), file=sys.stderr)
