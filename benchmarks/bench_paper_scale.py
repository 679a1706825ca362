"""Benchmark at paper scale: the full-size SD2-depth architecture (random weights), 8 frames of 512x512.

Not in CI (it needs ~6 GB of disk, up to ~12 GB of memory and several minutes per measurement).
Every measurement runs in a fresh process, one at a time, and reports its wall time, its CPU time
(user + system: steadier than wall time when other work shares the cores) and the whole process's
peak RSS (VmHWM):

  step   the model-only tuning step: inflated UNet, checkpointing as `depthvid tune` picks it,
         noise-prediction + temporal loss, backward, AdamW step (latents, depth, text given)
  tune   `depthvid tune CLIP --model FULL --steps 1` with default options (the whole CLI)
  edit   `depthvid edit RUN --prompt A --prompt B --steps 2` on that run
  flops  the model-only step's FLOPs, counted on the meta device (nothing allocated, seconds), and
         this machine's best fp32 GEMM rate: their quotient is a lower bound on the step's time

each for two formulations of the sparse-causal attention:

  depthvid  the torch backend on CPU: two flash-attention calls merged by log-sum-exp
  cpp       depthvid._C's CPU kernels for every op (step only: the CLI's --backend switches to the
            GPU rehearsal configuration)
  concat    Tune-A-Video's formulation: keys/values of frames 0 and f-1 concatenated (2N tokens)

Run:
  .venv/bin/python benchmarks/bench_paper_scale.py all [--model DIR] [--what step,tune,edit]
  .venv/bin/pytest benchmarks/bench_paper_scale.py --benchmark-enable   (with DEPTHVID_FULL_MODEL=DIR)
DIR defaults to ./.paper-scale/sd2-depth-full and is built on first use (save_full_size_pipeline).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRAMES, SIZE = 8, 512
VARIANTS = ("depthvid", "cpp", "concat")
CHECKPOINTING = ("selective", "full", "off")
DEFAULT_MODEL_DIR = Path(".paper-scale/sd2-depth-full")


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM), in GiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20


def cpu_seconds() -> float:
    """User + system CPU time of this process so far: on a shared machine, steadier than wall time."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def use_variant(variant: str) -> None:
    """Route the CPU torch backend of sparse-causal attention to ``variant``'s formulation."""
    from depthvid.ops import sparse_causal_attn

    if variant == "concat":
        sparse_causal_attn.sparse_causal_attention_torch = sparse_causal_attn.sparse_causal_attention_concat
    elif variant == "cpp":
        from depthvid.ops import _backend

        _backend._default_backend.set("cpp")  # what use_backend("cpp") does, for the rest of this process
    elif variant != "depthvid":
        raise SystemExit(f"variant {variant!r}: expected one of {VARIANTS}")


def ensure_model(model_dir: Path) -> Path:
    if not (model_dir / "model_index.json").is_file():
        from depthvid.testing import save_full_size_pipeline

        print(f"building the full-size random SD2-depth in {model_dir} (~5.5 GB)...", file=sys.stderr)
        save_full_size_pipeline(model_dir)
    return model_dir


def use_checkpoint(video_unet, checkpointing: str) -> None:
    """checkpointing: selective (what `depthvid tune` picks when it fits), full (recompute every
    op), or off."""
    if checkpointing not in CHECKPOINTING:
        raise SystemExit(f"checkpointing {checkpointing!r}: expected one of {CHECKPOINTING}")
    if checkpointing != "off":
        video_unet.enable_gradient_checkpointing(selective=checkpointing == "selective")


def model_step(model_dir: str, precision: str, checkpointing: str) -> dict:
    """One tuning step of the inflated full-size UNet on given latents (no VAE, DPT, text encoder)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from depthvid.memory import return_freed_tensors_to_the_system, tuning_plan
    from depthvid.models import inflate_unet, mark_trainable
    from depthvid.testing import SD2_SCHEDULER_CONFIG
    from depthvid.tuning import autocast, training_loss

    return_freed_tensors_to_the_system()  # as `depthvid tune` does
    latent = SIZE // 8
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    video_unet = inflate_unet(unet)
    mark_trainable(video_unet)
    plan = tuning_plan(video_unet.config, frames=FRAMES, height=SIZE, width=SIZE)
    if checkpointing == "auto":
        checkpointing = plan.checkpointing()
    use_checkpoint(video_unet, checkpointing)
    video_unet.train()
    params = [p for p in video_unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(1, 4, FRAMES, latent, latent, generator=generator),
        "depth": torch.rand(1, 1, FRAMES, latent, latent, generator=generator) * 2 - 1,
        "prompt_embeds": torch.randn(1, 77, video_unet.config.cross_attention_dim, generator=generator),
    }
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    scheduler = DDIMScheduler(**SD2_SCHEDULER_CONFIG)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    with autocast(torch.device("cpu"), dtype):
        loss, _, _ = training_loss(video_unet, scheduler, batch, generator, temporal_weight=0.01)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu_started,
            "loss": loss.item(), "checkpointing": checkpointing}


def gemm_rate(size: int = 4096, repeats: int = 3) -> float:
    """The best fp32 GFLOP/s of a size^3 torch.mm on this machine's threads (MKL on x86)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def step_flops(checkpointing: str = "selective") -> dict:
    """The model-only step's FLOPs (forward, recomputation, backward), counted on the meta device.

    Attention is counted as its matmuls (forward 2, backward 4 per score block), so this is a
    lower bound on the work a flash kernel does (it recomputes the scores in backward). On the meta
    device attention runs as those matmuls, which selective checkpointing recomputes where it
    would keep a flash kernel's output: its count is high by the attention's forward (1.74 TFLOP
    at paper scale).
    """
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from depthvid.models import inflate_unet, mark_trainable
    from depthvid.testing import SD2_DEPTH_UNET_CONFIG, SD2_SCHEDULER_CONFIG
    from depthvid.tuning import training_loss

    with torch.device("meta"):
        video_unet = inflate_unet(UNet2DConditionModel(**SD2_DEPTH_UNET_CONFIG))
    mark_trainable(video_unet)
    use_checkpoint(video_unet, checkpointing)
    video_unet.train()
    latent = SIZE // 8
    batch = {
        "latents": torch.empty(1, 4, FRAMES, latent, latent, device="meta"),
        "depth": torch.empty(1, 1, FRAMES, latent, latent, device="meta"),
        "prompt_embeds": torch.empty(1, 77, video_unet.config.cross_attention_dim, device="meta"),
    }
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = training_loss(video_unet, DDIMScheduler(**SD2_SCHEDULER_CONFIG), batch,
                                   torch.Generator().manual_seed(0), temporal_weight=0.01)
        loss.backward()
    by_op = {str(op): count / 1e12 for op, count in counter.get_flop_counts()["Global"].items()}
    return {"tflop": counter.get_total_flops() / 1e12, "tflop_by_op": by_op, "checkpointing": checkpointing}


def flops_bound(checkpointing: str) -> dict:
    """step_flops with this machine's GEMM rate: the step's time if every FLOP ran at that rate."""
    figures = step_flops(checkpointing)
    rate = gemm_rate()
    return {**figures, "gemm_gflops": rate, "bound_seconds": figures["tflop"] * 1e3 / rate}


def cli(argv: list[str]) -> dict:
    from depthvid.cli import main

    started, cpu_started = time.perf_counter(), cpu_seconds()
    status = main(argv)
    if status:
        raise SystemExit(f"depthvid {' '.join(argv)}: exit status {status}")
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu_started}


def measure(what: str, variant: str, model_dir: str, work_dir: str, precision: str, checkpointing: str) -> dict:
    """Run one measurement in this process; returns its figures with the process's peak RSS."""
    use_variant(variant)
    work = Path(work_dir)
    run_dir = work / f"run-{variant}"
    if what == "step":
        result = model_step(model_dir, precision, checkpointing)
    elif what == "tune":
        from depthvid.testing import make_sample_clip
        from depthvid.video import write_video

        clip = work / "clip.mp4"
        if not clip.exists():
            write_video(make_sample_clip(FRAMES, SIZE, SIZE), clip, fps=8)
        result = cli(["tune", str(clip), "--prompt", "a red ball bounces past a pillar", "-o", str(run_dir),
                      "--model", model_dir, "--steps", "1", "--frames", str(FRAMES), "--quiet"])
    elif what == "flops":
        if variant == "cpp":
            raise SystemExit("flops: depthvid._C's ops are opaque to the FLOP counter; count depthvid or concat")
        result = flops_bound(checkpointing if checkpointing != "auto" else "selective")
    elif what == "edit":
        result = cli(["edit", str(run_dir), "--prompt", "a blue ball", "--prompt", "a golden ball", "--steps", "2",
                      "-o", str(work / f"edit-{variant}.mp4"), "--quiet"])
    else:
        raise SystemExit(f"what {what!r}: expected step, tune, edit or flops")
    return {"what": what, "variant": variant, **result, "peak_rss_gb": peak_rss_gb()}


def measure_in_subprocess(what, variant, model_dir, work_dir, precision="fp32", checkpointing="auto") -> dict:
    command = [sys.executable, __file__, "one", what, variant, "--model", str(model_dir), "--work", str(work_dir),
               "--precision", precision, "--checkpointing", checkpointing]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        return {"what": what, "variant": variant, "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_all(model_dir: Path, whats: list[str], variants=VARIANTS, precision="fp32") -> list[dict]:
    if set(whats) != {"flops"}:
        ensure_model(model_dir)
    results = []
    with tempfile.TemporaryDirectory(prefix="depthvid-paper-scale-") as work:
        for variant in variants:  # one process at a time: the measurements are memory-bound
            for what in whats:
                result = measure_in_subprocess(what, variant, model_dir, work, precision)
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
    return results


def test_paper_scale(benchmark):
    import pytest

    model_dir = os.environ.get("DEPTHVID_FULL_MODEL")
    if not model_dir:
        pytest.skip("set DEPTHVID_FULL_MODEL=DIR (a full-size folder; built there if missing) to run at paper scale")
    results = measure_all(Path(model_dir), ["step", "tune", "edit"])
    for result in results:
        for key in ("seconds", "cpu_seconds", "peak_rss_gb"):
            if key in result:
                benchmark.extra_info[f"{result['what']}_{result['variant']}_{key}"] = result[key]
    benchmark.pedantic(lambda: None, rounds=1)  # the figures are in extra_info
    assert all("error" not in result for result in results), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("all", "one"))
    parser.add_argument("what", nargs="?", help="one: step, tune, edit or flops")
    parser.add_argument("variant", nargs="?", default="depthvid", choices=VARIANTS)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--work", help="one: folder for the clip, run and edits")
    parser.add_argument("--what", default="step,tune,edit", help="all: comma-separated measurements")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--checkpointing", default="auto", choices=("auto", *CHECKPOINTING))
    args = parser.parse_args()
    if args.mode == "one":
        print(json.dumps(measure(args.what, args.variant, args.model, args.work, args.precision, args.checkpointing)))
        return
    results = measure_all(Path(args.model), args.what.split(","), args.variants.split(","), args.precision)
    print("| measurement | formulation | wall s | CPU s | peak RSS (GiB) |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            figures = f"failed: {r['error']} | |"
        elif r["what"] == "flops":
            figures = (f">= {r['bound_seconds']:.0f} ({r['tflop']:.1f} TFLOP at {r['gemm_gflops']:.0f} GFLOP/s) | | "
                       f"{r['peak_rss_gb']:.2f}")
        else:
            figures = f"{r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['peak_rss_gb']:.2f}"
        print(f"| {r['what']} | {r['variant']} | {figures} |")


if __name__ == "__main__":
    main()
