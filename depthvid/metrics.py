"""Metrics for an edited video: CLIP frame consistency, CLIP textual alignment, depth fidelity.

Definitions (every choice that papers make differently is an ``EvalOptions`` field):

- Frame consistency (as Tune-A-Video defines it): CLIP image embeddings of the frames, cosine similarity
  of every frame pair, mean, x100. ``pairs="all"`` uses the F*(F-1)/2 unordered pairs (the paper's
  wording, and the default); ``pairs="adjacent"`` uses the F-1 pairs (f, f+1). It needs F >= 2:
  one frame has no pair, and a made-up 100 would inflate averages, so F == 1 raises ``UserError``.
- Textual alignment: torchmetrics' CLIPScore, ``100 * max(cos(image_emb, text_emb), 0)`` per frame,
  mean over frames; ``clamp=False`` drops the ``max(., 0)``.
- Depth fidelity: does the edit keep the source's geometry? DPT depth of both videos (one scale
  per clip, never per frame), then per frame a least-squares scale and shift that maps the edited
  depth onto the source depth, then errors of the aligned map (see ``depth_errors``).

CLIP images go through the model's own ``CLIPProcessor`` (resize, centre crop, normalise) as float
frames in [0, 1], so no 8-bit rounding happens on the way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from depthvid.errors import UserError
from depthvid.loading import quiet_loading

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DEPTH_MODEL = "stabilityai/stable-diffusion-2-depth"
PAIRS = ("all", "adjacent")
ABS_REL_MIN_DEPTH = 0.05  # abs_rel skips source pixels below this (depth scaled to [0, 1] per clip)


@dataclass
class EvalOptions:
    """Every choice behind the numbers; it is printed and saved with them."""

    # CLIP for both CLIP metrics: hub id or local folder (CLIPModel + CLIPProcessor). ViT-L/14 by
    # default; "openai/clip-vit-base-patch32" gives the ViT-B/32 numbers some papers report.
    clip_model: str = DEFAULT_CLIP_MODEL
    # frame consistency over "all" unordered frame pairs (Tune-A-Video) or "adjacent" pairs (f, f+1)
    pairs: str = "all"
    # textual alignment per frame: 100*max(cos, 0) (torchmetrics CLIPScore) if True, 100*cos if False
    clamp: bool = True
    # frames sampled uniformly from the edited video (and the source); None = every frame
    num_frames: int | None = None
    # SD2-depth-layout pipeline (hub id or folder) whose depth_estimator + feature_extractor give depth
    depth_model: str = DEFAULT_DEPTH_MODEL
    # depth maps are compared at this size (pixels) of their shorter side, aspect ratio kept
    depth_size: int = 128
    # frames per CLIP / DPT forward pass (memory vs speed; does not change the numbers)
    batch_size: int = 16
    # "cpu", "cuda", ...; None = cuda when available, else cpu
    device: str | None = None

    def __post_init__(self):
        if self.pairs not in PAIRS:
            raise UserError(f"pairs={self.pairs!r}: expected one of {', '.join(PAIRS)}; pick one of them")
        if self.num_frames is not None and self.num_frames < 1:
            raise UserError(f"--frames {self.num_frames}: expected a positive number of frames; pass e.g. 8, or omit it for all")
        if self.depth_size < 8:
            raise UserError(f"--depth-size {self.depth_size}: expected at least 8 pixels; try 128")
        if self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size}: expected a positive number; try 16")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise UserError(f"--device {self.device!r}: not a torch device; use cpu, cuda or cuda:N") from None


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_clip(model_id_or_path: str = DEFAULT_CLIP_MODEL, device: str | torch.device | None = None):
    """Load ``(CLIPModel, CLIPProcessor)`` with ``from_pretrained``, in eval mode, fp32, on ``device``.

    A local folder that does not exist, or a hub id that is not cached while offline, raises
    ``UserError`` naming the model.
    """
    try:
        with quiet_loading():
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(model_id_or_path)
            processor = CLIPProcessor.from_pretrained(model_id_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(
            f"--clip-model {model_id_or_path!r}: could not load a CLIP model ({_first_line(error)}); "
            "pass --clip-model PATH to a folder holding a saved CLIPModel and CLIPProcessor, "
            "or download the hub id while online"
        ) from None
    model = model.float().to(default_device(device)).eval().requires_grad_(False)
    return model, processor


def load_depth_model(model_id_or_path: str = DEFAULT_DEPTH_MODEL, device: str | torch.device | None = None):
    """Load ``(DPTForDepthEstimation, DPTImageProcessor)`` from the ``depth_estimator`` and
    ``feature_extractor`` subfolders of an SD2-depth-layout pipeline (hub id or folder), fp32, eval."""
    try:
        with quiet_loading():
            # without torchvision, importing DPTImageProcessor warns that it falls back to Pillow
            from transformers import DPTForDepthEstimation, DPTImageProcessor

            estimator = DPTForDepthEstimation.from_pretrained(model_id_or_path, subfolder="depth_estimator")
            extractor = DPTImageProcessor.from_pretrained(model_id_or_path, subfolder="feature_extractor")
    except (OSError, ValueError, KeyError) as error:
        raise UserError(
            f"--depth-model {model_id_or_path!r}: could not load its depth_estimator/feature_extractor "
            f"({_first_line(error)}); pass --depth-model PATH to a stable-diffusion-2-depth style folder"
        ) from None
    estimator = estimator.float().to(default_device(device)).eval().requires_grad_(False)
    return estimator, extractor


def check_frames(frames: torch.Tensor, name: str = "frames") -> torch.Tensor:
    """Accept (F, 3, H, W) float frames in [0, 1]; anything else is a ``UserError``."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise UserError(f"{name}: expected a (frames, 3, height, width) tensor, got {got}; pass RGB frames")
    if not frames.is_floating_point():
        raise UserError(f"{name}: expected float values in [0, 1], got dtype {frames.dtype}; divide uint8 frames by 255")
    if frames.shape[0] == 0:
        raise UserError(f"{name}: got 0 frames; pass at least one frame")
    low, high = frames.min().item(), frames.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        raise UserError(f"{name}: expected values in [0, 1], got [{low:.3g}, {high:.3g}]; rescale the frames")
    return frames


def _projected(output) -> torch.Tensor:
    """get_*_features returns the projected embedding (transformers 4) or an output whose
    ``pooler_output`` holds it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_image_embeddings(frames: torch.Tensor, model, processor, batch_size: int = 16) -> torch.Tensor:
    """frames (F, 3, H, W) in [0, 1] -> unit-norm CLIP image embeddings (F, projection_dim), fp32."""
    frames = check_frames(frames)
    device = next(model.parameters()).device
    embeddings = []
    for chunk in frames.float().cpu().clamp(0, 1).split(batch_size):
        pixels = processor(
            images=list(chunk), return_tensors="pt", do_rescale=False, input_data_format="channels_first"
        ).pixel_values
        embeddings.append(_projected(model.get_image_features(pixel_values=pixels.to(device))).float())
    return F.normalize(torch.cat(embeddings), dim=-1).cpu()


@torch.no_grad()
def clip_text_embedding(prompt: str, model, processor) -> torch.Tensor:
    """prompt -> unit-norm CLIP text embedding (projection_dim,), fp32; truncated to CLIP's context."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"prompt: expected non-empty text, got {prompt!r}; pass the edited prompt")
    device = next(model.parameters()).device
    tokens = processor(
        text=[prompt],
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    )
    output = model.get_text_features(
        input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
    )
    return F.normalize(_projected(output).float()[0], dim=-1).cpu()


def frame_pairs(num_frames: int, pairs: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of the frame pairs: all i < j, or adjacent j = i + 1."""
    if pairs == "all":
        i, j = torch.triu_indices(num_frames, num_frames, offset=1)
        return i, j
    if pairs == "adjacent":
        return torch.arange(num_frames - 1), torch.arange(1, num_frames)
    raise UserError(f"pairs={pairs!r}: expected one of {', '.join(PAIRS)}; pick one of them")


def check_two_frames(num_frames: int) -> None:
    """One frame has no pair: frame consistency is undefined, not 100."""
    if num_frames < 2:
        raise UserError(f"frames: frame consistency needs at least 2 frames, got {num_frames}; evaluate a longer video")


def consistency_score(image_embeddings: torch.Tensor, pairs: str = "all") -> float:
    """100 * mean cosine over frame pairs of unit-norm embeddings (F, D), F >= 2."""
    num_frames = image_embeddings.shape[0]
    check_two_frames(num_frames)
    i, j = frame_pairs(num_frames, pairs)
    cosine = (image_embeddings[i] * image_embeddings[j]).sum(-1)
    return 100 * cosine.mean().item()


def alignment_score(image_embeddings: torch.Tensor, text_embedding: torch.Tensor, clamp: bool = True) -> float:
    """Mean over frames of 100 * cos (clamped at 0 if ``clamp``): (F, D) and (D,) unit-norm."""
    scores = 100 * image_embeddings @ text_embedding
    if clamp:
        scores = scores.clamp(min=0)
    return scores.mean().item()


def frame_consistency(frames: torch.Tensor, model, processor, pairs: str = "all", batch_size: int = 16) -> float:
    """100 * mean cosine similarity of CLIP image embeddings over frame pairs.

    Args:
        frames: (F, 3, H, W) float in [0, 1], F >= 2.
        pairs: "all" (every unordered pair, default) or "adjacent" ((f, f+1) pairs).
    Returns a float in [-100, 100]; identical frames give 100.
    """
    check_two_frames(check_frames(frames).shape[0])
    return consistency_score(clip_image_embeddings(frames, model, processor, batch_size), pairs)


def textual_alignment(
    frames: torch.Tensor, prompt: str, model, processor, clamp: bool = True, batch_size: int = 16
) -> float:
    """CLIP score between each frame and ``prompt``, mean over frames (torchmetrics' CLIPScore).

    Args:
        frames: (F, 3, H, W) float in [0, 1].
        clamp: score each frame as 100 * max(cos, 0) (default) or 100 * cos.
    """
    text = clip_text_embedding(prompt, model, processor)
    return alignment_score(clip_image_embeddings(frames, model, processor, batch_size), text, clamp)


# -- depth fidelity ------------------------------------------------------------------------------


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the least-squares ``a * pred + b`` closest to ``target``: (F, N), (F, N) -> (F, N).

    Closed form: a = cov(pred, target) / var(pred), b = mean(target) - a * mean(pred); a constant
    row of ``pred`` gets a = 0 (its best fit is the target's mean).
    """
    pred_centered = pred - pred.mean(1, keepdim=True)
    target_centered = target - target.mean(1, keepdim=True)
    variance = pred_centered.square().mean(1, keepdim=True)
    covariance = (pred_centered * target_centered).mean(1, keepdim=True)
    scale = torch.where(variance > 0, covariance / variance.clamp_min(torch.finfo(pred.dtype).tiny), 0.0)
    return scale * pred_centered + target.mean(1, keepdim=True)


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of (F, N) and (F, N) -> (F,).

    A constant row has no correlation; we define it as 1 when both rows are constant (equal after a
    shift, the invariance this metric grants) and 0 when only one is.
    """
    x_centered = x - x.mean(1, keepdim=True)
    y_centered = y - y.mean(1, keepdim=True)
    x_norm = x_centered.norm(dim=1)
    y_norm = y_centered.norm(dim=1)
    both = (x_norm > 0) & (y_norm > 0)
    correlation = (x_centered * y_centered).sum(1) / (x_norm * y_norm).clamp_min(torch.finfo(x.dtype).tiny)
    neither = (x_norm == 0) & (y_norm == 0)
    return torch.where(both, correlation, neither.to(x.dtype))


def depth_errors(edited_depth: torch.Tensor, source_depth: torch.Tensor) -> dict[str, float]:
    """Scale-and-shift-invariant errors of ``edited_depth`` against ``source_depth``, both (F, 1, h, w).

    The source depth is first scaled to [0, 1] over the whole clip (0 = its farthest point, 1 = its
    nearest; DPT predicts relative inverse depth, so larger is nearer). Per frame, the edited map
    is aligned to it by ``align_scale_shift``; then
      - ``rmse``: root mean square error of the aligned map, in units of the source clip's depth
        range (0.05 means "off by 5% of the scene's depth range");
      - ``abs_rel``: mean |aligned - source| / source over the pixels where the scaled source is
        above 0.05 (the farthest 5% of the range, sky and far background, would divide by ~0);
        0.0 for a frame where no pixel qualifies;
      - ``pearson``: correlation of the two maps (invariant to scale and shift by construction).
    Each is computed per frame, then averaged over frames. Identical maps give 0, 0, 1, and so does
    any edited map that is a per-frame scale and shift of the source (both maps are affine-
    invariant, so DPT's clip-normalised output can be passed as is).
    """
    if edited_depth.shape != source_depth.shape:
        raise UserError(
            f"edited depth {tuple(edited_depth.shape)} vs source depth {tuple(source_depth.shape)}: "
            "expected the same shape; resize both videos to the same size and frame count"
        )
    # (F, 1, h, w) -> (F, h*w), float64 so identical inputs give errors at rounding level
    edited = edited_depth.flatten(1).double()
    source = source_depth.flatten(1).double()
    depth_range = (source.max() - source.min()).clamp_min(torch.finfo(source.dtype).tiny)
    source = (source - source.min()) / depth_range
    aligned = align_scale_shift(edited, source)
    rmse = (aligned - source).square().mean(1).sqrt()
    valid = source > ABS_REL_MIN_DEPTH
    relative = (aligned - source).abs() / torch.where(valid, source, 1.0)
    abs_rel = (relative * valid).sum(1) / valid.sum(1).clamp_min(1)
    return {
        "rmse": rmse.mean().item(),
        "abs_rel": abs_rel.mean().item(),
        "pearson": pearson(edited, source).mean().item(),
    }


def depth_map_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) scaled so that the shorter side is ``short_side``, aspect ratio kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def depth_fidelity(
    edited_frames: torch.Tensor,
    source_frames: torch.Tensor,
    depth_estimator,
    feature_extractor,
    depth_size: int = 128,
    batch_size: int = 4,
) -> dict[str, float]:
    """How well the edited video keeps the source's depth (see ``depth_errors`` for the formulas).

    Args:
        edited_frames: (F, 3, H, W) float in [0, 1].
        source_frames: (F, 3, H', W') float in [0, 1], the same F; frame f must show the same moment.
        depth_size: depth maps are compared at this shorter side, aspect ratio of ``edited_frames``.
        batch_size: frames per DPT forward.
    Returns ``{"rmse": float, "abs_rel": float, "pearson": float}``.
    """
    from depthvid.depth import estimate_depth

    edited_frames = check_frames(edited_frames, "edited_frames")
    source_frames = check_frames(source_frames, "source_frames")
    if edited_frames.shape[0] != source_frames.shape[0]:
        raise UserError(
            f"source_frames: expected as many frames as the edited video ({edited_frames.shape[0]}), "
            f"got {source_frames.shape[0]}; sample both videos with the same --frames"
        )
    size = depth_map_size(edited_frames.shape[2], edited_frames.shape[3], depth_size)
    # "clip" normalisation is one affine map for the whole clip: the source frames keep one common
    # scale (rmse's unit); the edited maps' scale does not matter, they are aligned per frame
    edited_depth = estimate_depth(depth_estimator, feature_extractor, edited_frames, size, "clip", batch_size=batch_size)
    source_depth = estimate_depth(depth_estimator, feature_extractor, source_frames, size, "clip", batch_size=batch_size)
    return depth_errors(edited_depth, source_depth)
