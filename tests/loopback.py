"""Helpers shared by the tests that start real servers on loopback (cog's HTTP server, the RunPod
worker): free ports, data URLs, leftover checks and a process-group stop that nothing outlives."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def ffmpeg_descendants(root_pid: int | None = None) -> list[int]:
    """Live ffmpeg processes below ``root_pid`` (default: this process)."""
    import psutil

    out = []
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if "ffmpeg" in child.name() and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def stop_process_group(proc: subprocess.Popen, polite: Callable[[], None] | None = None) -> None:
    """Ask ``proc`` to stop (``polite``, else SIGTERM), then SIGKILL its whole process group."""
    if proc.poll() is None:
        if polite is not None:
            try:
                polite()
            except OSError:
                pass
        else:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    try:
        os.killpg(proc.pid, 9)  # the server's workers and any ffmpeg: nothing outlives the test
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
