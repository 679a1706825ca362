"""Compile the Triton kernels for A100 (sm_80) and H100 (sm_90) on a machine without a GPU, exactly
as a real launch would, and read the binaries.

Each kernel module's ``gpu_launches()`` builds every launch its launchers can make on a GPU from
meta tensors of representative shapes and layouts (the same launch-building code the launchers run).
``compile_launch`` then hands those arguments to Triton's own JIT binder, so the signature,
the specialisation (tt.divisibility 16 on aligned pointers and on integers divisible by 16,
integers equal to 1 as constexprs) and the options are the ones a launch on that GPU computes,
and compiles for ``GPUTarget("cuda", arch, 32)``. ``analyse`` reads the PTX and ptxas's -v log:

- mma: tensor-core instructions (``mma.sync``, ``wgmma.mma_async``) inside loops;
- vector loads: 128-bit global loads (``ld.global...v4``), ``cp.async`` of 16 bytes or TMA
  (``cp.async.bulk.tensor``) inside loops, against the scalar global loads there;
- spills: ptxas's spill stores/loads; registers per thread; shared memory per block.

Under TRITON_INTERPRET=1 (set by conftest.py) ``@triton.jit`` builds interpreter functions that
cannot be compiled, so the compiling runs in subprocesses started without it: this file is their
script. Results are cached on disk (``$DEPTHVID_CACHE_DIR`` or ``~/.cache/depthvid``/gpu-binaries)
keyed by the kernel sources, the Triton version, the target and the specialisation.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SHARED_MEMORY_LIMITS = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block: A100, H100
KERNEL_MODULES = (
    "depthvid.triton_kernels.sparse_causal_attn",
    "depthvid.triton_kernels.temporal_attn",
    "depthvid.triton_kernels.pseudo3d_conv",
)


def cache_dir() -> Path:
    root = os.environ.get("DEPTHVID_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "depthvid"
    return Path(root) / "gpu-binaries"


def _loop_bodies(ptx: str) -> list[str]:
    """The PTX between each label and the last branch back to it (a loop; nested loops overlap)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line.strip()))}
    ends = {}
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            ends[m.group(1)] = i
    return ["\n".join(lines[labels[label]:end + 1]) for label, end in ends.items()]


def analyse(ptx: str, ptxas_log: str, shared: int) -> dict:
    loops = "\n".join(_loop_bodies(ptx))
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log)]
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", ptxas_log)]
    global_loads = re.findall(r"\bld\.global[\w.:]*", loops)
    return {
        "shared": shared,
        "registers": max(registers, default=-1),
        "spill_bytes": sum(spills) if spills else -1,
        "loops": loops.count("\n") > 0,
        "mma": len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\b", loops)),
        "vector_loads": sum(".v4" in load for load in global_loads)
        + len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^;]*,\s*(?:16|0x10)\b", loops))
        + len(re.findall(r"\bcp\.async\.bulk\.tensor\b", loops)),
        "scalar_loads": sum(".v2" not in load and ".v4" not in load for load in global_loads),
    }


def _module_source_hash(module) -> str:
    from depthvid.triton_kernels import _common

    paths = {Path(module.__file__), Path(_common.__file__)}
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(paths))).hexdigest()


def compile_launch(launch, arch: int, source_hash: str = "") -> dict:
    """Compile ``launch`` (a depthvid.triton_kernels._common.Launch) for sm_<arch> with the
    specialisation Triton's JIT computes from its arguments; returns :func:`analyse`'s dict plus
    "kernel", "label", "arch", or {"error": message}. Must run without TRITON_INTERPRET."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, target = launch.kernel, GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, specialization, options)
    dtype = next(str(arg.dtype).removeprefix("torch.") for arg in launch.args if hasattr(arg, "dtype"))
    identity = {"kernel": launch.name, "label": launch.label, "dtype": dtype, "arch": arch}
    key = hashlib.sha256(repr((source_hash, triton.__version__, launch.name, arch, signature, sorted(constexprs.items()),
                               sorted(attrs.items()), sorted(options.__dict__.items()))).encode()).hexdigest()
    cached = cache_dir() / f"{key}.json"
    if source_hash and cached.is_file():
        return {**json.loads(cached.read_text()), **identity}
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills
    knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as error:  # reported by the test, with the launch that failed
        return {"error": f"{type(error).__name__}: {error}"[-3000:], **identity}
    result = analyse(compiled.asm["ptx"], log.getvalue(), compiled.metadata.shared)
    result["cubin_bytes"] = len(compiled.asm.get("cubin", b""))
    if source_hash:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(cached)
    return {**result, **identity}


def env_without_interpreter() -> dict:
    """os.environ for a subprocess where @triton.jit compiles (conftest.py sets TRITON_INTERPRET=1)."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def compile_module(module_name: str, archs=tuple(SHARED_MEMORY_LIMITS), workers: int = 2) -> list[dict]:
    """Every launch of ``module_name``'s ``gpu_launches()`` compiled for every arch, in ``workers``
    subprocesses; one result per (launch, arch), launches in order, archs inner."""
    import depthvid

    env = env_without_interpreter()
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # the subprocesses compile the depthvid this process imported (a checkout run with another
    # checkout's editable install would otherwise compile that one's kernels)
    package_root = str(Path(depthvid.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, module_name, json.dumps(list(archs)), str(worker), str(workers)],
            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for worker in range(workers)
    ]  # all running before the first is waited for
    shares = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=3600)
        assert process.returncode == 0, f"compile subprocess failed:\n{stderr[-4000:]}"
        shares.append(json.loads(stdout.strip().splitlines()[-1]))
    results = [None] * sum(map(len, shares))
    for worker, share in enumerate(shares):
        results[worker::workers] = share
    return results


def _compile_share(module_name: str, archs: list[int], worker: int, workers: int) -> list[dict]:
    module = importlib.import_module(module_name)
    source_hash = _module_source_hash(module) if module_name.startswith("depthvid.") else ""
    jobs = [(launch, arch) for launch in module.gpu_launches() for arch in archs]
    return [compile_launch(launch, arch, source_hash) for launch, arch in jobs[worker::workers]]


if __name__ == "__main__":
    print(json.dumps(_compile_share(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
