import os

# The Triton kernels run on CPU tensors through the interpreter; it must be set before
# triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The kernel tests compare each backend with torch themselves: a failed first-use self-check must not
# quietly swap in the torch backend under them (tests/test_self_check.py turns it back on).
os.environ.setdefault("DEPTHVID_SELF_CHECK", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The interpreter computes with numpy: OpenBLAS's own threads make its small matmuls 30-100x
# slower on a busy 2-core machine (measured: 128x64 @ 64x64 fp32, 0.3 ms on one thread, 11-40 ms on
# two). One thread, like torch below; numpy reads it when first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random stable-diffusion-2-depth folder (depthvid.testing.save_tiny_pipeline, seed 0),
    saved once per test session. Treat it as read-only."""
    from depthvid.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd2_depth"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor folder (depthvid.testing.save_tiny_clip, seed 0)."""
    from depthvid.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test shapes are tiny: one thread beats two (and other processes may share the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
