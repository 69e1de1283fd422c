"""Sequence-parallel generation on the GPUs of one host, started from one process.

:class:`MultiGPUPipeline` (the servers with ``INFINITETALK_NUM_GPUS``, ``python -m infinitetalk
--num-gpus N``): rank 0 is the calling process, ranks 1..N-1 are spawned worker processes that load
their own copy of the pipeline and follow rank 0's jobs through queues. The collectives themselves
(process group, token split, agreeing on seed and stop) are :mod:`infinitetalk.distributed`; the
other way to start the ranks, ``torchrun --nproc-per-node N -m infinitetalk ...``, joins them with
:func:`infinitetalk.distributed.init_from_env`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .distributed import check_num_gpus, init_distributed, shutdown
from .pipeline import InfiniteTalkPipeline

logger = logging.getLogger(__name__)


@dataclass
class PipelineLoader:
    """``loader(device)`` for :class:`MultiGPUPipeline`: ``InfiniteTalkPipeline.from_pretrained``
    with fixed arguments (picklable, so spawned workers can run it)."""

    weights_dir: str
    options: dict

    def __call__(self, device: torch.device):
        return InfiniteTalkPipeline.from_pretrained(self.weights_dir, device=device, **self.options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, device_type: str, init_method: str, loader: Callable, jobs, results) -> None:
    try:
        ctx = init_distributed(rank, world_size, device_type, init_method)
        pipe = loader(ctx.device)
        pipe.enable_sequence_parallel(ctx)
    except BaseException as exc:  # noqa: BLE001 (reported to rank 0)
        results.put((rank, "failed", f"{type(exc).__name__}: {exc}"))
        return
    results.put((rank, "ready", None))
    while True:
        job = jobs.get()
        if job is None:
            break
        try:
            with tempfile.TemporaryDirectory(prefix=f"infinitetalk-rank{rank}-") as tmp:
                pipe.generate(job, Path(tmp) / "unused.mp4", show_progress=False)
            results.put((rank, "done", None))
        except BaseException as exc:  # noqa: BLE001 (rank 0 raises its own error; this is for the log)
            results.put((rank, "error", f"{type(exc).__name__}: {exc}"))
    with contextlib.suppress(Exception):
        shutdown()


class MultiGPUPipeline:
    """An :class:`~infinitetalk.pipeline.InfiniteTalkPipeline` split over ``num_gpus`` GPUs.

    ``loader(device)`` builds one rank's pipeline; it must be picklable (a module-level function or
    a ``functools.partial`` of one) because the workers are spawned processes.  ``generate`` has
    the pipeline's signature: rank 0 (this process) reports progress and writes the video.
    """

    def __init__(self, loader: Callable, num_gpus: int, device_type: str | None = None,
                 ready_timeout: float = 3600.0):
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        check_num_gpus(num_gpus, torch.cuda.device_count() if device_type == "cuda" else None)
        self.num_gpus = num_gpus
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx_mp = mp.get_context("spawn")
        self._results = ctx_mp.Queue()
        self._jobs = [ctx_mp.Queue() for _ in range(1, num_gpus)]
        self._procs = [
            ctx_mp.Process(target=_worker, args=(rank, num_gpus, device_type, init_method, loader,
                                                 self._jobs[rank - 1], self._results), daemon=True)
            for rank in range(1, num_gpus)
        ]
        for p in self._procs:
            p.start()
        self._closed = False
        self._broken = False
        try:
            self.context = init_distributed(0, num_gpus, device_type, init_method)
            self.pipeline = loader(self.context.device)
            self.pipeline.enable_sequence_parallel(self.context)
            self._collect("ready", ready_timeout)
        except BaseException:
            self.close()
            raise
        logger.info("sequence parallel over %d %s devices", num_gpus, device_type)

    def __getattr__(self, name):  # device, dtype, load_timings, turbo_loaded, ...: rank 0's pipeline
        if name == "pipeline":
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def _check_workers(self, timed_out: bool = False) -> None:
        dead = [(rank, p.exitcode) for rank, p in enumerate(self._procs, start=1) if not p.is_alive()]
        if dead or timed_out:
            self._broken = True
            what = f"GPU worker {dead[0][0]} exited (code {dead[0][1]})" if dead else "a GPU worker stopped answering"
            raise RuntimeError(f"{what}; restart the server")

    def _next_result(self, timeout: float):
        """The next worker message; fails fast when a worker process died (killed, crashed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                self._check_workers(timed_out=time.monotonic() > deadline)

    def _collect(self, expect: str, timeout: float) -> list[str]:
        problems = []
        for _ in self._procs:
            rank, status, detail = self._next_result(timeout)
            if status == "failed":
                raise RuntimeError(f"GPU worker {rank} failed to start: {detail}")
            if status != expect:
                problems.append(f"rank {rank}: {detail}")
        return problems

    def generate(self, request, output_path, callback=None, show_progress: bool = True):
        if self._closed or self._broken:
            raise RuntimeError("the multi-GPU pipeline is not running; restart the server")
        self._check_workers()  # a worker killed between predictions (e.g. by the OOM killer)
        for q in self._jobs:  # a missing seed is drawn by rank 0 and broadcast inside generate()
            q.put(request)
        try:
            result = self.pipeline.generate(request, output_path, callback=callback, show_progress=show_progress)
        finally:
            # Every rank stops at the same step (cancellation and input errors are agreed on), so
            # the workers answer promptly; their errors mirror this rank's own.
            problems = self._collect("done", timeout=600.0)
        if problems:
            logger.info("GPU workers stopped with: %s", "; ".join(problems))
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q in self._jobs:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        with contextlib.suppress(Exception):
            shutdown()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


__all__ = ["MultiGPUPipeline", "PipelineLoader"]
