"""Tiny, randomly initialised models and a synthetic clip, built offline, for tests and examples.

Nothing here downloads anything: the tokenizer files are written by hand (every byte is a token,
no merges), the models are built from small configs with a fixed seed and saved with
``save_pretrained`` in the same folder layouts as the real checkpoints.
"""
from __future__ import annotations

import json
import math
import pathlib

import torch
import torch.nn.functional as F

from depthvid.fileutil import write_json
from depthvid.loading import quiet_loading

PIPELINE_COMPONENTS = (
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "depth_estimator",
    "feature_extractor",
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


# -- offline tokenizer --------------------------------------------------------------------------


def _byte_to_char() -> list[str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted
    past 255 so that every byte has a visible, non-whitespace character (GPT-2/CLIP convention)."""
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def tiny_vocab() -> dict[str, int]:
    """CLIP-style vocabulary: 256 byte characters, the same with the end-of-word suffix ``</w>``,
    then ``<|startoftext|>`` (id 512) and ``<|endoftext|>`` (id 513)."""
    chars = _byte_to_char()
    tokens = chars + [c + "</w>" for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def save_tiny_tokenizer(path) -> pathlib.Path:
    """Write an offline ``CLIPTokenizer`` to ``path``: vocab.json, merges.txt, tokenizer.json.

    With no merges every character is its own token, so any text tokenizes without network access.
    Returns the folder.
    """
    from transformers import CLIPTokenizer

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(tiny_vocab(), ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(path)
    return path


def _tiny_text_config() -> dict:
    vocab = tiny_vocab()
    return dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        hidden_act="gelu",
    )


# -- tiny CLIP (for the metrics) -----------------------------------------------------------------


def save_tiny_clip(path, seed: int = 0) -> pathlib.Path:
    """Save a tiny random ``CLIPModel`` (text + vision, projection_dim 16) and ``CLIPProcessor``.

    Images are 32x32 with 8x8 patches; text uses the offline tokenizer of ``save_tiny_tokenizer``.
    Loadable with ``CLIPModel.from_pretrained(path)`` and ``CLIPProcessor.from_pretrained(path)``.
    The weights depend only on ``seed``. Returns the folder.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=_tiny_text_config(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path, safe_serialization=True)

    tokenizer = CLIPTokenizer.from_pretrained(save_tiny_tokenizer(path))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


# -- tiny stable-diffusion-2-depth ---------------------------------------------------------------


def tiny_unet_config() -> dict:
    """An SD2-depth-shaped UNet2DConditionModel config at toy width (2 and 4 heads of 16 dims)."""
    return dict(
        sample_size=8,
        in_channels=5,  # 4 latent channels + 1 depth channel
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),  # diffusers' SD2 naming: heads per level, like (5, 10, 20, 20)
        cross_attention_dim=32,  # the tiny text encoder's hidden size
        use_linear_projection=True,
    )


def tiny_vae_config() -> dict:
    """An AutoencoderKL config with 4 levels (x8 downsampling, like SD) and 4 latent channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=64,
    )


def tiny_dpt_config() -> dict:
    """A non-hybrid DPTForDepthEstimation config: a 2-layer ViT on 32x32 images, 8x8 patches."""
    return dict(
        hidden_size=32,
        num_hidden_layers=4,
        backbone_out_indices=(0, 1, 2, 3),
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=(8, 16, 32, 32),
        fusion_hidden_size=16,
        is_hybrid=False,
        use_auxiliary_head=False,
    )


def _tiny_depth_estimator(model: torch.nn.Module) -> torch.nn.Module:
    """Re-initialise a random DPT so that its depth is not all zeros.

    transformers' init (weights ~ N(0, 0.02), zero bias) shrinks the signal through the neck and
    head convs to ~1e-9, which the head's final ReLU then clips to 0. PyTorch's default init keeps
    it O(1), and a positive bias on the last conv keeps the ReLU open.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            module.reset_parameters()
    last_conv = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.constant_(last_conv.bias, 1.0)
    return model.eval()


# stabilityai/stable-diffusion-2-depth's UNet (DESIGN.md): for meta-device and benchmark models
SD2_DEPTH_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=5,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)

SD2_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def save_tiny_pipeline(path, seed: int = 0) -> pathlib.Path:
    """Save a tiny random pipeline in the folder layout of stabilityai/stable-diffusion-2-depth.

    ``path`` gets model_index.json (StableDiffusionDepth2ImgPipeline) and one subfolder per name
    in ``PIPELINE_COMPONENTS``, every model as safetensors. Loadable with
    ``StableDiffusionDepth2ImgPipeline.from_pretrained(path)``; 64x64 images give 8x8 latents.
    The weights depend only on ``seed`` (the caller's RNG state is left alone). Returns the folder.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # quietly: no "Writing model shards" bars, and (from the import itself) no notice that
    # DPTImageProcessor falls back to its Pil version without torchvision
    with quiet_loading():
        from diffusers import (
            AutoencoderKL,
            DDIMScheduler,
            StableDiffusionDepth2ImgPipeline,
            UNet2DConditionModel,
        )
        from transformers import (
            CLIPTextConfig,
            CLIPTextModel,
            CLIPTokenizer,
            DPTConfig,
            DPTForDepthEstimation,
            DPTImageProcessor,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**tiny_unet_config())
            vae = AutoencoderKL(**tiny_vae_config())
            text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_text_config()))
            dpt = DPTForDepthEstimation(DPTConfig(**tiny_dpt_config()))
            depth_estimator = _tiny_depth_estimator(dpt)
        tokenizer = CLIPTokenizer.from_pretrained(save_tiny_tokenizer(path / "tokenizer"))
        feature_extractor = DPTImageProcessor(
            do_resize=True,
            size={"height": 32, "width": 32},
            keep_aspect_ratio=False,
            do_rescale=True,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        pipeline = StableDiffusionDepth2ImgPipeline(
            vae=vae,
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**SD2_SCHEDULER_CONFIG),
            depth_estimator=depth_estimator,
            feature_extractor=feature_extractor,
        )
        pipeline.save_pretrained(path, safe_serialization=True)

    # Without torchvision transformers hands out DPTImageProcessorPil; record the portable name.
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["feature_extractor"] = ["transformers", "DPTImageProcessor"]
    write_json(index_file, index)
    return path


# -- full-size stable-diffusion-2-depth (random weights) ------------------------------------------
# The real architecture's sizes, for measuring memory and speed at paper scale without the download.

SD2_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)

SD2_TEXT_ENCODER_CONFIG = dict(  # OpenCLIP ViT-H/14's text tower as SD2 uses it: 23 of its 24 layers
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=MODEL_MAX_LENGTH,
    projection_dim=512,
    hidden_act="gelu",
)

DPT_HYBRID_CONFIG = dict(  # Intel/dpt-hybrid-midas: a BiT-ResNet stem feeding a 12-layer ViT-B/16
    is_hybrid=True,
    image_size=384,
    neck_hidden_sizes=(256, 512, 768, 768),
    reassemble_factors=(1, 1, 1, 0.5),
    backbone_featmap_shape=(1, 1024, 24, 24),
    use_auxiliary_head=False,
)

def full_size_components(device="cpu", seed: int = 0) -> dict:
    """Build the four models of stable-diffusion-2-depth at their real sizes, randomly initialised.

    Returns {"unet", "vae", "text_encoder", "depth_estimator"} -> module. On ``device="meta"``
    nothing is allocated (for counting parameters); on CPU this takes ~5.5 GB. The weights
    depend only on ``seed``.
    """
    return {name: build() for name, build in _full_size_builders(device, seed).items()}


def _full_size_builders(device, seed: int) -> dict:
    """name -> a no-argument function building that component (so a caller can hold one at a time)."""
    with quiet_loading():
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

    vocab = tiny_vocab()

    def seeded(index, build):
        def run():
            with torch.random.fork_rng(devices=[]), torch.device(device):
                torch.manual_seed(seed * 1000 + index)
                module = build()
            return module if device == "meta" else module.eval()
        return run

    def depth_estimator():
        model = DPTForDepthEstimation(DPTConfig(**DPT_HYBRID_CONFIG))
        return model if device == "meta" else _tiny_depth_estimator(model)

    text_config = dict(SD2_TEXT_ENCODER_CONFIG, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
                       pad_token_id=vocab[EOS_TOKEN])
    return {
        "unet": seeded(0, lambda: UNet2DConditionModel(**SD2_DEPTH_UNET_CONFIG)),
        "vae": seeded(1, lambda: AutoencoderKL(**SD2_VAE_CONFIG)),
        "text_encoder": seeded(2, lambda: CLIPTextModel(CLIPTextConfig(**text_config))),
        "depth_estimator": seeded(3, depth_estimator),
    }


def save_full_size_pipeline(path, seed: int = 0) -> pathlib.Path:
    """Save a random stable-diffusion-2-depth at its real sizes (~5.5 GB of fp32 safetensors).

    Same folder layout and offline tokenizer as :func:`save_tiny_pipeline`; the DPT-Hybrid feature
    extractor works at 384x384. Components are built and written one at a time, so the peak
    memory is about the UNet's 3.5 GB. The weights depend only on ``seed``. Returns the folder.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        from diffusers import DDIMScheduler
        from transformers import CLIPTokenizer, DPTImageProcessor

        for name, build in _full_size_builders("cpu", seed).items():
            module = build()
            module.save_pretrained(path / name, safe_serialization=True, max_shard_size="10GB")
            del module
        save_tiny_tokenizer(path / "tokenizer")
        CLIPTokenizer.from_pretrained(path / "tokenizer")  # the files load
        DDIMScheduler(**SD2_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
        DPTImageProcessor(
            do_resize=True,
            size={"height": 384, "width": 384},
            keep_aspect_ratio=False,
            do_rescale=True,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(path / "feature_extractor")
    index = {
        "_class_name": "StableDiffusionDepth2ImgPipeline",
        "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "depth_estimator": ["transformers", "DPTForDepthEstimation"],
        "feature_extractor": ["transformers", "DPTImageProcessor"],
    }
    write_json(path / "model_index.json", index)
    return path


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# -- the sample clip: a ray-cast toy scene --------------------------------------------------------
# A camera 1 unit above a checkered floor looks along +Z (Y is up). A near red ball bounces from
# left to right, passing in front of a yellow pillar (middle distance) and a blue box (far) that
# slides the other way. Each pixel keeps the nearest hit, so the scene also yields exact depth.

_CAMERA_HEIGHT = 1.0
_FOCAL = 1.2
_HORIZON = 0.4  # image row (fraction of the height) where the floor meets the sky
_LIGHT = torch.tensor([-0.5, 0.8, -0.4]) / torch.tensor([-0.5, 0.8, -0.4]).norm()
_SKY_TOP, _SKY_LOW = torch.tensor([0.35, 0.55, 0.85]), torch.tensor([0.80, 0.87, 0.95])


def _camera_rays(height: int, width: int) -> torch.Tensor:
    """Ray directions (H, W, 3) with unit Z component: a hit at s along a ray has depth s."""
    v = (torch.arange(height) + 0.5) / height
    u = (torch.arange(width) + 0.5) / width
    y_img = (v - _HORIZON) * 2  # grows downwards
    x_img = (u - 0.5) * 2 * width / height  # square pixels
    rays = torch.empty(height, width, 3)
    rays[..., 0] = x_img[None, :] / _FOCAL
    rays[..., 1] = -y_img[:, None] / _FOCAL
    rays[..., 2] = 1.0
    return rays


def _hit_sphere(origin, rays, center, radius):
    """Depth (H, W) of the first hit (inf where missed) and unit normals (H, W, 3)."""
    # |o + s d - c|^2 = r^2  ->  a s^2 + 2 b s + c0 = 0
    oc = origin - center
    a = (rays * rays).sum(-1)
    b = (rays * oc).sum(-1)
    c0 = (oc * oc).sum() - radius**2
    disc = b * b - a * c0
    s = (-b - disc.clamp(min=0).sqrt()) / a
    s = torch.where((disc >= 0) & (s > 0), s, torch.full_like(s, math.inf))
    normal = (origin + s[..., None].clamp(max=1e3) * rays - center) / radius
    return s, normal


def _hit_box(origin, rays, low, high):
    """Depth (H, W) of the entry into the axis-aligned box [low, high], and face normals."""
    inv = 1.0 / torch.where(rays == 0, torch.full_like(rays, 1e-12), rays)
    # Slab method: the ray is inside the box between the last entry and the first exit.
    t0, t1 = (low - origin) * inv, (high - origin) * inv
    near, far = torch.minimum(t0, t1), torch.maximum(t0, t1)
    s_in, axis = near.max(-1)
    s_out = far.min(-1).values
    hit = (s_in <= s_out) & (s_in > 0)
    s = torch.where(hit, s_in, torch.full_like(s_in, math.inf))
    # The entry face is the slab entered last; its normal points back against the ray.
    normal = torch.zeros_like(rays)
    normal.scatter_(-1, axis[..., None], -torch.sign(rays.gather(-1, axis[..., None])))
    return s, normal


def _shade(color, normal):
    lambert = (normal * _LIGHT).sum(-1, keepdim=True).clamp(min=0)
    return color * (0.35 + 0.65 * lambert)


def _render_frame(rays, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (H, W, 3) and depth (H, W) (inf for sky) at time t in [0, 1]."""
    height = rays.shape[0]
    origin = torch.tensor([0.0, _CAMERA_HEIGHT, 0.0])

    v = (torch.arange(height) + 0.5) / height
    sky = _SKY_TOP + (_SKY_LOW - _SKY_TOP) * (v / _HORIZON).clamp(max=1)[:, None, None]
    image = sky.expand_as(rays).clone()
    depth = torch.full(rays.shape[:2], math.inf)

    # floor: Y = 0 where the ray points down; checker of 0.5-unit tiles, fogged towards the horizon
    down = rays[..., 1] < 0
    s_floor = torch.where(down, _CAMERA_HEIGHT / -rays[..., 1].clamp(max=-1e-6), math.inf)
    point = origin + s_floor.clamp(max=1e3)[..., None] * rays
    checker = (torch.floor(point[..., 0] / 0.5) + torch.floor(point[..., 2] / 0.5)) % 2
    light_tile, dark_tile = torch.tensor([0.72, 0.66, 0.55]), torch.tensor([0.45, 0.40, 0.33])
    tile = torch.where(checker[..., None] > 0, light_tile, dark_tile)
    fog = torch.exp(-s_floor / 12.0)[..., None]
    floor = tile * fog + _SKY_LOW * (1 - fog)

    ball_x = -1.6 + 3.2 * t
    ball_y = 0.5 + 0.35 * abs(math.sin(2 * math.pi * t))  # two bounces
    objects = [
        (s_floor, None, floor),
        # far blue box sliding right to left
        (*_hit_box(origin, rays, torch.tensor([0.6 - 1.6 * t, 0.0, 5.5]),
                   torch.tensor([1.7 - 1.6 * t, 1.1, 6.4])), torch.tensor([0.25, 0.35, 0.85])),
        # yellow pillar, standing still at middle distance
        (*_hit_box(origin, rays, torch.tensor([0.35, 0.0, 4.2]), torch.tensor([0.75, 2.2, 4.6])),
         torch.tensor([0.95, 0.80, 0.25])),
        # near red ball
        (*_hit_sphere(origin, rays, torch.tensor([ball_x, ball_y, 2.4]), 0.5),
         torch.tensor([0.90, 0.20, 0.15])),
    ]
    for s, normal, color in objects:
        nearer = s < depth
        shaded = color if normal is None else _shade(color, normal)
        image = torch.where(nearer[..., None], shaded, image)
        depth = torch.where(nearer, s, depth)
    return image, depth


def _render_scene(num_frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (F, 3, H, W) in [0, 1] and inverse depth (F, 1, H, W), rendered 2x2 supersampled."""
    rays = _camera_rays(2 * height, 2 * width)
    images, depths = [], []
    # Many small elementwise ops: extra threads only add overhead (a lot of it on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for f in range(num_frames):
            image, depth = _render_frame(rays, f / max(num_frames - 1, 1))
            images.append(image.permute(2, 0, 1))  # (2H, 2W, 3) -> (3, 2H, 2W)
            depths.append((1.0 / depth)[None])  # sky: 1 / inf = 0
    finally:
        torch.set_num_threads(threads)
    images = F.avg_pool2d(torch.stack(images), 2)
    inverse_depth = F.avg_pool2d(torch.stack(depths), 2)
    return images.clamp(0, 1), inverse_depth


def make_sample_clip(num_frames: int = 16, height: int = 256, width: int = 256) -> torch.Tensor:
    """The toy scene (a ball passing in front of a pillar and a box on a checkered floor).

    Returns (num_frames, 3, height, width) float32 in [0, 1]; the same arguments give the same clip.
    """
    return _render_scene(num_frames, height, width)[0]


def make_sample_depth(num_frames: int = 16, height: int = 256, width: int = 256) -> torch.Tensor:
    """Exact depth of ``make_sample_clip`` as a depth video would store it: near bright.

    Returns (num_frames, 1, height, width) float32 in [0, 1] (inverse depth over its maximum).
    """
    inverse_depth = _render_scene(num_frames, height, width)[1]
    return inverse_depth / inverse_depth.amax()
