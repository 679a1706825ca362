"""One-shot tuning of the inflated video UNet on a single clip.

RUN_DIR layout (everything written atomically):
  run.json             the TuneConfig, base model, versions, steps done
  cache.safetensors    source frames, VAE latents, depth maps, caption embedding (computed once)
  source.mp4, depth.mp4  previews of what was tuned on
  adapter.safetensors + adapter.json   the tuned weights (what `depthvid edit` loads)
  checkpoint.safetensors  trainable weights (fp32), AdamW state, RNG state, step (for --resume)
  loss.jsonl, loss.png    the loss log and its curve
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import depthvid
from depthvid.config import TuneConfig
from depthvid import errors
from depthvid.errors import UserError
from depthvid.fileutil import atomic_path, check_writable, write_json
from depthvid.parallel.frames import FrameSplit

RUN_FILE = "run.json"
CACHE_FILE = "cache.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOSS_LOG = "loss.jsonl"
MEMORY_HINT = ("lower --frames or --height/--width, turn on --gradient-checkpointing, "
               "or use --precision bf16 (fp16 on CUDA)")


class TrainingInterrupted(Exception):
    """Ctrl-C during tuning: a checkpoint was saved; the message says how to resume."""


class TrainingDiverged(Exception):
    """The loss became NaN/inf: tuning stopped, the last good checkpoint is kept."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except (RuntimeError, TypeError):
        picked = None
    if picked is None or picked.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return picked


def pick_backend(backend: str, device: torch.device) -> str | None:
    """The ops' backend for ``--backend`` (None for auto: each op picks by its tensors' device)."""
    if backend == "auto":
        return None
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(
            "--backend triton on CPU runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 "
            "(slow; it rehearses the GPU run), or use --backend torch"
        )
    return backend


def runs_like_cuda(device: torch.device, backend: str) -> bool:
    """True on CUDA, and on CPU with an explicit --backend torch or triton: the rehearsal of the
    CUDA configuration (fp16 allowed, frozen weights cast to the compute dtype, gradient
    checkpointing on by default); with --backend triton it runs the GPU kernels in the interpreter.
    --backend auto on CPU keeps the CPU setup (fp32 frozen weights, no checkpointing)."""
    return device.type == "cuda" or backend in ("torch", "triton")


def autocast_dtype(precision: str, device: torch.device, backend: str = "auto") -> torch.dtype:
    """The dtype the model computes in ("auto": fp16 on CUDA, fp32 elsewhere)."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and not runs_like_cuda(device, backend):
        raise UserError(
            "--precision fp16 needs a CUDA GPU, or an explicit --backend triton (under TRITON_INTERPRET=1) "
            "or torch to rehearse the GPU run on CPU; on CPU use bf16 or fp32"
        )
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def learning_rate(step: int, config: TuneConfig) -> float:
    """Constant lr after a linear warm-up; a pure function of the step."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def versions() -> dict:
    import diffusers
    import transformers

    return {"depthvid": depthvid.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------- run directory


def read_run(run_dir: str | Path) -> tuple[TuneConfig, dict]:
    """(config, the whole run.json) of a tuned run; a clear error when it is not one."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a depthvid run (no {RUN_FILE}); create one with `depthvid tune`")
    try:
        run = json.loads(path.read_text())
        config = run["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{str(path)!r} is damaged ({type(error).__name__}: {error}); tune the run again") from None
    return TuneConfig.from_dict(config), run


def prepare_cache(base, config: TuneConfig, frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything tuning needs from the clip, computed once: latents, depth, caption embedding."""
    from depthvid.depth import estimate_depth
    from depthvid.loading import encode_frames, encode_prompts

    latents = encode_frames(base, frames)  # (1, 4, F, h, w)
    depth = estimate_depth(
        base.depth_estimator, base.feature_extractor, frames, latents.shape[-2:], normalize=config.depth_normalize
    )  # (F, 1, h, w)
    return {
        "frames": (frames * 255).round().to(torch.uint8),  # (F, 3, H, W)
        "latents": latents.cpu().contiguous(),
        "depth": depth.transpose(0, 1)[None].float().cpu().contiguous(),  # (F, 1, h, w) -> (1, 1, F, h, w)
        "prompt_embeds": encode_prompts(base, [config.prompt]).float().cpu().contiguous(),  # (1, L, D)
    }


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, step: int, video_unet, optimizer, generator, scaler, config: TuneConfig) -> None:
    tensors = {f"param/{name}": p.detach().float().cpu() for name, p in video_unet.named_parameters() if p.requires_grad}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optim/{index}/{key}"] = value.detach().cpu().reshape(value.shape)
    tensors["rng/generator"] = generator.get_state()
    metadata = {"step": str(step), "config": json.dumps(config.to_dict()), "scaler": json.dumps(scaler.state_dict())}
    save_tensors(run_dir / CHECKPOINT_FILE, tensors, metadata)


def load_checkpoint(run_dir: Path, video_unet, optimizer, generator, scaler) -> int:
    """Restore weights, optimiser, RNG and scaler; returns the number of steps done."""
    from safetensors import safe_open

    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"--resume: {str(path)!r} does not exist; start a new run without --resume")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    named = dict(video_unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param/"):
                named[key.removeprefix("param/")].copy_(value)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        state = {key.rsplit("/", 1)[1]: value.to(param.device)
                 for key, value in tensors.items() if key.startswith(f"optim/{index}/")}
        if state:
            optimizer.state[param] = state
    generator.set_state(tensors["rng/generator"])
    scaler.load_state_dict(json.loads(metadata["scaler"]))
    return int(metadata["step"])


def write_loss_curve(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / LOSS_LOG).read_text().splitlines() if line]
    if not records:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], label="loss", linewidth=1)
    axis.plot([r["step"] for r in records], [r["mse"] for r in records], label="noise MSE", linewidth=1, alpha=0.7)
    axis.set_xlabel("step")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    with atomic_path(run_dir / "loss.png") as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def truncate_loss_log(run_dir: Path, steps_done: int) -> None:
    """Keep only the log lines of steps that the checkpoint contains."""
    path = run_dir / LOSS_LOG
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= steps_done]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------- loss


def training_loss(video_unet, scheduler, batch: dict[str, torch.Tensor], generator, temporal_weight: float,
                  split=None):
    """Noise-prediction MSE + temporal_weight * temporal loss on the predicted clean latents.

    ``split`` (a depthvid.parallel.FrameSplit; default: one process) says which frames this
    process holds; ``video_unet`` is sharded to match. Each rank returns its window's share, and
    the shares sum to the single-process loss. The noise and timestep are drawn for the whole clip
    on every rank, so they equal one process's.

    Returns (loss, mse, temporal) as 0-d tensors.
    """
    clip, prompt_embeds = batch["latents"], batch["prompt_embeds"]  # clip: (B, C, F, h, w), all frames
    noise = torch.randn(clip.shape, generator=generator).to(clip.device)
    timestep = torch.randint(0, scheduler.config.num_train_timesteps, (clip.shape[0],), generator=generator)
    timestep = timestep.to(clip.device)
    split = FrameSplit(clip.shape[2]) if split is None else split
    latents, noise, depth = (split.shard(t) for t in (clip, noise, batch["depth"]))
    noisy = scheduler.add_noise(latents, noise, timestep)
    prediction = video_unet(torch.cat([noisy, depth], dim=1), timestep, prompt_embeds).float()

    alpha = scheduler.alphas_cumprod.to(latents.device)[timestep].view(-1, 1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timestep)
        clean = alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction
    else:
        target = noise
        clean = (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
    # means over the whole clip: this window's share of the sums; the pair (start-1, start) of
    # consecutive frames needs the previous rank's last frame. (B, C, F, h, w): frames on dim 2
    mse = (prediction - target).pow(2).sum() / clip.numel()
    clean = torch.cat([split.context_frames(clean, dim=2, first=False), clean], dim=2)
    pairs = clip.numel() // clip.shape[2] * (clip.shape[2] - 1)
    temporal = (clean[:, :, 1:] - clean[:, :, :-1]).pow(2).sum() / max(pairs, 1)
    return mse + temporal_weight * temporal, mse, temporal


# ---------------------------------------------------------------- tune


def tune(config: TuneConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Tune the inflated UNet on one clip; returns RUN_DIR. See the module docstring for its files."""
    from depthvid.ops import use_backend

    config.validate()
    # every op call of the run, the recomputations of gradient checkpointing included
    with use_backend(pick_backend(config.backend, pick_device(config.device))):
        return _tune(config, run_dir, resume=resume, progress=progress)


def _tune(config: TuneConfig, run_dir: str | Path, *, resume: bool, progress: bool) -> Path:
    from depthvid.loading import ENCODERS, load_base_model
    from depthvid.memory import return_freed_tensors_to_the_system, tuning_plan
    from depthvid.models import inflate_unet, mark_trainable, save_adapter
    from depthvid.video import load_video, write_video
    from depthvid.depth import export_depth_video
    from depthvid.parallel import frame_split, shard_video_unet

    run_dir = Path(run_dir)
    config.validate()
    return_freed_tensors_to_the_system()
    device = pick_device(config.device)
    dtype = autocast_dtype(config.precision, device, config.backend)
    cuda_like = runs_like_cuda(device, config.backend)
    split = frame_split(config.frames, device)  # under torchrun: this rank's frames; rank 0 writes
    if resume:
        previous, _ = read_run(run_dir)
        changed = config.changed_for_resume(previous)
        if changed:
            details = ", ".join(f"{name} ({getattr(previous, name)!r} -> {getattr(config, name)!r})" for name in changed)
            raise UserError(f"--resume: options changed since the run started: {details}; use the original options")
    elif (run_dir / RUN_FILE).exists():
        raise UserError(f"-o {str(run_dir)!r} already holds a run; pass --resume to continue it or choose another folder")
    check_writable(run_dir / RUN_FILE, "-o")
    split.barrier()  # every rank has checked RUN_DIR before rank 0 writes into it

    frames = load_video(config.video, config.frames, config.height, config.width,
                        sample=config.sample, start=config.start, stride=config.stride)
    cache_path = run_dir / CACHE_FILE
    cached = resume and cache_path.is_file()
    # phase 1, the encoders (VAE, text encoder, DPT): only to build the cache, on rank 0, then released
    encoders = load_base_model(config.model, device, networks=ENCODERS if split.is_main and not cached else ())
    if split.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    run = {"config": config.to_dict(), "base_model": config.model, "versions": versions(), "steps_done": 0}

    # -- cache: computed once, reused by every step and by `depthvid edit`
    if cached:
        cache = load_file(str(cache_path))
    else:
        cache = None
        if split.is_main:  # the clip's tensors then go to every rank
            cache = prepare_cache(encoders, config, frames)
            save_tensors(cache_path, cache)
            write_video(cache["frames"].float() / 255, run_dir / "source.mp4")
            export_depth_video(cache["depth"][0].transpose(0, 1), run_dir / "depth.mp4", size=tuple(frames.shape[-2:]))
        cache = split.broadcast(cache)
    encoders.release(*ENCODERS)
    del frames
    batch = {key: cache.pop(key).to(device) for key in ("latents", "depth", "prompt_embeds")}
    del cache

    # phase 2, the UNet: inflate, freeze all but the trainable set, keep that set in fp32
    base = load_base_model(config.model, device, networks=("unet",))
    torch.manual_seed(config.seed)  # the temporal layers' random init
    video_unet = shard_video_unet(inflate_unet(base.unet), split)
    trainable = mark_trainable(video_unet)
    if dtype != torch.float32 and cuda_like:
        for param in video_unet.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
    # from the work's size and the memory left with the model loaded; a rank holds at most the
    # first window's frames; rank 0 decides for all (every rank must recompute, collectives
    # included, or none)
    plan = tuning_plan(base.unet.config, len(split.windows[0]), config.height, config.width, dtype=dtype,
                       device=device)
    use_checkpointing = config.gradient_checkpointing
    if use_checkpointing is None and cuda_like and device.type == "cpu":
        use_checkpointing = True  # the rehearsal of the CUDA run checkpoints like a GPU at paper scale
    checkpointing = split.broadcast(plan.checkpointing(use_checkpointing))
    run["gradient_checkpointing"] = checkpointing
    if checkpointing != "off":
        video_unet.enable_gradient_checkpointing(selective=checkpointing == "selective")
    video_unet.train()
    params = [p for p in video_unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(config.seed)
    run["trainable_parameters"] = trainable

    step = 0
    if resume and (run_dir / CHECKPOINT_FILE).exists():
        step = load_checkpoint(run_dir, video_unet, optimizer, generator, scaler)
    if split.is_main:
        truncate_loss_log(run_dir, step)

    def checkpoint(steps_done: int) -> None:
        run["steps_done"] = steps_done
        if not split.is_main:
            return
        save_checkpoint(run_dir, steps_done, video_unet, optimizer, generator, scaler, config)
        save_adapter(video_unet, run_dir, base_model=config.model)
        write_json(run_dir / RUN_FILE, run)
        write_loss_curve(run_dir)

    if step == 0 and split.is_main:
        write_json(run_dir / RUN_FILE, run)
    bar = tqdm(total=config.steps, initial=step, desc="tune", unit="step", disable=not (progress and split.is_main),
               dynamic_ncols=True)
    log = open(run_dir / LOSS_LOG, "a") if split.is_main else open(os.devnull, "w")
    started = time.perf_counter()
    out_of_memory = None
    step_rng = generator.get_state()  # restored when a step does not finish: its noise was not used
    try:
        while step < config.steps:
            # -- learning rate
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            # -- forward / loss
            with autocast(device, dtype):
                loss, mse, temporal = training_loss(
                    video_unet, base.scheduler, batch, generator, config.temporal_loss_weight, split
                )
            totals = split.all_reduce(torch.stack([loss, mse, temporal]).detach().float())  # the whole clip's
            if not math.isfinite(totals[0].item()):
                raise TrainingDiverged(
                    f"loss became {totals[0].item()} at step {step + 1}; stopped, the last good checkpoint "
                    f"(step {run['steps_done']}) is kept in {run_dir}; lower --lr or use --precision fp32"
                )
            # -- backward, clip, step, zero_grad
            scaler.scale(loss).backward()
            split.all_reduce_grads(params)  # each rank holds the gradient of its share of the loss
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_rng = generator.get_state()
            # -- log
            record = {"step": step, "loss": totals[0].item(), "mse": totals[1].item(), "temporal": totals[2].item(),
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 3)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            # -- checkpoint
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint(step)
    except KeyboardInterrupt:
        log.close()
        generator.set_state(step_rng)
        if step > run["steps_done"]:
            checkpoint(step)
        raise TrainingInterrupted(
            f"interrupted at step {step}/{config.steps}; checkpoint saved in {run_dir}; "
            f"continue with the same command plus --resume"
        ) from None
    except (MemoryError, RuntimeError) as error:
        out_of_memory = errors.out_of_memory(error, MEMORY_HINT)
        if out_of_memory is None:
            raise
    finally:
        log.close()
        bar.close()
    if out_of_memory is not None:  # outside the except block: its traceback held the step's activations
        optimizer.zero_grad(set_to_none=True)
        generator.set_state(step_rng)
        if step > run["steps_done"]:
            checkpoint(step)
        if step:
            raise errors.OutOfMemory(f"{out_of_memory} (step {step} is saved in {run_dir}: continue with the "
                                     "same command plus --resume)")
        raise out_of_memory
    if run["steps_done"] != step:  # resumed a finished run: nothing to do but keep files current
        checkpoint(step)
    return run_dir
