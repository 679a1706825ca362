"""Settings shared by every benchmark: ``pytest benchmarks/ --benchmark-only``.

* No Triton interpreter: only real kernels are timed (harness.op_backends leaves Triton out on CPU).
* Offline: every model is built from its config with random weights.
* Results: unless --benchmark-json is given, a run that times something writes pytest-benchmark's
  JSON (every timing, machine info) to benchmarks/results/<cpu|cuda>-<UTC time>.json, with
  depthvid's versions, backends, threads, GPU and the machine's load average added to the
  machine info. ``python benchmarks/report.py`` turns the newest one into README.md's table and plot.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Benchmarks time the backend they name: no first-use self-check may run inside a timed call or
# swap in the torch backend (depthvid.ops._backend).
os.environ.setdefault("DEPTHVID_SELF_CHECK", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads the option
def pytest_configure(config):
    option = config.option
    if getattr(option, "benchmark_json", None) is None and not option.collectonly and not option.benchmark_disable:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        RESULTS_DIR.mkdir(exist_ok=True)
        option.benchmark_json = RESULTS_DIR / f"{device}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"


def pytest_benchmark_update_machine_info(config, machine_info):
    import diffusers
    import torch

    import depthvid
    from harness import interpreting, op_backends

    machine_info.update(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        depthvid=depthvid.__version__,
        torch_threads=torch.get_num_threads(),
        cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        depthvid_backends=op_backends(),
        triton_interpreter=interpreting(),
        load_average_at_end=os.getloadavg(),  # 1, 5, 15 minutes: how busy the (shared) machine was
    )
