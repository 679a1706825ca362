"""depthvid: one-shot, depth-conditioned, text-driven video editing."""
import importlib

__version__ = "0.1.0"

# name -> module; imported on first use so `import depthvid` (and the CLI) start fast
_EXPORTS = {
    "TuneConfig": "depthvid.config",
    "tune": "depthvid.tuning",
    "edit": "depthvid.editing",
    "inflate_unet": "depthvid.models",
    "VideoUNet": "depthvid.models",
    "load_video": "depthvid.video",
    "write_video": "depthvid.video",
    "UserError": "depthvid.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'depthvid' has no attribute {name!r}")
