"""How one video's frames are split over the ranks, and the collectives that move frames between them.

Rank r owns the contiguous window ``windows[r]`` of the F frames (sizes differ by at most one,
rank 0 owns frame 0). Tensors keep their usual layout with only the local frames on the frame
dim. A :class:`FrameSplit` with one rank is the single-process case: every method is then the
identity (or a no-op), so the pipeline code has one path.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from depthvid.errors import UserError
from depthvid.parallel.collectives import all_to_all


def even_windows(count: int, parts: int) -> list[range]:
    """``parts`` contiguous ranges covering ``range(count)``, sizes differing by at most one, larger first."""
    size, extra = divmod(count, parts)
    bounds = [0]
    for index in range(parts):
        bounds.append(bounds[-1] + size + (index < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclass(frozen=True)
class FrameSplit:
    """The frame windows of one video over ``world_size`` ranks, seen from ``rank``.

    Attributes:
        num_frames: frames of the whole video.
        rank, world_size: this process in ``group`` (0 and 1 for a single process).
        group: the torch.distributed process group (None: the default group).
    """

    num_frames: int
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.num_frames < self.world_size:
            raise UserError(
                f"--frames {self.num_frames}: frame parallelism over {self.world_size} ranks needs at least one "
                f"frame per rank; use at most {self.num_frames} processes (torchrun --nproc-per-node) or more frames"
            )

    @property
    def windows(self) -> list[range]:
        return even_windows(self.num_frames, self.world_size)

    @property
    def window(self) -> range:
        return self.windows[self.rank]

    @property
    def local_frames(self) -> int:
        return len(self.window)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes outputs and prints (rank 0)."""
        return self.rank == 0

    def describe(self) -> str:
        """The stderr line of a frame-parallel run: ``frame-parallel: 2 ranks, frames 0-3 | 4-6``."""
        spans = " | ".join(f"{w.start}-{w.stop - 1}" for w in self.windows)
        return f"frame-parallel: {self.world_size} ranks, frames {spans}"

    # -- moving whole frames (no autograd) ---------------------------------------------------------

    def shard(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """The local window of a tensor that holds all ``num_frames`` frames on ``dim``."""
        if x.shape[dim] != self.num_frames:
            raise ValueError(f"FrameSplit.shard: expected {self.num_frames} frames on dim {dim}, got {tuple(x.shape)}")
        return x.narrow(dim, self.window.start, self.local_frames)

    def gather(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """All frames on every rank, from each rank's local window on ``dim`` (not differentiable)."""
        if not self.is_parallel:
            return x
        largest = len(self.windows[0])
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, largest - x.shape[dim]]
        padded = torch.nn.functional.pad(x.detach(), pad).contiguous()  # all_gather needs equal shapes
        if dist.get_backend(self.group) == "nccl":  # NCCL moves CUDA tensors only (decoded frames are on the CPU)
            padded = padded.to(torch.device("cuda", torch.cuda.current_device()))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        whole = torch.cat([part.narrow(dim, 0, len(w)) for part, w in zip(parts, self.windows)], dim=dim)
        return whole.to(x.device)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object; tensors come back on the CPU)."""
        if not self.is_parallel:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.is_parallel:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_grads(self, params) -> None:
        """Sum the gradients of ``params`` over the ranks (one flat all_reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.is_parallel or not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.group)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))

    def barrier(self) -> None:
        if self.is_parallel:
            dist.barrier(group=self.group)

    # -- frames other ranks own (differentiable) ---------------------------------------------------

    def context_frames(self, x: torch.Tensor, dim: int, *, first: bool) -> torch.Tensor:
        """The frames just outside this rank's window that it needs, taken from their owners.

        ``first=True`` (sparse-causal attention): frame 0 (unless this rank owns it) then frame
        ``start - 1`` (unless that is frame 0 too); ``first=False`` (a difference of consecutive
        frames): frame ``start - 1`` only. Returns them stacked on ``dim``: 0, 1 or 2 frames.

        Differentiable: one all_to_all per call, whose backward returns each frame's gradient to
        its owner, summed over the ranks that used it.
        """
        if not self.is_parallel:
            return x.narrow(dim, 0, 0)
        needed = [self._needed_frames(r, first) for r in range(self.world_size)]
        owner = {f: r for r, w in enumerate(self.windows) for f in w}
        start = self.window.start
        # what this rank sends: for each destination, the frames it owns that the destination needs
        send_local, send_counts = [], []
        for frames in needed:
            mine = [f - start for f in frames if owner[f] == self.rank]
            send_local += mine
            send_counts.append(len(mine))
        # what it receives, in source-rank order (its needed frames ascend, and so do their owners)
        recv_counts = [sum(owner[f] == r for f in needed[self.rank]) for r in range(self.world_size)]
        # (..., F_local, ...) -> (F_local, ...): all_to_all splits dim 0
        front = x.movedim(dim, 0)
        send = front.index_select(0, torch.tensor(send_local, dtype=torch.long, device=x.device))
        received = all_to_all(send, send_counts, recv_counts, self.group)
        return received.movedim(0, dim)

    def _needed_frames(self, rank: int, first: bool) -> list[int]:
        start = self.windows[rank].start
        if first:
            return [0] * (start >= 1) + [start - 1] * (start >= 2)
        return [start - 1] * (start >= 1)


# -- process groups from the launcher's environment ---------------------------------------------

_frame_parallel_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("depthvid_frame_parallel", default=True)


@contextlib.contextmanager
def single_process_frames():
    """Inside this context, :func:`frame_split` never splits frames (``depthvid batch`` ranks run whole jobs)."""
    token = _frame_parallel_enabled.set(False)
    try:
        yield
    finally:
        _frame_parallel_enabled.reset(token)


def launched_world_size() -> int:
    """The number of processes torchrun (or accelerate launch) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: torch.device | None = None) -> None:
    """Join the launcher's process group once: NCCL for CUDA devices, gloo otherwise.

    RANK and WORLD_SIZE come from the launcher's environment; the rendezvous is torchrun's
    (env://) unless DEPTHVID_INIT_METHOD names another, e.g. ``file:///shared/folder/rendezvous``
    (no TCP store: what the tests use). On CUDA each process takes the GPU numbered LOCAL_RANK.
    """
    if dist.is_initialized():
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=os.environ.get("DEPTHVID_INIT_METHOD", "env://"),
        rank=int(os.environ.get("RANK", "0")),
        world_size=launched_world_size(),
    )


def is_main_process() -> bool:
    """True on rank 0 of the launch (and when run without a launcher)."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def frame_split(num_frames: int, device: torch.device) -> FrameSplit:
    """The frame windows of this process: all frames unless launched with several ranks.

    Under torchrun with N > 1 processes this joins the process group, and rank 0 prints the
    windows on stderr (one line, also when progress is off).
    """
    if launched_world_size() <= 1 or not _frame_parallel_enabled.get():
        return FrameSplit(num_frames)
    init_process_group(device)
    split = FrameSplit(num_frames, dist.get_rank(), dist.get_world_size())
    if split.is_main:
        print(split.describe(), file=sys.stderr, flush=True)
    return split
