"""``depthvid eval`` (metrics of one edited video) and ``depthvid eval-bench`` (a benchmark folder).

The metrics and their options are defined in ``depthvid.metrics``. Every printed table and every
saved file carries the options the numbers were computed with.

Benchmark layout (LOVEU-TGVE-like; ``--outputs`` defaults to DIR itself)::

    DIR/<video_name>/source.mp4      the source video: source.<mp4|avi|webm|mov|mkv|gif>,
                                     <video_name>.<ext>, or a source/ folder of frames
    DIR/<video_name>/prompts.json    {"style": ..., "object": ..., "background": ..., "multiple": ...}
                                     (an extra "source" key, the source caption, is allowed), or a
                                     list of the four prompts in that order; or prompts.csv with a
                                     header row "kind,prompt" and one row per edit kind
    OUTPUTS/<video_name>/<kind>.mp4  the edited video per kind: <kind>.<ext> or a <kind>/ folder

Every folder of DIR not starting with "." is a video. The CSV has one row per video x edit kind.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from depthvid.errors import UserError
from depthvid.fileutil import atomic_path, check_writable, write_json
from depthvid.metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DEPTH_MODEL,
    PAIRS,
    EvalOptions,
    alignment_score,
    check_frames,
    check_two_frames,
    clip_image_embeddings,
    clip_text_embedding,
    consistency_score,
    depth_fidelity,
    load_clip,
    load_depth_model,
)

EDIT_KINDS = ("style", "object", "background", "multiple")
METRICS = ("frame_consistency", "textual_alignment", "depth_rmse", "depth_abs_rel", "depth_pearson")
METRIC_LABELS = {
    "frame_consistency": "frame consistency (x100)",
    "textual_alignment": "textual alignment (CLIP score)",
    "depth_rmse": "depth RMSE (/ depth range)",
    "depth_abs_rel": "depth abs rel",
    "depth_pearson": "depth Pearson r",
}
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mov", ".mkv", ".gif")


@dataclass
class EvalModels:
    """The networks behind the metrics, loaded once and shared by every evaluated video."""

    clip_model: torch.nn.Module
    clip_processor: object
    depth_estimator: torch.nn.Module | None = None  # None: depth fidelity is not computed
    feature_extractor: object | None = None


def load_models(options: EvalOptions, with_depth: bool) -> EvalModels:
    """Load CLIP, and the depth estimator when ``with_depth``, as ``options`` name them."""
    clip_model, clip_processor = load_clip(options.clip_model, options.device)
    depth_estimator = feature_extractor = None
    if with_depth:
        depth_estimator, feature_extractor = load_depth_model(options.depth_model, options.device)
    return EvalModels(clip_model, clip_processor, depth_estimator, feature_extractor)


# -- one edited video ----------------------------------------------------------------------------


def evaluate_frames(
    frames: torch.Tensor,
    prompt: str,
    source_frames: torch.Tensor | None = None,
    options: EvalOptions | None = None,
    models: EvalModels | None = None,
) -> dict:
    """Every metric of one edited clip.

    Args:
        frames: (F, 3, H, W) float in [0, 1], the edited frames, F >= 2.
        prompt: the edited prompt.
        source_frames: (F, 3, H', W') float in [0, 1], the source frames they were made from, or
            None to skip depth fidelity.
        models: preloaded networks; None loads them as ``options`` say.
    Returns a JSON-ready dict: ``num_frames``, the five ``METRICS`` (depth ones None without a
    source) and ``options``.
    """
    options = options or EvalOptions()
    frames = check_frames(frames)
    check_two_frames(frames.shape[0])
    models = models or load_models(options, with_depth=source_frames is not None)
    # one CLIP pass over the frames serves both CLIP metrics
    images = clip_image_embeddings(frames, models.clip_model, models.clip_processor, options.batch_size)
    text = clip_text_embedding(prompt, models.clip_model, models.clip_processor)
    result = {
        "prompt": prompt,
        "num_frames": frames.shape[0],
        "frame_consistency": consistency_score(images, options.pairs),
        "textual_alignment": alignment_score(images, text, options.clamp),
        "depth_rmse": None,
        "depth_abs_rel": None,
        "depth_pearson": None,
    }
    if source_frames is not None:
        from depthvid.video import resize_and_crop

        height, width = frames.shape[-2:]
        source_frames = check_frames(source_frames, "source_frames")
        # centre crop to the edited frames' aspect ratio so both depth maps cover the same view
        source_frames = torch.stack([resize_and_crop(frame, height, width) for frame in source_frames])
        if models.depth_estimator is None:
            models.depth_estimator, models.feature_extractor = load_depth_model(options.depth_model, options.device)
        errors = depth_fidelity(
            frames, source_frames, models.depth_estimator, models.feature_extractor, options.depth_size,
            options.batch_size,
        )
        result.update({f"depth_{name}": value for name, value in errors.items()})
    result["options"] = dataclasses.asdict(options)
    return result


def _check_exists(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {str(path)!r}: no such file or folder; check the path")
    return path


def load_edit_and_source(
    video_path, source_path=None, num_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read the edited video (``num_frames`` sampled uniformly, None = all) at its own size, and
    the source with as many frames sampled uniformly over its whole length: frame f of both shows
    the same moment when the edit was made from frames spread uniformly over the source
    (depthvid's default sampling). Returns (F, 3, H, W) and (F, 3, H', W') or None."""
    from depthvid.video import load_video

    frames = load_video(_check_exists(video_path, "video"), num_frames, None, None)
    if source_path is None:
        return frames, None
    return frames, load_video(_check_exists(source_path, "--source"), frames.shape[0], None, None)


def evaluate_edit(
    video_path,
    prompt: str,
    source_path=None,
    options: EvalOptions | None = None,
    *,
    source_frames: torch.Tensor | None = None,
    models: EvalModels | None = None,
    **option_overrides,
) -> dict:
    """Every metric of the edited video at ``video_path`` (file or frame folder).

    Args:
        source_path: the source video; enables depth fidelity.
        source_frames: (F, 3, H', W') float in [0, 1], the source frames already in memory (as
            ``depthvid edit --eval`` has them), instead of ``source_path``.
        models: preloaded networks (``load_models``), shared across calls.
        option_overrides: ``EvalOptions`` fields replacing those of ``options`` (None keeps it),
            e.g. ``clip_model=...``.
    Returns ``evaluate_frames``'s dict plus the ``video`` and ``source`` it read.
    """
    options = options or EvalOptions()
    unknown = sorted(set(option_overrides) - {field.name for field in dataclasses.fields(EvalOptions)})
    if unknown:
        raise TypeError(f"evaluate_edit: unknown option(s) {unknown}; see depthvid.metrics.EvalOptions")
    given = {name: value for name, value in option_overrides.items() if value is not None}
    options = dataclasses.replace(options, **given)
    if source_path is not None and source_frames is not None:
        raise UserError("evaluate_edit: got both source_path and source_frames; pass one of them")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"--prompt {prompt!r}: expected the edited prompt as non-empty text")
    frames, source = load_edit_and_source(video_path, source_path, options.num_frames)
    if source_frames is not None:
        source = source_frames
    result = {"video": str(video_path), "source": None if source_path is None else str(source_path)}
    result.update(evaluate_frames(frames, prompt, source, options, models))
    return result


def _format_value(name: str, value) -> str:
    """CLIP scores (0-100) with 2 decimals, depth errors and correlations (0-1) with 4."""
    if value is None:
        return "-"
    return f"{value:.4f}" if name.startswith("depth_") else f"{value:.2f}"


def _options_lines(options: dict, with_depth: bool) -> list[str]:
    frames = "all" if options["num_frames"] is None else f"{options['num_frames']} (uniform)"
    lines = [
        f"  clip model    {options['clip_model']}",
        f"  pairs         {options['pairs']} (frame consistency)",
        f"  clamp         {'on: 100*max(cos, 0)' if options['clamp'] else 'off: 100*cos'} (textual alignment)",
        f"  frames        {frames}",
    ]
    if with_depth:
        lines += [
            f"  depth model   {options['depth_model']}",
            f"  depth size    {options['depth_size']} px short side, scale+shift aligned per frame",
        ]
    return lines


def format_result(result: dict) -> str:
    """The metrics of one ``evaluate_edit`` result and the options behind them, as a small table."""
    with_depth = result["depth_rmse"] is not None
    lines = [f"{result.get('video', 'frames')}: {result['num_frames']} frames, prompt {result['prompt']!r}"]
    for name in METRICS if with_depth else METRICS[:2]:
        lines.append(f"  {METRIC_LABELS[name]:<32} {_format_value(name, result[name]):>8}")
    lines.append("options:")
    lines += _options_lines(result["options"], with_depth)
    return "\n".join(lines)


# -- command line: shared options ----------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_option_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metric options")
    group.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                       help=f"CLIP hub id or local folder (default {DEFAULT_CLIP_MODEL}; "
                            "openai/clip-vit-base-patch32 for ViT-B/32 numbers)")
    group.add_argument("--depth-model", default=DEFAULT_DEPTH_MODEL,
                       help="SD2-depth-layout pipeline (hub id or folder) whose depth_estimator and "
                            f"feature_extractor estimate depth (default {DEFAULT_DEPTH_MODEL})")
    group.add_argument("--pairs", choices=PAIRS, default="all",
                       help="frame consistency over all frame pairs (default) or adjacent pairs only")
    group.add_argument("--no-clamp", action="store_true",
                       help="textual alignment as 100*cos instead of CLIPScore's 100*max(cos, 0)")
    group.add_argument("--frames", type=_positive_int, default=None,
                       help="frames sampled uniformly from each video (default: every frame)")
    group.add_argument("--depth-size", type=_positive_int, default=128,
                       help="shorter side in pixels at which depth maps are compared (default 128)")
    group.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        clip_model=args.clip_model,
        pairs=args.pairs,
        clamp=not args.no_clamp,
        num_frames=args.frames,
        depth_model=args.depth_model,
        depth_size=args.depth_size,
        device=args.device,
    )


# -- depthvid eval ---------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``depthvid eval VIDEO --prompt TEXT [--source VIDEO] [--json OUT] ...``."""
    parser.add_argument("video", help="the edited video: mp4/gif/... file or folder of frames")
    parser.add_argument("--prompt", required=True, help="the edited prompt (for textual alignment)")
    parser.add_argument("--source", default=None,
                        help="the source video the edit was made from; enables depth fidelity")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the result to this JSON file")
    _add_option_arguments(parser)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Print the metrics table of one edited video (and write --json). Bad input raises UserError."""
    options = options_from_args(args)
    if args.json is not None:
        check_writable(args.json, "--json")
    result = evaluate_edit(args.video, args.prompt, args.source, options)
    print(format_result(result))
    if args.json is not None:
        write_json(args.json, result)
    return 0


# -- depthvid eval-bench ---------------------------------------------------------------------------


@dataclass
class BenchItem:
    """One edit of the benchmark: a source video, an edit kind, its prompt and the edited video."""

    video: str  # the video's folder name
    kind: str  # one of EDIT_KINDS
    prompt: str
    source: Path
    edited: Path


def _find_video(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """``folder/<stem><suffix>`` for the first stem with a video file or a frame folder."""
    for stem in stems:
        for suffix in VIDEO_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        if (folder / stem).is_dir():
            return folder / stem
    return None


def _prompts_from_csv(path: Path) -> dict:
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    if rows and not {"kind", "prompt"} <= set(rows[0]):
        raise UserError(f"{path}: expected a header row 'kind,prompt', got {list(rows[0])}; fix the header")
    return {row["kind"].strip(): row["prompt"] for row in rows}


def read_prompts(folder: Path) -> dict[str, str]:
    """The four edit prompts of one benchmark video: {kind: prompt} for every kind in EDIT_KINDS."""
    json_path, csv_path = folder / "prompts.json", folder / "prompts.csv"
    path = json_path if json_path.is_file() else csv_path
    try:
        prompts = json.loads(path.read_text(encoding="utf-8")) if path == json_path else _prompts_from_csv(path)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: not a readable prompts file ({error}); see depthvid eval-bench --help") from None
    if isinstance(prompts, list):
        if len(prompts) != len(EDIT_KINDS):
            raise UserError(
                f"{path}: expected {len(EDIT_KINDS)} edit prompts ({', '.join(EDIT_KINDS)}), got "
                f"{len(prompts)}; give one prompt per edit kind"
            )
        prompts = dict(zip(EDIT_KINDS, prompts))
    if not isinstance(prompts, dict):
        raise UserError(f"{path}: expected an object {{kind: prompt}} or a list of 4 prompts, got {type(prompts).__name__}")
    unknown = sorted(set(prompts) - set(EDIT_KINDS) - {"source"})
    missing = [kind for kind in EDIT_KINDS if kind not in prompts]
    if unknown or missing:
        raise UserError(
            f"{path}: expected {len(EDIT_KINDS)} edit prompts ({', '.join(EDIT_KINDS)}), "
            f"missing {missing}, unknown {unknown}; name each prompt by its edit kind"
        )
    empty = [kind for kind in EDIT_KINDS if not isinstance(prompts[kind], str) or not prompts[kind].strip()]
    if empty:
        raise UserError(f"{path}: the {', '.join(empty)} prompt is empty or not text; write the edited prompt")
    return {kind: prompts[kind] for kind in EDIT_KINDS}


def find_bench_items(bench_dir, outputs_dir=None) -> list[BenchItem]:
    """Every (video, edit kind) of the benchmark at ``bench_dir`` (layout: module docstring).

    Raises one ``UserError`` listing every missing source, prompts file and edited video.
    """
    bench_dir = _check_exists(bench_dir, "benchmark folder")
    outputs_dir = bench_dir if outputs_dir is None else _check_exists(outputs_dir, "--outputs")
    folders = sorted(p for p in bench_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"benchmark folder {str(bench_dir)!r}: holds no video folders; see depthvid eval-bench --help")
    items, missing = [], []
    for folder in folders:
        source = _find_video(folder, ("source", folder.name))
        if source is None:
            missing.append(f"{folder}/source.mp4")
        if not (folder / "prompts.json").is_file() and not (folder / "prompts.csv").is_file():
            missing.append(f"{folder}/prompts.json")
            continue
        prompts = read_prompts(folder)
        for kind in EDIT_KINDS:
            edited = _find_video(outputs_dir / folder.name, (kind,))
            if edited is None:
                missing.append(f"{outputs_dir / folder.name}/{kind}.mp4")
            elif source is not None:
                items.append(BenchItem(folder.name, kind, prompts[kind], source, edited))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UserError(
            f"eval-bench: {len(missing)} missing ({shown}); add them (a .gif, other video suffix or "
            "frame folder works too) or pass --outputs"
        )
    return items


CSV_COLUMNS = ("video", "kind", "prompt", "num_frames") + METRICS + (
    "clip_model", "pairs", "clamp", "frames_option", "depth_model", "depth_size",
)


def _csv_row(item: BenchItem, result: dict) -> dict:
    options = result["options"]
    row = {"video": item.video, "kind": item.kind, "prompt": item.prompt, "num_frames": result["num_frames"]}
    row.update({name: "" if result[name] is None else result[name] for name in METRICS})
    row.update({name: options[name] for name in ("clip_model", "pairs", "clamp", "depth_model", "depth_size")})
    row["frames_option"] = "all" if options["num_frames"] is None else options["num_frames"]
    return row


def summarize(rows: list[dict], with_depth: bool) -> str:
    """Mean of every metric per edit kind and overall, as a table."""
    metrics = METRICS if with_depth else METRICS[:2]
    header = f"{'kind':<12}{'n':>4}" + "".join(f"{name:>20}" for name in metrics)
    lines = [header]
    for kind in EDIT_KINDS + ("overall",):
        chosen = [row for row in rows if kind in ("overall", row["kind"])]
        if not chosen:
            continue
        means = {name: math.fsum(row[name] for row in chosen) / len(chosen) for name in metrics}
        lines.append(f"{kind:<12}{len(chosen):>4}" + "".join(f"{_format_value(n, m):>20}" for n, m in means.items()))
    return "\n".join(lines)


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``depthvid eval-bench DIR [--outputs DIR] --csv OUT.csv ...``."""
    parser.add_argument("bench_dir", metavar="DIR",
                        help="benchmark folder: DIR/<video>/{source.mp4, prompts.json} (see module doc)")
    parser.add_argument("--outputs", default=None, metavar="DIR",
                        help="edited videos as OUTPUTS/<video>/<kind>.mp4 (default: DIR itself)")
    parser.add_argument("--csv", required=True, metavar="OUT", help="write one row per video x edit kind here")
    parser.add_argument("--no-depth", action="store_true", help="skip depth fidelity (no depth model needed)")
    _add_option_arguments(parser)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Evaluate every edit of a benchmark folder, write the CSV, print means per kind and overall."""
    from tqdm.auto import tqdm

    options = options_from_args(args)
    check_writable(args.csv, "--csv")
    items = find_bench_items(args.bench_dir, args.outputs)
    with_depth = not args.no_depth
    models = load_models(options, with_depth)
    rows = []
    for item in tqdm(items, desc="eval-bench", unit="edit", file=sys.stderr):
        result = evaluate_edit(item.edited, item.prompt, item.source if with_depth else None, options, models=models)
        rows.append(_csv_row(item, result))
    with atomic_path(args.csv) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    videos = len({item.video for item in items})
    print(f"{args.bench_dir}: {videos} videos x {len(EDIT_KINDS)} edit kinds -> {args.csv}")
    print(summarize(rows, with_depth))
    print("options:")
    print("\n".join(_options_lines(dataclasses.asdict(options), with_depth)))
    return 0
