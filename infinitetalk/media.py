"""Image and video I/O: probing, safe image loading, frame reading and H.264/AAC writing.

Every external tool is run with an argument list (never a shell string), so file
names from users cannot inject commands. Problems with the *input* are raised as
:class:`infinitetalk.errors.InputError` with a single line naming the problem and
the limit; problems of the *tools* (ffmpeg missing or crashing while encoding)
are raised as :class:`MediaToolError` and the tool's stderr goes to the log.

File type is detected from content, never from the file name: files handed over
by Cog often have no or a wrong extension.

Colour handling of :func:`load_image` (documented contract):

* EXIF orientation is applied (``ImageOps.exif_transpose``).
* Transparent images (RGBA, LA, PA, P/L/RGB with a ``transparency`` key) are
  alpha-composited on **white**.
* 16-bit / 32-bit integer images (``I;16*``, ``I``) are scaled to 8 bit
  (``value / 257``, clipped); float images (``F``) are taken as 0..1 if their
  maximum is <= 1, else clipped to 0..255.
* CMYK, YCbCr, LAB, HSV, 1-bit and grayscale are converted with Pillow to RGB.
* Animated images (GIF, APNG, WebP, multi-page TIFF) use their first frame.
* Embedded ICC profiles are ignored (pixels are taken as sRGB).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
import wave
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from infinitetalk.errors import InputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Default largest accepted image, in pixels (8192 x 8192; a 48 MP phone photo fits).
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Default smallest accepted image side, in pixels.
DEFAULT_MIN_SIDE = 64
#: Default x264 constant rate factor for outputs (visually near-lossless).
DEFAULT_CRF = 18
#: Default x264 preset.
DEFAULT_PRESET = "medium"
#: Default AAC bitrate of the muxed audio, for the whole track (the pipeline's soundtrack is mono or stereo).
#: At low sample rates ffmpeg's encoder lowers it to AAC's ceiling of 6144 bits per channel per 1024-sample
#: frame (e.g. 48 kb/s per channel at 8 kHz).
DEFAULT_AUDIO_BITRATE = "192k"
#: Seconds ffprobe may take before the input is declared unreadable.
PROBE_TIMEOUT_S = 60.0
#: Largest forward jump (seconds) the sequential frame reader decodes through before it seeks instead.
READER_MAX_SKIP_S = 8.0
#: Pillow formats accepted as still images (anything else Pillow opens goes to ffprobe).
IMAGE_FORMATS = frozenset(
    {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "JPEG2000", "AVIF", "HEIF", "QOI"}
)
#: ffprobe container names that mean "a single still image" (only reached when Pillow failed to decode it).
_IMAGE_DEMUXERS = ("image2", "_pipe", "tty", "apng", "webp")
#: Tail of a tool's stderr kept for the log.
_STDERR_TAIL_BYTES = 4000

MediaKind = Literal["image", "video", "audio"]


class MediaToolError(RuntimeError):
    """ffmpeg/ffprobe is missing or failed on data we produced (not the user's fault)."""


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` found in a file.

    ``width``/``height`` are the *display* size (rotation metadata applied, as
    ffmpeg's decoder outputs frames). ``fps``, ``duration`` and ``num_frames``
    are None where they do not apply (images have fps None, duration 0.0 and
    num_frames 1); ``num_frames`` may be None for videos whose container does
    not state it (mkv, webm).
    """

    kind: MediaKind
    width: int | None
    height: int | None
    fps: float | None
    duration: float | None
    num_frames: int | None
    has_audio: bool
    has_video: bool
    codec: str | None


# --------------------------------------------------------------------------- tools


def _tool(name: str) -> str:
    """Absolute path of an ffmpeg tool, or a clear MediaToolError."""
    found = shutil.which(name)
    if found is None:
        raise MediaToolError(f"{name} not found on PATH; install ffmpeg (Debian package 'ffmpeg')")
    return found


def _tail(data: bytes, limit: int = _STDERR_TAIL_BYTES) -> str:
    return data[-limit:].decode("utf-8", errors="replace").strip()


def _read_tail(fh: IO[bytes]) -> str:
    """Last bytes of a temp file holding a tool's stderr."""
    try:
        fh.flush()
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - _STDERR_TAIL_BYTES))
        return _tail(fh.read())
    except (OSError, ValueError):
        return ""


def _name(path: PathLike) -> str:
    """File name for user messages (no directories)."""
    return Path(path).name or str(path)


# --------------------------------------------------------------------------- probing


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {_name(p)!r} does not exist or is not a regular file")
    if p.stat().st_size == 0:
        raise InputError(f"input file {_name(p)!r} is empty (0 bytes)")
    return p


def _too_large(path: PathLike, width: int, height: int, max_pixels: int) -> InputError:
    return InputError(
        f"image {_name(path)!r} is too large: {width}x{height} = {width * height} pixels; "
        f"the maximum is {max_pixels} pixels"
    )


def _open_image(path: Path, max_pixels: int) -> Image.Image | None:
    """Open ``path`` with Pillow (header only). None if Pillow does not see a still image.

    The declared size is checked against ``max_pixels`` before any pixel is
    decoded. Pillow's own decompression-bomb guard (global ``MAX_IMAGE_PIXELS``)
    is left untouched; its warning is silenced here and its error mapped to the
    same InputError.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{found.group(1)} pixels" if found else "more pixels than allowed"
        raise InputError(f"image {_name(path)!r} is too large: {declared}; the maximum is {limit} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    if im.format not in IMAGE_FORMATS:
        im.close()
        return None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise _too_large(path, width, height, max_pixels)
    return im


def _decode_first_frame(im: Image.Image, path: Path) -> None:
    """Decode the first frame in place; corrupt or truncated data -> InputError."""
    try:
        im.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        logger.info("image decode failed for %s: %s", path, exc)
        raise InputError(f"image {_name(path)!r} is truncated or corrupt and cannot be decoded") from None


def _parse_rate(rate: str | None) -> float | None:
    if not rate or rate in ("0/0", "N/A"):
        return None
    try:
        value = float(Fraction(rate))
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _parse_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out >= 0 else None


def _rotation(stream: dict[str, Any]) -> int:
    """Rotation in degrees from display-matrix side data or the legacy ``rotate`` tag."""
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            try:
                return int(round(float(side["rotation"])))
            except (TypeError, ValueError):
                return 0
    try:
        return int((stream.get("tags") or {}).get("rotate", 0))
    except (TypeError, ValueError):
        return 0


def run_ffprobe(path: Path) -> dict[str, Any] | None:
    """ffprobe JSON (format and streams) of ``path``, or None if ffprobe cannot read it; the package's
    one ffprobe call (also behind :func:`infinitetalk.audio.probe_audio`)."""
    cmd = [_tool("ffprobe"), "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise InputError(f"input file {_name(path)!r} could not be probed within {PROBE_TIMEOUT_S:.0f} s") from None
    if res.returncode != 0:
        logger.info("ffprobe failed on %s: %s", path, _tail(res.stderr))
        return None
    try:
        return json.loads(res.stdout or b"{}")
    except json.JSONDecodeError:
        return None


def _streams(data: dict[str, Any], codec_type: str) -> list[dict[str, Any]]:
    out = []
    for s in data.get("streams") or []:
        if s.get("codec_type") != codec_type:
            continue
        if codec_type == "video" and (s.get("disposition") or {}).get("attached_pic"):
            continue  # cover art in an audio file
        out.append(s)
    return out


def _video_info(path: Path, data: dict[str, Any], has_audio: bool) -> MediaInfo:
    fmt = data.get("format") or {}
    v = _streams(data, "video")[0]
    width, height = int(v.get("width") or 0), int(v.get("height") or 0)
    if width <= 0 or height <= 0:
        raise InputError(f"video {_name(path)!r} has no valid frame size")
    if abs(_rotation(v)) % 180 == 90:
        width, height = height, width
    fps = _parse_rate(v.get("avg_frame_rate")) or _parse_rate(v.get("r_frame_rate"))
    if fps is None:
        raise InputError(f"video {_name(path)!r} has no usable frame rate")
    duration = _parse_float(v.get("duration")) or _parse_float(fmt.get("duration"))
    nb = v.get("nb_frames")
    num_frames = int(nb) if str(nb or "").isdigit() and int(nb) > 0 else None
    if duration is None and num_frames is not None:
        duration = num_frames / fps
    if duration is None or duration <= 0:
        raise InputError(f"video {_name(path)!r} has no usable duration")
    return MediaInfo("video", width, height, fps, duration, num_frames, has_audio, True, v.get("codec_name"))


def probe(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> MediaInfo:
    """Detect what ``path`` holds, from its content.

    Pillow is tried first (still images: the header is checked against
    ``max_pixels``, then the first frame is decoded so truncation is caught),
    then ffprobe. Raises InputError for missing, empty, truncated, oversized,
    unknown or text files.
    """
    p = _check_file(path)
    im = _open_image(p, max_pixels=max_pixels)
    if im is not None:
        with im:
            width, height = im.size
            _decode_first_frame(im, p)
            if _exif_orientation(im) in (5, 6, 7, 8):  # rotated by 90 degrees: report the display size
                width, height = height, width
            return MediaInfo("image", width, height, None, 0.0, 1, False, True, (im.format or "").lower())
    data = run_ffprobe(p)
    fmt_name = str((data or {}).get("format", {}).get("format_name", ""))
    if data is None or not data.get("streams"):
        raise InputError(f"input file {_name(p)!r} is not a readable image, video or audio file")
    if any(tag in fmt_name for tag in _IMAGE_DEMUXERS) and not _streams(data, "audio"):
        # Only single images reach here (Pillow could not decode them) or text files ('tty').
        raise InputError(f"input file {_name(p)!r} is not a readable image, video or audio file")
    has_audio = bool(_streams(data, "audio"))
    if _streams(data, "video"):
        return _video_info(p, data, has_audio)
    if has_audio:
        a = _streams(data, "audio")[0]
        duration = _parse_float(a.get("duration")) or _parse_float((data.get("format") or {}).get("duration"))
        if not duration:
            raise InputError(f"audio file {_name(p)!r} has no usable duration")
        return MediaInfo("audio", None, None, None, duration, None, True, False, a.get("codec_name"))
    raise InputError(f"input file {_name(p)!r} has no video or audio stream")


def check_duration(info: MediaInfo, max_seconds: float, what: str = "video") -> None:
    """InputError if ``info.duration`` exceeds ``max_seconds``."""
    if info.duration is not None and info.duration > max_seconds:
        raise InputError(f"{what} is {info.duration:.1f} s long; the maximum is {max_seconds:g} s")


# --------------------------------------------------------------------------- images


def _int_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale -> 8-bit L (value / 257, clipped)."""
    arr = np.asarray(im).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")


def _float_to_8bit(im: Image.Image) -> Image.Image:
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (alpha composited on white; see module docstring)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        im = _int_to_8bit(im)
    elif im.mode == "F":
        im = _float_to_8bit(im)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF means "no orientation"
        return 1


def _exif_transpose(im: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception as exc:  # noqa: BLE001 - broken EXIF must not reject an otherwise good image
        logger.info("ignoring unreadable EXIF orientation in %s: %s", path, exc)
        return im


def load_image(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
    """Load a still image as an RGB PIL image, safely.

    The declared size is checked against ``max_pixels`` and ``min_side`` before
    any pixel is decoded. The first frame of animated images is used. EXIF
    orientation is applied. Raises InputError for anything that is not a
    decodable image within the limits.
    """
    p = _check_file(path)
    im = _open_image(p, max_pixels=max_pixels)
    if im is None:
        raise InputError(f"input file {_name(p)!r} is not a readable image (PNG, JPEG, WebP, GIF, BMP, TIFF)")
    with im:
        return _still_to_rgb(im, p, min_side)


def probe_and_load(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                   min_side: int = DEFAULT_MIN_SIDE) -> tuple[MediaInfo, Image.Image | None]:
    """:func:`probe`, plus for a still image its RGB picture as :func:`load_image` gives it.

    A still image is decoded once (probing and loading separately would decode it twice);
    for anything else the picture is None and the info comes from ffprobe.
    """
    p = _check_file(path)
    im = _open_image(p, max_pixels=max_pixels)
    if im is None:
        return probe(p, max_pixels), None
    with im:
        codec = (im.format or "").lower()
        out = _still_to_rgb(im, p, min_side)
    return MediaInfo("image", out.width, out.height, None, 0.0, 1, False, True, codec), out


def _still_to_rgb(im: Image.Image, p: Path, min_side: int) -> Image.Image:
    """Min-size check, first-frame decode, EXIF orientation and RGB conversion of an opened image."""
    width, height = im.size
    if min(width, height) < min_side:
        raise InputError(f"image {_name(p)!r} is too small: {width}x{height}; the minimum side is {min_side} pixels")
    _decode_first_frame(im, p)
    out = to_rgb(_exif_transpose(im, p))
    return im.copy() if out is im else out


# --------------------------------------------------------------------------- reading video frames


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill and reap a child process (no zombie)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - kill() should always work
        logger.error("ffmpeg pid %d did not exit after SIGKILL", proc.pid)


class VideoFrameReader:
    """Random-ish access to the frames of a video, memory-bounded.

    ``frame_at(t)`` returns the source frame *shown* at time ``t`` seconds
    (frame ``floor(t * fps)`` of a source of any fps), or the last frame when
    ``t`` is past the end. Frames are read through one running
    ``ffmpeg -f rawvideo`` pipe; requests with increasing ``t`` (chunk starts)
    decode forward, a backward or far-forward request restarts the pipe with a
    fast ``-ss`` seek. Only the current frame is held in memory.

    Use as a context manager, or call :meth:`close`. Variable-frame-rate
    sources are re-timed by ffmpeg onto a grid of their average frame rate.
    """

    def __init__(self, path: PathLike, info: MediaInfo | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = _check_file(path)
        self.info = info or probe(self.path)
        if self.info.kind != "video" or not self.info.width or not self.info.height or not self.info.fps:
            raise InputError(f"input file {_name(self.path)!r} is not a video")
        self.width: int = self.info.width
        self.height: int = self.info.height
        if self.width * self.height > max_pixels:
            raise InputError(
                f"video {_name(self.path)!r} is too large: {self.width}x{self.height} = "
                f"{self.width * self.height} pixels per frame; the maximum is {max_pixels} pixels"
            )
        self._rate = Fraction(self.info.fps).limit_denominator(1001)
        self.fps: float = float(self._rate)
        self.duration: float = float(self.info.duration or 0.0)
        self._frame_bytes = self.width * self.height * 3
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._next_index = 0  # index of the frame the pipe yields next
        self._current: tuple[int, bytes] | None = None  # last frame read (index, rgb bytes)
        self._last_index: int | None = None  # known index of the final frame (from EOF)
        self._finalizer = weakref.finalize(self, VideoFrameReader._cleanup, [None])

    # -- public API

    @property
    def estimated_last_index(self) -> int:
        """Index of the last frame from metadata (exact once EOF was seen)."""
        if self._last_index is not None:
            return self._last_index
        if self.info.num_frames:
            return self.info.num_frames - 1
        return max(0, math.ceil(self.duration * self.fps - 1e-6) - 1)

    def index_at(self, t_seconds: float) -> int:
        """Source frame index shown at time ``t_seconds`` (clamped to the known last frame)."""
        if not math.isfinite(t_seconds) or t_seconds < 0:
            raise ValueError(f"t must be a finite time >= 0, got {t_seconds!r}")
        return min(int(math.floor(t_seconds * self.fps + 1e-6)), self.estimated_last_index)

    def frame_at(self, t_seconds: float) -> Image.Image:
        """RGB frame shown at ``t_seconds``; the last frame past the end."""
        index = self.index_at(t_seconds)
        return self._to_image(self._frame(index))

    def first_frame(self) -> Image.Image:
        """The first frame (InputError if the video cannot be decoded)."""
        return self.frame_at(0.0)

    def check_duration(self, max_seconds: float) -> None:
        """InputError if the video is longer than ``max_seconds``."""
        check_duration(self.info, max_seconds, what=f"video {_name(self.path)!r}")

    def close(self) -> None:
        """Stop the decoder process."""
        self._stop()

    def __enter__(self) -> VideoFrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    @staticmethod
    def _cleanup(holder: list[subprocess.Popen[bytes] | None]) -> None:
        _kill(holder[0])

    def _to_image(self, data: bytes) -> Image.Image:
        return Image.frombytes("RGB", (self.width, self.height), data)

    def _frame(self, index: int) -> bytes:
        if self._current is not None and self._current[0] == index:
            return self._current[1]
        if self._last_index is not None and index >= self._last_index and self._current is not None:
            if self._current[0] == self._last_index:
                return self._current[1]
        max_skip = int(READER_MAX_SKIP_S * self.fps)
        if self._proc is None or index < self._next_index or index - self._next_index > max_skip:
            self._start(index)
        while self._next_index <= index:
            data = self._read_one()
            if data is None:  # EOF: the previous frame is the last one
                return self._at_eof(index)
            self._current = (self._next_index, data)
            self._next_index += 1
        assert self._current is not None
        return self._current[1]

    def _at_eof(self, index: int) -> bytes:
        self._stop()
        if self._current is not None and self._current[0] == self._next_index - 1:
            self._last_index = self._current[0]
            return self._current[1]
        # The seek went past the real end (metadata overstated the length): decode the tail.
        data = self._read_tail_frame()
        if data is None:
            raise InputError(f"video {_name(self.path)!r} has no decodable frames")
        self._last_index = min(index, self.estimated_last_index)
        self._current = (self._last_index, data)
        return data

    def _cmd(self, seek_s: float | None, extra_input: Sequence[str] = ()) -> list[str]:
        cmd = [_tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error"]
        if seek_s is not None and seek_s > 0:
            cmd += ["-ss", f"{seek_s:.6f}"]
        cmd += [*extra_input, "-i", str(self.path), "-map", "0:v:0", "-an", "-sn", "-dn"]
        # The fps filter re-times the source onto an exact grid of its own (average) rate, so output
        # frame n is the source frame at n / fps also for variable-frame-rate sources. Rounding to the
        # nearest tick (the default) absorbs millisecond-rounded timestamps (mkv/webm).
        rate = f"{self._rate.numerator}/{self._rate.denominator}"
        cmd += ["-vf", f"scale={self.width}:{self.height},fps={rate}"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
        return cmd

    def _start(self, index: int) -> None:
        self._stop()
        # Seek half a frame before the wanted frame so float rounding cannot skip it.
        seek = (index - 0.5) / self.fps if index > 0 else None
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self._cmd(seek), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, VideoFrameReader._cleanup, [self._proc])
        self._next_index = index
        self._current = None

    def _read_one(self) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        data = self._proc.stdout.read(self._frame_bytes)
        if len(data) < self._frame_bytes:
            self._proc.wait()
            if self._proc.returncode not in (0, None) and self._stderr is not None:
                logger.warning("ffmpeg decode of %s ended with %s: %s", self.path, self._proc.returncode,
                               _read_tail(self._stderr))
            return None
        return data

    def _read_tail_frame(self) -> bytes | None:
        """Last decodable frame, reading only the final seconds of the file."""
        back = max(2.0, 3.0 / self.fps)
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                self._cmd(None, ["-sseof", f"-{back:.3f}"]),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )
            last: bytes | None = None
            try:
                assert proc.stdout is not None
                while len(chunk := proc.stdout.read(self._frame_bytes)) == self._frame_bytes:
                    last = chunk
            finally:
                _kill(proc)
        return last

    def _stop(self) -> None:
        _kill(self._proc)
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


# --------------------------------------------------------------------------- writing video


#: Most bytes of frames a :class:`VideoWriter` holds for its encoder thread: the arrays queued plus the one being
#: piped into ffmpeg. Two pipeline chunks of 81 frames at 960x960 or 1280x720 (224 MB each; five at 480p); a
#: single larger write is still taken, once nothing else is pending.
WRITER_QUEUE_BYTES = 512 * 2**20
#: Seconds abort() and the finalizer wait for the writer thread after ffmpeg was killed (it ends at once).
_JOIN_TIMEOUT_S = 30.0


class _FrameFeeder:
    """The writer thread of one :class:`VideoWriter`: pipes the arrays it is given into ffmpeg's stdin, in order.

    :meth:`put` returns as soon as the array is queued and blocks only while the frames held (queued
    plus the array being piped) would exceed ``limit`` bytes, so memory stays bounded however long
    the video is. An error of the pipe (ffmpeg exited, broken pipe) ends the thread and is kept in
    :attr:`error` for the writer to report. The feeder holds no reference to its VideoWriter, so a
    writer dropped without close() is still collected and its finalizer can stop the thread.
    """

    def __init__(self, stdin: IO[bytes], limit: int, name: str) -> None:
        self._stdin = stdin
        self._limit = limit
        self._cond = threading.Condition()
        self._queue: deque[np.ndarray] = deque()
        self._bytes = 0
        self._closing = False  # no more arrays: the thread ends once the queue is empty
        self._stopped = False  # abort: queued arrays are dropped, the thread ends after its current write
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, arr: np.ndarray) -> bool:
        """Queue a C-contiguous array (kept, not copied); False if the thread has ended (error or stop)."""
        with self._cond:
            while self._bytes and self._bytes + arr.nbytes > self._limit and self.error is None and not self._stopped:
                self._cond.wait()
            if self.error is not None or self._stopped:
                return False
            self._queue.append(arr)
            self._bytes += arr.nbytes
            self._cond.notify_all()
            return True

    def drain(self) -> None:
        """Wait until every queued array is piped (a failure or stop() empties the queue too)."""
        with self._cond:
            while self._queue:
                self._cond.wait()

    def finish(self) -> None:
        """Wait until every queued array is piped (or the thread failed)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def stop(self) -> None:
        """Drop the queue and let the thread end; its write in progress ends when ffmpeg is killed."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._bytes = 0
            self._cond.notify_all()

    def join(self) -> None:
        """Wait for the thread after :meth:`stop` (and killing ffmpeg)."""
        if self._thread is threading.current_thread():  # a finalizer run by the garbage collector in this thread
            return
        self._thread.join(_JOIN_TIMEOUT_S)
        if self._thread.is_alive():  # pragma: no cover - a killed ffmpeg always breaks the pipe
            logger.error("video writer thread did not end within %.0f s", _JOIN_TIMEOUT_S)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing and not self._stopped:
                    self._cond.wait()
                if self._stopped or not self._queue:
                    return
                arr = self._queue[0]
            try:
                self._stdin.write(memoryview(arr).cast("B"))
            except BaseException as exc:  # noqa: BLE001 - reported by the writer's next write() or close()
                with self._cond:
                    if not self._stopped:
                        self.error = exc
                    self._queue.clear()
                    self._bytes = 0
                    self._cond.notify_all()
                return
            with self._cond:
                if self._queue and self._queue[0] is arr:  # else stop() dropped the queue meanwhile
                    self._queue.popleft()
                    self._bytes -= arr.nbytes
                self._cond.notify_all()
            del arr  # the frames are freed now, not when the next array arrives


class VideoWriter:
    """Encode RGB frames to H.264 MP4 with one running ffmpeg, optionally muxing an audio file as AAC.

    Encoding runs off the caller's thread: :meth:`write` queues the array and returns, and a writer
    thread pipes the queued frames into ffmpeg's stdin as raw rgb24. The array is kept, not copied,
    until it is piped: do not modify it after handing it over. The queue holds at most
    ``queue_bytes`` of frames (queued plus being piped; one larger write is taken when nothing else
    is pending); :meth:`write` blocks while it is full, so memory stays bounded for any length. An
    encoder failure (ffmpeg exited, broken pipe, disk full) is raised by the next :meth:`write` or
    by :meth:`close` as :class:`MediaToolError`, with ffmpeg's stderr in the log.

    The output is written to a hidden temporary file next to ``path`` and renamed on a successful
    :meth:`close` (which first waits for the queue to drain), so ``path`` never holds a partial
    video. :meth:`abort` drops the queued frames, kills ffmpeg, ends the thread and removes the
    partial file; so does the finalizer of a writer dropped without close(). As a context manager it
    closes on success and aborts on any exception (including KeyboardInterrupt / cancellation).

    ``audio_path`` should already be trimmed to ``num_frames / fps``; the
    output is additionally cut with ``-shortest`` and, if given, ``-t duration``.
    Its sample rate and channels are kept (the rate must be one AAC takes:
    ``infinitetalk.audio.AAC_SAMPLE_RATES``); any PCM or float WAV works.
    """

    def __init__(
        self,
        path: PathLike,
        width: int,
        height: int,
        fps: float = 25,
        crf: int = DEFAULT_CRF,
        audio_path: PathLike | None = None,
        duration: float | None = None,
        preset: str = DEFAULT_PRESET,
        audio_bitrate: str = DEFAULT_AUDIO_BITRATE,
        queue_bytes: int = WRITER_QUEUE_BYTES,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"VideoWriter needs a positive even width and height for yuv420p, got {width}x{height}")
        if not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be positive, got {fps!r}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {crf}")
        if queue_bytes <= 0:
            raise ValueError(f"queue_bytes must be positive, got {queue_bytes}")
        if audio_path is not None and not Path(audio_path).is_file():
            raise FileNotFoundError(f"audio file {audio_path} does not exist")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.frames_written = 0  # frames handed over by write() (queued or already piped)
        self._tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.{id(self):x}.partial")
        self._stderr = tempfile.TemporaryFile()
        self._lock = threading.Lock()
        self._done = False
        self._aborted = False
        cmd = self._command(crf, preset, audio_path, audio_bitrate, duration)
        logger.debug("starting ffmpeg: %s", cmd)
        self._proc: subprocess.Popen[bytes] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        assert self._proc.stdin is not None
        self._feeder = _FrameFeeder(self._proc.stdin, queue_bytes, name=f"VideoWriter {self.path.name}")
        self._finalizer = weakref.finalize(self, VideoWriter._cleanup, self._feeder, self._proc, self._tmp_path)

    def _command(
        self, crf: int, preset: str, audio_path: PathLike | None, audio_bitrate: str, duration: float | None
    ) -> list[str]:
        cmd = [_tool("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}"]
        cmd += ["-framerate", _rate_str(self.fps), "-i", "pipe:0"]
        if audio_path is not None:
            cmd += ["-i", str(audio_path), "-map", "0:v:0", "-map", "1:a:0"]
        cmd += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p"]
        cmd += ["-r", _rate_str(self.fps)]
        if audio_path is not None:
            cmd += ["-c:a", "aac", "-b:a", audio_bitrate, "-shortest"]
        if duration is not None:
            cmd += ["-t", f"{duration:.6f}"]
        cmd += ["-movflags", "+faststart", "-f", "mp4", str(self._tmp_path)]
        return cmd

    @staticmethod
    def _cleanup(feeder: _FrameFeeder, proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
        """Stop the thread and ffmpeg, remove the partial file (abort, and the finalizer of a dropped writer)."""
        feeder.stop()
        if proc.poll() is None:
            proc.kill()  # breaks the pipe under a write in progress
        feeder.join()
        _kill(proc)
        tmp_path.unlink(missing_ok=True)

    def write(self, frames: np.ndarray) -> None:
        """Queue frames for encoding: uint8 array [N, H, W, 3] (or one frame [H, W, 3]).

        Returns once the array is queued (blocks while the queue is full). The array is kept until
        it is piped to ffmpeg: the caller must not modify it afterwards.
        """
        if self._done:
            raise RuntimeError("VideoWriter is already closed")
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 [N, {self.height}, {self.width}, 3], got {arr.dtype} {list(arr.shape)}"
            )
        if arr.shape[0] == 0:
            return
        if not self._feeder.put(np.ascontiguousarray(arr)):
            self._raise_failure()
        self.frames_written += arr.shape[0]

    def flush(self) -> None:
        """Wait until every frame written so far is piped into ffmpeg (which may still be encoding the
        last of them); MediaToolError if the encoder failed."""
        self._feeder.drain()
        if self._feeder.error is not None:
            self._raise_failure()

    def _raise_failure(self) -> None:
        """The writer thread ended early: abort and raise the encoder's error (its stderr goes to the log)."""
        error = self._feeder.error
        if error is None:  # stopped by abort(), from another thread
            raise MediaToolError("the video writer was aborted; no output was written")
        try:
            self._proc.wait(timeout=10)  # the pipe broke: ffmpeg is exiting
        except subprocess.TimeoutExpired:
            pass
        logger.error("ffmpeg exited while encoding %s (rc %s): %s", self.path, self._proc.returncode,
                     _read_tail(self._stderr))
        self.abort()
        rc = self._proc.returncode
        raise MediaToolError(f"video encoder stopped unexpectedly (ffmpeg exit code {rc})") from error

    def close(self) -> Path:
        """Wait for the queued frames, finish encoding, move the file into place; MediaToolError on failure."""
        with self._lock:
            if self._aborted:
                raise MediaToolError("the video writer was aborted; no output was written")
            if self._done:
                return self.path
            self._done = True
        try:
            if self.frames_written == 0:
                raise MediaToolError("no frames were written to the video")
            self._feeder.finish()
            if self._feeder.error is not None:
                self._raise_failure()
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            rc = self._proc.wait()
            if rc != 0 or not self._tmp_path.is_file():
                logger.error("ffmpeg failed writing %s (rc %s): %s", self.path, rc, _read_tail(self._stderr))
                raise MediaToolError(f"video encoding failed (ffmpeg exit code {rc})")
            os.replace(self._tmp_path, self.path)
        except BaseException:  # also an interrupt while waiting for the encoder: nothing may be left behind
            self._abort_now()
            raise
        self._stderr.close()
        self._finalizer.detach()
        return self.path

    def abort(self) -> None:
        """Drop the queued frames, kill ffmpeg, end the thread, delete the partial output (safe to call
        more than once, and from another thread)."""
        with self._lock:
            self._done = True
            self._aborted = True
        self._abort_now()

    def _abort_now(self) -> None:
        self._aborted = True
        VideoWriter._cleanup(self._feeder, self._proc, self._tmp_path)
        if not self._stderr.closed:
            self._stderr.close()
        self._finalizer.detach()

    @property
    def pid(self) -> int:
        """ffmpeg's process id (for tests and diagnostics)."""
        return self._proc.pid

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _rate_str(fps: float) -> str:
    """ffmpeg rate string; exact for common NTSC rates."""
    frac = Fraction(fps).limit_denominator(1001)
    return f"{frac.numerator}/{frac.denominator}"


# --------------------------------------------------------------------------- audio / test helpers


def write_wav(path: PathLike, samples: np.ndarray, sr: int) -> Path:
    """Write float samples in [-1, 1] ([N] mono or [N, C]) as 16-bit PCM WAV (clipped)."""
    arr = np.asarray(samples, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"samples must be [N] or [N, C], got shape {list(arr.shape)}")
    pcm = np.clip(np.rint(np.nan_to_num(arr) * 32767.0), -32768, 32767).astype("<i2")
    out = Path(path)
    with wave.open(str(out), "wb") as wav:
        wav.setnchannels(arr.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(int(sr))
        wav.writeframes(pcm.tobytes())
    return out


__all__ = [
    "DEFAULT_CRF",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "MediaInfo",
    "MediaToolError",
    "VideoFrameReader",
    "VideoWriter",
    "WRITER_QUEUE_BYTES",
    "check_duration",
    "load_image",
    "probe",
    "probe_and_load",
    "run_ffprobe",
    "to_rgb",
    "write_wav",
]
