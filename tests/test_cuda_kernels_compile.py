"""Every CUDA source in kernels/ compiles with plain nvcc (no torch headers) for sm_80 and sm_90,
and ptxas (-Xptxas -v) reports no register spills and static shared memory within the limits.

The kernels' dynamic shared memory (the attention tiles) is checked at compile time by
static_assert against the same limits (kernels/attention_tiles.cuh), so a tile that does not fit
fails the compile here. ptxas reports are cached by a hash of the sources, flags and nvcc version
(DEPTHVID_NVCC_CACHE, default ~/.cache/depthvid/nvcc-checks): unchanged kernels cost nothing.
No GPU is needed; the CUDA ops themselves only run where one is (not in this CI).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "kernels").glob("*.cu"))
# bytes of shared memory a block may use: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB
SHARED_MEMORY_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-Xptxas", "-v", "-I", str(ROOT / "csrc"), "-I", str(ROOT / "kernels")]

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")


def cache_key(source: Path, arch: int) -> str:
    digest = hashlib.sha256()
    digest.update(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.encode())
    digest.update(" ".join(NVCC_FLAGS + [str(arch), source.name]).encode())
    for header in sorted([*(ROOT / "kernels").iterdir(), *(ROOT / "csrc").glob("*.h")]):
        digest.update(header.name.encode() + header.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    """{(source name, arch): ptxas -v output}, compiling the uncached ones in parallel."""
    cache = Path(os.environ.get("DEPTHVID_NVCC_CACHE", Path.home() / ".cache" / "depthvid" / "nvcc-checks"))
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = tmp_path_factory.mktemp("nvcc")
    reports, running = {}, {}
    for source in SOURCES:
        for arch in SHARED_MEMORY_LIMITS:
            cached = cache / f"{cache_key(source, arch)}.txt"
            if cached.exists():
                reports[source.name, arch] = cached.read_text()
                continue
            command = ["nvcc", *NVCC_FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-c", str(source),
                       "-o", str(out_dir / f"{source.stem}_sm{arch}.o")]
            running[source.name, arch] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                           text=True), cached)
    for key, (process, cached) in running.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"nvcc failed on {key[0]} for sm_{key[1]}:\n{output[-4000:]}"
        cached.write_text(output)
        reports[key] = output
    return reports


ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?(?:,|$)")


def parse_ptxas(report: str) -> dict[str, dict[str, int]]:
    """{kernel: {"registers", "spill_stores", "spill_loads", "smem"}} from ptxas -v output."""
    kernels, current = {}, None
    for line in report.splitlines():
        if match := ENTRY.search(line):
            current = kernels.setdefault(match.group(1), {"smem": 0})
        elif current is not None and (match := SPILLS.search(line)):
            current["spill_stores"], current["spill_loads"] = int(match.group(1)), int(match.group(2))
        elif current is not None and (match := USAGE.search(line)):
            current["registers"] = int(match.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return kernels


def test_every_op_has_a_cuda_source():
    assert {source.stem for source in SOURCES} == {"sparse_causal_attn", "temporal_attn", "pseudo3d_conv"}


@pytest.mark.parametrize("arch", list(SHARED_MEMORY_LIMITS), ids=[f"sm_{arch}" for arch in SHARED_MEMORY_LIMITS])
@pytest.mark.parametrize("source", SOURCES, ids=[source.stem for source in SOURCES])
def test_compiles_without_spills_within_shared_memory(ptxas_reports, source, arch):
    kernels = parse_ptxas(ptxas_reports[source.name, arch])
    assert kernels, f"no kernels compiled from {source.name}"
    for name, usage in kernels.items():
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{name} spills on sm_{arch}: {usage}"
        assert usage["smem"] <= SHARED_MEMORY_LIMITS[arch], f"{name} static shared memory on sm_{arch}: {usage}"
        assert usage["registers"] <= 255, name


def test_parse_ptxas_reads_spills_and_shared_memory():
    report = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    24 bytes stack frame, 32 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size, 32 bytes smem\n"
    )
    assert parse_ptxas(report) == {"_Z1kv": {"registers": 64, "spill_stores": 32, "spill_loads": 8, "smem": 32}}
