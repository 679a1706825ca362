"""Checks a CUDA build of depthvid._C; run by tools/check_cuda_build.sh in its throwaway venv.

No GPU needed for these:
  - the .so: no undefined depthvid symbols (every launcher the host code calls is linked), and its
    .nv_fatbin holds a cubin per source for every arch in TORCH_CUDA_ARCH_LIST;
  - the build log: ptxas (-Xptxas=-v, with torch's extension flags) reports no register spills
    (reports kept next to the log, so a rebuild that recompiled nothing still checks every source);
  - import: depthvid._C loads without a GPU, build_info() reports cuda and the archs, every op of
    torch.ops.depthvid has a CPU, a CUDA and a fake (Meta) kernel;
  - torch.library.opcheck on every op (the CPU kernels of this same .so, with the CUDA torch);
  - the fake kernels on CUDA fake tensors (FakeTensorMode) give the shapes, dtypes and strides the
    real (CPU) kernels give, on device cuda. (Autograd cannot be traced this way without a GPU:
    the engine asks the driver for a CUDA context.)
With a GPU visible, also: each op's output and gradients on CUDA in fp16 and bf16 against the
torch backend (tests/_extension_checks.py's bounds relative to torch's own error).
Prints one line per check; exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # _extension_checks: opcheck cases, tolerances
os.environ.setdefault("DEPTHVID_SELF_CHECK", "0")  # a failing op must fail here, not fall back to torch

import torch  # noqa: E402

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    if not ok:
        FAILURES.append(name)


# ------------------------------------------------------------------------------------ the .so


def elf_section(path: Path, name: str) -> bytes:
    """The bytes of section `name` of a 64-bit little-endian ELF file (b"" if absent)."""
    data = path.read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index):  # name, type, flags, addr, offset, size, ...
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + index * shentsize)

    names_offset = header(shstrndx)[4]
    for index in range(shnum):
        entry = header(index)
        start = names_offset + entry[0]
        if data[start : data.index(b"\0", start)].decode() == name:
            return data[entry[4] : entry[4] + entry[5]]
    return b""


def fatbin_cubin_archs(blob: bytes) -> list[int]:
    """SM numbers of the cubins in a .nv_fatbin section: fatbin headers (magic 0xBA55ED50, header size,
    payload size), each followed by entries (kind 1 = PTX, 2 = cubin; header size, payload size;
    the arch at byte 28 of the entry header)."""
    archs, position = [], 0
    while position + 16 <= len(blob):
        magic, _, header_size, payload_size = struct.unpack_from("<IHHQ", blob, position)
        if magic != 0xBA55ED50:
            position += 8  # fatbins are 8-byte aligned in the section
            continue
        entry, end = position + header_size, position + header_size + payload_size
        while entry < end:
            kind, _, entry_header_size, entry_size = struct.unpack_from("<HHIQ", blob, entry)
            if kind == 2:
                archs.append(struct.unpack_from("<I", blob, entry + 28)[0])
            entry += entry_header_size + entry_size
        position = end
    return archs


def sm_number(arch: str) -> int:
    """80 for "8.0", 90 for "9.0a" (Hopper's arch-specific features) or "9.0+PTX"."""
    major, minor = re.match(r"(\d+)\.(\d+)", arch).groups()
    return int(major + minor)


def check_shared_object(so: Path, archs: list[str]) -> None:
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True).stdout
    demangled = subprocess.run(["c++filt"], input=nm, capture_output=True, text=True, check=True).stdout
    missing = [line.split(None, 1)[-1] for line in demangled.splitlines() if "depthvid" in line]
    report("no undefined depthvid symbols in the .so", not missing, "; ".join(missing[:5]))
    dynamic = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
    report("links the shared libstdc++, as torch does (errors crash across two C++ runtimes)",
           "[libstdc++.so.6]" in dynamic)
    cubins = fatbin_cubin_archs(elf_section(so, ".nv_fatbin"))
    sources = len(list((ROOT / "kernels").glob("*.cu")))
    want = {sm_number(arch): sources for arch in archs}
    got = {arch: cubins.count(arch) for arch in set(cubins)}
    report("a cubin per kernels/*.cu for every arch", got == want, f"cubins per sm {got}, expected {want}")


def ptxas_reports(log: Path, cache: Path) -> dict[str, str]:
    """{kernels/*.cu name: its ptxas -v output} from the build log (ninja prints each command, then
    its output), merged into `cache` (JSON), so that a rebuild that recompiled nothing, or only some
    sources, still has a report for every source."""
    reports = json.loads(cache.read_text()) if cache.exists() else {}
    current = None
    for line in log.read_text(errors="replace").splitlines():
        if re.match(r"\s*\[\d+/\d+\] ", line):
            source = re.search(r" -c (\S+\.cu) ", line)
            current = Path(source.group(1)).name if source else None
            if current:
                reports[current] = ""
        elif current and ("ptxas" in line or "bytes spill" in line):
            reports[current] += line + "\n"
    cache.write_text(json.dumps(reports, indent=1))
    return reports


def check_ptxas(log: Path) -> None:
    reports = ptxas_reports(log, log.with_name("ptxas-reports.json"))
    for source in sorted(path.name for path in (ROOT / "kernels").glob("*.cu")):
        text = reports.get(source, "")
        entries = len(re.findall(r"Compiling entry function", text))
        spills = re.findall(r"[1-9]\d* bytes spill (?:stores|loads)", text)
        report(f"ptxas compiled {source} without spills", entries > 0 and not spills,
               f"{entries} kernels x archs, {len(spills)} spill reports")


# ------------------------------------------------------------------------------------ the ops

OPS = ["sparse_causal_attn_fwd", "sparse_causal_attn_bwd", "temporal_attn_fwd", "temporal_attn_bwd",
       "group_norm_silu", "group_norm_silu_bwd", "conv_epilogue"]


def check_registrations() -> None:
    registered = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                        if name.startswith("depthvid::"))
    report("the schemas are the expected ops", registered == sorted(OPS), f"{registered}")
    for name in OPS:
        op = getattr(torch.ops.depthvid, name).default
        keys = {key: op.has_kernel_for_dispatch_key(getattr(torch._C.DispatchKey, key)) for key in ("CPU", "CUDA", "Meta")}
        report(f"{name} has CPU, CUDA and fake kernels", all(keys.values()), f"{keys}")


def check_opcheck() -> None:
    from _extension_checks import opcheck_cases

    for op, args in opcheck_cases():
        try:
            torch.library.opcheck(op, args)
            report(f"opcheck {op.name()} (CPU)", True)
        except Exception as error:  # opcheck raises OpCheckError or the op's own error
            report(f"opcheck {op.name()} (CPU)", False, f"{type(error).__name__}: {str(error)[:300]}")


def check_fake_cuda() -> None:
    """Each opcheck case on CUDA fake tensors (attention in fp16, as the CUDA kernels take it)
    against the metadata of the real CPU result."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from _extension_checks import opcheck_cases

    def metadata(result):
        results = result if isinstance(result, tuple) else (result,)
        return [(tuple(t.shape), t.dtype, t.stride()) for t in results]

    for op, args in opcheck_cases():
        attention = "attn" in op.name()

        def cast(t, attention=attention):  # lse / mean / rstd stay fp32
            if not isinstance(t, torch.Tensor) or not attention or t.dim() != 4:
                return t
            return t.detach().half()

        args = [cast(a) for a in args]
        want = metadata(op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args]))
        with FakeTensorMode():
            fake = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")
                    if isinstance(a, torch.Tensor) else a for a in args]
            result = op(*fake)
            got = metadata(result)
            devices = {t.device.type for t in (result if isinstance(result, tuple) else (result,))}
        report(f"fake {op.name()} on cuda", got == want and devices == {"cuda"}, "" if got == want else f"{got} vs {want}")


def check_on_gpu() -> None:
    """Output and gradients of the public ops with backend="cpp" on CUDA against backend="torch"."""
    from _extension_checks import assert_close_to_torch, check_attention, random_tensors

    from depthvid.ops import GroupNormSiLU, pseudo3d_conv, sparse_causal_attention, temporal_attention

    def torch_backend(op):
        return lambda q, k, v, num_frames: op(q, k, v, num_frames, backend="torch")

    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (40, 64, 80, 160):
            for num_frames in (1, 2, 3, 5):
                shape = (2 * num_frames, 2, 97, head_dim)  # two videos, ragged tokens
                tensors = [t.cuda() for t in random_tensors(shape, dtype)]
                # the model passes (B*F, N, H, D).transpose(1, 2) views: q as one of them
                q = tensors[0].transpose(1, 2).contiguous().transpose(1, 2)
                for name, op in (("sparse_causal", sparse_causal_attention), ("temporal", temporal_attention)):
                    if name == "temporal" and num_frames == 1:
                        continue  # dq is exactly 0 in torch: any rounding noise exceeds a bound relative to it
                    label = f"{name} attention on cuda {dtype} D={head_dim} F={num_frames}"
                    try:
                        check_attention(op, torch_backend(op), q, *tensors[1:], num_frames)
                        report(label, True)
                    except AssertionError as error:
                        report(label, False, str(error)[:300])
        generator = torch.Generator().manual_seed(0)
        x = (torch.randn(2, 8, 3, 9, 10, generator=generator) * 2 + 0.5).cuda()
        weight = (torch.randn(6, 8, 3, 3, generator=generator) * 0.2).cuda()
        bias, temb = torch.randn(6, generator=generator).cuda(), torch.randn(2, 6, generator=generator).cuda()
        residual = torch.randn(2, 6, 3, 9, 10, generator=generator).cuda()
        norm_weight, norm_bias = (1 + 0.3 * torch.randn(8, generator=generator)).cuda(), (0.3 * torch.randn(8, generator=generator)).cuda()

        def conv_results(backend, as_dtype):
            leaves = [t.detach().to(as_dtype).requires_grad_() for t in (x, weight, bias, norm_weight, norm_bias, temb, residual)]
            xx, w, b, nw, nb, tt, rr = leaves
            out = pseudo3d_conv(xx, w, b, 1, 1, backend, norm=GroupNormSiLU(4, nw, nb), temb=tt, residual=rr,
                                output_scale=2.0)
            return [out.detach(), *torch.autograd.grad(out.square().sum(), leaves)]

        names = ("out", "dx", "dweight", "dbias", "dnorm_weight", "dnorm_bias", "dtemb", "dresidual")
        try:
            assert_close_to_torch(names, conv_results("cpp", dtype), conv_results("torch", dtype),
                                  conv_results("torch", torch.float64))
            report(f"pseudo3d conv prologue/epilogue on cuda {dtype}", True)
        except AssertionError as error:
            report(f"pseudo3d conv prologue/epilogue on cuda {dtype}", False, str(error)[:300])
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-log", type=Path, help="pip's -v output of the build (ptxas -v reports)")
    args = parser.parse_args()
    import depthvid
    from depthvid import extension

    package = Path(depthvid.__file__).parent
    report("depthvid imported from the install, not the checkout", ROOT not in package.parents, str(package))
    info = extension.build_info()
    archs = [a for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(",", ";").split(";") if a]
    report("build_info() reports the CUDA build", info["built"] and info["error"] is None and info["cuda"]
           and info["cuda_archs"] == archs, f"{info}")
    if not info["built"]:
        sys.exit(1)
    (so,) = package.glob("_C*.so")
    print(f"     {so.name}: {so.stat().st_size / 2**20:.1f} MiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"GPU visible: {torch.cuda.is_available()}")
    if shutil.which("nm") and shutil.which("c++filt"):
        check_shared_object(so, archs)
    if args.build_log is not None:
        check_ptxas(args.build_log)
    check_registrations()
    check_opcheck()
    check_fake_cuda()
    if torch.cuda.is_available():
        check_on_gpu()
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
