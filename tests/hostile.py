"""Hostile input files, generated on the spot (nothing binary is checked in).

``make_corpus(folder, portrait, speech)`` writes every file and returns ``{name: path}``. The files
are what a public API receives: empty, truncated, mislabelled, oversized, odd colour modes and
layouts, odd audio layouts and values, and containers missing the stream they are used for.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (8-bit gray): a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)  # far too little data: only the header may be trusted
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def make_corpus(folder: Path, portrait: Path, speech: Path) -> dict[str, Path]:
    import soundfile as sf
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        out[name] = path
        return path

    photo = Image.open(portrait).convert("RGB").resize((128, 128))
    wav, sr = sf.read(str(speech), dtype="float32")

    put("zero.png", b"")
    put("zero.wav", b"")
    png = folder / "full.png"
    photo.save(png)
    put("truncated.png", png.read_bytes()[: png.stat().st_size // 2])
    jpg = folder / "full.jpg"
    photo.save(jpg, quality=90)
    put("truncated.jpg", jpg.read_bytes()[: jpg.stat().st_size // 2])
    mp3 = folder / "full.mp3"
    _ffmpeg("-i", str(speech), "-c:a", "libmp3lame", "-b:a", "64k", str(mp3))
    put("truncated.mp3", mp3.read_bytes()[: mp3.stat().st_size // 2])
    av = folder / "full.mp4"
    _ffmpeg("-loop", "1", "-framerate", "25", "-i", str(png), "-i", str(speech), "-t", "1",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(av))
    put("truncated.mp4", av.read_bytes()[: av.stat().st_size // 2])
    fs = folder / "faststart.mp4"
    _ffmpeg("-loop", "1", "-framerate", "25", "-i", str(png), "-i", str(speech), "-t", "1", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", "-movflags", "+faststart", str(fs))
    data = fs.read_bytes()
    put("no_frames.mp4", data[: data.index(b"mdat") + 200])  # complete header, the media data cut off
    put("text.png", b"this is not an image, just some text\n" * 20)
    put("text.wav", b"RIFF? no: this is plain text pretending to be a wav file\n" * 20)
    put("bomb_30000x30000.png", png_declaring(30000, 30000))

    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    out["cmyk.jpg"] = folder / "cmyk.jpg"
    gray16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")  # mode I;16
    out["gray16.png"] = folder / "gray16.png"
    wide = photo.resize((128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    wide.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    out["exif_rotated.jpg"] = folder / "exif_rotated.jpg"
    photo.resize((48, 32)).save(folder / "tiny_48x32.png")
    out["tiny_48x32.png"] = folder / "tiny_48x32.png"
    frames = [photo] + [Image.new("RGB", photo.size, c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = folder / "animated.gif"

    sr96 = 96000
    one_s = np.interp(np.arange(sr96) / sr96, np.arange(len(wav)) / sr, wav).astype(np.float32)
    eight = np.stack([one_s * (0.3 + 0.1 * c) for c in range(8)], axis=1)
    sf.write(str(folder / "8ch_96k.wav"), eight, sr96, subtype="PCM_24")
    out["8ch_96k.wav"] = folder / "8ch_96k.wav"
    sf.write(str(folder / "short_0.2s.wav"), wav[: int(0.2 * sr)], sr)
    out["short_0.2s.wav"] = folder / "short_0.2s.wav"
    sf.write(str(folder / "silent.wav"), np.zeros(sr, np.float32), sr)
    out["silent.wav"] = folder / "silent.wav"
    nan = wav[:sr].copy()
    nan[sr // 2] = np.nan
    sf.write(str(folder / "nan_float.wav"), nan, sr, subtype="FLOAT")
    out["nan_float.wav"] = folder / "nan_float.wav"
    inf = wav[:sr].copy()
    inf[sr // 3] = np.inf
    sf.write(str(folder / "inf_float.wav"), inf, sr, subtype="FLOAT")
    out["inf_float.wav"] = folder / "inf_float.wav"
    sf.write(str(folder / "tiny_20ms.wav"), wav[: int(0.02 * sr)], sr)
    out["tiny_20ms.wav"] = folder / "tiny_20ms.wav"

    _ffmpeg("-loop", "1", "-framerate", "25", "-i", str(png), "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(folder / "video_no_audio.mp4"))
    _ffmpeg("-loop", "1", "-framerate", "25", "-i", str(png), "-t", "1", "-vf", "scale=48:32", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", str(folder / "video_48x32.mp4"))
    out["video_48x32.mp4"] = folder / "video_48x32.mp4"
    out["video_no_audio.mp4"] = folder / "video_no_audio.mp4"
    _ffmpeg("-i", str(speech), "-t", "1", "-c:a", "aac", "-f", "mp4", str(folder / "audio_only.mp4"))
    out["audio_only.mp4"] = folder / "audio_only.mp4"
    return out
