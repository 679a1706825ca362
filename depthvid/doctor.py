"""`depthvid doctor`: the device, versions, which backends and extension builds are available, and
the self-check of every op on every backend that can run here (see depthvid.ops._backend)."""
from __future__ import annotations

import os
import platform
import warnings

import torch

import depthvid
from depthvid.ops import _backend

CHECK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        names = [
            f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        ]
        return "device: " + "; ".join(names)
    return f"device: cpu ({platform.processor() or platform.machine()}), no CUDA device visible"


def _triton_status(device: torch.device) -> tuple[bool, str]:
    if not _backend.triton_available():
        return False, "not installed (pip install triton)"
    if device.type == "cuda":
        return True, "runs the kernels on the GPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "runs the kernels on CPU in the interpreter (TRITON_INTERPRET=1; slow, for rehearsals)"
    return False, "installed; needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU"


def _extension_status(device: torch.device) -> tuple[bool, str]:
    try:
        from depthvid.extension import build_info
    except ImportError:
        return False, "not built"
    info = build_info()
    if not info.get("built"):
        return False, f"not built ({info.get('error') or 'no error recorded'})"
    archs = ", ".join(info.get("cuda_archs") or []) or "none"
    described = (f"built against torch {info.get('torch')}, CUDA {'yes' if info.get('cuda') else 'no'} (archs: {archs}), "
                 + ("CPU kernels on torch's threads" if info.get("openmp") else "CPU kernels on ONE thread (built without OpenMP)"))
    probe = torch.empty(0, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = _backend.resolve_backend("cpp", probe) == "cpp"  # CUDA kernels: fp16/bf16
    return runs, described + ("" if runs else f"; cannot run on {device.type} here")


def report() -> tuple[list[str], bool]:
    """The lines `depthvid doctor` prints, and whether every self-check passed."""
    device = _device()
    triton_version = "not installed"
    if _backend.triton_available():
        import triton

        triton_version = triton.__version__
    lines = [
        f"depthvid {depthvid.__version__}  python {platform.python_version()}  torch {torch.__version__} "
        f"(CUDA build {torch.version.cuda or 'none'})  triton {triton_version}",
        _device_line(device),
        "backends:",
        "  torch   available (the reference)",
    ]
    runnable = []
    for name, (runs, status) in (("triton", _triton_status(device)), ("cpp", _extension_status(device))):
        lines.append(f"  {name:<7} {status}")
        if runs:
            runnable.append(name)
    if not _backend.self_check_enabled():
        lines.append("note: DEPTHVID_SELF_CHECK=0, so runs skip the first-use self-check (doctor runs it anyway)")
    lines.append(f"self-check on {device} (backend vs torch reference: output and input gradients):")
    all_ok = True
    if not runnable:
        lines.append("  no backend besides torch can run here")
    for backend in runnable:
        for op in _backend.registered_self_checks():
            for dtype in CHECK_DTYPES:
                result = _backend.run_self_check(op, backend, device, dtype)
                all_ok &= result.ok
                lines.append(
                    f"  {backend:<7} {op:<24} {result.dtype:<9} {'ok    ' if result.ok else 'FAILED'} "
                    f"{result.detail} ({result.seconds:.2f} s)"
                )
    return lines, all_ok


def run_doctor(args) -> int:
    lines, all_ok = report()
    for line in lines:
        print(line, flush=True)
    return 0 if all_ok else 1
