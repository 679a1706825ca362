"""Compile Triton kernels for A100 (sm_80) and H100 (sm_90) on a machine without a GPU.

``triton.compile`` with a ``GPUTarget`` needs no device, only the ``@triton.jit`` function. Under
TRITON_INTERPRET=1 (set by conftest.py) ``@triton.jit`` builds interpreter functions that cannot
be compiled, so the compiling runs in subprocesses started without it: this file is their script
(jobs as a JSON argument, one result per job as JSON on stdout).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys

SHARED_MEMORY_LIMITS = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block: A100, H100
TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclasses.dataclass
class CompileJob:
    """One kernel as its launcher would launch it on sm_<arch>."""

    module: str  # e.g. "depthvid.triton_kernels.sparse_causal_attn"
    kernel: str  # name of the @triton.jit function in that module
    dtype: str  # element type of the tensors: "float16", "bfloat16" or "float32"
    constexprs: dict
    options: dict  # num_warps, num_stages
    arch: int
    fp32_pointers: tuple = ()  # buffers that are fp32 whatever dtype (log-sum-exp, statistics)
    float_args: tuple = ()  # scalar arguments passed as Python floats; the other scalars are ints
    unit_args: tuple = ()  # integer arguments always 1 (contiguous strides): the JIT makes them constexpr


def head_dim_strides(kernel) -> tuple:
    """The attention kernels' ``stride_*d`` arguments: 1 for tensors whose head dim is contiguous."""
    return tuple(name for name in kernel.arg_names if name.startswith("stride_") and name.endswith("d"))


def compile_job(job: CompileJob) -> dict:
    """{"shared": bytes, "cubin_bytes": n} or {"error": message}. Must run without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(job.module), job.kernel)
    signature, constexprs, attrs = {}, dict(job.constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in job.constexprs:
            signature[name] = "constexpr"
        elif name in job.unit_args:
            signature[name], constexprs[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in job.fp32_pointers else "*" + TRITON_TYPES[job.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = "fp32" if name in job.float_args else "i32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as error:  # reported by the test, with the job that failed
        return {"error": f"{type(error).__name__}: {error}"[-3000:]}
    return {"shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm.get("cubin", b""))}


def env_without_interpreter() -> dict:
    """os.environ for a subprocess where @triton.jit compiles (conftest.py sets TRITON_INTERPRET=1)."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def compile_jobs(jobs: list[CompileJob], workers: int = 2) -> list[dict]:
    """Results of :func:`compile_job` in job order, compiled by ``workers`` subprocesses."""
    env = env_without_interpreter()
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    shares = [jobs[start::workers] for start in range(workers)]
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, json.dumps([dataclasses.asdict(job) for job in share])],
            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for share in shares
    ]  # all running before the first is waited for
    outputs = [process.communicate(timeout=3600) for process in processes]
    results = [None] * len(jobs)
    for start, (process, (stdout, stderr)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"compile subprocess failed:\n{stderr[-4000:]}"
        results[start::workers] = json.loads(stdout.strip().splitlines()[-1])
    return results


def assert_fits_the_gpu(result: dict, arch: int) -> None:
    assert "error" not in result, result["error"]
    assert result["cubin_bytes"] > 0, "no cubin"
    limit = SHARED_MEMORY_LIMITS[arch]
    assert 0 <= result["shared"] <= limit, f"{result['shared']} bytes of shared memory > {limit}"


if __name__ == "__main__":
    jobs = [CompileJob(**fields) for fields in json.loads(sys.argv[1])]
    print(json.dumps([compile_job(job) for job in jobs]))
