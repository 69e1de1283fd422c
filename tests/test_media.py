"""Tests of infinitetalk.media: probing, safe image loading, frame reading, H.264/AAC writing.

All inputs are generated in tmp dirs (Pillow, numpy, ffmpeg). Needs ffmpeg/ffprobe on PATH.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
import wave
import weakref
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from decoding import decode_frames, ffprobe_streams  # tests/ is on sys.path for test modules
from infinitetalk.errors import InputError
from infinitetalk.media import (
    DEFAULT_MAX_PIXELS,
    MediaToolError,
    VideoFrameReader,
    VideoWriter,
    check_duration,
    load_image,
    probe,
    write_wav,
)
from leaks import ffmpeg_children, writer_threads

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

SRC_FPS = 30
SRC_FRAMES = 60  # 2 s at 30 fps


# --------------------------------------------------------------------------- helpers


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _level(i: int) -> int:
    """Grey level that encodes source frame index i."""
    return 8 + 3 * i


def _index_of(img: Image.Image) -> int:
    return int(round((np.asarray(img, dtype=np.float64).mean() - 8) / 3))


def _indexed_video(path: Path, fps: int = SRC_FPS, frames: int = SRC_FRAMES, extra: tuple[str, ...] = ()) -> Path:
    """Flat grey video whose frame i has level 8 + 3i (lossless H.264)."""
    h, w = 32, 48
    raw = np.concatenate([np.full((1, h, w, 3), _level(i), np.uint8) for i in range(frames)])
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
         "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-qp", "0",
         "-pix_fmt", "yuv444p", *extra, str(path)],
        input=raw.tobytes(), check=True,
    )  # fmt: skip
    return path


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR is patched to declare width x height (CRC fixed)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGB", (10, 200, 30), (10, 200, 30)),
        ("L", 128, (128, 128, 128)),
        ("1", 1, (255, 255, 255)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white background
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("LA", (0, 128), (128, 128, 128)),  # black at 50% alpha over white
    ],
)
def test_load_image_modes_png(tmp_path: Path, mode: str, colour: object, expected: tuple[int, int, int]) -> None:
    path = tmp_path / "img"
    Image.new(mode, (80, 70), colour).save(path, "PNG")  # type: ignore[arg-type]
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (80, 70)
    assert np.abs(np.asarray(img)[5, 5].astype(int) - np.array(expected)).max() <= 1


def test_load_image_palette_with_and_without_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (80, 80), 0)
    p.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    p.save(tmp_path / "opaque.png")
    p.save(tmp_path / "transparent.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "opaque.png"))[0, 0].tolist() == [0, 0, 255]
    assert np.asarray(load_image(tmp_path / "transparent.png"))[0, 0].tolist() == [255, 255, 255]


def test_load_image_16bit_grey_png(tmp_path: Path) -> None:
    arr = np.full((70, 90), 40000, np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB"
    assert np.asarray(img)[0, 0].tolist() == [round(40000 / 257)] * 3


def test_load_image_16bit_rgb_png(tmp_path: Path) -> None:
    path = tmp_path / "rgb48.png"
    _ffmpeg("-f", "lavfi", "-i", "color=c=0x3366CC:s=96x64", "-frames:v", "1", "-pix_fmt", "rgb48be", str(path))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (96, 64)
    assert np.abs(np.asarray(img)[10, 10].astype(int) - [0x33, 0x66, 0xCC]).max() <= 4  # lavfi colour goes through YUV


def test_load_image_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (100, 80), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    img = load_image(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(img)[40, 50].astype(int)
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60  # red


def test_load_image_exif_rotation(tmp_path: Path) -> None:
    arr = np.zeros((80, 120, 3), np.uint8)
    arr[:, :60] = (255, 0, 0)  # stored: left red, right blue
    arr[:, 60:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", "JPEG", exif=exif, quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.size == (80, 120)
    top, bottom = np.asarray(img)[10, 40].astype(int), np.asarray(img)[110, 40].astype(int)
    assert top[0] > 200 and top[2] < 60, top  # left side became the top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    info = probe(tmp_path / "rot.jpg")
    assert (info.width, info.height) == (80, 120)


def test_load_image_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (70, 70), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    img = load_image(tmp_path / "anim.gif")
    assert np.asarray(img)[0, 0].tolist() == [255, 0, 0]
    assert probe(tmp_path / "anim.gif").kind == "image"


def test_decompression_bomb_rejected_fast(tmp_path: Path) -> None:
    path = _png_declaring(tmp_path / "bomb.png", 30000, 30000)
    for fn in (load_image, probe):
        start = time.monotonic()
        with pytest.raises(InputError) as err:
            fn(path)
        assert time.monotonic() - start < 1.0
        msg = str(err.value)
        assert str(DEFAULT_MAX_PIXELS) in msg and "\n" not in msg and "Traceback" not in msg


def test_custom_max_pixels_and_min_side(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="19999 pixels"):
        load_image(tmp_path / "a.png", max_pixels=19999)
    assert load_image(tmp_path / "a.png", max_pixels=20000).size == (200, 100)
    with pytest.raises(InputError, match="minimum side is 128"):
        load_image(tmp_path / "a.png", min_side=128)
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="too small"):
        load_image(tmp_path / "small.png")


@pytest.mark.parametrize("kind", ["empty", "truncated_jpeg", "text_png", "missing", "random_bytes"])
def test_bad_files_raise_input_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        rng = np.random.default_rng(0)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        path = tmp_path / "trunc.jpg"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "text_png":
        path.write_text("this is not an image\nreally not\n")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(1).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    for fn in (probe, load_image):
        with pytest.raises(InputError) as err:
            fn(path)
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_truncated_mp4_rejected(testsrc_videos: dict[str, Path], tmp_path: Path) -> None:
    data = testsrc_videos["noaudio"].read_bytes()  # moov atom at the end (no faststart)
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        probe(path)


def test_huge_video_frames_rejected(testsrc_videos: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="maximum is 1000 pixels"):
        VideoFrameReader(testsrc_videos["noaudio"], max_pixels=1000)


def test_vfr_source_frame_at(tmp_path: Path) -> None:
    """Variable frame rate: re-timed on the average-rate grid, so the frame is right within one grid tick."""
    times = [0.0, 0.1, 0.5, 0.6, 1.0]  # frame i is shown during [times[i], times[i + 1])
    lst = tmp_path / "list.txt"
    lines = []
    for i, t_next in enumerate(times[1:]):
        Image.new("RGB", (48, 32), (_level(i),) * 3).save(tmp_path / f"f{i}.png")
        lines += [f"file 'f{i}.png'", f"duration {t_next - times[i]:.3f}"]
    lst.write_text("\n".join(lines + [f"file 'f{len(times) - 2}.png'"]) + "\n")
    out = tmp_path / "vfr.mp4"
    _ffmpeg("-f", "concat", "-safe", "0", "-i", str(lst), "-vsync", "vfr", "-c:v", "libx264", "-qp", "0",
            "-pix_fmt", "yuv444p", str(out))  # fmt: skip

    def shown(t: float) -> int:
        return max(i for i in range(len(times) - 1) if times[i] <= max(t, 0.0))

    with VideoFrameReader(out) as reader:
        tick = 1 / reader.fps
        for t in (0.0, 0.05, 0.2, 0.45, 0.55, 0.8, 0.95, 5.0):
            got = _index_of(reader.frame_at(t))
            assert shown(t - tick) <= got <= shown(t + tick), (t, got, reader.fps)
        assert _index_of(reader.frame_at(5.0)) == 3


def test_text_renamed_mp4_rejected(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_text("hello\n" * 100)
    with pytest.raises(InputError):
        probe(path)


# --------------------------------------------------------------------------- probing media


@pytest.fixture(scope="module")
def testsrc_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {
        "noaudio": d / "noaudio",  # no extension on purpose (Cog)
        "withaudio": d / "withaudio.bin",
        "indexed": _indexed_video(d / "indexed.mp4"),
        "indexed_mkv": _indexed_video(d / "indexed.mkv"),
        "wav": d / "tone",
    }
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate={SRC_FPS}:duration=2", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", "-f", "mp4", str(out["noaudio"]))  # fmt: skip
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate={SRC_FPS}:duration=2", "-f", "lavfi", "-i",
            "sine=frequency=440:sample_rate=16000:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-shortest", "-f", "mp4", str(out["withaudio"]))  # fmt: skip
    write_wav(out["wav"], np.sin(np.linspace(0, 100, 16000)).astype(np.float32) * 0.5, 16000)
    return out


def test_probe_image(tmp_path: Path) -> None:
    Image.new("RGB", (120, 90)).save(tmp_path / "x.webp", "WEBP")
    (tmp_path / "x.webp").rename(tmp_path / "x.mp4")  # wrong suffix: content decides
    info = probe(tmp_path / "x.mp4")
    assert (info.kind, info.width, info.height, info.has_video, info.has_audio) == ("image", 120, 90, True, False)
    assert info.codec == "webp"


def test_probe_video_without_audio(testsrc_videos: dict[str, Path]) -> None:
    info = probe(testsrc_videos["noaudio"])
    assert info.kind == "video" and info.has_video and not info.has_audio
    assert (info.width, info.height) == (64, 48)
    assert info.fps == pytest.approx(SRC_FPS)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert info.num_frames == 60 and info.codec == "h264"


def test_probe_video_with_audio_and_wav(testsrc_videos: dict[str, Path]) -> None:
    info = probe(testsrc_videos["withaudio"])
    assert info.kind == "video" and info.has_audio
    wav = probe(testsrc_videos["wav"])
    assert wav.kind == "audio" and not wav.has_video and wav.width is None
    assert wav.duration == pytest.approx(1.0, abs=0.01)


def test_check_duration(testsrc_videos: dict[str, Path]) -> None:
    info = probe(testsrc_videos["noaudio"])
    check_duration(info, 10)
    with pytest.raises(InputError, match="maximum is 1.5 s"):
        check_duration(info, 1.5)
    with VideoFrameReader(testsrc_videos["noaudio"]) as reader, pytest.raises(InputError):
        reader.check_duration(1.0)


# --------------------------------------------------------------------------- frame reader


@pytest.mark.parametrize("name", ["indexed", "indexed_mkv"])
def test_frame_at_maps_time_to_source_frame(testsrc_videos: dict[str, Path], name: str) -> None:
    with VideoFrameReader(testsrc_videos[name]) as reader:
        assert reader.fps == pytest.approx(SRC_FPS)
        assert _index_of(reader.first_frame()) == 0
        for t in (0.0, 0.01, 1 / 30 - 1e-3, 1 / 30, 0.5, 1.0, 1.49, 1.99, 2.5, 100.0, 0.2):
            expected = min(int(np.floor(t * SRC_FPS + 1e-6)), SRC_FRAMES - 1)
            img = reader.frame_at(t)
            assert img.mode == "RGB" and img.size == (48, 32)
            assert _index_of(img) == expected, (t, expected)


def test_frame_at_output_grid_25fps_is_sequential(testsrc_videos: dict[str, Path], monkeypatch) -> None:
    """Chunk starts at output frames 0, 72, 144... (25 fps) on a 30 fps source: one decoder start."""
    starts: list[int] = []
    original = VideoFrameReader._start

    def counting(self: VideoFrameReader, index: int) -> None:
        starts.append(index)
        original(self, index)

    monkeypatch.setattr(VideoFrameReader, "_start", counting)
    with VideoFrameReader(testsrc_videos["indexed"]) as reader:
        for k in range(0, 50, 7):  # output frames at 25 fps
            t = k / 25
            assert _index_of(reader.frame_at(t)) == min(int(np.floor(k * SRC_FPS / 25 + 1e-6)), SRC_FRAMES - 1)
    assert starts == [0]


def test_frame_reader_rejects_image(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "i.png")
    with pytest.raises(InputError, match="not a video"):
        VideoFrameReader(tmp_path / "i.png")


def test_frame_reader_close_reaps_process(testsrc_videos: dict[str, Path]) -> None:
    reader = VideoFrameReader(testsrc_videos["indexed"])
    reader.frame_at(0.3)
    proc = reader._proc
    assert proc is not None and proc.poll() is None
    reader.close()
    assert proc.returncode is not None


# --------------------------------------------------------------------------- writer


def _frames(n: int, w: int = 64, h: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def test_video_writer_h264_aac(tmp_path: Path) -> None:
    n, fps = 50, 25
    wav = write_wav(tmp_path / "a.wav", 0.3 * np.sin(np.arange(int(16000 * n / fps)) / 5).astype(np.float32), 16000)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 64, 48, fps=fps, audio_path=wav, duration=n / fps) as writer:
        writer.write(_frames(20))
        writer.write(_frames(30))
        writer.write(_frames(1)[0][None][:0])  # empty batch is a no-op
    info = ffprobe_streams(out)
    v, a = info["video"], info["audio"]
    assert v["codec"] == "h264" and v["pix_fmt"] == "yuv420p" and (v["width"], v["height"]) == (64, 48)
    assert v["fps"] == pytest.approx(25) and v["nb_frames"] == n
    assert v["duration"] == pytest.approx(n / fps, abs=1 / fps)
    assert a["codec"] == "aac"
    assert abs(a["duration"] - v["duration"]) <= 1 / fps
    assert not list(tmp_path.glob(".*partial"))
    # faststart: moov before mdat
    head = out.read_bytes()
    assert head.find(b"moov") < head.find(b"mdat")


@pytest.mark.parametrize(("rate", "channels"), [(48000, 2), (44100, 1), (96000, 2)])
def test_video_writer_keeps_the_audio_rate_and_channels(tmp_path: Path, rate: int, channels: int) -> None:
    """A float WAV is muxed at its own rate and channel count (no -ar/-ac), as long as the video."""
    import soundfile as sf

    t = np.arange(rate) / rate
    wav = np.stack([0.3 * np.sin(2 * np.pi * (300 + 200 * c) * t) for c in range(channels)], axis=1)
    sf.write(str(tmp_path / "a.wav"), wav.astype(np.float32), rate, subtype="FLOAT")
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 64, 48, fps=25, audio_path=tmp_path / "a.wav", duration=1.0) as writer:
        writer.write(_frames(25))
    a = ffprobe_streams(out)["audio"]
    assert (a["codec"], a["sample_rate"], a["channels"]) == ("aac", rate, channels)
    assert a["duration"] == pytest.approx(1.0, abs=1 / 25)


def test_video_writer_trims_long_audio(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "long.wav", np.zeros(16000 * 5, np.float32), 16000)
    out = tmp_path / "trim"
    with VideoWriter(out, 64, 48, fps=25, audio_path=wav, duration=1.0) as writer:
        writer.write(_frames(25))
    info = ffprobe_streams(out)
    assert info["format_duration"] == pytest.approx(1.0, abs=1 / 25 + 0.03)
    assert abs(info["audio"]["duration"] - info["video"]["duration"]) <= 1 / 25


def test_video_writer_no_audio(tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    with VideoWriter(out, 32, 32, fps=25) as writer:
        writer.write(_frames(10, 32, 32))
    info = ffprobe_streams(out)
    assert info["audio"] is None and info["video"]["nb_frames"] == 10


def test_video_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "aborted.mp4"
    writer = VideoWriter(out, 64, 48)
    writer.write(_frames(10))
    pid = writer.pid
    writer.abort()
    writer.abort()  # idempotent
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert writer._proc.returncode is not None  # reaped: no zombie
    assert not Path(f"/proc/{pid}").exists() or "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


class _Cancelled(BaseException):
    pass


def test_video_writer_context_aborts_on_base_exception(tmp_path: Path) -> None:
    out = tmp_path / "cancel.mp4"
    with pytest.raises(_Cancelled):
        with VideoWriter(out, 64, 48) as writer:
            writer.write(_frames(5))
            raise _Cancelled()
    assert list(tmp_path.iterdir()) == []
    assert writer._proc.returncode is not None


def test_video_writer_failure_is_clear(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_audio = tmp_path / "notaudio.wav"
    bad_audio.write_text("not audio at all\n")
    out = tmp_path / "fail.mp4"
    writer = VideoWriter(out, 64, 48, audio_path=bad_audio)
    with pytest.raises(MediaToolError) as err:
        try:
            writer.write(_frames(5))
        finally:
            writer.close()
    assert "\n" not in str(err.value) and "Invalid" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    assert any("notaudio" in r.getMessage() or "Invalid" in r.getMessage() for r in caplog.records)


def test_video_writer_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "o.mp4", 63, 48)
    with VideoWriter(tmp_path / "o.mp4", 64, 48) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((1, 48, 64, 3), np.float32))
        with pytest.raises(ValueError):
            writer.write(np.zeros((1, 40, 64, 3), np.uint8))
        writer.write(_frames(2))
    assert (tmp_path / "o.mp4").exists()


def _returns_within(seconds: float, fn, *args) -> bool:
    """Run ``fn(*args)`` in a helper thread: whether it returned within ``seconds`` (it may go on running)."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def _wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_video_writer_write_does_not_wait_for_the_encoder_and_blocks_when_full(tmp_path: Path) -> None:
    """With ffmpeg stopped (no frame is encoded), writes return while the queue has room, and the
    next one waits once the queue holds ``queue_bytes``: the encoder is off the caller's path and
    memory stays bounded. Resumed, every frame arrives in order."""
    dark, bright = np.full((20, 48, 64, 3), 40, np.uint8), np.full((20, 48, 64, 3), 200, np.uint8)
    assert dark.nbytes > 65536  # more than a pipe holds: a synchronous write could not return
    out = tmp_path / "queued.mp4"
    writer = VideoWriter(out, 64, 48, queue_bytes=2 * dark.nbytes)
    os.kill(writer.pid, signal.SIGSTOP)
    try:
        assert _returns_within(2.0, writer.write, dark)
        assert _returns_within(2.0, writer.write, bright)  # held: one being piped, one queued
        third = threading.Thread(target=writer.write, args=(dark,), daemon=True)
        third.start()
        third.join(1.0)
        assert third.is_alive(), "the queue is full: write() must wait for the encoder"
        assert writer.frames_written == 40
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    third.join(30)
    assert not third.is_alive() and writer.frames_written == 60
    writer.close()
    levels = np.frombuffer(decode_frames(out), np.uint8).reshape(60, -1).mean(axis=1)
    assert np.allclose(levels, [40] * 20 + [200] * 20 + [40] * 20, atol=2), levels
    assert not writer_threads()


@pytest.mark.parametrize("reported_by", ["write", "close"])
def test_video_writer_encoder_death_mid_stream_is_clear(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reported_by: str
) -> None:
    out = tmp_path / "died.mp4"
    writer = VideoWriter(out, 64, 48)
    writer.write(_frames(20))
    writer.flush()
    os.kill(writer.pid, signal.SIGKILL)
    assert _wait_until(lambda: psutil.Process(writer.pid).status() == psutil.STATUS_ZOMBIE)
    writer.write(_frames(20))  # queued: the thread finds the broken pipe
    with pytest.raises(MediaToolError) as err:
        if reported_by == "write":
            assert _wait_until(lambda: not writer_threads())
            writer.write(_frames(1))
        else:
            writer.close()
    assert str(err.value) == "video encoder stopped unexpectedly (ffmpeg exit code -9)"
    assert any("ffmpeg exited while encoding" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.iterdir()) == []
    assert not writer_threads() and not ffmpeg_children()
    with pytest.raises(MediaToolError, match="aborted"):
        writer.close()


class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [_Boom, _Cancelled])
def test_video_writer_exception_mid_video_aborts_at_once(tmp_path: Path, error: type[BaseException]) -> None:
    """An exception (or a BaseException: cancellation) with a full queue that ffmpeg could never encode
    (stopped): the queued frames are dropped (freed, though the writer lives on), nothing waits for
    them, nothing is left behind."""
    batches = [_frames(20), _frames(20)]
    freed = [weakref.ref(b) for b in batches]
    with pytest.raises(error):
        with VideoWriter(tmp_path / "x.mp4", 64, 48, queue_bytes=2 * batches[0].nbytes) as writer:
            os.kill(writer.pid, signal.SIGSTOP)
            for batch in batches:
                writer.write(batch)
            del batches, batch
            assert all(ref() is not None for ref in freed)  # held by the writer
            start = time.monotonic()
            raise error()
    assert time.monotonic() - start < 5.0
    assert all(ref() is None for ref in freed)
    assert list(tmp_path.iterdir()) == []
    assert not writer_threads() and not ffmpeg_children()
    assert writer._proc.returncode is not None


def test_video_writer_dropped_without_close_cleans_up(tmp_path: Path) -> None:
    """The thread holds no reference to the writer: dropping it runs the finalizer, which stops the
    thread and ffmpeg (stopped, with frames queued) and removes the partial file."""
    batch = _frames(20)
    writer = VideoWriter(tmp_path / "dropped.mp4", 64, 48, queue_bytes=2 * batch.nbytes)
    os.kill(writer.pid, signal.SIGSTOP)
    writer.write(batch)
    writer.write(batch)
    assert writer_threads() and ffmpeg_children()
    start = time.monotonic()
    del writer
    gc.collect()
    assert time.monotonic() - start < 5.0
    assert not writer_threads() and not ffmpeg_children()
    assert list(tmp_path.iterdir()) == []


def test_video_writer_output_is_the_synchronous_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of every shape through a small queue (blocking, one write larger than the queue, a
    non-contiguous array) give the very file ffmpeg makes from the same frames piped in one go."""
    commands: list[list[str]] = []
    command = VideoWriter._command

    def recording(self: VideoWriter, *args: object) -> list[str]:
        commands.append(command(self, *args))  # type: ignore[arg-type]
        return commands[-1]

    monkeypatch.setattr(VideoWriter, "_command", recording)
    frames = _frames(60)
    wav = write_wav(tmp_path / "a.wav", 0.3 * np.sin(np.arange(16000 * 60 // 25) / 7).astype(np.float32), 16000)
    out = tmp_path / "threaded.mp4"
    with VideoWriter(out, 64, 48, audio_path=wav, duration=60 / 25, queue_bytes=3 * frames[0].nbytes) as writer:
        writer.write(frames[0])  # one frame [H, W, 3]
        for a, b in ((1, 3), (3, 10), (10, 11)):
            writer.write(frames[a:b])
        writer.write(np.asfortranarray(frames[11:30]))  # not C-contiguous, larger than the queue
        writer.write(frames[30:60])
    reference = [*commands[0][:-1], str(tmp_path / "reference.mp4")]
    subprocess.run(reference, input=frames.tobytes(), check=True)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (out, tmp_path / "reference.mp4")]
    assert digest[0] == digest[1]
    assert ffprobe_streams(out)["video"]["nb_frames"] == 60


def test_write_wav_roundtrip(tmp_path: Path) -> None:
    samples = np.array([0.0, 0.5, -0.5, 1.5, -2.0], np.float32)
    write_wav(tmp_path / "x.wav", samples, 16000)
    with wave.open(str(tmp_path / "x.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        data = np.frombuffer(w.readframes(5), "<i2")
    assert data.tolist() == [0, 16384, -16384, 32767, -32768]


@pytest.mark.parametrize("claimed_frames", [100, 5000])
def test_frame_at_when_metadata_overstates_length(testsrc_videos: dict[str, Path], claimed_frames: int) -> None:
    """Past the real end, the real last frame is returned (sequential EOF and seek-past-end paths)."""
    real = probe(testsrc_videos["indexed"])
    fake = dataclasses.replace(real, num_frames=claimed_frames, duration=claimed_frames / SRC_FPS)
    with VideoFrameReader(testsrc_videos["indexed"], info=fake) as reader:
        assert _index_of(reader.frame_at(0.1)) == 3
        assert _index_of(reader.frame_at((claimed_frames - 1) / SRC_FPS)) == SRC_FRAMES - 1
        assert _index_of(reader.frame_at(1.0)) == 30
        assert _index_of(reader.frame_at(1000.0)) == SRC_FRAMES - 1
