"""`depthvid batch`: 3 jobs on 2 ranks, each run once; a second run skips them; a bad video is recorded."""
import json

import pytest

from depthvid.assets import sample_clip_path
from depthvid.batch import load_jobs
from depthvid.cli import main
from depthvid.errors import UserError

from _parallel_workers import launch

TUNE = dict(frames=2, height=64, width=64, checkpoint_every=1, lr=1e-3)


def write_jobs(tmp_path, tiny_pipeline_dir) -> tuple:
    (tmp_path / "broken.mp4").write_text("not a video")
    jobs = [
        {"name": "ball", "video": str(sample_clip_path()), "prompt": "a ball", "edits": ["a marble"], "steps": 2},
        {"name": "broken", "video": "broken.mp4", "prompt": "a ball", "edits": ["a marble"], "steps": 1},
        {"name": "box", "video": str(sample_clip_path()), "prompt": "a box", "edits": ["a crate", "a house"],
         "steps": 1, "output": "frames"},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({**job, **TUNE, "model": str(tiny_pipeline_dir), "edit": {"steps": 1}}) + "\n"
                            for job in jobs))
    return path


def test_three_jobs_on_two_ranks_run_once_resume_and_survive_a_bad_video(tiny_pipeline_dir, tmp_path, capsys):
    jobs = write_jobs(tmp_path, tiny_pipeline_dir)
    out = tmp_path / "out"
    # job "ball" was interrupted after step 1 of 2: its run resumes from that checkpoint
    assert main(["tune", str(sample_clip_path()), "--prompt", "a ball", "-o", str(out / "ball" / "run"), "--model",
                 str(tiny_pipeline_dir), "--frames", "2", "--height", "64", "--width", "64", "--steps", "1",
                 "--checkpoint-every", "1", "--lr", "1e-3", "--quiet"]) == 0
    first_step = (out / "ball" / "run" / "loss.jsonl").read_text()
    capsys.readouterr()

    ranks = launch(2, ["batch", str(jobs), "-o", str(out), "--quiet"], tmp_path, check=False)
    assert [r.returncode for r in ranks] == [1, 0]  # rank 0 reports the failed job
    started = [line.split(": ")[1] for r in ranks for line in r.stderr.splitlines() if line.endswith(": started")]
    assert sorted(started) == ["ball", "box", "broken"]  # each job once, over both ranks
    statuses = {name: json.loads((out / name / "status.json").read_text()) for name in started}
    assert {name: s["status"] for name, s in statuses.items()} == {"ball": "done", "box": "done", "broken": "failed"}
    assert "broken.mp4" in statuses["broken"]["error"] and "\n" not in statuses["broken"]["error"]
    log = (out / "ball" / "run" / "loss.jsonl").read_text()
    assert log.startswith(first_step) and [json.loads(line)["step"] for line in log.splitlines()] == [1, 2]
    assert (out / "ball" / "edit.mp4").is_file() and (out / "ball" / "edit-side-by-side.mp4").is_file()
    assert sorted(p.name for p in (out / "box" / "frames").iterdir()) == ["0-a-crate", "1-a-house", "side-by-side"]
    table = ranks[0].stdout.splitlines()
    assert table[0].split() == ["job", "status", "rank", "seconds", "result"] and len(table) == 4
    assert not ranks[1].stdout

    # a second run, in one process: the finished jobs are skipped, the failed one is tried again
    assert main(["batch", str(jobs), "-o", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "batch: ball: already done, skipped" in captured.err and "batch: box: already done, skipped" in captured.err
    assert "batch: broken: started" in captured.err and "batch: broken: failed" in captured.err
    assert [line.split()[:2] for line in captured.out.splitlines()[1:]] == [
        ["ball", "done"], ["broken", "failed"], ["box", "done"]]


@pytest.mark.parametrize("content, message", [
    ('{"video": "a.mp4", "prompt": "p"}', "'edits' is missing"),
    ('{"video": "a.mp4", "prompt": "p", "edits": ["q"], "stepz": 3}', "unknown keys \\['stepz'\\]"),
    ('{"video": "a.mp4", "prompt": "p", "edits": ["q"], "edit": {"guidanse": 3}}', "'guidanse'"),
    ('{"video": "a.mp4", "prompt": "p", "edits": ["q"], "height": 500}', "--height 500"),
    ('{"video": "a.mp4", "prompt": "p", "edits": "q", "name": "x"}\n{"video": "b.mp4", "prompt": "p", "edits": "q", "name": "x"}',
     "name 'x' is used twice"),
    ("not json", "line 1: not JSON"),
])
def test_bad_jobs_file_is_one_line_naming_the_job_and_key(tmp_path, content, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(UserError, match=message):
        load_jobs(path)


def test_yaml_jobs_take_defaults_and_resolve_videos_next_to_the_file(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("defaults: {frames: 4, steps: 10, edit: {steps: 5}}\n"
                    "jobs:\n  - {video: clips/car.mp4, prompt: a car, edits: a red car}\n"
                    "  - {video: /abs/dog.mp4, prompt: a dog, edits: [a cat, a fox], steps: 20, name: dog}\n")
    car, dog = load_jobs(path)
    assert car.name == "000-car" and car.video == str(tmp_path / "clips" / "car.mp4") and car.edits == ["a red car"]
    assert car.tune == {"frames": 4, "steps": 10} and car.edit == {"steps": 5}
    assert dog.name == "dog" and dog.video == "/abs/dog.mp4" and dog.tune["steps"] == 20


def test_batch_cli_with_a_missing_jobs_file_exits_2(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
