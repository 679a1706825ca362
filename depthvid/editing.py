"""Editing a tuned run: DDIM inversion of the source latents, then guided DDIM sampling.

Both loops are written out here over diffusers' schedulers (DDIMInverseScheduler, DDIMScheduler),
outside the model classes. The UNet input is always cat(latents, depth) along channels.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from depthvid.config import SEED_MAX, check_backend
from depthvid.errors import UserError, check_number
from depthvid.ops import use_backend
from depthvid.tuning import (
    CACHE_FILE, autocast, autocast_dtype, pick_backend, pick_device, prepare_cache, read_run, save_tensors,
)
from depthvid.video import OUTPUT_SUFFIXES, check_fps, check_output_suffix, check_video_output

INVERSION_DIR = "inversions"
MAX_GUIDANCE = 100  # far above any useful scale; much larger ones overflow into NaN frames


@dataclass
class EditResult:
    outputs: list[Path]  # one per prompt, in prompt order
    side_by_side: Path
    inversion_cached: bool  # True when the inverted latents came from RUN_DIR's cache
    metrics: list[dict] = field(default_factory=list)


def unet_input(latents: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """(B, 4, F, h, w) latents + (1, 1, F, h, w) depth -> (B, 5, F, h, w)."""
    return torch.cat([latents, depth.expand(latents.shape[0], -1, -1, -1, -1).to(latents.dtype)], dim=1)


@torch.no_grad()
def ddim_invert(video_unet, scheduler_config, latents, depth, prompt_embeds, steps: int, progress: bool = True):
    """Run DDIM backwards from the clean latents (1, 4, F, h, w) to the noise that regenerates them."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler_config)
    inverse.set_timesteps(steps, device=latents.device)
    for timestep in tqdm(inverse.timesteps, desc="invert", disable=not progress, dynamic_ncols=True):
        noise_pred = video_unet(unet_input(latents, depth), timestep, prompt_embeds)
        latents = inverse.step(noise_pred.float(), timestep, latents).prev_sample
    return latents


def default_videos_per_call(device: torch.device) -> int | None:
    """How many videos (prompts x guidance halves) one UNet call takes while sampling: all at once
    on a GPU; one on CPU, where batching gains nothing and the activations of 2 prompts x 2 halves
    set the whole edit's peak. Measured at full size (8 x 512x512, fp32, 2 threads): one forward of
    4 videos took 4.5x the time of one video and peaked at 7.98 GiB RSS against 4.91 GiB."""
    return None if torch.device(device).type == "cuda" else 1


def predict_noise(video_unet, model_in, timestep, embeds, videos_per_call: int | None) -> torch.Tensor:
    """``video_unet`` over the batch of videos, ``videos_per_call`` at a time (None: all), in fp32."""
    step = videos_per_call or model_in.shape[0]
    return torch.cat([video_unet(model_in[i : i + step], timestep, embeds[i : i + step]).float()
                      for i in range(0, model_in.shape[0], step)])


@torch.no_grad()
def ddim_sample(video_unet, scheduler_config, noise, depth, prompt_embeds, uncond_embeds, steps: int,
                guidance: float, eta: float = 0.0, generator=None, progress: bool = True, split=None,
                videos_per_call: int | None = None):
    """Guided DDIM sampling of every prompt from the same starting noise.

    noise: (1, 4, F, h, w); prompt_embeds: (P, L, D); uncond_embeds: (1, L, D).
    ``split`` (a depthvid.parallel.FrameSplit; default: one process) says which frames noise,
    depth and the result hold; with eta > 0 the sampler's noise is drawn for all frames and
    sharded, so every rank uses its part of the single-process draw. ``videos_per_call`` bounds
    the UNet's batch (None: all 2P, or P unguided, in one call).
    Returns latents (P, 4, F, h, w).
    """
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from depthvid.parallel import FrameSplit

    split = FrameSplit(noise.shape[2]) if split is None else split

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, device=noise.device)
    num_prompts = prompt_embeds.shape[0]
    latents = noise.expand(num_prompts, -1, -1, -1, -1).clone()
    guided = guidance != 1.0
    embeds = torch.cat([uncond_embeds.expand(num_prompts, -1, -1), prompt_embeds]) if guided else prompt_embeds
    for timestep in tqdm(scheduler.timesteps, desc="sample", disable=not progress, dynamic_ncols=True):
        model_in = unet_input(torch.cat([latents, latents]) if guided else latents, depth)
        noise_pred = predict_noise(video_unet, model_in, timestep, embeds, videos_per_call)
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (cond - uncond)
        variance_noise = None
        if eta > 0:  # the scheduler's own draw, made for all frames: (P, 4, F, h, w)
            shape = (*noise_pred.shape[:2], split.num_frames, *noise_pred.shape[3:])
            variance_noise = split.shard(randn_tensor(shape, generator=generator, device=noise_pred.device,
                                                      dtype=noise_pred.dtype))
        latents = scheduler.step(noise_pred, timestep, latents, eta=eta, variance_noise=variance_noise).prev_sample
    return latents


def tensor_digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().float().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def output_paths(out: Path, prompts: list[str]) -> tuple[list[Path], Path]:
    """One output per prompt plus the side-by-side, named from OUT."""
    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "edit"

    if out.suffix.lower() in OUTPUT_SUFFIXES:
        if len(prompts) == 1:
            return [out], out.with_name(f"{out.stem}-side-by-side{out.suffix}")
        return ([out.with_name(f"{out.stem}-{i}-{slug(p)}{out.suffix}") for i, p in enumerate(prompts)],
                out.with_name(f"{out.stem}-side-by-side{out.suffix}"))
    return [out / f"{i}-{slug(p)}" for i, p in enumerate(prompts)], out / "side-by-side"


def _count_frames(path, option: str) -> int:
    """Frames of the video at ``path``; a missing or unreadable one is a ``UserError`` naming ``option``."""
    from depthvid.video import count_frames

    try:
        return count_frames(path)
    except UserError as error:
        raise UserError(f"{option}: {error}") from None


def edit(
    run_dir: str | Path,
    prompts: list[str],
    out: str | Path,
    *,
    steps: int = 50,
    guidance: float = 12.5,
    seed: int = 0,
    eta: float = 0.0,
    negative_prompt: str = "",
    frames: int | None = None,
    video: str | None = None,
    depth_video: str | None = None,
    depth_scale: float = 1.0,
    depth_shift: float = 0.0,
    fps: int = 8,
    precision: str = "auto",
    device: str = "auto",
    backend: str = "auto",
    evaluate: bool = False,
    clip_model: str | None = None,
    progress: bool = True,
) -> EditResult:
    """Re-render a tuned run's clip under new prompts.

    Args:
        run_dir: a folder written by :func:`depthvid.tune`.
        prompts: the edited captions; they are sampled together in one batch.
        out: ``.mp4``/``.gif`` file, or a folder of PNG frames (one sub-folder per prompt).
        steps: DDIM steps for inversion and sampling.
        guidance: classifier-free guidance scale (1 = no guidance).
        seed: seeds the sampler's noise when ``eta > 0`` (eta = 0 is deterministic).
        frames: sample this many frames (may exceed the tuned count); default the tuned frames.
        video: the source clip when it moved since tuning (needed only with ``frames``).
        depth_video: a depth video replacing the estimated depth (near = bright).
        depth_scale, depth_shift: applied to the normalised depth: d * scale + shift.
        backend: kernels of the video ops: "auto" (the fastest per op on CUDA, torch on CPU),
            "torch", "triton" (on CPU under TRITON_INTERPRET=1 it rehearses the CUDA run, fp16
            included) or "cpp".
        evaluate: score each output with the CLIP metrics and depth fidelity.
    """
    from depthvid.depth import depth_to_frames, estimate_depth, load_depth_video
    from depthvid.loading import ENCODERS, decode_latents, encode_prompts, load_base_model
    from depthvid.memory import return_freed_tensors_to_the_system
    from depthvid.models import inflate_unet, load_adapter
    from depthvid.parallel import frame_split, shard_video_unet
    from depthvid.video import load_video, make_grid, sample_frame_indices, write_video

    # -- check everything before loading anything
    run_dir, out = Path(run_dir), Path(out)
    config, run = read_run(run_dir)
    for name in ("adapter.safetensors", CACHE_FILE):
        if not (run_dir / name).is_file():
            raise UserError(f"{str(run_dir)!r} has no {name} yet; let `depthvid tune` reach a checkpoint")
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise UserError("--prompt: an edit prompt is empty; give the caption you want the video to have")
    check_number("--steps", steps, minimum=1, integer=True, hint="50 is a good default")
    check_number("--guidance", guidance, minimum=0, maximum=MAX_GUIDANCE, hint="1 = no guidance; 7.5-12.5 is typical")
    check_number("--eta", eta, minimum=0, maximum=1, hint="0 is deterministic DDIM, 1 is DDPM-like")
    check_number("--seed", seed, minimum=0, maximum=SEED_MAX, integer=True, hint="e.g. 0")
    check_number("--depth-scale", depth_scale, hint="1 keeps the estimated depth")
    check_number("--depth-shift", depth_shift, hint="0 keeps the estimated depth")
    check_fps(fps)
    if frames is not None:
        check_number("--frames", frames, minimum=1, integer=True, hint="omit it for the tuned frames")
    new_frames = frames is not None and frames != config.frames  # read from the source clip: it must have them
    if video is not None or new_frames:
        if video is None and not Path(config.video).exists():
            raise UserError(f"--frames {frames}: the source video {config.video!r} is gone; pass --video PATH")
        available = _count_frames(video or config.video, "--video")
        if new_frames:
            sample_frame_indices(available, frames, config.sample, config.start, config.stride)
    if depth_video is not None:
        _count_frames(depth_video, "--depth")
    check_output_suffix(out, "-o")
    outputs, side_by_side = output_paths(out, prompts)
    for path in (*outputs, side_by_side):
        check_video_output(path, "-o")
    check_backend(backend)
    device = pick_device(device)
    dtype = autocast_dtype(precision, device, backend)
    ops_backend = pick_backend(backend, device)
    return_freed_tensors_to_the_system()
    cache = load_file(str(run_dir / CACHE_FILE))
    num_frames = frames if new_frames else cache["latents"].shape[2]
    split = frame_split(num_frames, device)  # under torchrun: this rank's frames; rank 0 writes
    progress = progress and split.is_main
    if evaluate and split.is_main:  # loaded first: a bad --clip-model fails before any compute, with nothing written
        from depthvid.evaluate import evaluate_edit, load_models
        from depthvid.metrics import EvalOptions

        eval_options = EvalOptions(depth_model=config.model, **({"clip_model": clip_model} if clip_model else {}))
        eval_models = load_models(eval_options, with_depth=True)

    # -- phase 1, the encoders: the prompts' embeddings, and a new cache for a new frame count (on rank 0)
    build_cache = new_frames and split.is_main
    base = load_base_model(config.model, device, networks=ENCODERS if build_cache else ("text_encoder",))
    timesteps = base.scheduler.config.num_train_timesteps
    if steps > timesteps:
        raise UserError(f"--steps {steps}: the model was trained with {timesteps} timesteps, DDIM can take at most "
                        f"that many; 50 is a good default")
    if new_frames:
        if build_cache:
            clip = load_video(video or config.video, frames, config.height, config.width,
                              sample=config.sample, start=config.start, stride=config.stride)
        cache = split.broadcast(prepare_cache(base, config, clip) if build_cache else None)
    empty = encode_prompts(base, [negative_prompt]).to(device)
    prompt_embeds = encode_prompts(base, prompts).to(device)
    base.release(*ENCODERS)
    source_frames = cache["frames"].float() / 255  # (F, 3, H, W)
    latents = cache["latents"].to(device)
    depth = cache["depth"]
    if depth_video is not None:
        depth = load_depth_video(depth_video, num_frames, tuple(latents.shape[-2:]),
                                 normalize=config.depth_normalize).transpose(0, 1)[None]
    depth = (depth * depth_scale + depth_shift).to(device)

    # -- phase 2, the UNet: base + inflation + the tuned weights (no optimiser state is read)
    base.unet = load_base_model(config.model, device, networks=("unet",)).unet
    video_unet = shard_video_unet(inflate_unet(base.unet), split)
    load_adapter(video_unet, run_dir)
    video_unet.eval()

    # -- inversion, cached by everything it depends on
    adapter_digest = hashlib.sha256((run_dir / "adapter.safetensors").read_bytes()).hexdigest()
    key = tensor_digest(adapter_digest, latents, depth, steps, str(dtype), backend, negative_prompt,
                        dict(base.scheduler.config))
    inversion_path = run_dir / INVERSION_DIR / f"{key}.safetensors"
    inversion_cached = split.broadcast(inversion_path.is_file())
    local_depth = split.shard(depth)
    with use_backend(ops_backend), autocast(device, dtype):
        if inversion_cached:
            noise = split.shard(load_file(str(inversion_path))["latents"].to(device))
        else:
            noise = ddim_invert(video_unet, base.scheduler.config, split.shard(latents), local_depth, empty, steps,
                                progress)
            whole = split.gather(noise)
            if split.is_main:
                save_tensors(inversion_path, {"latents": whole.cpu()})
        generator = torch.Generator(device).manual_seed(seed)
        edited = ddim_sample(video_unet, base.scheduler.config, noise, local_depth, prompt_embeds, empty, steps,
                             guidance, eta=eta, generator=generator, progress=progress, split=split,
                             videos_per_call=default_videos_per_call(device))
    del video_unet
    base.release("unet")

    # -- phase 3, the VAE: decode this rank's frames, gathered on every rank
    base.vae = load_base_model(config.model, device, networks=("vae",)).vae
    videos = split.gather(decode_latents(base, edited), dim=1)  # (P, F, 3, H, W)
    base.release("vae")

    result = EditResult(outputs=outputs, side_by_side=side_by_side, inversion_cached=inversion_cached)
    if not split.is_main:
        return result
    # -- outputs: one per prompt + source | depth | edits
    for path, frames_out in zip(outputs, videos):
        write_video(frames_out, path, fps=fps)
    grid = make_grid([source_frames, depth_to_frames(depth[0].transpose(0, 1).cpu()), *videos])
    write_video(grid, side_by_side, fps=fps)
    if evaluate:
        result.metrics = [
            evaluate_edit(str(path), prompt, options=eval_options, source_frames=source_frames, models=eval_models)
            for path, prompt in zip(outputs, prompts)
        ]
    return result
