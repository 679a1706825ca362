import os

# Benchmarks time the backend they name: no first-use self-check may run inside a timed call or
# swap in the torch backend (depthvid.ops._backend).
os.environ.setdefault("DEPTHVID_SELF_CHECK", "0")
