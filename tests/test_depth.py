import pytest
import torch
from PIL import Image

from depthvid.depth import (
    depth_to_frames,
    estimate_depth,
    export_depth_video,
    load_depth_video,
    normalize_depth,
)
from depthvid.errors import UserError
from depthvid.testing import make_sample_clip, make_sample_depth
from depthvid.video import load_video, resize_and_crop, write_video


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_dir):
    from diffusers import StableDiffusionDepth2ImgPipeline

    return StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def frames():
    return make_sample_clip(4, 64, 64)


# -- normalize_depth ------------------------------------------------------------------------------


def ramps():
    """Two frames: frame 0 spans [0, 4], frame 1 spans [1, 2]."""
    first = torch.linspace(0, 4, 12).reshape(1, 1, 3, 4)
    second = torch.linspace(1, 2, 12).reshape(1, 1, 3, 4)
    return torch.cat([first, second])


def test_clip_normalization_uses_one_scale_for_the_clip():
    depth = ramps()
    out = normalize_depth(depth, "clip")
    assert out.min() == -1 and out.max() == 1
    torch.testing.assert_close(out, depth / 2 - 1)  # 2 * (d - 0) / 4 - 1
    assert out[1].min() > -1 and out[1].max() < 1  # frame 1 keeps its narrower range


def test_frame_normalization_spans_every_frame():
    out = normalize_depth(ramps(), "frame")
    assert out.amin(dim=(1, 2, 3)).tolist() == [-1, -1]
    assert out.amax(dim=(1, 2, 3)).tolist() == [1, 1]
    torch.testing.assert_close(out[0], out[1])  # both are the same ramp once rescaled


@pytest.mark.parametrize("mode", ["clip", "frame"])
def test_constant_depth_gives_zeros(mode):
    out = normalize_depth(torch.full((3, 1, 4, 4), 7.5), mode)
    assert torch.equal(out, torch.zeros(3, 1, 4, 4))


def test_one_flat_frame_among_others_in_frame_mode():
    depth = ramps()
    depth[1] = 3.0
    out = normalize_depth(depth, "frame")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].min() == -1 and out[0].max() == 1


@pytest.mark.parametrize(
    "depth, mode, message",
    [
        (torch.zeros(2, 1, 4, 4), "video", "--depth-normalize 'video': must be 'clip'"),
        (torch.zeros(2, 3, 4, 4), "clip", r"depth: expected \(F, 1, h, w\), got \(2, 3, 4, 4\)"),
    ],
)
def test_normalize_depth_rejects_bad_input(depth, mode, message):
    with pytest.raises(UserError, match=message):
        normalize_depth(depth, mode)


# -- estimate_depth -------------------------------------------------------------------------------


def test_estimate_depth_shape_and_range(pipeline, frames):
    depth = estimate_depth(pipeline.depth_estimator, pipeline.feature_extractor, frames, (8, 8))
    assert depth.shape == (4, 1, 8, 8) and depth.dtype == torch.float32
    assert depth.min() == -1 and depth.max() == 1
    per_frame = estimate_depth(
        pipeline.depth_estimator, pipeline.feature_extractor, frames, (8, 12), "frame"
    )
    assert per_frame.shape == (4, 1, 8, 12)
    assert (per_frame.amin(dim=(1, 2, 3)) == -1).all()
    assert (per_frame.amax(dim=(1, 2, 3)) == 1).all()


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_estimate_depth_per_frame_matches_diffusers(pipeline, frames):
    images = [Image.fromarray(f) for f in (frames * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    expected = pipeline.prepare_depth_map(
        images, None, len(images), False, torch.float32, torch.device("cpu")
    )
    ours = estimate_depth(
        pipeline.depth_estimator, pipeline.feature_extractor, frames, (8, 8), "frame"
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_estimate_depth_does_not_depend_on_batch_size(pipeline, frames):
    args = (pipeline.depth_estimator, pipeline.feature_extractor, frames, (8, 8))
    # The random DPT's depth spans ~0.05, so rescaling to [-1, 1] magnifies float32 rounding
    # differences between batched and single convolutions ~40x.
    torch.testing.assert_close(
        estimate_depth(*args, batch_size=1), estimate_depth(*args, batch_size=3), atol=1e-3, rtol=0
    )


def test_half_precision_estimator_runs_in_float32_and_is_restored(tiny_pipeline_dir, frames):
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    model = DPTForDepthEstimation.from_pretrained(tiny_pipeline_dir / "depth_estimator")
    processor = DPTImageProcessor.from_pretrained(tiny_pipeline_dir / "feature_extractor")
    model.half().train()
    rounded = DPTForDepthEstimation.from_pretrained(tiny_pipeline_dir / "depth_estimator")
    rounded.load_state_dict({k: v.half().float() for k, v in rounded.state_dict().items()})

    depth = estimate_depth(model, processor, frames, (8, 8))
    assert next(model.parameters()).dtype == torch.float16 and model.training
    assert depth.dtype == torch.float32
    torch.testing.assert_close(depth, estimate_depth(rounded, processor, frames, (8, 8)))


@pytest.mark.parametrize(
    "frames, latent_size, message",
    [
        (torch.rand(2, 1, 64, 64), (8, 8), r"frames: expected \(F, 3, H, W\)"),
        (torch.rand(2, 3, 64, 64), (8,), "latent_size: expected"),
        (torch.rand(2, 3, 64, 64), (8, 0), "latent_size: expected"),
    ],
)
def test_estimate_depth_rejects_bad_input(pipeline, frames, latent_size, message):
    with pytest.raises(UserError, match=message):
        estimate_depth(pipeline.depth_estimator, pipeline.feature_extractor, frames, latent_size)


# -- depth videos ---------------------------------------------------------------------------------


def test_load_depth_video_round_trip(tmp_path):
    depth = make_sample_depth(4, 32, 64)  # (F, 1, H, W), near = bright
    folder = write_video(depth.expand(-1, 3, -1, -1), tmp_path / "depth")
    loaded = load_depth_video(folder, None, (8, 8))
    assert loaded.shape == (4, 1, 8, 8)
    assert loaded.min() == -1 and loaded.max() == 1
    stored = load_video(folder, None, None, None)[:, :1]  # 8-bit gray as written
    expected = normalize_depth(torch.stack([resize_and_crop(f, 8, 8) for f in stored]), "clip")
    torch.testing.assert_close(loaded, expected)
    # near = dark videos: invert flips the sign
    torch.testing.assert_close(load_depth_video(folder, None, (8, 8), invert=True), -loaded)


def test_load_depth_video_samples_like_load_video(tmp_path):
    depth = make_sample_depth(6, 16, 16)
    folder = write_video(depth.expand(-1, 3, -1, -1), tmp_path / "depth")
    every = load_depth_video(folder, None, (4, 4), normalize="frame")
    strided = load_depth_video(
        folder, 2, (4, 4), sample="stride", start=1, stride=3, normalize="frame"
    )
    torch.testing.assert_close(strided, every[[1, 4]])


def test_depth_to_frames_and_export(tmp_path):
    depth = torch.linspace(-1, 1, 2 * 4 * 4).reshape(2, 1, 4, 4)
    frames = depth_to_frames(depth)
    assert frames.shape == (2, 3, 4, 4)
    assert frames.min() == 0 and frames.max() == 1
    assert torch.equal(frames[:, 0], frames[:, 2])
    folder = export_depth_video(depth, tmp_path / "depth", size=(16, 16))
    back = load_video(folder, None, None, None)
    assert back.shape == (2, 3, 16, 16)
    assert back[0, 0, 0, 0] < 0.1 and back[1, 0, -1, -1] > 0.9  # far dark, near bright
    with pytest.raises(UserError, match=r"depth: expected \(F, 1, h, w\)"):
        depth_to_frames(torch.zeros(2, 3, 4, 4))
    with pytest.raises(UserError, match="size: expected"):
        export_depth_video(depth, tmp_path / "d.gif", size=16)
