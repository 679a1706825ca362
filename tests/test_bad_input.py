"""Every bad input of every command: one line on stderr, exit status 2, no traceback, nothing written.

Numbers, paths, model folders, unreadable videos (with decord/FFmpeg's own log lines) and running
out of memory anywhere (raised by a monkeypatched forward or writer).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from depthvid import tuning
from depthvid.assets import sample_clip_path
from depthvid.cli import main
from depthvid.errors import out_of_memory
from depthvid.models.video_unet import VideoUNet
from depthvid.testing import make_sample_clip
from depthvid.video import write_video

PROMPT = "a ball rolls in front of a box"
UNWRITABLE = "/proc/depthvid-test"  # cannot be created, not even by root


def tune_args(model_dir, run_dir, *extra):
    return ["tune", str(sample_clip_path()), "--prompt", PROMPT, "-o", str(run_dir), "--model", str(model_dir),
            "--frames", "2", "--height", "64", "--width", "64", "--steps", "1", "--lr", "1e-3", "--quiet", *extra]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_one_line_error(err: str, *needles) -> None:
    assert err.count("\n") == 1 and err.startswith("depthvid") and err.endswith("\n"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def run_bad(capsys, argv, *needles) -> str:
    """main(argv) must exit 2 with one line on stderr naming every needle (argparse's errors exit
    through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err, *needles)
    return err


@pytest.fixture(scope="module")
def tuned_run(tiny_pipeline_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bad-input") / "run"
    assert main(tune_args(tiny_pipeline_dir, run_dir)) == 0
    return run_dir


# -- numbers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("--frames", "0"), ("--frames", "-3"), ("--height", "0"), ("--start", "-1"), ("--stride", "0"),
    ("--steps", "0"), ("--steps", "1.5"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1e-5"), ("--lr", "2"),
    ("--warmup-steps", "-1"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"), ("--max-grad-norm", "0"),
    ("--max-grad-norm", "inf"), ("--temporal-loss-weight", "nan"), ("--temporal-loss-weight", "-1"),
    ("--seed", "-1"), ("--seed", str(2**64)), ("--checkpoint-every", "0"), ("--device", "gpu"),
])
def test_tune_rejects_out_of_range_options(tiny_pipeline_dir, tmp_path, capsys, option, value):
    run_dir = tmp_path / "run"
    run_bad(capsys, tune_args(tiny_pipeline_dir, run_dir, option, value), option)
    assert not run_dir.exists()


@pytest.mark.parametrize("option, value", [
    ("--steps", "0"), ("--steps", "nan"), ("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-1"),
    ("--guidance", "1e6"), ("--eta", "nan"), ("--eta", "-0.1"), ("--eta", "1.5"), ("--seed", "-1"),
    ("--frames", "0"), ("--depth-scale", "nan"), ("--depth-shift", "-inf"), ("--fps", "0"), ("--fps", "100000"),
    ("--device", "cuda:x"),
])
def test_edit_rejects_out_of_range_options(tuned_run, tmp_path, capsys, option, value):
    before = files_under(tuned_run)
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a marble", "-o", str(tmp_path / "out.mp4"), option, value],
            option)
    assert files_under(tmp_path) == [] and files_under(tuned_run) == before


def test_edit_steps_above_the_training_timesteps(tuned_run, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(VideoUNet, "forward", lambda *args, **kwargs: calls.append(1))
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", str(tmp_path / "o.gif"), "--steps", "1001"],
            "--steps 1001", "1000")
    assert calls == [] and files_under(tmp_path) == []


@pytest.mark.parametrize("command", ["eval", "eval-bench"])
@pytest.mark.parametrize("option, value", [("--frames", "0"), ("--frames", "nan"), ("--depth-size", "4"),
                                           ("--depth-size", "inf")])
def test_eval_commands_reject_out_of_range_numbers(tmp_path, capsys, command, option, value):
    clip = write_video(make_sample_clip(2, 64, 64), tmp_path / "clip")
    target = ["--prompt", "a"] if command == "eval" else ["--csv", str(tmp_path / "scores.csv")]
    run_bad(capsys, [command, str(clip), *target, option, value], option)
    assert not (tmp_path / "scores.csv").exists()


# -- paths -----------------------------------------------------------------------------------------------


def test_every_command_checks_its_output_can_be_created(tuned_run, tiny_pipeline_dir, tmp_path, capsys,
                                                       monkeypatch):
    import depthvid.loading

    loads = []
    monkeypatch.setattr(depthvid.loading, "load_base_model", lambda *a, **k: loads.append(1))
    clip = str(write_video(make_sample_clip(2, 64, 64), tmp_path / "clip"))
    run_bad(capsys, tune_args(tiny_pipeline_dir, UNWRITABLE), UNWRITABLE)
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", f"{UNWRITABLE}/o.mp4"], UNWRITABLE)
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", f"{UNWRITABLE}/frames"], UNWRITABLE)
    run_bad(capsys, ["demo", "-o", UNWRITABLE], UNWRITABLE)
    run_bad(capsys, ["eval", clip, "--prompt", "a", "--json", f"{UNWRITABLE}/s.json"], "--json", UNWRITABLE)
    run_bad(capsys, ["eval-bench", str(tmp_path), "--csv", f"{UNWRITABLE}/s.csv"], "--csv", UNWRITABLE)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run_bad(capsys, tune_args(tiny_pipeline_dir, blocker), "a-file")
    assert loads == [] and not Path(UNWRITABLE).exists()


@pytest.mark.parametrize("name", ["out.avi", "out.webm", "out.png", "edits.v2"])
def test_edit_rejects_unsupported_output_suffixes(tuned_run, tmp_path, capsys, name):
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", str(tmp_path / name)],
            name, ".mp4 or .gif", "folder name without a suffix")
    assert files_under(tmp_path) == []


def test_edit_checks_input_videos_before_loading(tuned_run, tmp_path, capsys):
    out = str(tmp_path / "o.mp4")
    (tmp_path / "depth.mp4").write_text("not a video")
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", out, "--depth", str(tmp_path / "depth.mp4")],
            "--depth", "depth.mp4")
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", out, "--video", str(tmp_path / "gone.mp4")],
            "--video", "gone.mp4")
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", out, "--frames", "999"], "999")


def test_damaged_run_json(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"config": ')
    run_bad(capsys, ["edit", str(tmp_path / "run"), "--prompt", "a", "-o", str(tmp_path / "o.mp4")], "run.json",
            "damaged")
    run_bad(capsys, ["tune", "-o", str(tmp_path / "run"), "--resume"], "run.json", "damaged")


# -- model folders ------------------------------------------------------------------------------------


def break_unet(tiny_pipeline_dir, folder: Path, how: str) -> Path:
    shutil.copytree(tiny_pipeline_dir, folder)
    config_path, weights_path = folder / "unet" / "config.json", folder / "unet" / "diffusion_pytorch_model.safetensors"
    config, weights = json.loads(config_path.read_text()), load_file(str(weights_path))
    if how == "weight missing":  # diffusers would fill it with random values
        del weights["conv_in.weight"]
    elif how == "no mid block":  # diffusers would drop its weights
        config["mid_block_type"] = None
    elif how == "other width":  # diffusers would fail inside load_state_dict
        config["cross_attention_dim"] += 16
    config_path.write_text(json.dumps(config))
    save_file(weights, str(weights_path))
    return folder


@pytest.mark.parametrize("how, needle", [("weight missing", "missing from the file: 1 (conv_in.weight)"),
                                         ("no mid block", "not in the config"),
                                         ("other width", "of another shape")])
def test_model_folder_whose_unet_config_and_weights_disagree(tiny_pipeline_dir, tmp_path, capsys, how, needle):
    model = break_unet(tiny_pipeline_dir, tmp_path / "model", how)
    run_bad(capsys, tune_args(model, tmp_path / "run"), str(model), "unet/config.json", needle)
    assert not (tmp_path / "run").exists()


# -- unreadable videos: FFmpeg and decord print from C, around our line -----------------------------------


def test_unreadable_videos_give_one_line_without_ffmpeg_or_decord_logs(tiny_pipeline_dir, tmp_path, capfd):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_text("hello")  # decord logs "moov atom not found" and "ERROR opening"
    truncated = tmp_path / "truncated.mp4"  # opens, then fails to decode: h264 and filter-graph errors
    truncated.write_bytes(sample_clip_path().read_bytes()[:3000])
    for video in (garbage, truncated):
        argv = tune_args(tiny_pipeline_dir, tmp_path / "run")
        argv[1] = str(video)
        assert main(argv) == 2
        assert_one_line_error(capfd.readouterr().err, video.name, "not a readable video")
    assert not (tmp_path / "run").exists()


# -- out of memory -----------------------------------------------------------------------------------------

ALLOCATION_FAILURES = {
    "cuda": (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total)", "2.0 GiB"),
    "cpu allocator": (RuntimeError, "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                                    "memory: you tried to allocate 23068672000 bytes.", "21.5 GiB"),
    "numpy": (MemoryError, "Unable to allocate 512. MiB for an array with shape (4, 4096) and data type float32",
              "512.0 MiB"),
    "bare": (MemoryError, "", "size not reported"),
}


@pytest.mark.parametrize("kind", ALLOCATION_FAILURES)
def test_out_of_memory_names_the_size(kind):
    error_type, message, size = ALLOCATION_FAILURES[kind]
    error = out_of_memory(error_type(message), "lower --frames")
    assert size in str(error) and str(error).endswith("; lower --frames")
    assert ("GPU" if kind == "cuda" else "CPU") in str(error)


def test_a_real_failed_allocation_is_out_of_memory():
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**50, dtype=torch.uint8)  # beyond the address space: refused at once, even with overcommit
    assert "an allocation of 1024.0 TiB failed" in str(out_of_memory(failed.value, "x"))


def test_other_runtime_errors_are_not_out_of_memory():
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "x") is None
    assert out_of_memory(ValueError("not enough memory"), "x") is None


@pytest.mark.parametrize("kind", ["cuda", "cpu allocator", "bare"])
def test_out_of_memory_in_edit_is_one_line_and_writes_nothing(tuned_run, tmp_path, capsys, monkeypatch, kind):
    error_type, message, size = ALLOCATION_FAILURES[kind]

    def forward(*args, **kwargs):
        raise error_type(message)

    monkeypatch.setattr(VideoUNet, "forward", forward)
    before = files_under(tuned_run)
    run_bad(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", str(tmp_path / "o.mp4"), "--quiet"], size,
            "--frames")
    assert files_under(tmp_path) == [] and files_under(tuned_run) == before


def fail_at_call(function, failing_call: int, error: BaseException):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= failing_call:
            raise error
        return function(*args, **kwargs)

    return failing


def test_out_of_memory_in_a_tuning_step_keeps_the_steps_done(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ("--steps", "4", "--checkpoint-every", "10")
    assert main(tune_args(tiny_pipeline_dir, straight, *args)) == 0
    error = RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 23068672000 bytes.")
    # the third step draws its noise, then runs out of memory in the forward
    monkeypatch.setattr(VideoUNet, "forward", fail_at_call(VideoUNet.forward, 3, error))
    run_bad(capsys, tune_args(tiny_pipeline_dir, stopped, *args), "21.5 GiB", "--gradient-checkpointing",
            "step 2 is saved", "--resume")
    assert json.loads((stopped / "run.json").read_text())["steps_done"] == 2
    assert not [p for p in stopped.iterdir() if p.name.startswith(".")]  # no temporary files left
    monkeypatch.undo()
    assert main(["tune", "-o", str(stopped), "--resume", "--quiet"]) == 0
    a, b = load_file(str(straight / "checkpoint.safetensors")), load_file(str(stopped / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if nothing had happened


def test_out_of_memory_while_saving_a_checkpoint_keeps_the_previous_one(tiny_pipeline_dir, tmp_path, capsys,
                                                                       monkeypatch):
    run_dir = tmp_path / "run"
    # save_file writes the cache, then the checkpoints of steps 1, 2, ...: the second checkpoint fails
    monkeypatch.setattr(tuning, "save_file", fail_at_call(tuning.save_file, 3, MemoryError()))
    run_bad(capsys, tune_args(tiny_pipeline_dir, run_dir, "--steps", "3", "--checkpoint-every", "1"),
            "out of CPU memory")
    assert json.loads((run_dir / "run.json").read_text())["steps_done"] == 1
    from safetensors import safe_open

    with safe_open(str(run_dir / "checkpoint.safetensors"), "pt") as handle:
        assert handle.metadata()["step"] == "1"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
