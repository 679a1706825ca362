"""`depthvid tune | edit | demo | eval | eval-bench | doctor`: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from depthvid import errors
from depthvid.errors import UserError

EDIT_MEMORY_HINT = "lower --frames, edit fewer --prompt at once, or use --precision bf16 (fp16 on CUDA)"
EVAL_MEMORY_HINT = "lower --frames or --depth-size"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr with exit status 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _tune_parser(subparsers) -> None:
    from depthvid.tuning import MEMORY_HINT

    p = subparsers.add_parser("tune", help="tune the video model on one clip",
                              description="Tune the inflated SD2-depth video UNet on one clip and its caption.",
                              argument_default=argparse.SUPPRESS)
    p.add_argument("video", nargs="?", help="source clip: mp4/avi/webm/mov/gif or a folder of images")
    p.add_argument("--prompt", help="caption of the source clip")
    p.add_argument("-o", "--output", dest="run_dir", required=True, help="run folder to write")
    p.add_argument("--model", help="hub id or local folder (default stabilityai/stable-diffusion-2-depth)")
    p.add_argument("--frames", type=int, help="frames sampled from the clip (default 8)")
    p.add_argument("--height", type=int, help="frame height, multiple of 64 (default 512)")
    p.add_argument("--width", type=int, help="frame width, multiple of 64 (default 512)")
    p.add_argument("--sample", choices=("uniform", "stride"), help="frame sampling (default uniform)")
    p.add_argument("--start", type=int, help="first frame for --sample stride")
    p.add_argument("--stride", type=int, help="frame step for --sample stride")
    p.add_argument("--steps", type=int, help="optimiser steps (default 500)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-5)")
    p.add_argument("--warmup-steps", type=int, help="linear lr warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0)")
    p.add_argument("--temporal-loss-weight", type=float, help="lambda of the temporal loss (default 0.01)")
    p.add_argument("--depth-normalize", choices=("clip", "frame"), help="depth min/max over the clip (default) or per frame")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), help="autocast dtype (default auto)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="default: on when a step without it would not fit in the memory available; "
                   "it keeps the attention and wide convs' outputs where that fits")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cpp"),
                   help="kernels of the video ops (default auto: the fastest per op on this device); triton on CPU needs TRITON_INTERPRET=1")
    p.add_argument("--resume", action="store_true", default=False, help="continue the run in -o")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bars")
    p.set_defaults(command=run_tune, memory_hint=MEMORY_HINT)


def run_tune(args) -> int:
    from depthvid.config import TuneConfig
    from depthvid.tuning import read_run, tune

    given = {k: v for k, v in vars(args).items() if k not in ("command", "memory_hint", "run_dir", "resume", "quiet")}
    if args.resume and (Path(args.run_dir) / "run.json").exists():
        stored, _ = read_run(args.run_dir)
        config = dataclasses.replace(stored, **given)
    else:
        for name in ("video", "prompt"):
            if name not in given:
                raise UserError(f"tune: {'VIDEO' if name == 'video' else '--prompt'} is required for a new run")
        config = TuneConfig(**given)
    run_dir = tune(config, args.run_dir, resume=args.resume, progress=not args.quiet)
    if not _is_main_process():
        return 0
    print(f"tuned: {run_dir} (edit it with: depthvid edit {run_dir} --prompt '...' -o edit.mp4)")
    return 0


def _edit_parser(subparsers) -> None:
    p = subparsers.add_parser("edit", help="re-render a tuned clip under new prompts",
                              description="DDIM-invert the tuned clip, then sample it under each --prompt.")
    p.add_argument("run_dir", help="a folder written by `depthvid tune`")
    p.add_argument("--prompt", action="append", required=True, help="edited caption (repeat for several)")
    p.add_argument("-o", "--output", required=True, help="OUT.mp4, OUT.gif, or a folder of PNG frames")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=12.5, help="classifier-free guidance (default 12.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt (also used for inversion)")
    p.add_argument("--frames", type=int, help="frames to render (may exceed the tuned count)")
    p.add_argument("--video", help="the source clip, if it moved since tuning (with --frames)")
    p.add_argument("--depth", dest="depth_video", help="a depth video to use instead of the estimated depth")
    p.add_argument("--depth-scale", type=float, default=1.0, help="multiply the normalised depth")
    p.add_argument("--depth-shift", type=float, default=0.0, help="add to the normalised depth")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cpp"), default="auto",
                   help="kernels of the video ops (default auto: the fastest per op on this device); triton on CPU needs TRITON_INTERPRET=1")
    p.add_argument("--eval", action="store_true", help="score the outputs (CLIP metrics, depth fidelity)")
    p.add_argument("--clip-model", help="CLIP model for --eval (hub id or folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(command=run_edit, memory_hint=EDIT_MEMORY_HINT)


def run_edit(args) -> int:
    from depthvid.editing import edit

    result = edit(
        args.run_dir, args.prompt, args.output, steps=args.steps, guidance=args.guidance, seed=args.seed,
        eta=args.eta, negative_prompt=args.negative_prompt, frames=args.frames, video=args.video,
        depth_video=args.depth_video, depth_scale=args.depth_scale, depth_shift=args.depth_shift, fps=args.fps,
        precision=args.precision, device=args.device, backend=args.backend, evaluate=args.eval, clip_model=args.clip_model,
        progress=not args.quiet,
    )
    if not _is_main_process():
        return 0
    for prompt, path in zip(args.prompt, result.outputs):
        print(f"wrote {path}  ({prompt})")
    print(f"wrote {result.side_by_side}  (source | depth | edits)")
    if result.metrics:
        from depthvid.evaluate import format_result

        for metrics in result.metrics:
            print(format_result(metrics))
    return 0


def _is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or the only process) prints the results."""
    from depthvid.parallel import is_main_process

    return is_main_process()


def _batch_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="tune and edit many clips; under torchrun the ranks share the jobs",
        description="Run every job of JOBS (YAML or JSONL: clip, caption, tune options, edit prompts) into OUT. "
                    "Finished jobs are skipped, interrupted ones resume, failures are recorded and the rest go on.")
    p.add_argument("jobs", help="a .yaml/.yml or .jsonl file of jobs")
    p.add_argument("-o", "--output", required=True, help="folder for the jobs' runs, edits and status")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(command=run_batch)


def run_batch(args) -> int:
    from depthvid.batch import run_batch as run

    return run(args.jobs, args.output, progress=not args.quiet)


def _demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on a tiny model and the bundled clip")
    p.add_argument("-o", "--output", default="depthvid-demo", help="folder to write (default ./depthvid-demo)")
    p.set_defaults(command=run_demo, memory_hint="close other programs and run it again")


def run_demo(args) -> int:
    from depthvid.demo import demo

    demo(args.output)
    return 0


def _doctor_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="device, versions, backends, extension build, per-op self-check",
                              description="Print what this machine can run and self-check every op's backends "
                                          "against the torch reference (exit status 1 if a check fails).")
    p.set_defaults(command=run_doctor)


def run_doctor(args) -> int:
    from depthvid.doctor import run_doctor

    return run_doctor(args)


def _eval_parsers(subparsers) -> None:
    from depthvid.evaluate import add_bench_arguments, add_eval_arguments, run_bench, run_eval

    p = subparsers.add_parser("eval", help="CLIP frame consistency, text alignment, depth fidelity")
    add_eval_arguments(p)
    p.set_defaults(command=run_eval, memory_hint=EVAL_MEMORY_HINT)
    p = subparsers.add_parser("eval-bench", help="score a folder of edited clips (LOVEU-TGVE layout)")
    add_bench_arguments(p)
    p.set_defaults(command=run_bench, memory_hint=EVAL_MEMORY_HINT)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="depthvid", description="One-shot depth-conditioned text-driven video editing.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('depthvid').__version__}")
    subparsers = parser.add_subparsers(title="commands", required=True, parser_class=OneLineParser)
    _tune_parser(subparsers)
    _edit_parser(subparsers)
    _batch_parser(subparsers)
    _demo_parser(subparsers)
    _eval_parsers(subparsers)
    _doctor_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from depthvid.tuning import TrainingDiverged, TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        return args.command(args)
    except UserError as error:
        print(f"depthvid: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        out_of_memory = errors.out_of_memory(error, getattr(args, "memory_hint", "use smaller inputs"))
        if out_of_memory is None:
            raise
        print(f"depthvid: error: {out_of_memory}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"depthvid: {stop}", file=sys.stderr)
        return 130
    except TrainingDiverged as stop:
        print(f"depthvid: error: {stop}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("depthvid: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """A torchrun launch joined a process group (depthvid.parallel): leave it cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
