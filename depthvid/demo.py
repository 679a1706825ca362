"""`depthvid demo`: tune then edit, offline, on a tiny random model and the bundled clip."""
from __future__ import annotations

import time
from pathlib import Path

DEMO_CAPTION = "a ball rolls in front of a box"
DEMO_EDITS = ["a glass marble rolls in front of a wooden crate, watercolor", "a red planet passes a tower at night"]


def demo(out_dir: str | Path = "depthvid-demo", *, progress: bool = True) -> list[Path]:
    """Write a tiny model, tune it briefly on the bundled clip, edit under two prompts.

    The model is random, so the pictures are noise: the demo shows the whole tool working end to
    end in about a minute on a laptop CPU. Returns the files written.
    """
    from depthvid.assets import sample_clip_path
    from depthvid.config import TuneConfig
    from depthvid.editing import edit
    from depthvid.fileutil import check_writable
    from depthvid.testing import save_tiny_pipeline
    from depthvid.tuning import tune

    out_dir = Path(out_dir)
    check_writable(out_dir / "run", "-o")
    started = time.perf_counter()
    model_dir = save_tiny_pipeline(out_dir / "tiny-sd2-depth")
    run_dir = out_dir / "run"
    config = TuneConfig(video=str(sample_clip_path()), prompt=DEMO_CAPTION, model=str(model_dir), frames=8,
                        height=64, width=64, steps=20, checkpoint_every=10, lr=1e-4, device="cpu")
    tune(config, run_dir, resume=(run_dir / "run.json").exists(), progress=progress)
    result = edit(run_dir, DEMO_EDITS, out_dir / "edit.mp4", steps=10, guidance=7.5, device="cpu", progress=progress)
    written = [model_dir, run_dir / "adapter.safetensors", run_dir / "loss.png", *result.outputs, result.side_by_side]
    print(f"depthvid demo finished in {time.perf_counter() - started:.0f} s; wrote:")
    for path in written:
        print(f"  {path}")
    return written
