"""Frame parallelism on gloo: split frames over 2 and 3 processes == one process, forward and backward."""
import pytest
import torch
import torch.multiprocessing as mp

from depthvid.errors import UserError
from depthvid.parallel import FrameSplit, even_windows

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
    spawn(2, tmp_path, unet_cases=[(4, 1), (5, 2), (2, 1)], op_cases=OP_CASES)


def test_three_ranks_equal_one_process(tmp_path):
    # frames=3: every window one frame (frame 0 alone, rank 1 starts at frame 1, rank 2 needs a halo)
    spawn(3, tmp_path, unet_cases=[(3, 1), (7, 2)], op_cases=OP_CASES)
