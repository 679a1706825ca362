"""Bodies of the multi-process checks in test_frame_parallel.py: each runs on every rank.

A process group costs ~5 s of imports per process, so one spawn runs several checks. Ranks meet
through a FileStore (DEPTHVID_INIT_METHOD=file://...): no TCP store, nothing listens on a port.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid

import torch
import torch.distributed as dist

from depthvid.models import inflate_unet, mark_trainable, trainable_parameters
from depthvid.ops import sparse_causal_attention, temporal_attention
from depthvid.parallel import FrameSplit, init_process_group, shard_video_unet
from depthvid.parallel.attention import sparse_causal_attention_sharded, temporal_attention_sharded
from depthvid.testing import tiny_unet_config

FP32 = dict(atol=2e-5, rtol=1e-4)


def launcher_env(rank: int, world: int, init_file) -> dict[str, str]:
    """What torchrun would set, with a file rendezvous instead of its TCP store."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "DEPTHVID_INIT_METHOD": f"file://{init_file}", "GLOO_SOCKET_IFNAME": "lo"}


def launch(world: int, args: list[str], tmp_path, check: bool = True) -> list[subprocess.CompletedProcess]:
    """``python -m depthvid ARGS`` on ``world`` ranks, with the environment torchrun would give them."""
    tag = uuid.uuid4().hex
    logs = [(tmp_path / f"rank{rank}-{tag}.out", tmp_path / f"rank{rank}-{tag}.err") for rank in range(world)]
    procs = []
    for rank, (out, err) in enumerate(logs):  # files, not pipes: a full pipe would stall a rank
        env = {**os.environ, **launcher_env(rank, world, tmp_path / f"rendezvous-{tag}"), "OMP_NUM_THREADS": "1"}
        with open(out, "w") as stdout, open(err, "w") as stderr:
            procs.append(subprocess.Popen([sys.executable, "-m", "depthvid", *args], env=env, text=True,
                                          stdout=stdout, stderr=stderr))
    results = []
    for proc, (out, err) in zip(procs, logs):
        proc.wait(timeout=900)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text()))
    for rank, result in enumerate(results):
        assert result.returncode == 0 or not check, f"rank {rank}: {result.stderr[-3000:]}"
    return results


def run_checks(rank: int, world: int, init_file: str, unet_cases, op_cases) -> None:
    os.environ.update(launcher_env(rank, world, init_file))
    torch.set_num_threads(1)
    init_process_group(torch.device("cpu"))
    try:
        for case in op_cases:
            check_op(*case, rank=rank, world=world)
        for case in unet_cases:
            check_video_unet(*case, rank=rank, world=world)
    finally:
        dist.destroy_process_group()


def _local_leaf(full: torch.Tensor, split: FrameSplit, batch: int) -> torch.Tensor:
    """This rank's rows of a (batch*frames, ...) tensor, as a new leaf that requires grad."""
    return split.shard(full.detach().unflatten(0, (batch, -1)), dim=1).flatten(0, 1).clone().requires_grad_()


def check_op(name: str, frames: int, batch: int, tokens: int, *, rank: int, world: int) -> None:
    """One attention op, sharded vs whole: output and the gradients of q, k, v on every rank."""
    op, sharded = {"sparse_causal": (sparse_causal_attention, sparse_causal_attention_sharded),
                   "temporal": (temporal_attention, temporal_attention_sharded)}[name]
    split = FrameSplit(frames, rank, world)
    generator = torch.Generator().manual_seed(frames * 100 + tokens)
    q, k, v, weight = (torch.randn(batch * frames, 2, tokens, 8, generator=generator) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = 0.3
    expected = op(q, k, v, frames, scale=scale, backend="torch")
    (expected * weight).sum().backward()

    local = [_local_leaf(t, split, batch) for t in (q, k, v)]
    out = sharded(*local, split, scale)
    (out * _local_leaf(weight, split, batch).detach()).sum().backward()
    label = f"{name} frames={frames} batch={batch} tokens={tokens} rank {rank}/{world}"
    torch.testing.assert_close(out, _local_leaf(expected, split, batch).detach(), **FP32, msg=lambda m: f"{label}: {m}")
    for mine, full, what in zip(local, (q, k, v), "qkv"):
        torch.testing.assert_close(mine.grad, _local_leaf(full.grad, split, batch).detach(), **FP32,
                                   msg=lambda m: f"{label} d{what}: {m}")


def check_video_unet(frames: int, batch: int, checkpointing: bool = False, *, rank: int, world: int) -> None:
    """The tiny SD2-depth-shaped VideoUNet: frame-parallel output and summed trainable grads == single process.

    With ``checkpointing`` the sharded model recomputes its blocks (collectives included) in backward.
    """
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    video_unet = inflate_unet(UNet2DConditionModel(**tiny_unet_config()))
    mark_trainable(video_unet)
    with torch.no_grad():  # non-zero temporal output projections, so temporal attention matters
        for name, param in video_unet.named_parameters():
            if "attn_temp.to_out" in name:
                param.normal_(0, 0.2)
    generator = torch.Generator().manual_seed(frames)
    sample = torch.randn(batch, 5, frames, 8, 8, generator=generator)
    text = torch.randn(batch, 7, 32, generator=generator)
    timestep = torch.tensor([10, 700][:batch])
    weight = torch.randn(batch, 4, frames, 8, 8, generator=generator)

    expected = video_unet(sample, timestep, text)
    (expected * weight).sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in trainable_parameters(video_unet).items()}

    split = FrameSplit(frames, rank, world)
    sharded = shard_video_unet(copy.deepcopy(video_unet), split)
    sharded.zero_grad(set_to_none=True)
    if checkpointing:
        sharded.enable_gradient_checkpointing()
        sharded.train()
    out = sharded(split.shard(sample), timestep, text)
    (out * split.shard(weight)).sum().backward()
    params = trainable_parameters(sharded)
    split.all_reduce_grads(params.values())

    label = f"VideoUNet frames={frames} batch={batch} checkpointing={checkpointing} windows={split.describe()} rank {rank}"
    torch.testing.assert_close(out, split.shard(expected), **FP32, msg=lambda m: f"{label}: {m}")
    torch.testing.assert_close(split.gather(out), expected, **FP32, msg=lambda m: f"{label} gathered: {m}")
    assert expected_grads.keys() == params.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, f"{name}: the test's loss gives it no gradient"
        torch.testing.assert_close(params[name].grad, grad, **FP32, msg=lambda m: f"{label} grad {name}: {m}")
