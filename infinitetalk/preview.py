"""Watch a video while it is generated: every chunk becomes an HLS segment the moment it is done.

:class:`HLSWriter` receives each chunk's new frames (the arrays the pipeline also hands to the final
encoder) and, on its own thread, encodes them with the chunk's stretch of the soundtrack into one
self-contained fragmented-MP4 piece (H.264 without B-frames + AAC), so nothing waits for the next
chunk (a single running encoder would hold the last frames in its look-ahead until more arrive).
Every piece has the same codec setup, so its header becomes the playlist's one ``init.mp4`` and
its fragments, moved to their place on the video's timeline (``tfdt``), become ``seg-NNNNN.m4s``.
``index.m3u8`` is an HLS EVENT playlist rewritten (atomically) after each segment and closed with
``#EXT-X-ENDLIST``; any HLS player can follow it while it grows (``viewer/index.html``).

:func:`preview_mp4` turns the folder into a progressive MP4 of everything so far without
re-encoding (the fragments joined, then remuxed with ``+faststart``): the Cog predictor's preview
outputs. The final MP4 is encoded separately as always, so previews never change it.

A failure here never fails the generation: the writer logs it, stops and removes its files, and
the video is still produced (``HLSWriter.error`` says why the previews stopped).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .media import MediaToolError, _kill, _rate_str, _read_tail, _tool

logger = logging.getLogger(__name__)

PLAYLIST = "index.m3u8"
INIT = "init.mp4"
#: Encoder settings of the segments: fast (they are previews; the final MP4 is encoded apart) and
#: without B-frames, so a segment's first frame is shown at its own start time.
SEGMENT_PRESET = "veryfast"
SEGMENT_AUDIO_BITRATE = "128k"


@dataclass(frozen=True)
class Segment:
    """One finished segment: its index, and the video now playable (frames and seconds from the start)."""

    index: int
    frames: int
    seconds: float
    folder: Path


@dataclass(frozen=True)
class HLSOutput:
    """Ask :meth:`InfiniteTalkPipeline.generate` for a live HLS folder; ``on_segment`` is called (on the
    writer's thread) after each segment is in the playlist."""

    folder: Path
    on_segment: Callable[[Segment], None] | None = None


# ----------------------------------------------------------------------------------------- MP4 boxes


def _boxes(buf: bytes, start: int = 0, end: int | None = None):
    """(type, offset, size) of the boxes in ``buf[start:end]`` (64-bit sizes too)."""
    end = len(buf) if end is None else end
    off = start
    while off + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, off)
        if size == 1:
            size = struct.unpack_from(">Q", buf, off + 8)[0]
        elif size == 0:
            size = end - off
        if size < 8 or off + size > end:
            raise MediaToolError(f"malformed MP4 box {kind!r} at {off}")
        yield kind.decode("latin-1"), off, size
        off += size


def _children(buf: bytes, off: int, size: int):
    header = 16 if struct.unpack_from(">I", buf, off)[0] == 1 else 8
    return _boxes(buf, off + header, off + size)


def _nested(buf: bytes, *path: str, start: int = 0, end: int | None = None):
    """(offset, size) of every box at ``path`` (e.g. ``"moov", "trak"``) in ``buf[start:end]``."""
    for kind, off, size in _boxes(buf, start, end):
        if kind != path[0]:
            continue
        if len(path) == 1:
            yield off, size
        else:
            for child_off, child_size in _nested_children(buf, off, size, path[1:]):
                yield child_off, child_size


def _nested_children(buf: bytes, off: int, size: int, path: tuple[str, ...]):
    header = 16 if struct.unpack_from(">I", buf, off)[0] == 1 else 8
    return _nested(buf, *path, start=off + header, end=off + size)


def _timescales(init: bytes) -> dict[int, int]:
    """track_ID -> media timescale, from an init segment's ``moov``."""
    scales = {}
    for t_off, t_size in _nested(init, "moov", "trak"):
        (tkhd, _), (mdhd, _) = (next(_nested_children(init, t_off, t_size, path))
                                for path in (("tkhd",), ("mdia", "mdhd")))
        # version 1 boxes carry 64-bit times before the field: track_ID / timescale sit 8 bytes later
        track_id = struct.unpack_from(">I", init, tkhd + (28 if init[tkhd + 8] == 1 else 20))[0]
        scales[track_id] = struct.unpack_from(">I", init, mdhd + (28 if init[mdhd + 8] == 1 else 20))[0]
    return scales


def _split(data: bytes) -> tuple[bytes, bytes]:
    """A fragmented MP4 -> (header: everything before the first ``moof``, the fragments)."""
    for kind, off, _ in _boxes(data):
        if kind == "moof":
            return data[:off], data[off:]
    raise MediaToolError("the segment encoder wrote no fragment")


def _shift(fragments: bytes, offsets: dict[int, int]) -> bytes:
    """Add ``offsets[track_ID]`` ticks to every ``tfdt`` (the fragments' decode times)."""
    buf = bytearray(fragments)
    for t_off, t_size in _nested(buf, "moof", "traf"):
        track_id = None
        for kind, off, _ in _children(buf, t_off, t_size):
            if kind == "tfhd":
                track_id = struct.unpack_from(">I", buf, off + 12)[0]
            elif kind == "tfdt":
                if track_id not in offsets:
                    raise MediaToolError(f"fragment of an unknown track {track_id}")
                wide = buf[off + 8] == 1  # version 1: a 64-bit decode time
                fmt = ">Q" if wide else ">I"
                value = struct.unpack_from(fmt, buf, off + 12)[0] + offsets[track_id]
                if not wide and value >= 2**32:
                    raise MediaToolError("fragment decode time overflows a 32-bit tfdt")
                struct.pack_into(fmt, buf, off + 12, value)
    return bytes(buf)


# ----------------------------------------------------------------------------------------- writer


class HLSWriter:
    """Each :meth:`write` (one chunk's new frames, uint8 ``[N, H, W, 3]``) becomes one HLS segment,
    encoded on the writer's thread. :meth:`write` returns at once (it blocks only while two chunks
    are already waiting); :meth:`close` waits for the last segment and ends the playlist;
    :meth:`abort` stops, kills the encoder and removes every file it wrote. A failure stops the
    previews (logged, kept in :attr:`error`, files removed) but is never raised to the caller."""

    def __init__(self, folder: Path, width: int, height: int, *, fps: float, crf: int, audio_path: Path | None,
                 max_segment_frames: int, on_segment: Callable[[Segment], None] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.width, self.height, self.fps, self.crf = width, height, fps, crf
        self.audio_path = audio_path
        self.target_duration = max(1, math.ceil(max_segment_frames / fps))
        self.on_segment = on_segment
        self.error: BaseException | None = None
        self.segments: list[tuple[str, float]] = []  # (file name, seconds)
        self._frames = 0  # frames handed over by write()
        self._done_frames = 0  # frames in finished segments
        self._init: bytes | None = None
        self._scales: dict[int, int] = {}
        self._written: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name=f"HLSWriter {self.folder.name}", daemon=True)
        self._thread.start()

    # -- caller's side
    def write(self, frames: np.ndarray) -> None:
        if self._stopped or self.error is not None or len(frames) == 0:
            return
        start, self._frames = self._frames, self._frames + len(frames)
        while not self._stopped and self.error is None:
            try:
                self._queue.put((start, frames), timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for the queued segments, then end the playlist (``#EXT-X-ENDLIST``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        if self.error is None and not self._stopped and self.segments:
            self._write_playlist(ended=True)

    def abort(self) -> None:
        """Stop now: drop what is queued, kill the encoder, remove every file written."""
        self._stopped = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put(None)
        self._thread.join(30)
        self._remove_files()

    # -- writer's thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stopped:
                return
            start, frames = item
            try:
                self._segment(start, frames)
            except BaseException as exc:  # noqa: BLE001 - previews stop; the generation goes on
                if self._stopped:
                    return
                self.error = exc
                logger.error("live preview stopped: %s", exc)
                self._remove_files()
                return

    def _segment(self, start: int, frames: np.ndarray) -> None:
        index = len(self.segments)
        data = self._encode(start, frames)
        head, fragments = _split(data)
        if self._init is None:
            self._init, self._scales = head, _timescales(head)
            self._put(INIT, head)
        elif head != self._init:
            raise MediaToolError("the segment encoder changed its codec setup between chunks")
        t0 = start / self.fps
        name = f"seg-{index:05d}.m4s"
        self._put(name, _shift(fragments, {tid: round(t0 * scale) for tid, scale in self._scales.items()}))
        self.segments.append((name, len(frames) / self.fps))
        self._done_frames = start + len(frames)
        self._write_playlist(ended=False)
        if self.on_segment is not None:
            self.on_segment(Segment(index, self._done_frames, self._done_frames / self.fps, self.folder))

    def _encode(self, start: int, frames: np.ndarray) -> bytes:
        arr = np.ascontiguousarray(frames, dtype=np.uint8)
        if arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be uint8 [N, {self.height}, {self.width}, 3], got {list(arr.shape)}")
        n = arr.shape[0]
        fd, tmp = tempfile.mkstemp(prefix=".segment-", suffix=".mp4", dir=self.folder)
        os.close(fd)
        tmp_path = Path(tmp)
        cmd = [_tool("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{self.width}x{self.height}", "-framerate", _rate_str(self.fps), "-i", "pipe:0"]
        if self.audio_path is not None:
            cmd += ["-ss", f"{start / self.fps:.6f}", "-t", f"{n / self.fps:.6f}", "-i", str(self.audio_path),
                    "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", SEGMENT_AUDIO_BITRATE]
        cmd += ["-c:v", "libx264", "-preset", SEGMENT_PRESET, "-crf", str(self.crf), "-pix_fmt", "yuv420p",
                "-bf", "0", "-g", str(n), "-r", _rate_str(self.fps),
                "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
                # No edit lists (a segment's own would apply to the whole playlist) and no shift of the
                # AAC encoder's 1024 priming samples: frame 0 is at 0 exactly, the audio (priming first)
                # too, so the previews' sound lags the picture by those 21-23 ms (the final MP4 does not).
                "-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-use_editlist", "0",
                "-avoid_negative_ts", "disabled", "-f", "mp4", str(tmp_path)]
        with tempfile.TemporaryFile() as stderr:
            try:
                self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)
                assert self._proc.stdin is not None
                try:
                    self._proc.stdin.write(memoryview(arr).cast("B"))
                    self._proc.stdin.close()
                except BrokenPipeError:
                    pass
                rc = self._proc.wait()
                if rc != 0:
                    raise MediaToolError(f"segment encoder failed (ffmpeg exit code {rc}): {_read_tail(stderr)}")
                return tmp_path.read_bytes()
            finally:
                _kill(self._proc)
                self._proc = None
                tmp_path.unlink(missing_ok=True)

    def _put(self, name: str, data: bytes) -> None:
        path = self.folder / name
        tmp = path.with_name(f".{name}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if path not in self._written:
            self._written.append(path)

    def _write_playlist(self, ended: bool) -> None:
        lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{self.target_duration}",
                 "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS",
                 f'#EXT-X-MAP:URI="{INIT}"']
        for name, seconds in self.segments:
            lines += [f"#EXTINF:{seconds:.6f},", name]
        if ended:
            lines.append("#EXT-X-ENDLIST")
        self._put(PLAYLIST, ("\n".join(lines) + "\n").encode())

    def _remove_files(self) -> None:
        for path in self._written:
            path.unlink(missing_ok=True)
        for stray in self.folder.glob(".*.partial"):
            stray.unlink(missing_ok=True)
        self._written.clear()


# ----------------------------------------------------------------------------------------- previews


def playlist_segments(folder: Path) -> list[str]:
    """The segment files ``index.m3u8`` lists now, in order."""
    return [name for name, _ in _listed(folder)]


def _listed(folder: Path) -> list[tuple[str, float]]:
    """(segment file, seconds) as ``index.m3u8`` lists them now."""
    entries, seconds = [], None
    for line in (Path(folder) / PLAYLIST).read_text().splitlines():
        if line.startswith("#EXTINF:"):
            seconds = float(line[len("#EXTINF:"):].split(",")[0])
        elif line and not line.startswith("#"):
            entries.append((line, seconds or 0.0))
    return entries


def preview_mp4(folder: Path, out_path: Path, segments: int | None = None) -> Path:
    """A progressive MP4 (``+faststart``) of the first ``segments`` segments (default: all listed),
    by stream copy: the init and the fragments joined, then remuxed."""
    folder, out_path = Path(folder), Path(out_path)
    listed = _listed(folder)[:segments]
    if not listed:
        raise MediaToolError(f"no segments in {folder / PLAYLIST}")
    names = [name for name, _ in listed]
    seconds = sum(s for _, s in listed)
    fd, joined = tempfile.mkstemp(prefix=".joined-", suffix=".mp4", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write((folder / INIT).read_bytes())
            for name in names:
                out.write((folder / name).read_bytes())
        tmp = out_path.with_name(f".{out_path.name}.partial")
        # -t: each segment's audio starts with the encoder's priming, so the joined audio runs a little
        # past the picture; cut at the picture's length (to the AAC frame).
        cmd = [_tool("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", "-i", joined, "-c", "copy",
               "-t", f"{seconds:.6f}", "-movflags", "+faststart", "-f", "mp4", str(tmp)]
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise MediaToolError(f"preview remux failed: {result.stderr.decode(errors='replace')[-500:]}")
        os.replace(tmp, out_path)
    finally:
        Path(joined).unlink(missing_ok=True)
    return out_path
