"""`depthvid eval` and `depthvid eval-bench` end to end on tiny models and a 6-frame toy clip."""
import csv
import json
import math

import pytest
import torch

from depthvid.cli import main
from depthvid.errors import UserError
from depthvid.evaluate import EDIT_KINDS, evaluate_edit
from depthvid.metrics import EvalOptions, frame_consistency, load_clip, textual_alignment
from depthvid.testing import make_sample_clip
from depthvid.video import load_video, write_video

PROMPT = "a red ball bouncing in the snow"


@pytest.fixture(scope="module")
def clip_dir(tiny_clip_dir):
    return str(tiny_clip_dir)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A source clip (PNG folder, lossless) and an 'edit' of it (colours swapped, mp4)."""
    folder = tmp_path_factory.mktemp("videos")
    source = make_sample_clip(6, 64, 64)
    return {
        "source": write_video(source, folder / "source"),
        "edited": write_video(source[:, [2, 0, 1]], folder / "edited.mp4"),
    }


def eval_args(clip_dir, tiny_pipeline_dir, *extra):
    return ["--clip-model", clip_dir, "--depth-model", str(tiny_pipeline_dir), "--depth-size", "16", *extra]


def test_eval_cli_writes_json_with_numbers_and_options(clip_dir, tiny_pipeline_dir, clips, tmp_path, capsys):
    out = tmp_path / "scores" / "edit.json"
    status = main(["eval", str(clips["edited"]), "--prompt", PROMPT, "--source", str(clips["source"]),
                   *eval_args(clip_dir, tiny_pipeline_dir, "--pairs", "adjacent", "--no-clamp", "--json", str(out))])
    assert status == 0
    result = json.loads(out.read_text())
    assert result["options"]["pairs"] == "adjacent" and result["options"]["clamp"] is False
    assert result["options"]["clip_model"] == clip_dir and result["options"]["num_frames"] is None
    assert result["num_frames"] == 6 and result["prompt"] == PROMPT

    model, processor = load_clip(clip_dir, device="cpu")
    frames = load_video(clips["edited"], None, None, None)
    assert result["frame_consistency"] == pytest.approx(
        frame_consistency(frames, model, processor, pairs="adjacent"), abs=1e-4)
    assert result["textual_alignment"] == pytest.approx(
        textual_alignment(frames, PROMPT, model, processor, clamp=False), abs=1e-4)
    for name in ("depth_rmse", "depth_abs_rel", "depth_pearson"):
        assert math.isfinite(result[name])

    printed = capsys.readouterr().out
    assert f"{result['frame_consistency']:.2f}" in printed
    assert "adjacent" in printed and "off: 100*cos" in printed and clip_dir in printed
    assert not list(out.parent.glob(".*tmp*")), "the atomic write left a temporary file"


def test_eval_of_the_source_against_itself_has_perfect_depth(clip_dir, tiny_pipeline_dir, clips):
    options = EvalOptions(clip_model=clip_dir, depth_model=str(tiny_pipeline_dir), depth_size=16, num_frames=4)
    result = evaluate_edit(clips["source"], PROMPT, clips["source"], options)
    assert result["num_frames"] == 4
    assert result["depth_rmse"] == pytest.approx(0, abs=1e-6)
    assert result["depth_pearson"] == pytest.approx(1, abs=1e-6)


def test_evaluate_edit_with_frames_in_memory_and_option_overrides(clip_dir, tiny_pipeline_dir, clips):
    source = load_video(clips["source"], None, None, None)
    result = evaluate_edit(str(clips["source"]), PROMPT, source_path=None, source_frames=source,
                           clip_model=clip_dir, depth_model=str(tiny_pipeline_dir), depth_size=16, pairs=None)
    assert result["options"]["clip_model"] == clip_dir and result["options"]["pairs"] == "all"
    assert result["depth_abs_rel"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(TypeError, match="clip_mdoel"):
        evaluate_edit(str(clips["source"]), PROMPT, clip_mdoel=clip_dir)


def test_eval_without_source_skips_depth(clip_dir, tiny_pipeline_dir, clips, capsys):
    assert main(["eval", str(clips["edited"]), "--prompt", PROMPT, "--frames", "3",
                 *eval_args(clip_dir, tiny_pipeline_dir)]) == 0
    printed = capsys.readouterr().out
    assert "3 frames" in printed and "depth" not in printed and "pairs         all" in printed


def test_eval_missing_video_exits_2(clip_dir, tmp_path, capsys):
    missing = tmp_path / "nope.mp4"
    assert main(["eval", str(missing), "--prompt", PROMPT, "--clip-model", clip_dir]) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "no such file" in error and error.count("\n") == 1


def test_eval_missing_clip_model_exits_2(clips, tmp_path, capsys):
    missing = str(tmp_path / "clip-vit-large")
    assert main(["eval", str(clips["edited"]), "--prompt", PROMPT, "--clip-model", missing]) == 2
    error = capsys.readouterr().err
    assert missing in error and "--clip-model PATH" in error and error.count("\n") == 1


# -- eval-bench --------------------------------------------------------------------------------------


@pytest.fixture
def bench(tmp_path):
    """Two videos: one with prompts.json (object) + source.mp4, one with prompts.csv + <name>.gif;
    edits as mp4, gif and a frame folder under a separate outputs folder."""
    root, outputs = tmp_path / "bench", tmp_path / "outputs"
    clip = make_sample_clip(4, 64, 64)
    (root / "car").mkdir(parents=True)
    write_video(clip, root / "car" / "source.mp4")
    prompts = {"source": "a ball", "style": "a ball, van gogh style", "object": "a cube",
               "background": "a ball on the moon", "multiple": "a cube on the moon, watercolor"}
    (root / "car" / "prompts.json").write_text(json.dumps(prompts))
    (root / "dog").mkdir()
    write_video(clip.flip(0), root / "dog" / "dog.gif")
    (root / "dog" / "prompts.csv").write_text(
        "kind,prompt\nstyle,a dog in ukiyo-e\nobject,a cat\nbackground,\"a dog, in a forest\"\nmultiple,a cat in a forest\n")
    suffixes = {"style": ".mp4", "object": ".gif", "background": "", "multiple": ".mp4"}
    for index, name in enumerate(("car", "dog")):
        for shift, kind in enumerate(EDIT_KINDS):
            edited = clip.roll(shift + index, dims=1)  # a different colour permutation per edit
            write_video(edited, outputs / name / f"{kind}{suffixes[kind]}")
    return root, outputs


def test_eval_bench_writes_csv_and_summary(clip_dir, tiny_pipeline_dir, bench, tmp_path, capsys):
    root, outputs = bench
    out = tmp_path / "results.csv"
    assert main(["eval-bench", str(root), "--outputs", str(outputs), "--csv", str(out),
                 *eval_args(clip_dir, tiny_pipeline_dir)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted((row["video"], row["kind"]) for row in rows) == sorted(
        (video, kind) for video in ("car", "dog") for kind in EDIT_KINDS)
    by_key = {(row["video"], row["kind"]): row for row in rows}
    assert by_key["dog", "background"]["prompt"] == "a dog, in a forest"
    assert by_key["car", "object"]["prompt"] == "a cube"

    # one row against the Python API with the same options
    options = EvalOptions(clip_model=clip_dir, depth_model=str(tiny_pipeline_dir), depth_size=16)
    direct = evaluate_edit(outputs / "dog" / "object.gif", "a cat", root / "dog" / "dog.gif", options)
    for name in ("frame_consistency", "textual_alignment", "depth_rmse", "depth_pearson"):
        assert float(by_key["dog", "object"][name]) == pytest.approx(direct[name], abs=1e-6)
    assert by_key["dog", "object"]["pairs"] == "all" and by_key["dog", "object"]["clip_model"] == clip_dir

    printed = capsys.readouterr().out
    overall = next(line for line in printed.splitlines() if line.startswith("overall"))
    mean_consistency = sum(float(row["frame_consistency"]) for row in rows) / len(rows)
    assert overall.split()[1] == "8" and f"{mean_consistency:.2f}" in overall
    assert all(any(line.startswith(kind) for line in printed.splitlines()) for kind in EDIT_KINDS)


def test_eval_bench_prompt_count_mismatch_exits_2(clip_dir, bench, tmp_path, capsys):
    root, outputs = bench
    (root / "car" / "prompts.json").write_text(json.dumps(["a", "b", "c"]))
    assert main(["eval-bench", str(root), "--outputs", str(outputs), "--csv", str(tmp_path / "r.csv"),
                 "--clip-model", clip_dir]) == 2
    error = capsys.readouterr().err
    assert "expected 4 edit prompts" in error and "got 3" in error and "prompts.json" in error
    assert not (tmp_path / "r.csv").exists()


def test_eval_bench_lists_every_missing_file(bench):
    root, outputs = bench
    (outputs / "car" / "style.mp4").unlink()
    (root / "dog" / "prompts.csv").unlink()
    from depthvid.evaluate import find_bench_items

    with pytest.raises(UserError, match="2 missing") as info:
        find_bench_items(root, outputs)
    assert "car/style.mp4" in str(info.value) and "dog/prompts.json" in str(info.value)


def test_eval_bench_unknown_prompt_kind_is_named(bench):
    root, outputs = bench
    (root / "car" / "prompts.json").write_text(json.dumps(dict(zip(("style", "object", "backgorund", "multiple"), "abcd"))))
    from depthvid.evaluate import find_bench_items

    with pytest.raises(UserError, match=r"missing \['background'\], unknown \['backgorund'\]"):
        find_bench_items(root, outputs)
