"""The kernels compiled on a CUDA device at SD-sized shapes (gpu_checks.py), and the same checks
under the interpreter at tiny shapes."""
import subprocess
import sys
from pathlib import Path

import gpu_checks
import pytest
import torch
from _gpu_compile import env_without_interpreter


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device; the same checks run under the interpreter in test_gpu_checks_under_the_interpreter",
)
def test_kernels_match_the_reference_on_the_gpu():
    result = subprocess.run(
        [sys.executable, str(Path(gpu_checks.__file__))], env=env_without_interpreter(),
        capture_output=True, text=True, timeout=3000,
    )
    failures = [line for line in result.stdout.splitlines() if '"ok": false' in line]
    assert result.returncode == 0 and not failures, "\n".join(failures) or result.stderr[-4000:]


@pytest.mark.parametrize("dtype", gpu_checks.DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("case", gpu_checks.TINY_CASES, ids=lambda case: case.name)
def test_gpu_checks_under_the_interpreter(case, dtype):
    reports = gpu_checks.check(case, dtype, "cpu")
    assert len(reports) == 1 + len(case.shapes)
    for report in reports:
        assert report["ok"], report
