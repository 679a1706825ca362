"""Atomic writes: a file or folder appears complete under its final name, or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from depthvid.errors import UserError


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early (before any compute) when ``path`` cannot be created."""
    path = Path(path)
    parent = path.parent if path.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _can_create_in(probe):
        raise UserError(f"{what} {str(path)!r}: cannot write into {str(probe)!r}; choose a writable location")
    if path.exists() and path.is_dir() and path.suffix in (".mp4", ".gif"):
        raise UserError(f"{what} {str(path)!r} is an existing folder; choose another name")
    return path


def _can_create_in(folder: Path) -> bool:
    """Try it: permission bits do not tell (root, read-only mounts, /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".depthvid-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False):
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create private (0600/0700) entries: give the result the usual permissions
        tmp.chmod((0o777 if directory else 0o666) & ~_umask())
        if directory and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
