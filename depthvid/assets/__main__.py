"""Rewrite the bundled sample clip from its generator: python -m depthvid.assets"""
from depthvid.assets import SAMPLE_CLIP_SHAPE, sample_clip_path
from depthvid.testing import make_sample_clip
from depthvid.video import write_video

num_frames, _, height, width = SAMPLE_CLIP_SHAPE
path = write_video(make_sample_clip(num_frames, height, width), sample_clip_path(), fps=8)
print(f"wrote {path} ({path.stat().st_size} bytes)")
