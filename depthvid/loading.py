"""Load the base depth-conditioned image model and the shared encode/decode steps around it."""
from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from depthvid.errors import UserError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-depth"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "depth_estimator", "feature_extractor")


NETWORKS = ("unet", "vae", "text_encoder", "depth_estimator")  # the components that hold weights
ENCODERS = ("vae", "text_encoder", "depth_estimator")  # what turns a clip and prompts into UNet inputs


@dataclass
class BaseModel:
    """The components of a stable-diffusion-2-depth style pipeline that depthvid uses.

    A network that was not asked for (see :func:`load_base_model`) or was released is None.
    """

    model: str  # hub id or local folder it came from
    unet: torch.nn.Module | None
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: object
    scheduler: object
    depth_estimator: torch.nn.Module | None
    feature_extractor: object

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def release(self, *names: str) -> None:
        """Drop the named networks so that their memory goes back before the next phase."""
        for name in names:
            setattr(self, name, None)
        gc.collect()


def check_model_folder(model: str) -> None:
    """A local model folder must hold model_index.json and every component depthvid needs."""
    path = Path(model)
    if not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise UserError(f"--model {model!r}: no such folder, and not a hub id (owner/name); check the path")
        return  # a hub id: from_pretrained resolves it
    if not (path / "model_index.json").is_file():
        raise UserError(f"--model {model!r}: no model_index.json; point it at a stable-diffusion-2-depth folder")
    for name in COMPONENTS:
        if not (path / name).is_dir():
            raise UserError(
                f"--model {model!r}: component {name!r} is missing ({path / name}/); "
                "use a complete stable-diffusion-2-depth folder"
            )
    check_unet_weights(model)


def _weight_shapes(unet_dir: Path) -> tuple[str, dict[str, tuple]] | None:
    """(file name, {tensor name: shape}) from the safetensors headers of ``unet_dir``; None for
    other formats (diffusers' own loading judges those)."""
    from safetensors import safe_open

    single, index = unet_dir / "diffusion_pytorch_model.safetensors", unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        name, files = single.name, [single]
    elif index.is_file():
        name, files = index.name, sorted({unet_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        return None
    shapes = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return name, shapes


def check_unet_weights(model: str) -> None:
    """A local folder's unet/config.json must describe the tensors in its weights.

    diffusers fills weights the file lacks with random values and drops those the config has no
    place for, both without a word, and fails deep inside load_state_dict on other shapes.
    """
    from diffusers import UNet2DConditionModel

    unet_dir = Path(model) / "unet"
    where = f"--model {model!r}"
    try:
        found = _weight_shapes(unet_dir)
        if found is None:
            return
        weights_name, found = found
        with quiet_loading(), torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    except Exception as error:  # unparsable JSON or header, a config diffusers cannot build
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{where}: cannot read its unet ({reason}); use a complete stable-diffusion-2-depth folder") from None
    expected = {key: tuple(tensor.shape) for key, tensor in unet.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = [key for key in sorted(expected.keys() & found.keys()) if expected[key] != found[key]]
    if not (missing or unexpected or reshaped):
        return

    def some(keys: list[str]) -> str:
        return f"{len(keys)} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"

    problems = []
    if missing:
        problems.append(f"missing from the file: {some(missing)}")
    if unexpected:
        problems.append(f"not in the config: {some(unexpected)}")
    if reshaped:
        key = reshaped[0]
        problems.append(f"of another shape: {some(reshaped)}, e.g. {found[key]} in the file, {expected[key]} by the config")
    raise UserError(
        f"{where}: unet/config.json and unet/{weights_name} disagree on weights {'; '.join(problems)}; "
        "restore the config.json that came with these weights"
    )


@contextlib.contextmanager
def quiet_loading():
    """Silence diffusers/transformers loading bars and info logs (our own bars say what runs)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def load_base_model(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype=torch.float32,
    networks: tuple[str, ...] = NETWORKS,
) -> BaseModel:
    """Load the components through diffusers' ``from_pretrained`` (hub id or local folder).

    Only the ``networks`` named (of :data:`NETWORKS`) are loaded, the others are None: tuning and
    editing load each phase's networks when the phase starts and release them after it. The
    tokenizer, scheduler and feature extractor always load (no weights). The UNet's config is
    checked (a depth channel) even when its weights are not loaded. The depth estimator always
    runs in float32 (DPT-Hybrid's batch norm misbehaves in fp16).
    """
    check_model_folder(model)
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown:
        raise ValueError(f"networks: unknown {unknown}; expected names from {NETWORKS}")
    try:
        with quiet_loading():  # the import too: without torchvision it notes DPTImageProcessor's Pil fallback
            from diffusers import StableDiffusionDepth2ImgPipeline, UNet2DConditionModel

            unet_config = UNet2DConditionModel.load_config(model, subfolder="unet")
            skipped = {name: None for name in NETWORKS if name not in networks}
            pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(model, dtype=dtype, **skipped)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "loading state_dict" not in str(error):
            raise  # out of memory, or a bug: not a bad folder
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--model {model!r}: could not load it ({reason}); pass a local stable-diffusion-2-depth folder"
        ) from None
    if unet_config.get("in_channels") != 5:
        raise UserError(
            f"--model {model!r}: its UNet has in_channels={unet_config.get('in_channels')}, not 5 "
            "(4 latent + 1 depth); depthvid needs a depth-conditioned model like stabilityai/stable-diffusion-2-depth"
        )
    base = BaseModel(
        model=model,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        depth_estimator=None if pipe.depth_estimator is None else pipe.depth_estimator.float(),
        feature_extractor=pipe.feature_extractor,
    )
    for name in networks:
        getattr(base, name).to(device).requires_grad_(False).eval()
    return base


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    """prompts -> (len(prompts), tokens, text_dim) CLIP text embeddings."""
    ids = base.tokenizer(
        prompts, padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return base.text_encoder(ids.to(base.text_encoder.device))[0]


@torch.no_grad()
def encode_frames(base: BaseModel, frames: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """frames (F, 3, H, W) in [0, 1] -> latents (1, 4, F, H/8, W/8), scaled by the VAE factor."""
    vae = base.vae
    latents = [
        vae.encode((part * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
        for part in frames.split(chunk)
    ]
    # (F, 4, h, w) -> (1, 4, F, h, w)
    return (torch.cat(latents) * vae.config.scaling_factor).transpose(0, 1)[None].float()


@torch.no_grad()
def decode_latents(base: BaseModel, latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """latents (B, 4, F, h, w) -> frames (B, F, 3, H, W) in [0, 1]."""
    vae = base.vae
    batch = latents.shape[0]
    # (B, 4, F, h, w) -> (B*F, 4, h, w)
    flat = latents.transpose(1, 2).flatten(0, 1) / vae.config.scaling_factor
    images = [vae.decode(part.to(vae.device, vae.dtype)).sample.float() for part in flat.split(chunk)]
    return ((torch.cat(images) + 1) / 2).clamp(0, 1).unflatten(0, (batch, -1)).cpu()
