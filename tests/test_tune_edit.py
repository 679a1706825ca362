"""End to end: `depthvid tune` -> `depthvid edit` on the tiny pipeline, resume, caching, bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depthvid import editing, tuning
from depthvid.assets import sample_clip_path
from depthvid.cli import main
from depthvid.config import TuneConfig
from depthvid.models.video_unet import VideoUNet
from depthvid.video import load_video

FRAMES, SIZE = 4, 64


def tune_args(model_dir, run_dir, *extra):
    return ["tune", str(sample_clip_path()), "--prompt", "a ball rolls in front of a box", "-o", str(run_dir),
            "--model", str(model_dir), "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", "3", "--checkpoint-every", "2", "--lr", "1e-3", "--quiet", *extra]


@pytest.fixture(scope="module")
def tuned_run(tiny_pipeline_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert main(tune_args(tiny_pipeline_dir, run_dir)) == 0
    return run_dir


def count_unet_calls(monkeypatch):
    calls = []
    forward = VideoUNet.forward

    def counting_forward(self, sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(VideoUNet, "forward", counting_forward)
    return calls


def test_tune_writes_a_complete_run(tuned_run):
    run = json.loads((tuned_run / "run.json").read_text())
    assert run["steps_done"] == 3 and run["config"]["frames"] == FRAMES
    assert run["trainable_parameters"] > 0
    for name in ("adapter.safetensors", "adapter.json", "cache.safetensors", "checkpoint.safetensors",
                 "loss.png", "source.mp4", "depth.mp4"):
        assert (tuned_run / name).is_file(), name
    log = [json.loads(line) for line in (tuned_run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in log)
    cache = load_file(str(tuned_run / "cache.safetensors"))
    assert cache["latents"].shape == (1, 4, FRAMES, SIZE // 8, SIZE // 8)
    assert cache["depth"].shape == (1, 1, FRAMES, SIZE // 8, SIZE // 8)
    assert cache["depth"].min() >= -1 and cache["depth"].max() <= 1
    assert cache["frames"].shape == (FRAMES, 3, SIZE, SIZE) and cache["frames"].dtype == torch.uint8


def test_edit_writes_one_video_per_prompt_and_a_side_by_side(tuned_run, tmp_path, capsys):
    out = tmp_path / "edit.mp4"
    code = main(["edit", str(tuned_run), "--prompt", "a glass marble", "--prompt", "a red planet",
                 "-o", str(out), "--steps", "3", "--quiet"])
    assert code == 0
    written = sorted(tmp_path.glob("*.mp4"))
    assert len(written) == 3, written
    for path in written:
        frames = load_video(path, num_frames=None, height=None, width=None)
        assert frames.shape[0] == FRAMES and frames.shape[-2] == SIZE
        columns = 2 + 2 if "side-by-side" in path.name else 1  # source | depth | two edits
        assert frames.shape[-1] == SIZE * columns, path.name
    assert "side-by-side" in capsys.readouterr().out


def test_edit_with_eval_scores_each_output_against_the_source(tuned_run, tiny_pipeline_dir, tiny_clip_dir, tmp_path, capsys):
    from depthvid.evaluate import evaluate_edit
    from depthvid.metrics import EvalOptions

    prompts = ["a glass marble", "a red planet"]
    result = editing.edit(tuned_run, prompts, tmp_path / "edit.gif", steps=2, evaluate=True,
                          clip_model=str(tiny_clip_dir), progress=False)
    assert [metrics["prompt"] for metrics in result.metrics] == prompts
    source = load_file(str(tuned_run / tuning.CACHE_FILE))["frames"].float() / 255
    options = EvalOptions(clip_model=str(tiny_clip_dir), depth_model=str(tiny_pipeline_dir))
    for path, prompt, metrics in zip(result.outputs, prompts, result.metrics):
        direct = evaluate_edit(str(path), prompt, options=options, source_frames=source)
        for name in ("frame_consistency", "textual_alignment", "depth_rmse", "depth_abs_rel", "depth_pearson"):
            assert metrics[name] is not None and metrics[name] == pytest.approx(direct[name], abs=1e-6), name

    assert main(["edit", str(tuned_run), "--prompt", prompts[0], "-o", str(tmp_path / "cli.gif"), "--steps", "2",
                 "--quiet", "--eval", "--clip-model", str(tiny_clip_dir)]) == 0
    assert "frame consistency (x100)" in capsys.readouterr().out


def test_edit_with_eval_and_a_missing_clip_model_fails_before_editing(tuned_run, tmp_path, capsys, monkeypatch):
    calls = count_unet_calls(monkeypatch)
    missing = str(tmp_path / "no-clip")
    assert_user_error(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", str(tmp_path / "o.mp4"), "--eval",
                               "--clip-model", missing], missing)
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_edit_to_gif_and_frame_folder_with_more_frames_than_tuned(tuned_run, tmp_path):
    assert main(["edit", str(tuned_run), "--prompt", "a marble", "-o", str(tmp_path / "a.gif"),
                 "--steps", "2", "--quiet"]) == 0
    assert load_video(tmp_path / "a.gif", num_frames=None, height=None, width=None).shape[0] == FRAMES
    assert main(["edit", str(tuned_run), "--prompt", "a marble", "-o", str(tmp_path / "frames"),
                 "--steps", "2", "--frames", str(FRAMES + 3), "--quiet"]) == 0
    folder = next(p for p in (tmp_path / "frames").iterdir() if p.name != "side-by-side")
    assert len(list(folder.glob("*.png"))) == FRAMES + 3


def test_second_edit_reuses_the_cached_inversion(tuned_run, tmp_path, monkeypatch):
    calls = count_unet_calls(monkeypatch)
    steps = 4  # no other test inverts with 4 steps
    first = editing.edit(tuned_run, ["a cat"], tmp_path / "a.mp4", steps=steps, progress=False, guidance=1.0)
    assert len(calls) == 2 * steps  # inversion + sampling
    calls.clear()
    second = editing.edit(tuned_run, ["a dog", "a fox"], tmp_path / "b.mp4", steps=steps, progress=False)
    assert not first.inversion_cached and second.inversion_cached
    # sampling only: 2 prompts x 2 guidance halves, one video per UNet call on CPU
    assert calls == [1] * (2 * 2 * steps)


class GaussianOracle(torch.nn.Module):
    """The exact noise predictor for latents drawn from N(0, sigma^2): eps(x_t) is linear in x_t.

    With it, the DDIM ODE is smooth, so inversion followed by sampling must come back to the
    start up to a small discretisation error: a check of the two loops and their timesteps.
    """

    def __init__(self, alphas_cumprod, sigma):
        super().__init__()
        self.alphas_cumprod, self.sigma = alphas_cumprod, sigma

    def forward(self, sample, timestep, encoder_hidden_states):
        alpha = self.alphas_cumprod[int(timestep)]
        latents = sample[:, :4]  # the depth channel is conditioning only
        return (1 - alpha).sqrt() * latents / (alpha * self.sigma**2 + 1 - alpha)


def test_ddim_inversion_then_sampling_reconstructs_the_source(tuned_run):
    from diffusers import DDIMScheduler

    config, _ = tuning.read_run(tuned_run)
    scheduler_config = DDIMScheduler.load_config(Path(config.model) / "scheduler")
    cache = load_file(str(tuned_run / "cache.safetensors"))
    depth, sigma = cache["depth"], 0.5
    latents = cache["latents"] / cache["latents"].std() * sigma
    oracle = GaussianOracle(DDIMScheduler.from_config(scheduler_config).alphas_cumprod, sigma)
    embeds = torch.zeros(1, 77, 32)
    errors = []
    for steps in (25, 50):
        noise = editing.ddim_invert(oracle, scheduler_config, latents, depth, embeds, steps, progress=False)
        assert 0.9 < noise.std() < 1.1  # inverted to unit-variance noise
        rebuilt = editing.ddim_sample(oracle, scheduler_config, noise, depth, embeds, embeds, steps,
                                      guidance=1.0, progress=False)
        errors.append(((rebuilt - latents).norm() / latents.norm()).item())
    # DDIM inversion is first order: the error halves when the steps double
    assert errors[1] < 0.05 and errors[1] < 0.6 * errors[0], errors


def test_inversion_error_of_the_tuned_model_shrinks_with_more_steps(tuned_run):
    """The tiny random UNet is far from smooth, so only convergence can be asked of it."""
    from depthvid.loading import encode_prompts, load_base_model
    from depthvid.models import inflate_unet, load_adapter

    config, _ = tuning.read_run(tuned_run)
    cache = load_file(str(tuned_run / "cache.safetensors"))
    base = load_base_model(config.model)
    video_unet = inflate_unet(base.unet)
    load_adapter(video_unet, tuned_run)
    caption = encode_prompts(base, [config.prompt])
    latents, depth = cache["latents"], cache["depth"]
    errors = []
    for steps in (5, 40):
        noise = editing.ddim_invert(video_unet, base.scheduler.config, latents, depth, caption, steps, progress=False)
        rebuilt = editing.ddim_sample(video_unet, base.scheduler.config, noise, depth, caption, caption, steps,
                                      guidance=1.0, progress=False)
        errors.append(((rebuilt - latents).norm() / latents.norm()).item())
    assert errors[1] < 0.75 * errors[0], errors


def test_sampling_one_video_per_unet_call_gives_the_batched_result(tuned_run, monkeypatch):
    """CPU samples each prompt's guided halves one video per UNet call (its memory peak); the
    latents must be those of one batched call."""
    from depthvid.loading import encode_prompts, load_base_model
    from depthvid.models import inflate_unet, load_adapter

    config, _ = tuning.read_run(tuned_run)
    cache = load_file(str(tuned_run / "cache.safetensors"))
    base = load_base_model(config.model)
    video_unet = inflate_unet(base.unet).eval()
    load_adapter(video_unet, tuned_run)
    prompts, empty = encode_prompts(base, ["a red ball", "a blue box"]), encode_prompts(base, [""])
    noise = torch.randn(cache["latents"].shape, generator=torch.Generator().manual_seed(0))
    batches = count_unet_calls(monkeypatch)
    results = {}
    for videos_per_call in (None, 1):
        results[videos_per_call] = editing.ddim_sample(
            video_unet, base.scheduler.config, noise, cache["depth"], prompts, empty, 3, guidance=7.5,
            progress=False, videos_per_call=videos_per_call)
    assert batches == [4] * 3 + [1] * 12
    torch.testing.assert_close(results[1], results[None], rtol=1e-4, atol=1e-5)
    assert editing.default_videos_per_call(torch.device("cpu")) == 1
    assert editing.default_videos_per_call(torch.device("cuda")) is None


def test_resume_after_ctrl_c_ends_with_the_same_weights(tiny_pipeline_dir, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(tune_args(tiny_pipeline_dir, straight, "--steps", "4", "--checkpoint-every", "10")) == 0

    real_loss = tuning.training_loss
    taken = []

    def interrupt_at_third_step(*args, **kwargs):
        taken.append(1)
        if len(taken) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(tuning, "training_loss", interrupt_at_third_step)
    assert main(tune_args(tiny_pipeline_dir, stopped, "--steps", "4", "--checkpoint-every", "10")) == 130
    assert json.loads((stopped / "run.json").read_text())["steps_done"] == 2
    monkeypatch.setattr(tuning, "training_loss", real_loss)
    assert main(["tune", "-o", str(stopped), "--resume", "--quiet"]) == 0

    a = load_file(str(straight / "checkpoint.safetensors"))
    b = load_file(str(stopped / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (stopped / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_same_seed_same_adapter_and_edit(tiny_pipeline_dir, tuned_run, tmp_path):
    again = tmp_path / "again"
    assert main(tune_args(tiny_pipeline_dir, again)) == 0
    a, b = load_file(str(tuned_run / "adapter.safetensors")), load_file(str(again / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    outs = [editing.edit(tuned_run, ["a cat"], tmp_path / f"{i}", steps=2, eta=1.0, seed=7, progress=False)
            for i in range(2)]
    frames = [load_video(r.outputs[0], num_frames=None, height=None, width=None) for r in outs]
    assert torch.equal(frames[0], frames[1])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    real_loss = tuning.training_loss
    taken = []

    def nan_at_third_step(*args, **kwargs):
        loss, mse, temporal = real_loss(*args, **kwargs)
        taken.append(1)
        return (loss * float("nan"), mse, temporal) if len(taken) == 3 else (loss, mse, temporal)

    monkeypatch.setattr(tuning, "training_loss", nan_at_third_step)
    run_dir = tmp_path / "run"
    assert main(tune_args(tiny_pipeline_dir, run_dir, "--steps", "4")) == 1
    assert "nan" in capsys.readouterr().err
    assert json.loads((run_dir / "run.json").read_text())["steps_done"] == 2
    assert (run_dir / "adapter.safetensors").is_file()


def test_python_api_is_the_cli(tiny_pipeline_dir, tmp_path):
    import depthvid

    config = depthvid.TuneConfig(video=str(sample_clip_path()), prompt="a ball", model=str(tiny_pipeline_dir),
                                 frames=2, height=64, width=64, steps=1)
    run_dir = depthvid.tune(config, tmp_path / "run", progress=False)
    result = depthvid.edit(run_dir, ["a marble"], tmp_path / "out.gif", steps=1, progress=False)
    assert result.outputs[0].is_file() and result.side_by_side.is_file()


# ---------------------------------------------------------------- bad input: one line, exit 2


def assert_user_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("depthvid"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_bad_tune_input(tiny_pipeline_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["--prompt", "x", "-o", run, "--model", str(tiny_pipeline_dir), "--height", "64", "--width", "64"]
    assert_user_error(capsys, ["tune", str(tmp_path / "missing.mp4"), *base], "missing.mp4")
    (tmp_path / "notavideo.mp4").write_text("hello")
    assert_user_error(capsys, ["tune", str(tmp_path / "notavideo.mp4"), *base], "notavideo.mp4")
    clip = str(sample_clip_path())
    assert_user_error(capsys, ["tune", clip, *base, "--frames", "999"], "999")
    assert_user_error(capsys, ["tune", clip, *base[:-4], "--height", "500", "--width", "64"], "500", "64")
    assert_user_error(capsys, ["tune", clip, *base, "--steps", "0"], "--steps")
    assert_user_error(capsys, ["tune", clip, "--prompt", " ", "-o", run], "--prompt")
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_pipeline_dir, broken)
    shutil.rmtree(broken / "vae")
    assert_user_error(capsys, ["tune", clip, *base[:-6], "--model", str(broken)], "vae")
    assert not Path(run).exists()  # nothing half-written


def test_base_without_depth_channel_is_rejected(tiny_pipeline_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "not-depth"
    shutil.copytree(tiny_pipeline_dir, model)
    unet_config = dict(UNet2DConditionModel.load_config(model / "unet"))
    unet_config["in_channels"] = 4
    UNet2DConditionModel.from_config(unet_config).save_pretrained(model / "unet")
    assert_user_error(capsys, tune_args(model, tmp_path / "run"), "in_channels=4")


def test_bad_edit_input(tuned_run, tiny_pipeline_dir, tmp_path, capsys):
    out = str(tmp_path / "o.mp4")
    assert_user_error(capsys, ["edit", str(tmp_path), "--prompt", "a", "-o", out], "not a depthvid run")
    assert_user_error(capsys, ["edit", str(tuned_run), "--prompt", "", "-o", out], "empty")
    assert_user_error(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", out, "--steps", "0"], "--steps")
    assert_user_error(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", out, "--guidance", "-1"], "--guidance")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_user_error(capsys, ["edit", str(tuned_run), "--prompt", "a", "-o", str(blocker / "o.mp4")], "o.mp4")
    assert_user_error(capsys, tune_args(tiny_pipeline_dir, tuned_run, "--resume", "--lr", "0.5"), "lr")


def test_run_tuned_on_another_base_is_rejected(tuned_run, tiny_pipeline_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    other_model, run = tmp_path / "other", tmp_path / "run"
    shutil.copytree(tiny_pipeline_dir, other_model)
    shutil.copytree(tuned_run, run)
    unet_config = dict(UNet2DConditionModel.load_config(other_model / "unet"))
    unet_config["layers_per_block"] = unet_config["layers_per_block"] + 1
    UNet2DConditionModel.from_config(unet_config).save_pretrained(other_model / "unet")
    run_json = json.loads((run / "run.json").read_text())
    run_json["config"]["model"] = str(other_model)
    (run / "run.json").write_text(json.dumps(run_json))
    assert_user_error(capsys, ["edit", str(run), "--prompt", "a", "-o", str(tmp_path / "o.mp4")], "base")
