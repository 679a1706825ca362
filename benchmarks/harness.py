"""What the benchmarks share: the device, the backends worth timing on it, timing and peak-memory
helpers, SD2-depth's attention shapes at 512x512 x 8 frames, and the model configs they build.

Not a benchmark file itself (pytest collects only bench_*.py here).
"""
from __future__ import annotations

import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from depthvid.ops._backend import resolve_backend, triton_available
from depthvid.testing import (
    DPT_HYBRID_CONFIG,
    SD2_DEPTH_UNET_CONFIG,
    SD2_SCHEDULER_CONFIG,
    SD2_TEXT_ENCODER_CONFIG,
    SD2_VAE_CONFIG,
    make_sample_clip,
    tiny_dpt_config,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# the dtypes an op is timed in: fp32 on CPU (the reference); the tuning precisions on a GPU
OP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16} if ON_CUDA else {"fp32": torch.float32}
FRAMES = 8  # the paper's clip length


@dataclass(frozen=True)
class AttnShape:
    """One attention layer of SD2-depth's UNet at 512x512 (64x64 latents) for one video."""

    label: str
    batch: int
    frames: int
    heads: int
    tokens: int
    head_dim: int


# SD2-depth: 64-dim heads; 5, 10, 20 heads at latent levels 64, 32, 16 and 20 in the 8x8 mid block
SD2_ATTN_SHAPES = [
    AttnShape("level0-64x64", 1, FRAMES, 5, 64 * 64, 64),
    AttnShape("level1-32x32", 1, FRAMES, 10, 32 * 32, 64),
    AttnShape("level2-16x16", 1, FRAMES, 20, 16 * 16, 64),
    AttnShape("level3-8x8", 1, FRAMES, 20, 8 * 8, 64),
]


# ---------------------------------------------------------------- backends


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton "kernels" are Python loops: no timing meaning."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def op_backends(device: torch.device = DEVICE) -> list[str]:
    """The depthvid backends that really run on ``device``: the torch reference always; Triton on
    CUDA (never the interpreter); the C++ extension wherever the backend layer would run it in
    every dtype of OP_DTYPES (its CUDA kernels are fp16/bf16 only)."""
    names = ["torch"]
    if device.type == "cuda" and triton_available() and not interpreting():
        names.append("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolve_backend warns when it falls back
        if all(resolve_backend("cpp", torch.empty(0, device=device, dtype=dtype)) == "cpp" for dtype in OP_DTYPES.values()):
            names.append("cpp")
    return names


# ---------------------------------------------------------------- timing


def synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def time_call(fn) -> tuple[float, object]:
    """(seconds, result) of one call of ``fn``, with the device synchronised."""
    synchronize()
    started = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - started, result


def run_benchmark(benchmark, fn, *, budget_s: float, min_rounds: int = 3, max_rounds: int = 50,
                  warm_up: bool = True, measure_memory: bool = False):
    """Time ``fn`` with pytest-benchmark: one call per round, the median is what counts.

    With ``warm_up``, a first untimed call (allocator, caches, compilation) also sets the number
    of rounds so that they take about ``budget_s``, at least ``min_rounds``; with
    ``measure_memory`` that call runs under :func:`peak_memory_bytes`. Without either, exactly
    ``min_rounds`` rounds. Returns (the last call's result, the peak bytes or None).
    """
    peak, rounds = None, min_rounds
    if warm_up or measure_memory:
        if measure_memory:
            first_s, peak = time_call(lambda: peak_memory_bytes(fn))
        else:
            first_s, _ = time_call(fn)
        rounds = max(min_rounds, min(max_rounds, int(budget_s / max(first_s, 1e-6))))

    def synchronized():
        result = fn()
        synchronize()
        return result

    result = benchmark.pedantic(synchronized, rounds=rounds, warmup_rounds=0, iterations=1)
    return result, peak


def median_seconds(fn, rounds: int) -> float:
    """Median wall time of ``rounds`` calls of ``fn`` (the caller warms it up first)."""
    times = sorted(time_call(fn)[0] for _ in range(rounds))
    return times[len(times) // 2]


# ---------------------------------------------------------------- memory


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the storage bytes of every tensor an op creates until that storage is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()  # one Python object per storage, kept while it lives
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def peak_memory_bytes(fn) -> int:
    """Peak bytes of tensor memory one call of ``fn`` adds to what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the peak total size of tensors created by the
    call's ops while alive (outputs, autograd's saved tensors, gradients); scratch memory
    inside a kernel is not seen. Same rule for every implementation compared.
    """
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _LiveTensorBytes() as counter:
        fn()
    return counter.peak


# ---------------------------------------------------------------- models


def scaled_unet_config(width_divisor: int, latent_size: int) -> dict:
    """SD2-depth's UNet with its channels divided by ``width_divisor`` (heads stay 5/10/20/20)."""
    return dict(
        SD2_DEPTH_UNET_CONFIG,
        sample_size=latent_size,
        block_out_channels=tuple(c // width_divisor for c in SD2_DEPTH_UNET_CONFIG["block_out_channels"]),
        norm_num_groups=math.gcd(32, 320 // width_divisor),  # 32 groups do not divide 80 channels (1/4 width)
    )


def scaled_vae_config(width_divisor: int) -> dict:
    """SD2's AutoencoderKL (x8 downsampling, 4 latent channels), channels divided by ``width_divisor``."""
    return dict(
        SD2_VAE_CONFIG,
        block_out_channels=tuple(c // width_divisor for c in SD2_VAE_CONFIG["block_out_channels"]),
        norm_num_groups=math.gcd(SD2_VAE_CONFIG["norm_num_groups"], 128 // width_divisor),
    )


# ---------------------------------------------------------------- attention cases

TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float16: dict(atol=2e-2, rtol=2e-2),
              torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_attention_inputs(shape: AttnShape, dtype: torch.dtype, requires_grad: bool):
    """q, k, v (B*F, H, N, D) as an attention processor makes them -- views of a (B*F, N, H*D)
    projection -- and an output gradient; seeded, so every implementation gets the same tensors."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def projected():  # (B*F, N, H*D) -> (B*F, H, N, D) view
        flat = torch.randn(shape.batch * shape.frames, shape.tokens, shape.heads * shape.head_dim,
                           generator=generator, device=DEVICE, dtype=dtype)
        return flat.unflatten(-1, (shape.heads, shape.head_dim)).transpose(1, 2).requires_grad_(requires_grad)

    q, k, v = projected(), projected(), projected()
    grad_out = torch.randn(q.shape, generator=generator, device=DEVICE, dtype=dtype)
    return q, k, v, grad_out


def attention_step(attend, q, k, v, grad_out, backward: bool):
    """A no-argument callable: ``attend(q, k, v)``, and with ``backward`` the gradients of q, k, v.

    Returns [out] or [out, dq, dk, dv].
    """
    def step():
        out = attend(q, k, v)
        if not backward:
            return [out]
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]

    return step


def assert_same_result(results, reference, dtype: torch.dtype, what: str) -> None:
    """A fast wrong answer is no result: every tensor must match the torch reference's.

    The absolute tolerance scales with the tensor's largest value: a sum of many rounded products
    that cancels to near zero keeps the rounding error of its terms (seen on an H100: bf16 conv
    outputs 0.04 apart at values near 0, one bf16 ulp of the outputs around 8).
    """
    for index, (got, want) in enumerate(zip(results, reference, strict=True)):
        label = "output" if index == 0 else f"gradient {index}"
        tolerance = dict(TOLERANCES[dtype])
        tolerance["atol"] *= max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), **tolerance, msg=lambda m: f"{what} {label}: {m}")


def reference_result(cache: dict, case, implementation: str, result, reference_step):
    """The torch reference's result for ``case``: ``result`` itself when ``implementation`` is
    "torch" (timed first in each case), else computed once. Only the latest case is kept."""
    if case not in cache:
        cache.clear()
        cache[case] = result if implementation == "torch" else reference_step()
    return cache[case]


def memory_cap_bytes() -> int:
    """The most one baseline may allocate: 3 GiB on CPU (the benchmarks share a machine and must
    fit in about 6 GB), half of the free memory on a GPU."""
    if ON_CUDA:
        return torch.cuda.mem_get_info()[0] // 2
    return 3 * 2**30


# ---------------------------------------------------------------- pipeline scale


@dataclass(frozen=True)
class PipelineScale:
    """The model size and clip the pipeline benchmarks (tuning, editing, design card) run at."""

    label: str
    width_divisor: int  # UNet and VAE channels = SD2-depth's / this
    size: int  # frame height = width, pixels
    frames: int
    dtype: torch.dtype  # autocast dtype (fp32: no autocast)

    @property
    def latent_size(self) -> int:
        return self.size // 8


# the design card's workload: the full SD2-depth architecture, 8 frames of 512x512, fp16 as `depthvid tune` on CUDA
PAPER_SCALE = PipelineScale("sd2-depth 8x512x512 fp16", 1, 512, FRAMES, torch.float16)
# on 2 CPU cores: the peer figure's 1/4-width SD2-depth with 8 frames of 256x256, fp32 (DESIGN.md)
CPU_SCALE = PipelineScale("sd2-depth/4-width 8x256x256 fp32", 4, 256, FRAMES, torch.float32)
# a toy size that runs every pipeline benchmark in seconds, to check they work: DEPTHVID_BENCH_SCALE=tiny
TINY_SCALE = PipelineScale("sd2-depth/8-width 8x64x64 fp32 (tiny)", 8, 64, FRAMES, torch.float32)
SCALES = {"paper": PAPER_SCALE, "cpu": CPU_SCALE, "tiny": TINY_SCALE}
SCALE_CHOSEN = os.environ.get("DEPTHVID_BENCH_SCALE")  # None: by device
PIPELINE_SCALE = SCALES[SCALE_CHOSEN] if SCALE_CHOSEN else PAPER_SCALE if ON_CUDA else CPU_SCALE


def build_video_unet(scale: PipelineScale, seed: int = 0, device: torch.device | str = DEVICE):
    """A freshly inflated SD2-depth-shaped VideoUNet on ``device``; the same ``seed``, the same weights."""
    from diffusers import UNet2DConditionModel

    from depthvid.models import inflate_unet

    torch.manual_seed(seed)
    with torch.device(device):
        video_unet = inflate_unet(UNet2DConditionModel(**scaled_unet_config(scale.width_divisor, scale.latent_size)))
    return video_unet


def build_vae(scale: PipelineScale, device: torch.device | str = DEVICE):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    with torch.device(device):
        return AutoencoderKL(**scaled_vae_config(scale.width_divisor)).eval().requires_grad_(False)


def build_text_encoder(device: torch.device | str = DEVICE):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER_CONFIG)).eval().requires_grad_(False)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD2_SCHEDULER_CONFIG)


def make_clip(scale: PipelineScale) -> torch.Tensor:
    """The sample clip (a ball passing a pillar) at ``scale``: (F, 3, H, W) in [0, 1] on DEVICE."""
    return make_sample_clip(scale.frames, scale.size, scale.size).to(DEVICE)


def caption_ids(count: int = 1) -> torch.Tensor:
    """(count, 77) token ids: tokenizing is no cost worth timing, encoding them is."""
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, SD2_TEXT_ENCODER_CONFIG["vocab_size"], (count, 77), generator=generator).to(DEVICE)


def make_tuner(video_unet, scale: PipelineScale):
    """Prepare ``video_unet`` as `depthvid tune` does and return its step, ``step(batch, generator) -> loss``.

    Trainable set only, frozen weights in the autocast dtype on CUDA, gradient checkpointing,
    AdamW (lr 1e-5), gradient clipping, a loss scaler for fp16: the body of tuning.tune's loop.
    """
    from depthvid.models import mark_trainable
    from depthvid.tuning import autocast, training_loss

    mark_trainable(video_unet)
    if ON_CUDA and scale.dtype != torch.float32:
        for param in video_unet.parameters():
            if not param.requires_grad:
                param.data = param.data.to(scale.dtype)
    video_unet.enable_gradient_checkpointing()
    video_unet.train()
    params = [p for p in video_unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=scale.dtype == torch.float16)
    scheduler = build_scheduler()

    def step(batch: dict, generator: torch.Generator) -> torch.Tensor:
        with autocast(DEVICE, scale.dtype):
            loss, _, _ = training_loss(video_unet, scheduler, batch, generator, temporal_weight=0.01)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def encode_clip(vae, clip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """clip (F, 3, H, W) in [0, 1] -> VAE latents (1, 4, F, h, w), through depthvid.loading."""
    from types import SimpleNamespace

    from depthvid.loading import encode_frames
    from depthvid.tuning import autocast

    with autocast(DEVICE, dtype):
        return encode_frames(SimpleNamespace(vae=vae), clip)


def encode_caption(text_encoder, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, 77) token ids -> (P, 77, 1024) text embeddings."""
    from depthvid.tuning import autocast

    with torch.no_grad(), autocast(DEVICE, dtype):
        return text_encoder(ids)[0].float()


def build_depth_estimator(scale: PipelineScale, device: torch.device | str = DEVICE):
    """(DPTForDepthEstimation, DPTImageProcessor): DPT-Hybrid at 384x384 at full width; the tiny
    test DPT (32x32) on the reduced CPU scale, where DPT-Hybrid alone would take longer than the edit."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPT_HYBRID_CONFIG if scale.width_divisor == 1 else tiny_dpt_config()
    torch.manual_seed(4)
    with torch.device(device):
        model = DPTForDepthEstimation(DPTConfig(**config)).eval().requires_grad_(False)
    size = config["image_size"]
    processor = DPTImageProcessor(do_resize=True, size={"height": size, "width": size}, keep_aspect_ratio=False,
                                  do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, processor


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (torch.utils.flop_counter: matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
