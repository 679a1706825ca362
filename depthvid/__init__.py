"""depthvid: one-shot, depth-conditioned, text-driven video editing."""
__version__ = "0.1.0"
