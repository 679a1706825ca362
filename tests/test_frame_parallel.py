"""Frame parallelism on gloo: split frames over 2 and 3 processes == one process, forward and backward."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from depthvid.assets import sample_clip_path
from depthvid.cli import main
from depthvid.errors import UserError
from depthvid.parallel import FrameSplit, even_windows
from depthvid.video import load_video

import _parallel_workers


@pytest.mark.parametrize("count, parts", [(7, 3), (6, 3), (3, 3), (2, 2), (5, 4), (64, 4), (0, 2)])
def test_even_windows_are_contiguous_and_differ_by_at_most_one(count, parts):
    windows = even_windows(count, parts)
    assert len(windows) == parts
    assert [f for w in windows for f in w] == list(range(count))
    assert max(map(len, windows)) - min(map(len, windows)) <= 1


def test_split_describes_its_windows_and_shards_its_frames():
    splits = [FrameSplit(7, rank, 2) for rank in range(2)]
    assert splits[0].describe() == "frame-parallel: 2 ranks, frames 0-3 | 4-6"
    video = torch.arange(7.0).view(1, 1, 7, 1, 1)
    assert [s.shard(video).flatten().tolist() for s in splits] == [[0, 1, 2, 3], [4, 5, 6]]
    assert FrameSplit(3, 0, 3).describe() == "frame-parallel: 3 ranks, frames 0-0 | 1-1 | 2-2"


def test_more_ranks_than_frames_is_a_user_error():
    with pytest.raises(UserError, match="--frames 2: .* 3 ranks"):
        FrameSplit(2, 0, 3)


def test_single_process_split_changes_nothing():
    split = FrameSplit(5)
    x = torch.randn(1, 4, 5, 2, 2)
    assert split.shard(x) is not None and torch.equal(split.shard(x), x) and split.gather(x) is x
    assert not split.is_parallel and split.is_main


def spawn(world: int, tmp_path, unet_cases, op_cases):
    mp.spawn(_parallel_workers.run_checks, args=(world, str(tmp_path / "rendezvous"), unet_cases, op_cases),
             nprocs=world, join=True)


OP_CASES = [
    # (op, frames, batch, tokens per frame)
    ("sparse_causal", 5, 2, 6),  # uneven windows, two videos
    ("sparse_causal", 3, 1, 4),  # 3 ranks: every window one frame
    ("temporal", 5, 2, 7),  # tokens not a multiple of the ranks
    ("temporal", 4, 1, 1),  # one token: the other ranks get none
]


def test_two_ranks_equal_one_process(tmp_path):
    # (frames, batch[, gradient checkpointing]): even, uneven with two videos, frame 0 alone
    spawn(2, tmp_path, unet_cases=[(4, 1), (5, 2, True), (2, 1)], op_cases=OP_CASES)


def test_three_ranks_equal_one_process(tmp_path):
    # frames=3: every window one frame (frame 0 alone, rank 1 starts at frame 1, rank 2 needs a halo)
    spawn(3, tmp_path, unet_cases=[(3, 1), (7, 2)], op_cases=OP_CASES)


# -- the pipeline under a launcher: tune on 2 ranks, edit on 3 ranks ------------------------------

FRAMES, SIZE = 5, 64


def read_frames(folder: Path) -> torch.Tensor:
    """Every frame folder of an edit, side by side: (F, 3, H, W * columns)."""
    return torch.cat([load_video(path, None, None, None) for path in sorted(folder.iterdir()) if path.is_dir()], -1)


def test_tune_on_two_ranks_and_edit_on_three_equal_one_process(tiny_pipeline_dir, tmp_path):
    tune_args = ["tune", str(sample_clip_path()), "--prompt", "a ball rolls in front of a box", "--model",
                 str(tiny_pipeline_dir), "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
                 "--steps", "2", "--checkpoint-every", "2", "--lr", "1e-3", "--temporal-loss-weight", "1",
                 "--quiet", "-o"]
    assert main([*tune_args, str(tmp_path / "single")]) == 0
    ranks = _parallel_workers.launch(2, [*tune_args, str(tmp_path / "two-ranks")], tmp_path)
    assert "frame-parallel: 2 ranks, frames 0-2 | 3-4" in ranks[0].stderr
    assert "frame-parallel" not in ranks[1].stderr and "tuned:" not in ranks[1].stdout

    def log(run):
        return [json.loads(line) for line in (tmp_path / run / "loss.jsonl").read_text().splitlines()]

    for single, parallel in zip(log("single"), log("two-ranks"), strict=True):
        for key in ("loss", "mse", "temporal"):
            assert parallel[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    single, parallel = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("single", "two-ranks"))
    assert single.keys() == parallel.keys()
    for name in single:
        # AdamW moves every weight by ~lr (1e-3) per step whatever the gradient's size: a wrong
        # gradient shows at that scale, float rounding of near-zero gradients at ~1e-5
        torch.testing.assert_close(parallel[name], single[name], atol=1e-4, rtol=1e-4, msg=name)

    # edit the single-process run twice from the same files: in one process and on 3 ranks
    shutil.copytree(tmp_path / "single", tmp_path / "single-copy")
    edit_args = ["--prompt", "a glass marble", "--steps", "2", "--guidance", "7.5", "--eta", "0.5", "--seed", "3",
                 "--quiet", "-o"]
    assert main(["edit", str(tmp_path / "single"), *edit_args, str(tmp_path / "edit-single")]) == 0
    ranks = _parallel_workers.launch(3, ["edit", str(tmp_path / "single-copy"), *edit_args, str(tmp_path / "edit-ranks")], tmp_path)
    assert "frame-parallel: 3 ranks, frames 0-1 | 2-3 | 4-4" in ranks[0].stderr
    assert "wrote" in ranks[0].stdout and not ranks[1].stdout and not ranks[2].stdout

    (single_inversion,), (ranks_inversion,) = (
        list((tmp_path / run / "inversions").glob("*.safetensors")) for run in ("single", "single-copy"))
    torch.testing.assert_close(load_file(str(ranks_inversion))["latents"], load_file(str(single_inversion))["latents"],
                               atol=1e-5, rtol=1e-4)
    single_frames, ranks_frames = read_frames(tmp_path / "edit-single"), read_frames(tmp_path / "edit-ranks")
    assert single_frames.shape == ranks_frames.shape and single_frames.shape[0] == FRAMES
    assert (single_frames - ranks_frames).abs().max() <= 1 / 255 + 1e-6  # PNGs: at most one level of rounding
