import re

import av
import numpy as np
import pytest
import torch
from PIL import Image

import depthvid.video as video
from depthvid.assets import SAMPLE_CLIP_SHAPE, sample_clip_path
from depthvid.errors import UserError
from depthvid.testing import make_sample_clip
from depthvid.video import (
    check_frame_size,
    count_frames,
    load_video,
    make_grid,
    sample_frame_indices,
    write_video,
)

# Mean absolute error allowed after an H.264 round trip at crf 18 (measured ~0.01 on these clips).
MP4_MAE = 0.03
# Gif stores at most 256 colors per frame.
GIF_MAE = 0.05


@pytest.fixture(scope="module")
def clip():
    return make_sample_clip(8, 64, 96)


def gray_frames(num_frames, height=32, width=32):
    """Frame i is a flat gray of value 25 * i / 255, so a frame read back tells its index."""
    values = torch.arange(num_frames, dtype=torch.float32) * 25 / 255
    return values[:, None, None, None].expand(num_frames, 3, height, width).clone()


def frame_index(frames):
    return [round(v) for v in (frames.mean(dim=(1, 2, 3)) * 255 / 25).tolist()]


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_mp4_round_trip(clip, tmp_path, backend):
    path = write_video(clip, tmp_path / "clip.mp4", fps=8)
    assert count_frames(path, backend=backend) == clip.shape[0]
    frames = load_video(path, None, None, None, backend=backend)
    assert frames.shape == clip.shape and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert (frames - clip).abs().mean() < MP4_MAE


def test_decord_and_pyav_decode_the_same_frames(clip, tmp_path):
    path = write_video(clip, tmp_path / "clip.mp4")
    by_decord = load_video(path, 3, None, None, backend="decord")
    by_pyav = load_video(path, 3, None, None, backend="pyav")
    assert (by_decord - by_pyav).abs().mean() < 0.01


def test_mp4_is_browser_playable_h264(clip, tmp_path):
    path = write_video(clip, tmp_path / "clip.mp4", fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 12


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = torch.rand(3, 3, 31, 33)
    path = write_video(frames, tmp_path / "odd.mp4")
    back = load_video(path, None, None, None)
    assert back.shape == (3, 3, 32, 34)


def test_mp4_through_imageio_ffmpeg_when_pyav_lacks_libx264(clip, tmp_path, monkeypatch):
    monkeypatch.setattr(av, "codecs_available", set())
    path = write_video(clip, tmp_path / "clip.mp4")
    frames = load_video(path, None, None, None, backend="pyav")
    assert frames.shape == clip.shape
    assert (frames - clip).abs().mean() < MP4_MAE


def test_gif_round_trip_with_durations(clip, tmp_path):
    path = write_video(clip, tmp_path / "clip.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == clip.shape[0]
        assert gif.info["loop"] == 0
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert durations == [200] * clip.shape[0]
    frames = load_video(path, None, None, None)
    assert frames.shape == clip.shape
    assert (frames - clip).abs().mean() < GIF_MAE


def test_png_folder_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    uint8 = torch.randint(0, 256, (4, 20, 24, 3), dtype=torch.uint8).numpy()
    folder = write_video(uint8, tmp_path / "frames")
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:04d}.png" for i in range(4)]
    back = load_video(folder, None, None, None)
    expected = torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(back, expected)
    # float input that is already on the 8-bit grid survives exactly too
    again = load_video(write_video(back, tmp_path / "again"), None, None, None)
    assert torch.equal(again, back)


def test_png_folder_replaces_an_earlier_output_but_not_other_folders(tmp_path):
    folder = write_video(gray_frames(5), tmp_path / "out")
    write_video(gray_frames(2), folder)
    assert count_frames(folder) == 2
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files"):
        write_video(gray_frames(2), other)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("suffix", [".gif", ".mp4", ""])
def test_interrupted_write_leaves_no_partial_output(tmp_path, monkeypatch, suffix):
    target = tmp_path / f"out{suffix}"
    write_video(gray_frames(3), target)
    before = sorted(p.name for p in tmp_path.iterdir())

    def crash(frames, path, *args):
        (path / "frame_0000.png" if not suffix else path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    writer = {".gif": "_write_gif", ".mp4": "_write_mp4", "": "_write_png_folder"}[suffix]
    monkeypatch.setattr(video, writer, crash)
    with pytest.raises(KeyboardInterrupt):
        write_video(gray_frames(4), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp file left beside it
    assert count_frames(target) == 3  # the earlier output is intact


def test_unwritable_destination_is_a_user_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot write .*choose a writable location"):
        write_video(gray_frames(2), blocker / "out.mp4")
    with pytest.raises(UserError, match="exists and is not a folder"):
        write_video(gray_frames(2), blocker)
    (tmp_path / "dir.gif").mkdir()
    with pytest.raises(UserError, match="is a folder: choose a file name"):
        write_video(gray_frames(2), tmp_path / "dir.gif")


@pytest.mark.parametrize(
    "frames, fps, message",
    [
        (torch.rand(2, 4, 8, 8), 8, r"expected \(F, 3, H, W\) float.*got shape \(2, 4, 8, 8\)"),
        (np.zeros((2, 8, 8, 3), dtype=np.int32), 8, "dtype int32"),
        (torch.rand(0, 3, 8, 8), 8, "empty video"),
        (torch.rand(2, 3, 8, 8), 0, "--fps 0: expected a finite number >= 1"),
    ],
)
def test_write_video_rejects_bad_input(tmp_path, frames, fps, message):
    with pytest.raises(UserError, match=message):
        write_video(frames, tmp_path / "out.gif", fps=fps)


# -- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, num_frames, sample, start, stride, expected",
    [
        (10, 1, "uniform", 0, 1, [0]),  # one frame
        (10, 10, "uniform", 0, 1, list(range(10))),  # every frame
        (10, None, "uniform", 0, 1, list(range(10))),  # num_frames=None
        (10, 4, "uniform", 0, 1, [0, 3, 6, 9]),  # first and last included
        (10, 3, "uniform", 4, 1, [4, 7, 9]),  # start offset, 6.5 rounds up
        (10, None, "uniform", 7, 1, [7, 8, 9]),
        (10, 3, "stride", 1, 4, [1, 5, 9]),  # stride reaching the last frame exactly
        (10, None, "stride", 0, 3, [0, 3, 6, 9]),
        (10, 2, "stride", 0, 1, [0, 1]),
    ],
)
def test_sample_frame_indices(total, num_frames, sample, start, stride, expected):
    assert sample_frame_indices(total, num_frames, sample, start, stride) == expected


@pytest.mark.parametrize(
    "total, num_frames, sample, start, stride, message",
    [
        (5, 8, "uniform", 0, 1, "video has 5 frames, --frames 8 asked: use --frames 5 or fewer"),
        (10, 8, "uniform", 4, 1, "--frames 8 from --start 4 asked: use --frames 6 or fewer"),
        (10, 4, "stride", 1, 3, "(needs frame 10): use --frames 3 or fewer, or a smaller --stride"),
        (10, 2, "uniform", 10, 1, "--start 10: the video has only 10 frames"),
        (10, 0, "uniform", 0, 1, "--frames 0: must be an integer >= 1"),
        (10, 2, "stride", 0, 0, "--stride 0: must be an integer >= 1"),
        (10, 2, "random", 0, 1, "--sample 'random': must be one of uniform, stride"),
    ],
)
def test_sample_frame_indices_errors(total, num_frames, sample, start, stride, message):
    with pytest.raises(UserError, match=re.escape(message)):
        sample_frame_indices(total, num_frames, sample, start, stride)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_load_video_reads_the_sampled_frames(tmp_path, backend):
    path = write_video(gray_frames(10), tmp_path / "gray.mp4")
    assert frame_index(load_video(path, 4, None, None, backend=backend)) == [0, 3, 6, 9]
    strided = load_video(path, 3, None, None, sample="stride", start=1, stride=4, backend=backend)
    assert frame_index(strided) == [1, 5, 9]


def test_folder_is_read_in_natural_name_order(tmp_path):
    frames = gray_frames(11, 8, 8)
    for i, frame in enumerate(frames):
        array = (frame.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(tmp_path / f"img{i}.png")  # img2.png before img10.png
    (tmp_path / "readme.txt").write_text("ignored")
    assert count_frames(tmp_path) == 11
    assert frame_index(load_video(tmp_path, None, None, None)) == list(range(11))
    assert frame_index(load_video(tmp_path, 2, None, None, start=9)) == [9, 10]


# -- resize and crop ------------------------------------------------------------------------------


def horizontal_ramp(height, width):
    ramp = torch.arange(width, dtype=torch.float32) / (width - 1)
    return ramp.expand(2, 3, height, width).clone()


def test_wide_source_is_center_cropped(tmp_path):
    folder = write_video(horizontal_ramp(64, 128), tmp_path / "wide")
    frames = load_video(folder, 2, 64, 64)  # same height: no scaling, keep columns 32..95
    expected = torch.arange(32, 96, dtype=torch.float32) / 127
    assert frames.shape == (2, 3, 64, 64)
    torch.testing.assert_close(frames[0, 0, 0], expected, atol=1 / 255, rtol=0)


def test_tall_source_is_scaled_to_cover_then_cropped(tmp_path):
    tall = horizontal_ramp(128, 32)
    folder = write_video(tall, tmp_path / "tall")
    frames = load_video(folder, 2, 64, 128)  # scale x4 to 512x128, keep rows 224..287
    assert frames.shape == (2, 3, 64, 128)
    # the ramp spans the full width, so both ends survive the crop
    assert frames[0, 0, :, 0].max() < 0.05 and frames[0, 0, :, -1].min() > 0.95
    # every row is the same ramp: rows are not mixed up
    assert (frames[0, 0] - frames[0, 0, :1]).abs().max() < 1e-5


def test_downscale_keeps_the_picture(clip, tmp_path):
    folder = write_video(clip, tmp_path / "clip")
    small = load_video(folder, None, 64, 64)
    # 64x96 -> 64x64 keeps columns 16..79 at scale 1
    assert (small - clip[..., 16:80]).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    "height, width, message",
    [
        (500, 512, "--height 500: must be a positive multiple of 64 (try 448 or 512)"),
        (512, 30, "--width 30: must be a positive multiple of 64 (try 64)"),
        (0, 64, "--height 0: must be a positive multiple of 64 (try 64)"),
        (64.0, 64, "--height 64.0: must be an integer multiple of 64"),
        (None, 64, "--height None --width 64: give both or neither"),
    ],
)
def test_check_frame_size(height, width, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_frame_size(height, width)


def test_check_frame_size_accepts_good_sizes():
    check_frame_size(448, 768)
    check_frame_size(None, None)


# -- bad input ------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_video(tmp_path / "nope.mp4")


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"not a video \(suffix '.txt'\)"):
        load_video(path)


@pytest.mark.parametrize("backend", [None, "decord", "pyav"])
def test_unreadable_video(tmp_path, backend):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x01 this is not an mp4" * 50)
    with pytest.raises(UserError, match="not a readable video"):
        load_video(path, backend=backend)


def test_unreadable_gif(tmp_path):
    path = tmp_path / "broken.gif"
    path.write_bytes(b"GIF89a garbage")
    with pytest.raises(UserError, match="not a readable video"):
        count_frames(path)


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="the folder holds no images"):
        load_video(tmp_path)


def test_too_few_frames_message(tmp_path):
    path = write_video(gray_frames(5), tmp_path / "short.gif")
    message = "video has 5 frames, --frames 8 asked: use --frames 5 or fewer"
    with pytest.raises(UserError, match=re.escape(message)):
        load_video(path, 8, None, None)


def test_frames_of_different_sizes_need_a_target_size(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 16)).save(tmp_path / "b.png")
    with pytest.raises(UserError, match="frames differ in size"):
        load_video(tmp_path, None, None, None)
    assert load_video(tmp_path, None, 64, 64).shape == (2, 3, 64, 64)


def test_zero_size_frames(tmp_path, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    empty_frame = np.zeros((0, 16, 3), np.uint8)
    monkeypatch.setattr(video._ImageFolderReader, "read", lambda self, indices: [empty_frame])
    with pytest.raises(UserError, match=r"frames have size \(0, 16\)"):
        load_video(tmp_path, 1, None, None)


def test_bad_backend(clip, tmp_path):
    with pytest.raises(UserError, match="backend 'ffmpeg': must be None, 'decord' or 'pyav'"):
        load_video(tmp_path, backend="ffmpeg")


def test_missing_decord_falls_back_to_pyav_or_says_so(clip, tmp_path, monkeypatch):
    path = write_video(clip, tmp_path / "clip.mp4")

    def no_decord(self, path):
        raise ImportError("No module named 'decord'")

    monkeypatch.setattr(video._DecordReader, "__init__", no_decord)
    assert load_video(path, 2, None, None).shape == (2, 3, 64, 96)
    with pytest.raises(UserError, match="decord is not installed"):
        load_video(path, 2, None, None, backend="decord")


# -- grid -----------------------------------------------------------------------------------------


def test_make_grid_places_rows_side_by_side():
    torch.manual_seed(0)
    a, b = torch.rand(3, 3, 16, 24), torch.rand(3, 1, 16, 24)
    grid = make_grid([a, b])
    assert grid.shape == (3, 3, 16, 48)
    assert torch.equal(grid[..., :24], a)
    assert torch.equal(grid[..., 24:], b.expand(-1, 3, -1, -1))


def test_make_grid_resizes_rows_to_the_first_height():
    grid = make_grid([torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 32, 64)])
    assert grid.shape == (2, 3, 16, 16 + 32)
    assert torch.allclose(grid[..., 16:], torch.ones(()))


def test_make_grid_labels_mark_only_the_top_left():
    frames = torch.full((2, 3, 64, 64), 0.5)
    labelled = make_grid([frames, frames], labels=["source", "edit"])
    changed = (labelled != 0.5).any(dim=(0, 1))  # (H, W)
    assert changed[:16, :32].any() and changed[:16, 64:96].any()  # both labels drawn
    assert not changed[32:].any()  # bottom half untouched
    assert torch.equal(labelled[0], labelled[1])  # same label on every frame


@pytest.mark.parametrize(
    "rows, labels, message",
    [
        ([], None, "expected at least one video"),
        (
            [torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8)],
            None,
            r"rows\[1\]: expected \(2, 3, H, W\)",
        ),
        ([torch.zeros(2, 3, 8, 8)], ["a", "b"], "labels: expected 1"),
    ],
)
def test_make_grid_rejects_bad_rows(rows, labels, message):
    with pytest.raises(UserError, match=message):
        make_grid(rows, labels)


# -- bundled sample clip --------------------------------------------------------------------------


def test_sample_clip_asset_matches_its_generator():
    path = sample_clip_path()
    assert path.is_file() and path.stat().st_size < 60_000
    num_frames, _, height, width = SAMPLE_CLIP_SHAPE
    assert count_frames(path) == num_frames
    assert load_video(path, 1, None, None).shape == (1, 3, height, width)
    # compare at 64x64: rendering at full size costs seconds
    frames = load_video(path, None, 64, 64)
    assert (frames - make_sample_clip(num_frames, 64, 64)).abs().mean() < MP4_MAE
