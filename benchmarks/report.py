"""Turn one run's pytest-benchmark JSON into benchmarks/README.md's results section and a plot.

    python benchmarks/report.py [RESULTS.json ...]  (default: the newest file in benchmarks/results/)

Everything is a ratio between medians of the same run: ours / baseline, below 1 is better.
The section replaced lies between README's "report.py:begin <device>" and "report.py:end <device>"
markers, so a CPU and a CUDA section (and other people's sections) live side by side.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from depthvid.fileutil import atomic_path

HERE = Path(__file__).parent
README = HERE / "README.md"
RESULTS_DIR = HERE / "results"
TARGETS = {"tuning_step": 0.5, "editing": 0.75}  # the targets (CPU, same run)


def load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data, [b for b in data["benchmarks"] if "implementation" in b.get("extra_info", {})]


def by_case(benchmarks: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(op, case) -> implementation -> benchmark, in run order."""
    cases: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench["extra_info"]
        cases[(info["op"], info["case"])][info["implementation"]] = bench
    return cases


def median(bench: dict) -> float:
    return bench["stats"]["median"]


def ratio_cell(ours: dict, baseline: dict | None) -> str:
    if baseline is None:
        return "-"
    text = f"{median(ours) / median(baseline):.2f}x"
    ours_mb, baseline_mb = ours["extra_info"].get("peak_mb"), baseline["extra_info"].get("peak_mb")
    if ours_mb is not None and baseline_mb:
        text += f" (mem {ours_mb / baseline_mb:.2f}x)"
    return text


def op_table(cases) -> list[str]:
    baselines = ["torch", "tav", "tav-materialised", "flex"]
    lines = ["| op | case | ours | vs torch | vs tav | vs tav-materialised | vs flex |", "|---|---|---|---|---|---|---|"]
    for (op, case), impls in cases.items():
        if op not in ("sparse_causal_attention", "temporal_attention", "pseudo3d_conv"):
            continue
        for name, bench in impls.items():
            if bench["extra_info"]["ours"]:
                cells = [ratio_cell(bench, impls.get(b)) if b != name else "-" for b in baselines]
                lines.append(f"| {op} | {case} | {name} | " + " | ".join(cells) + " |")
    return lines


def pipeline_lines(cases) -> list[str]:
    lines = ["| what | case | ratio (time, peak memory) | target | median ours / baseline |", "|---|---|---|---|---|"]
    for (op, case), impls in cases.items():
        if op == "tuning_step" and {"depthvid", "tav-style"} <= set(impls):
            ours, base = impls["depthvid"], impls["tav-style"]
            lines.append(f"| tune step: depthvid / Tune-A-Video-style | {case} | {ratio_cell(ours, base)} | "
                         f"<= {TARGETS['tuning_step']}x | {median(ours):.2f} s / {median(base):.2f} s |")
        if op == "editing" and "per-prompt" in impls:
            base = impls["per-prompt"]
            for name, ours in impls.items():
                if name == "per-prompt":
                    continue
                target = f"<= {TARGETS['editing']}x" if name == "one-inversion" else ""
                lines.append(f"| edit: {name} / per-prompt | {case} | {ratio_cell(ours, base)} | {target} | "
                             f"{median(ours):.1f} s / {median(base):.1f} s |")
    return lines


def design_card_lines(cases) -> list[str]:
    lines = ["| workload | measured at | projected | limit (A100's x 312 / device TFLOP/s) | TFLOP at 8x512x512 | "
             "at A100's peak | at this device's peak | fraction of peak reached |", "|---|---|---|---|---|---|---|---|"]
    for (op, case), impls in cases.items():
        if op != "design_card":
            continue
        info = impls["depthvid"]["extra_info"]
        limit = "- (reduced scale)" if info["limit_s"] is None else f"{info['limit_s']:.0f} s"
        lines.append(
            f"| {case} | {info['scale']} | {info['projected_s']:.0f} s | {limit} | {info['tflop_paper_scale']:.0f} | "
            f"{info['paper_scale_s_at_a100_peak']:.1f} s | {info['paper_scale_s_at_device_peak']:.0f} s | "
            f"{info['fraction_of_peak']:.2f} of {info['peak_tflops']:.2f} TFLOP/s ({info['peak_source']}) |"
        )
    return lines


def plot(cases, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = []  # (label, ratio, target)
    for (op, case), impls in cases.items():
        if op == "tuning_step" and {"depthvid", "tav-style"} <= set(impls):
            rows.append(("tune step vs TAV-style", median(impls["depthvid"]) / median(impls["tav-style"]), 0.5))
        elif op == "editing" and "per-prompt" in impls:
            for name in ("one-inversion", "cached-inversion"):
                if name in impls:
                    target = 0.75 if name == "one-inversion" else None
                    rows.append((f"edit {case.split()[0]} {name} vs per-prompt",
                                 median(impls[name]) / median(impls["per-prompt"]), target))
        elif op in ("sparse_causal_attention", "temporal_attention", "pseudo3d_conv") and "tav" in impls:
            for name, bench in impls.items():
                if bench["extra_info"]["ours"]:
                    short = {"sparse_causal_attention": "sparse-causal", "temporal_attention": "temporal",
                             "pseudo3d_conv": "conv"}[op]
                    label = f"{short} {case.replace(' fp32', '').replace(' plain', '')} {name} vs tav"
                    rows.append((label, median(bench) / median(impls["tav"]), None))
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2), dpi=100)
    positions = range(len(rows))
    colors = ["tab:green" if r < 1 else "tab:red" for _, r, _ in rows]
    axis.barh(list(positions), [r for _, r, _ in rows], color=colors)
    for y, (_, r, target) in zip(positions, rows):
        axis.text(r, y, f" {r:.2f}", va="center", fontsize=7)
        if target:
            axis.plot([target, target], [y - 0.4, y + 0.4], color="black", linewidth=2)
    axis.axvline(1.0, color="grey", linewidth=1)
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axis.tick_params(axis="x", which="both", labelsize=7)
    axis.set_yticks(list(positions), [label for label, _, _ in rows], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("median time, ours / baseline (log; < 1 is faster; black ticks: targets)")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def or_note(table: list[str]) -> list[str]:
    """A table with rows, or a note saying that this run has none."""
    return table if len(table) > 2 else ["(not in this run)"]


def run_line(path: Path, data: dict) -> str:
    """Where and when one results file was measured, and how busy the machine was."""
    machine = data["machine_info"]
    when = data["datetime"][:16].replace("T", " ")
    load_avg = machine.get("load_average_at_end")
    return (
        f"- `{path.relative_to(HERE) if path.is_relative_to(HERE) else path}`: {when} UTC, "
        f"{machine['cpu']['brand_raw']}, {machine['cpu'].get('count')} cores, torch {machine.get('torch')} "
        f"({machine.get('torch_threads')} threads), GPU: {machine.get('cuda_device') or 'none'}, depthvid "
        f"backends timed: {', '.join(machine.get('depthvid_backends', []))}"
        + (f"; load average at the end {load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} (1/5/15 min)"
           if load_avg else "")
    )


def section(paths: list[Path]) -> tuple[str, str]:
    """(device, markdown) for the results in ``paths``; writes the plot to results/<device>-ratios.png.

    A case measured in several files is taken whole from the last one: a ratio never mixes runs.
    """
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    runs = []
    for path in paths:
        data, benchmarks = load(path)
        cases.update(by_case(benchmarks))
        runs.append(run_line(path, data))
    machine = data["machine_info"]
    device = "cuda" if machine.get("cuda_device") else "cpu"
    plot_path = RESULTS_DIR / f"{device}-ratios.png"
    when = data["datetime"][:10]
    plot(cases, plot_path, f"{device}: {machine.get('cuda_device') or machine['cpu']['brand_raw']}, {when}")
    text = [
        "Measured in:",
        "",
        *runs,
        "",
        f"![ratios]({plot_path.relative_to(HERE)})",
        "",
        "**Pipeline** (same model, same run):",
        "",
        *or_note(pipeline_lines(cases)),
        "",
        "**Design card** (projections from timed steps; the limits are asserted on CUDA only):",
        "",
        *or_note(design_card_lines(cases)),
        "",
        "**Ops** at SD2-depth's shapes, 8 frames of 512x512 (ours / baseline; `-`: not run, see the "
        "skip reasons in the run's output):",
        "",
        *or_note(op_table(cases)),
    ]
    return device, "\n".join(text)


def update_readme(device: str, markdown: str) -> None:
    begin, end = f"<!-- report.py:begin {device} -->", f"<!-- report.py:end {device} -->"
    readme = README.read_text()
    if begin not in readme:
        raise SystemExit(f"{README}: no {begin!r} marker; add {begin} and {end} where the section goes")
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    with atomic_path(README) as tmp:
        tmp.write_text(f"{head}{begin}\n{markdown}\n{end}{tail}")


def main(argv: list[str]) -> None:
    if argv:
        paths = [Path(arg) for arg in argv]
    else:
        runs = sorted(RESULTS_DIR.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise SystemExit(f"no results in {RESULTS_DIR}: run pytest benchmarks/ --benchmark-only first")
        paths = runs[-1:]
    device, markdown = section([path.resolve() for path in paths])
    update_readme(device, markdown)
    print(f"{README}: {device} section from {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main(sys.argv[1:])
