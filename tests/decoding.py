"""Decoding and probing helpers shared by the tests that check produced videos."""

from __future__ import annotations

import math
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

from infinitetalk.media import run_ffprobe


def final_output(outputs) -> Path:
    """The video of a Cog prediction: the last file its output iterator gives (running it to the end)."""
    items = list(outputs)
    assert items, "the prediction gave no output"
    return items[-1]


def decode_frames(path: Path) -> bytes:
    """All frames of ``path`` as raw rgb24 bytes (ffmpeg decode)."""
    res = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v:0",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True)
    assert len(res.stdout) > 0
    return res.stdout


def _rate(rate: str | None) -> float | None:
    try:
        value = float(Fraction(rate)) if rate and rate not in ("0/0", "N/A") else None
    except (ValueError, ZeroDivisionError):
        return None
    return value if value and value > 0 else None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out >= 0 else None


def ffprobe_streams(path: str | Path) -> dict[str, Any]:
    """Summary of a media file: ``{"format_duration", "video": {...}|None, "audio": {...}|None}``.

    ``video`` (the first video stream that is not cover art): codec, width, height, fps, duration,
    nb_frames, pix_fmt. ``audio`` (the first audio stream): codec, sample_rate, channels, duration.
    """
    data = run_ffprobe(Path(path))
    assert data is not None, f"ffprobe cannot read {path}"
    streams = data.get("streams") or []
    videos = [s for s in streams
              if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")]
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    out: dict[str, Any] = {"format_duration": _float((data.get("format") or {}).get("duration")),
                           "video": None, "audio": None}
    if videos:
        v = videos[0]
        nb = v.get("nb_frames")
        out["video"] = {
            "codec": v.get("codec_name"), "width": v.get("width"), "height": v.get("height"),
            "fps": _rate(v.get("avg_frame_rate")) or _rate(v.get("r_frame_rate")),
            "duration": _float(v.get("duration")), "nb_frames": int(nb) if str(nb or "").isdigit() else None,
            "pix_fmt": v.get("pix_fmt"),
        }
    if audios:
        a = audios[0]
        out["audio"] = {"codec": a.get("codec_name"), "sample_rate": int(a.get("sample_rate") or 0),
                        "channels": a.get("channels"), "duration": _float(a.get("duration"))}
    return out
