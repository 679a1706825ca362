"""The video ops, one function each; the backend choice lives in ``_backend``."""
from depthvid.ops._backend import BACKENDS, resolve_backend, use_backend
from depthvid.ops.pseudo3d_conv import GroupNormSiLU, pseudo3d_conv
from depthvid.ops.sparse_causal_attn import sparse_causal_attention
from depthvid.ops.temporal_attn import temporal_attention

__all__ = [
    "BACKENDS",
    "GroupNormSiLU",
    "pseudo3d_conv",
    "resolve_backend",
    "sparse_causal_attention",
    "temporal_attention",
    "use_backend",
]
