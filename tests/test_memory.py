"""Memory: the gradient-checkpointing default as a function of the work and the machine, and which
networks are resident in each phase of `depthvid tune` and `depthvid edit` (tiny pipeline)."""
import gc
import os
import sys
import weakref

import pytest
import torch

from depthvid import editing, loading, tuning
from depthvid.assets import sample_clip_path
from depthvid.cli import main
from depthvid.memory import (
    activation_bytes,
    available_memory_bytes,
    channel_pixels,
    return_freed_tensors_to_the_system,
    tuning_plan,
)
from depthvid.testing import SD2_DEPTH_UNET_CONFIG, tiny_unet_config

GB = 2**30
QUARTER_WIDTH = dict(SD2_DEPTH_UNET_CONFIG, block_out_channels=(80, 160, 320, 320))


def test_channel_pixels_sum_over_levels():
    # 64x64 latents: 320*64^2 + 640*32^2 + 1280*16^2 + 1280*8^2
    assert channel_pixels(SD2_DEPTH_UNET_CONFIG, 512, 512) == 320 * 4096 + 640 * 1024 + 1280 * 256 + 1280 * 64
    assert channel_pixels(SD2_DEPTH_UNET_CONFIG, 512, 256) == channel_pixels(SD2_DEPTH_UNET_CONFIG, 512, 512) // 2


def test_activation_estimate_matches_the_measurements_it_came_from():
    # measured (module docstring): 1.165 GiB at 1/4 width, 8 x 256x256; out of memory at 21.5 GB with
    # 3.5 GB of weights at full size, 8 x 512x512
    assert activation_bytes(QUARTER_WIDTH, 8, 256, 256) == pytest.approx(1.165 * GB, rel=0.02)
    assert activation_bytes(SD2_DEPTH_UNET_CONFIG, 8, 512, 512) > 18 * GB
    fp32 = activation_bytes(SD2_DEPTH_UNET_CONFIG, 8, 512, 512)
    assert activation_bytes(SD2_DEPTH_UNET_CONFIG, 8, 512, 512, dtype=torch.bfloat16) == fp32 // 2
    assert activation_bytes(SD2_DEPTH_UNET_CONFIG, 8, 512, 512, batch=2) == 2 * fp32
    assert activation_bytes(SD2_DEPTH_UNET_CONFIG, 24, 512, 512) == 3 * fp32


@pytest.mark.parametrize(
    "config, frames, size, available_gb, checkpointing, selective",
    [
        pytest.param(SD2_DEPTH_UNET_CONFIG, 8, 512, 20, True, True, id="paper-scale-on-24GB-machine"),
        pytest.param(SD2_DEPTH_UNET_CONFIG, 8, 512, 10, True, False, id="paper-scale-on-16GB-machine"),
        pytest.param(SD2_DEPTH_UNET_CONFIG, 8, 512, 60, False, True, id="paper-scale-on-64GB-machine"),
        pytest.param(SD2_DEPTH_UNET_CONFIG, 24, 512, 60, True, True, id="24-frames-on-64GB-machine"),
        pytest.param(SD2_DEPTH_UNET_CONFIG, 8, 256, 20, False, True, id="256px-on-24GB-machine"),
        pytest.param(QUARTER_WIDTH, 8, 256, 1, True, True, id="small-model-on-1GB"),
        pytest.param(QUARTER_WIDTH, 8, 256, 0.5, True, False, id="small-model-on-0.5GB"),
        pytest.param(tiny_unet_config(), 4, 64, 1, False, True, id="tiny"),
    ],
)
def test_checkpointing_follows_work_size_and_memory(config, frames, size, available_gb, checkpointing, selective):
    plan = tuning_plan(config, frames, size, size, available_bytes=int(available_gb * GB))
    assert plan.gradient_checkpointing is checkpointing
    assert plan.gradient_checkpointing == (plan.activation_bytes > plan.budget_bytes)
    assert plan.selective is selective
    assert plan.checkpointing() == (("selective" if selective else "full") if checkpointing else "off")
    assert plan.checkpointing(on=False) == "off"


def test_available_memory_is_measured():
    assert 0 < available_memory_bytes("cpu") < 2**50


# -- phase residency -------------------------------------------------------------------------------

FRAMES, SIZE = 3, 64


def record_loaded_networks(monkeypatch):
    """Patch load_base_model to keep a weak reference to every network it loads: [(name, ref)]."""
    loaded = []
    load = loading.load_base_model

    def recording(*args, **kwargs):
        base = load(*args, **kwargs)
        for name in loading.NETWORKS:
            if getattr(base, name) is not None:
                loaded.append((name, weakref.ref(getattr(base, name))))
        return base

    monkeypatch.setattr(loading, "load_base_model", recording)
    return loaded


def resident(loaded) -> set[str]:
    gc.collect()
    return {name for name, ref in loaded if ref() is not None}


def spy(monkeypatch, module, name, loaded, seen):
    """Wrap ``module.name`` to note which networks are alive whenever it is called."""
    function = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.setdefault(name, []).append(resident(loaded))
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture(scope="module")
def run_dir(tiny_pipeline_dir, tmp_path_factory):
    return tmp_path_factory.mktemp("memory") / "run"


def test_tuning_keeps_only_the_unet_resident(tiny_pipeline_dir, run_dir, monkeypatch):
    loaded, seen = record_loaded_networks(monkeypatch), {}
    spy(monkeypatch, tuning, "training_loss", loaded, seen)
    argv = ["tune", str(sample_clip_path()), "--prompt", "a ball", "-o", str(run_dir), "--model",
            str(tiny_pipeline_dir), "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", "2", "--quiet"]
    assert main(argv) == 0
    assert {name for name, _ in loaded} == set(loading.NETWORKS)  # the encoders did run (the cache)
    assert seen["training_loss"] == [{"unet"}, {"unet"}]


def test_editing_loads_each_network_for_its_phase_only(run_dir, tmp_path, monkeypatch):
    loaded, seen = record_loaded_networks(monkeypatch), {}
    spy(monkeypatch, editing, "ddim_invert", loaded, seen)
    spy(monkeypatch, editing, "ddim_sample", loaded, seen)
    spy(monkeypatch, loading, "decode_latents", loaded, seen)
    assert main(["edit", str(run_dir), "--prompt", "a", "--prompt", "b", "--steps", "2", "-o",
                 str(tmp_path / "out.mp4"), "--quiet"]) == 0
    assert seen == {"ddim_invert": [{"unet"}], "ddim_sample": [{"unet"}], "decode_latents": [{"vae"}]}
    assert "depth_estimator" not in {name for name, _ in loaded}  # the tuned frame count: cached depth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_tensors_return_to_the_system():
    assert return_freed_tensors_to_the_system()
    # glibc's default: freeing a 16 MiB block raises its mmap threshold past 8 MiB, so a freed
    # 8 MiB tensor would stay in the heap; with the fixed threshold it is unmapped
    larger = torch.ones(16 * 2**20 // 4)
    del larger
    before = resident_bytes()
    block = torch.ones(8 * 2**20 // 4)
    during = resident_bytes()
    del block
    assert during - before > 7 * 2**20 and during - resident_bytes() > 7 * 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
