"""The pipeline's progress display (``pipeline._Progress``): tqdm bars on a terminal, plain log lines
anywhere else (servers, log files), nothing when not shown; the callback gets every step either way."""

from __future__ import annotations

import io
import logging
import sys
from types import SimpleNamespace

import torch

from infinitetalk import pipeline


def _run(show: bool, steps: int = 3, chunks: int = 2) -> list:
    """Drive _Progress through ``chunks`` chunks of ``steps`` steps, as the chunk loop does; the events."""
    events: list = []
    job = SimpleNamespace(timesteps=torch.zeros(steps + 1), plan=SimpleNamespace(num_chunks=chunks), frames_done=0,
                          total_frames=chunks * 81 - (chunks - 1) * 9, timings={})
    pipe = SimpleNamespace(device=torch.device("cpu"), parallel=None)
    progress = pipeline._Progress(pipe, events.append, job, show)
    cache = SimpleNamespace(skipped=None)
    try:
        for k in range(chunks):
            progress.chunk_started(k)
            for i in range(steps):
                progress.on_step(i, steps, None)
            progress.sampled()
            job.frames_done += 81 if k == 0 else 72
            progress.chunk_done(cache)
    finally:
        progress.close()
    return events


def _stderr(monkeypatch, terminal: bool) -> io.StringIO:
    """A stderr that is (or is not) a terminal. Set in the test's body: pytest's output capture puts its
    own stream back into sys.stderr when the test's call phase starts."""
    stream = io.StringIO()
    stream.isatty = lambda: terminal
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_off_a_terminal_progress_is_plain_log_lines(monkeypatch, caplog):
    stderr = _stderr(monkeypatch, terminal=False)
    caplog.set_level(logging.INFO, logger="infinitetalk.pipeline")
    events = _run(show=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "infinitetalk.pipeline"]
    assert lines[:4] == ["chunk 1/2, step 1/3", "chunk 1/2, step 2/3", "chunk 1/2, step 3/3",
                         lines[3]] and lines[3].startswith("chunk 1/2 done: 3.24 s of 6.12 s video in ")
    assert lines[4:7] == ["chunk 2/2, step 1/3", "chunk 2/2, step 2/3", "chunk 2/2, step 3/3"]
    assert lines[7].startswith("chunk 2/2 done: 6.12 s of 6.12 s video in ") and len(lines) == 8
    assert stderr.getvalue() == ""  # no bar was drawn
    assert len(events) == 2 * (3 + 1)  # every step, then the chunk's last step again once it is written


def test_on_a_terminal_progress_is_tqdm_bars(monkeypatch, caplog):
    stderr = _stderr(monkeypatch, terminal=True)
    caplog.set_level(logging.INFO, logger="infinitetalk.pipeline")
    events = _run(show=True)
    assert not [r for r in caplog.records if r.name == "infinitetalk.pipeline"]
    assert "chunks: 100%" in stderr.getvalue() and "\r" in stderr.getvalue()
    assert len(events) == 8


def test_not_shown_is_silent_but_still_reported(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="infinitetalk.pipeline")
    for terminal in (False, True):
        stderr = _stderr(monkeypatch, terminal)
        assert len(_run(show=False)) == 8
        assert stderr.getvalue() == ""
    assert not [r for r in caplog.records if r.name == "infinitetalk.pipeline"]
