"""The tuning configuration: one dataclass, commented defaults, unknown keys rejected by name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from depthvid.errors import UserError, check_number
from depthvid.loading import DEFAULT_MODEL

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to here
BACKENDS = ("auto", "torch", "triton", "cpp")  # auto: the fastest per op (ops._backend.CUDA_AUTO, CPU_AUTO)


@dataclass
class TuneConfig:
    video: str  # the source clip (file or folder of frames)
    prompt: str  # its caption
    model: str = DEFAULT_MODEL  # hub id or local folder with the stable-diffusion-2-depth layout
    frames: int = 8  # frames sampled from the clip (paper: 8-12)
    height: int = 512  # multiples of 64
    width: int = 512
    sample: str = "uniform"  # "uniform": evenly spaced over the clip; "stride": start + i * stride
    start: int = 0
    stride: int = 1
    steps: int = 500  # optimiser steps (paper: 500)
    lr: float = 1e-5  # AdamW learning rate (paper: 1e-5; Tune-A-Video's code uses 3e-5)
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # gradient clipping
    # lambda of the temporal loss: mean over consecutive frame pairs of the mean squared
    # difference of the model's predicted clean latents, added to the noise-prediction MSE
    temporal_loss_weight: float = 0.01
    depth_normalize: str = "clip"  # "clip": one min/max over the whole clip; "frame": per frame
    precision: str = "auto"  # autocast dtype: auto = fp16 on CUDA, fp32 on CPU; trainable weights stay fp32
    gradient_checkpointing: bool | None = None  # None: on when a step without it would not fit in memory
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints (also written on Ctrl-C and at the end)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # kernels of the video ops; "triton" on CPU (under TRITON_INTERPRET=1) rehearses the CUDA run
    backend: str = "auto"

    # options that may change when resuming: they do not change the weights of steps already taken
    RESUMABLE_CHANGES = ("steps", "checkpoint_every", "device", "backend")

    def validate(self) -> None:
        """Every option in range before any work starts; bad values raise ``UserError`` naming the option."""
        from depthvid.video import check_frame_size

        if not self.prompt or not self.prompt.strip():
            raise UserError("--prompt: the caption of the source video is empty; describe the video")
        check_frame_size(self.height, self.width)
        for name, minimum, hint in (("frames", 1, "the paper uses 8"), ("start", 0, "0 is the first frame"),
                                    ("stride", 1, "1 takes consecutive frames"), ("steps", 1, "the paper uses 500"),
                                    ("warmup_steps", 0, "0 turns warm-up off"), ("checkpoint_every", 1, "the default is 100")):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), minimum=minimum, integer=True, hint=hint)
        check_number("--seed", self.seed, minimum=0, maximum=SEED_MAX, integer=True, hint="e.g. 0")
        check_number("--lr", self.lr, above=0, maximum=1, hint="the paper uses 1e-5")
        check_number("--weight-decay", self.weight_decay, minimum=0, hint="the default is 0.01")
        check_number("--max-grad-norm", self.max_grad_norm, above=0, hint="the default is 1.0")
        check_number("--temporal-loss-weight", self.temporal_loss_weight, minimum=0, hint="the default is 0.01")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        check_backend(self.backend)
        if self.sample not in ("uniform", "stride"):
            raise UserError(f"--sample {self.sample}: expected 'uniform' or 'stride'")
        if self.depth_normalize not in ("clip", "frame"):
            raise UserError(f"--depth-normalize {self.depth_normalize}: expected 'clip' or 'frame'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TuneConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"run config has unknown keys {unknown}; it was written by another depthvid version")
        return cls(**data)

    def changed_for_resume(self, other: "TuneConfig") -> list[str]:
        """Names of options that differ from ``other`` and would change the result."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in self.RESUMABLE_CHANGES and mine[k] != theirs[k]]


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
