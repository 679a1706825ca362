"""The CUDA configuration rehearsed on CPU, end to end: `depthvid tune` (2 steps) then `depthvid
edit` (2 DDIM steps, 2 prompts, guidance 1: classifier-free guidance only doubles the batch,
and the interpreter's time with it) on the tiny pipeline with ``--device cpu --backend triton`` under
TRITON_INTERPRET=1, in fp16, bf16 and fp32, each against ``--backend torch`` in the same precision.

Both backends run the CUDA configuration (frozen weights in the compute dtype, trainable weights
fp32, autocast, GradScaler for fp16, gradient checkpointing), checked here by spying on the model.

Tolerances are relative to the precision's own error: "torch in fp16/bf16 vs torch in fp32" is
what rounding to that dtype costs in this pipeline, and the Triton run may differ from the torch
run in the same dtype by at most RATIO times that (plus a floor for values torch gets exactly).
The kernels round at different points than torch's ops (P and dS to the dtype before their
matmuls, the conv's fused epilogue rounds once), so they are not bit-identical, but an indexing
or dtype bug shows up as errors far above the rounding noise. fp32 is compared directly.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from depthvid.assets import sample_clip_path
from depthvid.cli import main
from depthvid.models.video_unet import VideoUNet
from depthvid.ops import _backend
from depthvid.triton_kernels import _common

pytestmark = pytest.mark.slow  # minutes: every UNet pass runs ~40 interpreted kernel launches

FRAMES, SIZE = 3, 64  # 3 frames: frame 2 attends to frames 0 and 1 (both sparse-causal segments)
RATIO = 3.0
# fp32: both backends compute in fp32 (the kernels' dots in "ieee" fp32), so only summation order differs
FP32_LOSS_RTOL, FP32_PIXEL_ATOL = 1e-4, 2  # pixel values 0..255


def read_frames(folder) -> np.ndarray:
    """(prompts, F, H, W, 3) float pixel values of an edit's PNG output folders."""
    prompts = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "side-by-side")
    return np.stack([
        np.stack([np.asarray(Image.open(png), dtype=np.float64) for png in sorted(p.glob("*.png"))]) for p in prompts
    ])


@pytest.fixture(scope="module")
def rehearse(tiny_pipeline_dir, tmp_path_factory):
    """rehearse(backend, precision) -> {"losses", "frames", "seen", "launches", "scaler"}, run once each."""
    runs = {}

    def run(backend: str, precision: str) -> dict:
        if (backend, precision) in runs:
            return runs[backend, precision]
        root = tmp_path_factory.mktemp(f"{backend}-{precision}")
        seen, launches = [], set()
        forward, launch = VideoUNet.forward, _common.Launch.__call__

        def spying_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
            frozen = next(p for p in self.parameters() if not p.requires_grad)
            trainable = [p.dtype for p in self.parameters() if p.requires_grad]
            seen.append(dict(autocast=torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                             frozen=frozen.dtype, trainable=set(trainable),
                             checkpointing=self.unet.is_gradient_checkpointing, training=self.training))
            return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

        def spying_launch(self):
            launches.add(self.name)
            return launch(self)

        with pytest.MonkeyPatch.context() as patch:
            # as on a GPU: each op's first Triton use self-checks, here inside the first
            # checkpointed UNet block (conftest.py turns the self-check off for the kernel tests)
            patch.setenv("DEPTHVID_SELF_CHECK", "1")
            _backend.reset_self_checks()
            patch.setattr(VideoUNet, "forward", spying_forward)
            patch.setattr(_common.Launch, "__call__", spying_launch)
            common = ["--device", "cpu", "--backend", backend, "--precision", precision, "--quiet"]
            assert main(["tune", str(sample_clip_path()), "--prompt", "a ball rolls in front of a box",
                         "-o", str(root / "run"), "--model", str(tiny_pipeline_dir), "--frames", str(FRAMES),
                         "--height", str(SIZE), "--width", str(SIZE), "--steps", "2", "--lr", "1e-3", *common]) == 0
            assert main(["edit", str(root / "run"), "--prompt", "a glass marble", "--prompt", "a red planet",
                         "-o", str(root / "edit"), "--steps", "2", "--guidance", "1", *common]) == 0
        log = [json.loads(line) for line in (root / "run" / "loss.jsonl").read_text().splitlines()]
        from safetensors import safe_open

        with safe_open(str(root / "run" / "checkpoint.safetensors"), "pt") as handle:
            scaler = json.loads(handle.metadata()["scaler"])
        self_checks = {key[0]: result.ok for key, result in _backend._self_check_results.items() if key[1] == backend}
        runs[backend, precision] = dict(losses=np.array([r["loss"] for r in log]), frames=read_frames(root / "edit"),
                                        seen=seen, launches=launches, scaler=scaler, self_checks=self_checks)
        return runs[backend, precision]

    return run


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_run_is_the_cuda_configuration(rehearse, backend, precision):
    run = rehearse(backend, precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    tuning = [s for s in run["seen"] if s["training"]]
    assert tuning and all(s["autocast"] == dtype for s in run["seen"])
    assert all(s["frozen"] == dtype and s["trainable"] == {torch.float32} and s["checkpointing"] for s in tuning)
    assert bool(run["scaler"]) == (precision == "fp16")  # GradScaler on for fp16 only
    kernels = {"_pseudo3d_conv_fwd_kernel", "_pseudo3d_conv_bwd_dx_kernel", "_group_norm_stats_kernel",
               "_sparse_causal_attn_fwd_kernel", "_sparse_causal_attn_bwd_dq_kernel",
               "_sparse_causal_attn_bwd_dkdv_kernel", "_temporal_attn_fwd_kernel", "_temporal_attn_bwd_kernel"}
    assert run["launches"] == (kernels if backend == "triton" else set())
    ops = {"sparse_causal_attention", "temporal_attention", "pseudo3d_conv"}
    assert run["self_checks"] == ({op: True for op in ops} if backend == "triton" else {})


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_triton_matches_torch_within_the_precisions_own_error(rehearse, precision):
    exact, torch_run, triton_run = rehearse("torch", "fp32"), rehearse("torch", precision), rehearse("triton", precision)
    for run in (torch_run, triton_run):
        assert np.isfinite(run["losses"]).all() and len(run["losses"]) == 2
        assert run["frames"].shape == (2, FRAMES, SIZE, SIZE, 3) and run["frames"].std() > 1  # not a blank (NaN) image
    loss_noise = np.abs(torch_run["losses"] - exact["losses"]).max()
    loss_error = np.abs(triton_run["losses"] - torch_run["losses"]).max()
    assert loss_error <= RATIO * loss_noise + 1e-3 * exact["losses"].max(), (loss_error, loss_noise)
    pixel_noise = np.abs(torch_run["frames"] - exact["frames"]).mean()
    pixel_error = np.abs(triton_run["frames"] - torch_run["frames"]).mean()
    assert pixel_error <= RATIO * pixel_noise + 1.0, (pixel_error, pixel_noise)


def test_triton_matches_torch_in_fp32(rehearse):
    torch_run, triton_run = rehearse("torch", "fp32"), rehearse("triton", "fp32")
    np.testing.assert_allclose(triton_run["losses"], torch_run["losses"], rtol=FP32_LOSS_RTOL)
    assert np.abs(triton_run["frames"] - torch_run["frames"]).max() <= FP32_PIXEL_ATOL
