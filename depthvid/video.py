"""Reading, writing and tiling videos.

Frames travel as float tensors ``(frames, 3, height, width)`` in [0, 1]. Sources are video files
(mp4, avi, webm, mov, mkv: decord, with PyAV as the fallback), gifs (Pillow) and folders of images
(Pillow, sorted by name). Outputs are mp4 (H.264, yuv420p: plays in a browser), gif, or a folder of
PNGs, always written beside the target first and moved into place, so an interrupted write never
leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from depthvid.errors import UserError, check_number
from depthvid.fileutil import atomic_path, check_writable

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mov", ".mkv", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
READER_BACKENDS = (None, "decord", "pyav")
SAMPLE_MODES = ("uniform", "stride")
OUTPUT_SUFFIXES = (".mp4", ".gif")  # write_video's file formats; any other target is a folder of PNGs
SIZE_MULTIPLE = 64
MAX_FPS = 240
MP4_CRF = 18  # x264 quality: 18 is visually near-lossless, 23 is x264's default.


# -- argument checks ------------------------------------------------------------------------------


def check_frame_size(height, width) -> None:
    """Raise ``UserError`` unless height and width are both None or both positive multiples of 64.

    The message names the CLI flag and suggests the nearest valid sizes; the CLI reuses it.
    """
    if (height is None) != (width is None):
        raise UserError(
            f"--height {height} --width {width}: give both or neither "
            "(neither keeps the source size)"
        )
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"--{name} {value!r}: must be an integer multiple of {SIZE_MULTIPLE}")
        if value <= 0 or value % SIZE_MULTIPLE:
            below = value // SIZE_MULTIPLE * SIZE_MULTIPLE
            above = below + SIZE_MULTIPLE
            suggestion = f"{below} or {above}" if below > 0 else f"{above}"
            raise UserError(
                f"--{name} {value}: must be a positive multiple of {SIZE_MULTIPLE} "
                f"(try {suggestion})"
            )


def _check_positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"--{name} {value!r}: must be an integer >= {minimum}")


def sample_frame_indices(
    total: int, num_frames: int | None, sample: str = "uniform", start: int = 0, stride: int = 1
) -> list[int]:
    """Which frames of a ``total``-frame clip to read.

    ``sample="uniform"``: ``num_frames`` indices evenly spaced from ``start`` to the last frame,
    both ends included (one frame: just ``start``). ``sample="stride"``: ``start + i * stride``.
    ``num_frames=None`` takes every frame the mode reaches.
    """
    if sample not in SAMPLE_MODES:
        raise UserError(f"--sample {sample!r}: must be one of {', '.join(SAMPLE_MODES)}")
    if num_frames is not None:
        _check_positive_int("frames", num_frames, 1)
    _check_positive_int("start", start, 0)
    _check_positive_int("stride", stride, 1)
    if start >= total:
        raise UserError(
            f"--start {start}: the video has only {total} frames (use --start {total - 1} or less)"
        )
    available = total - start
    from_start = f" from --start {start}" if start else ""

    if sample == "stride":
        reachable = (available - 1) // stride + 1
        if num_frames is None:
            return list(range(start, total, stride))
        if num_frames > reachable:
            raise UserError(
                f"video has {total} frames, --frames {num_frames} with --stride {stride}"
                f"{from_start} asked (needs frame {start + (num_frames - 1) * stride}): "
                f"use --frames {reachable} or fewer, or a smaller --stride"
            )
        return [start + i * stride for i in range(num_frames)]

    if num_frames is None:
        return list(range(start, total))
    if num_frames > available:
        raise UserError(
            f"video has {total} frames, --frames {num_frames}{from_start} asked: "
            f"use --frames {available} or fewer"
        )
    if num_frames == 1:
        return [start]
    # round(start + i * (available - 1) / (num_frames - 1)) in integers, halves rounded up.
    span, steps = available - 1, num_frames - 1
    return [start + (2 * i * span + steps) // (2 * steps) for i in range(num_frames)]


# -- readers: each gives len() and read(indices) -> list of (H, W, 3) uint8 arrays --------------


def _natural_key(name: str):
    """'frame2.png' sorts before 'frame10.png'; zero-padded names sort as plain text would."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class _ImageFolderReader:
    def __init__(self, folder: Path):
        self.files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: _natural_key(p.name),
        )
        if not self.files:
            raise UserError(
                f"video {str(folder)!r}: the folder holds no images "
                f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}): add frames or pass a video file"
            )

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: list[int]) -> list[np.ndarray]:
        from PIL import Image

        frames = []
        for i in indices:
            try:
                with Image.open(self.files[i]) as image:
                    frames.append(np.asarray(image.convert("RGB")))
            except OSError as err:
                raise UserError(
                    f"video frame {str(self.files[i])!r}: not a readable image ({err}): "
                    "replace or remove it"
                ) from err
        return frames


class _GifReader:
    """Pillow composes each gif frame over the previous one (disposal, partial frames)."""

    def __init__(self, path: Path):
        from PIL import Image

        self.path = path
        try:
            with Image.open(path) as image:
                self.num_frames = getattr(image, "n_frames", 1)
        except OSError as err:
            raise _unreadable(path, err) from err

    def __len__(self) -> int:
        return self.num_frames

    def read(self, indices: list[int]) -> list[np.ndarray]:
        from PIL import Image

        frames = []
        with Image.open(self.path) as image:
            for i in indices:
                image.seek(i)
                frames.append(np.asarray(image.convert("RGB")))
        return frames


@contextlib.contextmanager
def _native_logs_captured():
    """Swallow what decord and FFmpeg print on file descriptor 2 while they probe or decode.

    They log from C/C++ ("[mov,mp4,...] moov atom not found", "video_reader.cc:83: ERROR opening"),
    around our own one-line error; Python's sys.stderr never sees those lines, so the descriptor
    itself is pointed at a scratch file for the duration.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to protect
        yield
        return
    try:
        with tempfile.TemporaryFile() as scratch:
            sys.stderr.flush()
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class _DecordReader:
    def __init__(self, path: Path):
        import decord

        with _native_logs_captured():
            self.reader = decord.VideoReader(str(path), ctx=decord.cpu(0))

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, indices: list[int]) -> list[np.ndarray]:
        with _native_logs_captured():
            return list(self.reader.get_batch(indices).asnumpy())


class _PyAVReader:
    """Decodes from the start and keeps the frames asked for (stops after the last one)."""

    def __init__(self, path: Path):
        import av

        self.path = path
        with _native_logs_captured(), av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"video {str(path)!r}: the file has no video stream")
            self.num_frames = container.streams.video[0].frames
            if self.num_frames <= 0:  # some containers (webm, avi) do not store a frame count
                self.num_frames = sum(1 for _ in container.decode(video=0))

    def __len__(self) -> int:
        return self.num_frames

    def read(self, indices: list[int]) -> list[np.ndarray]:
        import av

        wanted, last = set(indices), max(indices)
        decoded = {}
        with _native_logs_captured(), av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        missing = sorted(wanted - decoded.keys())
        if missing:
            raise UserError(
                f"video {str(self.path)!r}: frame {missing[0]} could not be decoded "
                f"(the file may be truncated): use fewer --frames"
            )
        return [decoded[i] for i in indices]


def _unreadable(path: Path, err: Exception) -> UserError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", reason)  # decord's "[time] file.cc:line: " prefix
    return UserError(
        f"video {str(path)!r}: not a readable video ({reason}): "
        f"pass an {'/'.join(s[1:] for s in VIDEO_SUFFIXES)} file or a folder of images"
    )


def _open_reader(path, backend: str | None = None):
    if backend not in READER_BACKENDS:
        raise UserError(f"backend {backend!r}: must be None, 'decord' or 'pyav'")
    path = Path(path)
    if not path.exists():
        raise UserError(f"video {str(path)!r}: no such file or folder: check the path")
    if path.is_dir():
        return _ImageFolderReader(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(
            f"video {str(path)!r}: not a video (suffix {path.suffix or 'none'!r}): pass an "
            f"{'/'.join(s[1:] for s in VIDEO_SUFFIXES)} file or a folder of images"
        )
    if path.suffix.lower() == ".gif":
        return _GifReader(path)

    if backend in (None, "decord"):
        try:
            return _DecordReader(path)
        except ImportError as err:
            if backend == "decord":
                raise UserError(
                    "backend 'decord': decord is not installed: pip install decord, "
                    "or use backend='pyav'"
                ) from err
        except Exception as err:  # decord raises DECORDError (an Exception) on files it cannot read
            if backend == "decord":
                raise _unreadable(path, err) from err
    try:
        return _PyAVReader(path)
    except UserError:
        raise
    except Exception as err:  # av.error.FFmpegError and friends
        raise _unreadable(path, err) from err


def _read_frames(reader, indices: list[int], path: Path, backend: str | None) -> list[np.ndarray]:
    """``reader.read(indices)``; a file that opens but does not decode is a ``UserError``."""
    try:
        return reader.read(indices)
    except UserError:
        raise
    except Exception as err:
        if not (isinstance(reader, _DecordReader) and backend is None):
            raise _unreadable(path, err) from err
    # decord opens some files it cannot decode (e.g. 16x16 frames): PyAV decides
    try:
        return _PyAVReader(path).read(indices)
    except UserError:
        raise
    except Exception as err:
        raise _unreadable(path, err) from err


def count_frames(path, *, backend: str | None = None) -> int:
    """Number of frames in a video file, gif or image folder."""
    return len(_open_reader(path, backend))


# -- tensors --------------------------------------------------------------------------------------


def resize_and_crop(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale ``frame`` (C, h, w) so it covers height x width (aspect kept), then center-crop.

    Returns (C, height, width). Downscaling is antialiased.
    """
    _, h, w = frame.shape
    if (h, w) == (height, width):
        return frame
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    resized = F.interpolate(
        frame[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[:, top : top + height, left : left + width].clamp(0.0, 1.0)


def load_video(
    path,
    num_frames: int | None = 8,
    height: int | None = 512,
    width: int | None = 512,
    *,
    sample: str = "uniform",
    start: int = 0,
    stride: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Read frames of a video file, gif or folder of images.

    Args:
        path: an mp4/avi/webm/mov/mkv/gif file, or a folder of png/jpg/jpeg/webp/bmp frames
            (sorted by name).
        num_frames: how many frames to return; None returns every frame ``sample`` reaches.
        height, width: output size, multiples of 64: frames are scaled to cover it (aspect ratio
            kept) and center-cropped. Both None keeps the source size.
        sample: "uniform" spreads the frames evenly from ``start`` to the last frame (first and
            last included); "stride" takes ``start + i * stride`` (Tune-A-Video's sampling).
        backend: video-file reader, None (decord, falling back to PyAV), "decord" or "pyav".
            Gifs and image folders are always read with Pillow.

    Returns:
        frames: (num_frames, 3, height, width) float32 in [0, 1].
    """
    check_frame_size(height, width)
    reader = _open_reader(path, backend)
    indices = sample_frame_indices(len(reader), num_frames, sample, start, stride)
    arrays = _read_frames(reader, indices, Path(path), backend)

    frames = []
    for array in arrays:
        if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
            raise UserError(
                f"video {str(path)!r}: frames have size {array.shape[:2]}: the file is damaged, "
                "re-export it"
            )
        # np.array copies: Pillow's arrays are read-only, which torch.from_numpy warns about.
        frame = torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255.0
        if height is not None:
            frame = resize_and_crop(frame, height, width)
        frames.append(frame)
    sizes = {tuple(f.shape[1:]) for f in frames}
    if len(sizes) > 1:
        raise UserError(
            f"video {str(path)!r}: frames differ in size {sorted(sizes)}: "
            "pass --height and --width to resize them to one size"
        )
    return torch.stack(frames)


# -- writing --------------------------------------------------------------------------------------


def to_uint8_frames(frames) -> np.ndarray:
    """(F, 3, H, W) float in [0, 1] (torch or numpy) or (F, H, W, 3) uint8 -> (F, H, W, 3) uint8."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.dtype in (torch.bfloat16, torch.float16):
            frames = frames.float()
        frames = frames.numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3:
        return np.ascontiguousarray(frames)
    if np.issubdtype(frames.dtype, np.floating) and frames.ndim == 4 and frames.shape[1] == 3:
        frames = np.clip(frames, 0.0, 1.0) * 255.0
        return np.ascontiguousarray(np.rint(frames).astype(np.uint8).transpose(0, 2, 3, 1))
    raise UserError(
        f"frames: expected (F, 3, H, W) float in [0, 1] or (F, H, W, 3) uint8, "
        f"got shape {tuple(frames.shape)} dtype {frames.dtype}: convert before writing"
    )


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    """H.264 yuv420p, which needs even sides: odd sides get their last row/column repeated."""
    import av

    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    if "libx264" not in av.codecs_available:
        _write_mp4_imageio(frames, path, fps)
        return
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for array in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames


def _write_mp4_imageio(frames: np.ndarray, path: Path, fps: float) -> None:
    """Fallback for PyAV builds without libx264: imageio-ffmpeg's bundled ffmpeg binary."""
    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        size=(width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,
        output_params=["-crf", str(MP4_CRF), "-movflags", "+faststart", "-f", "mp4"],
    )
    writer.send(None)  # start the ffmpeg process
    for array in frames:
        writer.send(array)
    writer.close()


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    """Pillow's GIF writer merges consecutive identical frames into one (durations summed)."""
    from PIL import Image

    images = [Image.fromarray(array) for array in frames]
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
    )


def _write_png_folder(frames: np.ndarray, folder: Path) -> None:
    """frame_0000.png, frame_0001.png, ... into the existing (empty) ``folder``."""
    from PIL import Image

    for i, array in enumerate(frames):
        Image.fromarray(array).save(folder / f"frame_{i:04d}.png")


def _is_previous_output(folder: Path) -> bool:
    return all(re.fullmatch(r"frame_\d+\.png", p.name) for p in folder.iterdir())


def check_fps(fps) -> None:
    check_number("--fps", fps, minimum=1, maximum=MAX_FPS, hint="8 is the default")


def check_output_suffix(path, option: str = "output") -> None:
    """Only .mp4 and .gif name files; a new folder of PNG frames has no suffix (out.avi is a typo,
    not a folder name)."""
    path = Path(path)
    if path.suffix and path.suffix.lower() not in OUTPUT_SUFFIXES and not path.is_dir():
        raise UserError(
            f"{option} {str(path)!r}: cannot write {path.suffix} videos: end it with "
            f"{' or '.join(OUTPUT_SUFFIXES)}, or give a folder name without a suffix for PNG frames"
        )


def check_video_output(path, option: str = "output") -> Path:
    """Raise ``UserError`` unless ``write_video`` can write ``path``: call it before the work that
    produces the frames. The suffix picks the format: .mp4, .gif, or none for a folder of PNGs."""
    path = Path(path)
    is_folder = path.suffix.lower() not in OUTPUT_SUFFIXES
    if is_folder and path.exists() and not path.is_dir():
        raise UserError(
            f"{option} {str(path)!r}: exists and is not a folder: end it with .mp4 or .gif"
        )
    if not is_folder and path.is_dir():
        raise UserError(f"{option} {str(path)!r}: is a folder: choose a file name")
    check_output_suffix(path, option)
    if is_folder and path.is_dir() and not _is_previous_output(path):
        raise UserError(
            f"{option} {str(path)!r}: folder exists and holds other files: choose a new folder"
        )
    return check_writable(path, option)


def write_video(frames, path, fps: float = 8) -> Path:
    """Write frames to ``path``: .mp4 (H.264), .gif (loops forever) or else a folder of PNGs.

    Args:
        frames: (F, 3, H, W) float in [0, 1], torch or numpy, or (F, H, W, 3) uint8 numpy.
        path: target; its suffix picks the format. A folder target may already exist if empty or
            holding only an earlier output (frame_0000.png, ...), which is then replaced.
        fps: frames per second (gif: each frame lasts round(1000 / fps) ms; Pillow stores
            consecutive identical frames once with their durations summed, so such a gif reads
            back with fewer frames but plays the same).

    The output is written beside the target under a temporary name, then moved into place.
    Returns the path written.
    """
    array = to_uint8_frames(frames)
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise UserError(f"frames: got an empty video of shape {array.shape}: nothing to write")
    check_fps(fps)
    path = check_video_output(path)
    suffix = path.suffix.lower()
    is_folder = suffix not in OUTPUT_SUFFIXES

    try:
        with atomic_path(path, directory=is_folder) as temp:
            if suffix == ".mp4":
                _write_mp4(array, temp, fps)
            elif suffix == ".gif":
                _write_gif(array, temp, fps)
            else:
                _write_png_folder(array, temp)
    except OSError as err:
        raise UserError(f"output {str(path)!r}: cannot write ({err.strerror or err}): "
                        "choose a writable location") from err
    return path


def _label_mask(text: str, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha masks (1, height, width) for a label's dark box and its white text, top-left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(8, height // 16))
    box_image = Image.new("L", (width, height), 0)
    text_image = Image.new("L", (width, height), 0)
    left, top, right, bottom = ImageDraw.Draw(text_image).textbbox((4, 2), text, font=font)
    ImageDraw.Draw(box_image).rectangle((0, 0, right + 4, bottom + 3), fill=160)
    ImageDraw.Draw(text_image).text((4, 2), text, fill=255, font=font)
    return _to_mask(box_image), _to_mask(text_image)


def _to_mask(image) -> torch.Tensor:
    """8-bit gray PIL image (H, W) -> (1, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def make_grid(rows: list[torch.Tensor], labels: list[str] | None = None) -> torch.Tensor:
    """Place videos side by side (e.g. source | depth | edits), optionally labelled.

    Args:
        rows: videos (F, 3, H_i, W_i) (or (F, 1, H_i, W_i), shown gray) with the same F. Each is
            scaled to the first one's height, aspect ratio kept.
        labels: one caption per video, drawn in its top-left corner, or None.

    Returns:
        (F, 3, H, sum of widths) float in [0, 1]: (F, 3, H, W * len(rows)) for equal sizes.
    """
    if not rows:
        raise UserError("rows: expected at least one video (F, 3, H, W), got none")
    if labels is not None and len(labels) != len(rows):
        raise UserError(f"labels: expected {len(rows)} (one per video), got {len(labels)}")
    num_frames, height = rows[0].shape[0], rows[0].shape[-2]
    panels = []
    for i, row in enumerate(rows):
        if row.ndim != 4 or row.shape[1] not in (1, 3) or row.shape[0] != num_frames:
            raise UserError(
                f"rows[{i}]: expected ({num_frames}, 3, H, W), got {tuple(row.shape)}: "
                "give every video the same frame count"
            )
        row = row.detach().float().cpu().expand(-1, 3, -1, -1)
        if row.shape[-2] != height:
            new_width = max(1, round(row.shape[-1] * height / row.shape[-2]))
            row = F.interpolate(row, size=(height, new_width), mode="bilinear",
                                align_corners=False, antialias=True).clamp(0.0, 1.0)
        if labels is not None and labels[i]:
            box, text = _label_mask(labels[i], height, row.shape[-1])
            row = row * (1 - box)  # a dark box under the label
            row = row * (1 - text) + text  # white text
        panels.append(row)
    return torch.cat(panels, dim=-1)
