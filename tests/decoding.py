"""Decoding helper shared by the tests that compare produced videos frame by frame."""

from __future__ import annotations

import subprocess
from pathlib import Path


def decode_frames(path: Path) -> bytes:
    """All frames of ``path`` as raw rgb24 bytes (ffmpeg decode)."""
    res = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v:0",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True)
    assert len(res.stdout) > 0
    return res.stdout
