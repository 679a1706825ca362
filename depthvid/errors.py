"""The errors that reach the user as a one-line message (CLI exit status 2), and the checks that raise them."""
from __future__ import annotations

import math
import numbers
import re


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do.

    The CLI prints ``depthvid: error: <message>`` on one line and exits with status 2;
    library callers get an ordinary ``ValueError`` subclass.
    """


class OutOfMemory(UserError):
    """An allocation failed: the message names the size asked for and what to lower."""


def check_number(option: str, value, *, minimum=None, maximum=None, above=None, integer: bool = False,
                 hint: str = "") -> None:
    """Raise ``UserError`` unless ``value`` is a finite number in range.

    Args:
        option: the name the user typed, e.g. ``"--lr"``.
        minimum, maximum: inclusive bounds; ``above``: exclusive lower bound.
        integer: require an int (bools are never numbers here).
        hint: what to do, e.g. ``"the paper uses 1e-5"``; appended after a semicolon.
    """
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if above is not None:
        bounds.append(f"> {above}")
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "")
    is_number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value) and (
        (above is None or value > above) and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
    )
    if not ok:
        raise UserError(f"{option} {value!r}: expected {expected}" + (f"; {hint}" if hint else ""))


# -- out of memory ----------------------------------------------------------------------------------

# How allocators say they failed: torch.OutOfMemoryError (CUDA, MPS, XPU), the CPU allocator's
# RuntimeError ("DefaultCPUAllocator: not enough memory"), numpy's MemoryError ("Unable to allocate")
_ALLOCATION_FAILURE = re.compile(r"out of memory|not enough memory|unable to allocate|failed to allocate|"
                                 r"(can't|cannot) allocate memory", re.IGNORECASE)
_SIZE = re.compile(r"allocate\s+([\d.]+)\s*(bytes|[KMGT]i?B)\b", re.IGNORECASE)
_UNITS = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _format_bytes(count: float) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0].lower()]
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} bytes"


def out_of_memory(error: BaseException, hint: str) -> OutOfMemory | None:
    """The one-line ``OutOfMemory`` for an allocation failure, None for any other error.

    ``hint`` says what to lower, e.g. ``"use fewer --frames"``. The size asked for is read from the
    allocator's message when it gives one.
    """
    import torch

    text = str(error)
    torch_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if not (isinstance(error, (MemoryError, torch_oom))
            or isinstance(error, RuntimeError) and _ALLOCATION_FAILURE.search(text)):
        return None
    size = _SIZE.search(text)
    if size:
        count = float(size.group(1)) * _UNITS[size.group(2)[0].lower()]  # "bytes" -> b
        asked = f"an allocation of {_format_bytes(count)}"
    else:
        asked = "an allocation (size not reported)"
    where = "GPU" if re.search(r"CUDA|GPU|MPS|XPU", text) else "CPU"
    return OutOfMemory(f"out of {where} memory: {asked} failed; {hint}")
