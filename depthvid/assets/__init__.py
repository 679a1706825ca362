"""Files shipped with depthvid: a 16-frame sample clip (regenerate with ``python -m depthvid.assets``)."""
from pathlib import Path

SAMPLE_CLIP = "sample.mp4"
SAMPLE_CLIP_SHAPE = (16, 3, 256, 256)  # (frames, channels, height, width), 8 fps


def sample_clip_path() -> Path:
    """Path of the bundled sample clip: ``depthvid.testing.make_sample_clip(16, 256, 256)`` as mp4."""
    return Path(__file__).with_name(SAMPLE_CLIP)
