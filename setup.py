"""Builds depthvid._C, the C++/CUDA extension, next to the metadata in pyproject.toml.

The extension is optional: without torch at build time (pip's build isolation), with
DEPTHVID_SKIP_EXTENSION=1, or when the compiler fails, depthvid installs without it and the
torch/Triton backends work; ``depthvid doctor`` and the first ``backend="cpp"`` call say why.
Build it against the torch that runs it: ``pip install --no-build-isolation .`` (README).

Environment:
    DEPTHVID_SKIP_EXTENSION=1   do not build depthvid._C
    DEPTHVID_FORCE_CUDA=1       build the CUDA kernels even with no GPU visible; fail if impossible
    TORCH_CUDA_ARCH_LIST        CUDA archs (default "8.0;9.0" when no GPU is visible: torch's
                                build crashes without one, pytorch#137261)
    MAX_JOBS                    parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _say(message: str) -> None:
    print(f"depthvid setup: {message}", file=sys.stderr)


def _locate_cuda_home() -> None:
    """Set CUDA_HOME when torch's guess (the parent of nvcc's folder) holds no CUDA headers.

    torch takes CUDA_HOME = dirname(dirname(which nvcc)); an nvcc on PATH that is a wrapper script
    (/usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc, as on this project's machines)
    makes that /usr/local, and every CUDA host file then fails on a missing cuda_runtime.h.
    Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME once, at import).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return  # torch then tries /usr/local/cuda itself
    torch_guess = os.path.dirname(os.path.dirname(nvcc))
    for home in (torch_guess, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            if home != torch_guess:
                os.environ["CUDA_HOME"] = home
                _say(f"CUDA_HOME={home} (nvcc on PATH is {nvcc}, whose parent folder has no CUDA headers)")
            return


def _cuda_wanted(torch, cuda_home) -> bool:
    """CUDA kernels when a CUDA torch and nvcc are present and a GPU is visible (or it is forced)."""
    force = _flag("DEPTHVID_FORCE_CUDA")
    if force and (torch.version.cuda is None or cuda_home is None):
        raise RuntimeError(
            "DEPTHVID_FORCE_CUDA=1 needs a CUDA build of torch and the CUDA toolkit (nvcc); found torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) and CUDA_HOME={cuda_home}"
        )
    if torch.version.cuda is None or cuda_home is None:
        return False
    return force or torch.cuda.is_available()


def extension_setup() -> dict:
    """ext_modules and cmdclass for depthvid._C, or {} when it is not built."""
    if _flag("DEPTHVID_SKIP_EXTENSION"):
        _say("DEPTHVID_SKIP_EXTENSION=1: not building depthvid._C")
        return {}
    _locate_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable at build time (pip build isolation?): not building depthvid._C; "
            "install torch first and use `pip install --no-build-isolation .`"
        )
        return {}

    with_cuda = _cuda_wanted(torch, CUDA_HOME)
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_archs = ""
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("kernels/*.cu"))
    # -fopenmp: at::parallel_for is inline header code whose `#pragma omp parallel` compiles into
    # our objects; without it every CPU kernel ran on one thread (measured: 2 threads no faster than
    # 1). The runtime is torch's own libgomp.so.1 (same soname, already loaded), not a second one.
    # -march=native: the extension is always compiled on the machine that runs it (pip install from
    # source). -fno-trapping-math (as torch's own build): without it GCC keeps the clamps in
    # fast_exp as branches and the softmax loops stay scalar (measured: the CPU attention forward
    # ran at half the speed of torch's).
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
    macros = [
        ("DEPTHVID_TORCH_VERSION", f'"{torch.__version__}"'),
        ("DEPTHVID_CUDA_ARCHS", f'"{cuda_archs}"'),
        ("DEPTHVID_WITH_CUDA", "1" if with_cuda else "0"),
    ]
    kwargs = dict(
        name="depthvid._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")],
        define_macros=macros,
        # -lstdc++: the shared C++ runtime, as torch uses, even where the compiler links it
        # statically (a g++ wrapper adding -static-libstdc++, as on the leased H100's image). With
        # its own copy, an error the extension throws crashed the process there (segfault in
        # every TORCH_CHECK) and garbled the message here; a wrapper rehearsed it on this machine.
        extra_link_args=["-fopenmp", "-lstdc++"],
    )
    if with_cuda:
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-Xptxas=-v", "-lineinfo"]
        extension = CUDAExtension(**kwargs, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        extension = CppExtension(**kwargs, extra_compile_args={"cxx": cxx_flags})
    _say(f"building depthvid._C for torch {torch.__version__}, " + (f"CUDA archs {cuda_archs}" if with_cuda else "CPU only"))

    class OptionalBuildExtension(BuildExtension):
        """A failed build leaves depthvid installed without _C (unless CUDA was forced)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # compiler errors come as several exception types
                if _flag("DEPTHVID_FORCE_CUDA"):
                    raise
                _say(f"building depthvid._C failed ({error}); installing without it (torch backend only)")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**extension_setup())
