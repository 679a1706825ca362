"""`depthvid batch JOBS -o OUT`: tune and edit many clips; under torchrun the ranks share the jobs.

JOBS is YAML (a list of jobs, or ``{defaults: {...}, jobs: [...]}``) or JSONL (one job per line).
A job is a mapping::

    name: car                 # optional, default <index>-<video stem>; names a folder of OUT
    video: clips/car.mp4      # relative paths start at the JOBS file's folder
    prompt: a car drives down a road
    edits: [a red sports car drives down a road, a lego car drives down a road]
    steps: 300                # any `depthvid tune` option by its TuneConfig name (frames, lr, model, ...)
    edit: {steps: 50, guidance: 12.5}   # any `depthvid edit` option by its Python name
    output: edit.mp4          # optional, .mp4/.gif or a folder name

OUT/<name>/run is the job's tune run, OUT/<name>/<output> its edits, OUT/<name>/status.json the
outcome. Each process takes whole jobs: it claims a job by creating OUT/.claims/<launch>/<name>
(exclusive create), so no job runs twice in a launch and every job is taken whatever the number of
ranks. A job already done is skipped; an interrupted one resumes from its checkpoint; a failing
one is recorded with its one-line error and the others go on. Rank 0 prints a summary at the end.
Several machines need OUT on a shared filesystem.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from depthvid.errors import UserError
from depthvid.fileutil import check_writable, write_json

STATUS_FILE = "status.json"
CLAIMS_DIR = ".claims"
JOB_KEYS = ("name", "video", "prompt", "edits", "edit", "output")


@dataclasses.dataclass
class Job:
    name: str
    video: str
    prompt: str
    edits: list[str]
    tune: dict  # TuneConfig fields besides video and prompt
    edit: dict  # depthvid.editing.edit keyword arguments
    output: str = "edit.mp4"


# ---------------------------------------------------------------- reading JOBS


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "job"


def _read_entries(path: Path) -> list[tuple[str, dict]]:
    """(where, mapping) per job, with ``defaults`` merged in; ``where`` names the job in errors."""
    text = path.read_text()
    if path.suffix.lower() == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{path.name} line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise UserError(f"{path.name} line {number}: not JSON ({error.msg}); write one job object per line")
        return entries
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path.name}: not valid YAML ({str(error).splitlines()[0]}); check the indentation") from None
    defaults = {}
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"defaults", "jobs"})
        if unknown:
            raise UserError(f"{path.name}: unknown top-level keys {unknown}; expected 'jobs' and optionally 'defaults'")
        defaults, data = data.get("defaults") or {}, data.get("jobs")
    if not isinstance(data, list) or not isinstance(defaults, dict):
        raise UserError(f"{path.name}: expected a list of jobs (or 'jobs:' with a list, 'defaults:' a mapping)")
    return [(f"{path.name} job {index + 1}", {**defaults, **entry} if isinstance(entry, dict) else entry)
            for index, entry in enumerate(data)]


def _edit_options() -> set[str]:
    from depthvid.editing import edit

    return set(inspect.signature(edit).parameters) - {"run_dir", "prompts", "out", "progress"}


def load_jobs(path: str | Path) -> list[Job]:
    """Parse and check JOBS; every mistake is a UserError naming the job and the key."""
    from depthvid.config import TuneConfig

    path = Path(path)
    if not path.is_file():
        raise UserError(f"JOBS {str(path)!r} does not exist; give a .yaml or .jsonl file of jobs")
    if path.suffix.lower() not in (".yaml", ".yml", ".jsonl"):
        raise UserError(f"JOBS {str(path)!r}: expected a .yaml, .yml or .jsonl file")
    tune_options = {field.name for field in dataclasses.fields(TuneConfig)} - {"video", "prompt"}
    edit_options = _edit_options()
    jobs, names = [], set()
    for index, (where, entry) in enumerate(_read_entries(path)):
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with video, prompt and edits, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(JOB_KEYS) - tune_options)
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown}; a job takes {list(JOB_KEYS)} and the tune options "
                            f"{sorted(tune_options)}")
        for key in ("video", "prompt", "edits"):
            if not entry.get(key):
                raise UserError(f"{where}: '{key}' is missing or empty")
        edits = [entry["edits"]] if isinstance(entry["edits"], str) else entry["edits"]
        if not isinstance(edits, list) or not all(isinstance(e, str) and e.strip() for e in edits):
            raise UserError(f"{where}: 'edits' must be a prompt or a list of non-empty prompts")
        edit = entry.get("edit") or {}
        if not isinstance(edit, dict) or set(edit) - edit_options:
            bad = sorted(set(edit) - edit_options) if isinstance(edit, dict) else edit
            raise UserError(f"{where}: 'edit' options {bad} are not edit options; known: {sorted(edit_options)}")
        video = Path(entry["video"]).expanduser()
        video = str(video if video.is_absolute() else path.parent / video)
        name = str(entry.get("name") or f"{index:03d}-{_slug(Path(video).stem)}")
        if name in names or name.startswith(".") or not re.fullmatch(r"[\w.-]+", name):
            raise UserError(f"{where}: name {name!r} is used twice or is not a folder name (letters, digits, - _ .)")
        names.add(name)
        tune = {key: value for key, value in entry.items() if key in tune_options}
        try:
            TuneConfig(video=video, prompt=entry["prompt"], **tune).validate()
        except TypeError as error:
            raise UserError(f"{where}: {error}") from None
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        jobs.append(Job(name, video, entry["prompt"], edits, tune, edit, str(entry.get("output", "edit.mp4"))))
    if not jobs:
        raise UserError(f"JOBS {str(path)!r} holds no jobs")
    return jobs


# ---------------------------------------------------------------- running


def job_status(out: Path, job: Job) -> dict | None:
    path = out / job.name / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def claim(out: Path, launch: str, job: Job) -> bool:
    """True for exactly one process of this launch: the one that created the claim file."""
    path = out / CLAIMS_DIR / launch / job.name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def run_job(job: Job, out: Path, rank: int, progress: bool) -> dict:
    """Tune (resuming a started run) then edit; returns the status written to OUT/<name>/status.json."""
    from depthvid.config import TuneConfig
    from depthvid.editing import edit
    from depthvid.parallel import single_process_frames
    from depthvid.tuning import RUN_FILE, TrainingInterrupted, tune

    job_dir = out / job.name
    run_dir = job_dir / "run"
    started = time.perf_counter()
    status = {"job": job.name, "rank": rank}
    try:
        with single_process_frames():  # this process runs the whole job
            config = TuneConfig(video=job.video, prompt=job.prompt, **job.tune)
            tune(config, run_dir, resume=(run_dir / RUN_FILE).is_file(), progress=progress)
            result = edit(run_dir, job.edits, job_dir / job.output, progress=progress, **job.edit)
        status.update(status="done", outputs=[str(p) for p in (*result.outputs, result.side_by_side)])
    except TrainingInterrupted:
        raise
    except Exception as error:  # noqa: BLE001 - one job's failure, whatever it is, must not stop the others
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        status.update(status="failed", error=message if isinstance(error, UserError)
                      else f"{type(error).__name__}: {message}")
    status["seconds"] = round(time.perf_counter() - started, 1)
    write_json(job_dir / STATUS_FILE, status)
    return status


def summary_table(jobs: list[Job], out: Path) -> str:
    rows = [("job", "status", "rank", "seconds", "result")]
    for job in jobs:
        status = job_status(out, job) or {"status": "not run"}
        result = status.get("error") or (status.get("outputs") or [""])[0]
        rows.append((job.name, status["status"], str(status.get("rank", "")), str(status.get("seconds", "")), result))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[4]]).rstrip() for row in rows)


def run_batch(jobs_path: str | Path, out: str | Path, *, progress: bool = True) -> int:
    """Run every job of JOBS into OUT; returns the exit status (0: all done, 1: some failed)."""
    import torch
    import torch.distributed as dist

    from depthvid.parallel import init_process_group, launched_world_size

    jobs = load_jobs(jobs_path)
    out = Path(out)
    check_writable(out / CLAIMS_DIR, "-o")
    rank, parallel = 0, launched_world_size() > 1
    launch = [uuid.uuid4().hex]  # names this launch's claims: rank 0's, on every rank
    if parallel:
        if torch.cuda.is_available():  # one GPU per process; the (gloo) group only coordinates
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_process_group(torch.device("cpu"))
        rank = dist.get_rank()
        dist.broadcast_object_list(launch, src=0)
    tag = f"batch rank {rank}" if parallel else "batch"
    for job in jobs:
        status = job_status(out, job)
        if status and status.get("status") == "done":
            if rank == 0:
                print(f"{tag}: {job.name}: already done, skipped", file=sys.stderr, flush=True)
            continue
        if not claim(out, launch[0], job):
            continue
        print(f"{tag}: {job.name}: started", file=sys.stderr, flush=True)
        status = run_job(job, out, rank, progress and not parallel)
        outcome = status.get("error") or f"{status['seconds']} s"
        print(f"{tag}: {job.name}: {status['status']} ({outcome})", file=sys.stderr, flush=True)
    if parallel:
        dist.barrier()
    if rank != 0:
        return 0
    shutil.rmtree(out / CLAIMS_DIR / launch[0], ignore_errors=True)
    print(summary_table(jobs, out))
    return 0 if all((job_status(out, job) or {}).get("status") == "done" for job in jobs) else 1
