"""Every Triton kernel at every launch configuration, compiled for sm_80 and sm_90 with a real
launch's specialisation, passes the static checks of gpu_binaries.py; a deliberately bad kernel
fails them. Run ``python tests/gpu_binaries.py`` for the full table."""
import pytest
from _gpu_compile import KERNEL_MODULES, SHARED_MEMORY_LIMITS, compile_module
from gpu_binaries import new_problems, problems, table


@pytest.mark.parametrize("module", KERNEL_MODULES, ids=lambda name: name.rsplit(".", 1)[1])
def test_every_launch_configuration_passes_the_static_checks(module, capsys):
    import importlib

    launches = importlib.import_module(module).gpu_launches()
    results = compile_module(module)
    assert len(results) == len(launches) * len(SHARED_MEMORY_LIMITS)
    assert {r.get("dtype") for r in results} == {"float16", "bfloat16", "float32"}
    with capsys.disabled():
        print(f"\n{module}\n{table(results)}")
    failures = [f"{r['kernel']} {r['label']} sm_{r['arch']}: {'; '.join(new_problems(r))}" for r in results if new_problems(r)]
    assert not failures, "\n".join(failures)


def test_a_scalar_load_kernel_without_tl_dot_fails_the_checks():
    (sm80, sm90) = compile_module("_bad_kernel", workers=1)
    for result in (sm80, sm90):
        found = " | ".join(problems(result, needs_mma=True, needs_vector_loads=True))
        assert "no tensor-core MMA" in found and "no 128-bit global loads" in found, found
        assert result["scalar_loads"] > 0
