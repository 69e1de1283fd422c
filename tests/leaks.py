"""What a finished or cancelled job must not leave behind: encoder threads, ffmpeg children."""

from __future__ import annotations

import threading

import psutil


def writer_threads() -> list[threading.Thread]:
    """Live writer threads of :class:`infinitetalk.media.VideoWriter` and :class:`infinitetalk.preview.HLSWriter`."""
    return [t for t in threading.enumerate() if t.name.startswith(("VideoWriter", "HLSWriter"))]


def ffmpeg_children() -> list[psutil.Process]:
    """This process's ffmpeg descendants that are still running (zombies excluded)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "ffmpeg" in child.name() and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out
