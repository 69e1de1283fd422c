"""Sequence-parallel generation on the GPUs of one host, started from one process.

:class:`MultiGPUPipeline` (the servers with ``INFINITETALK_NUM_GPUS``, ``python -m infinitetalk
--num-gpus N``): rank 0 is the calling process, ranks 1..N-1 are spawned worker processes that load
their own copy of the pipeline and follow rank 0's jobs through queues. The collectives themselves
(process group, token split, agreeing on seed and stop) are :mod:`infinitetalk.distributed`; the
other way to start the ranks, ``torchrun --nproc-per-node N -m infinitetalk ...``, joins them with
:func:`infinitetalk.distributed.init_from_env`.

A worker that dies during a job (killed, crashed, OOM-killed) or stops making progress fails the
job within seconds of being seen, with a :class:`~infinitetalk.pipeline.GenerationError`, instead of
leaving rank 0 inside a collective until its 30-minute timeout; the workers are then restarted and
the next job runs as usual (see :class:`MultiGPUPipeline`).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

import torch

from . import settings as settings_lib
from .distributed import abort, check_num_gpus, init_distributed, shutdown
from .pipeline import GenerationError, InfiniteTalkPipeline

logger = logging.getLogger(__name__)

HANG_TIMEOUT_S = settings_lib.HANG_TIMEOUT_S  # the default (its reasons: infinitetalk.settings)


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


def _how_it_ended(exitcode: int | None) -> str:
    """``killed by SIGKILL``, ``exit code 1``."""
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _worker(rank: int, world_size: int, device_type: str, init_method: str, loader: Callable, jobs, results,
            steps, tmp_root: str) -> None:
    try:
        ctx = init_distributed(rank, world_size, device_type, init_method)
        pipe = loader(ctx.device)
        pipe.enable_sequence_parallel(ctx)
        # The jobs' temporary files go under tmp_root, which rank 0 removes once this process has
        # ended: a killed worker cannot clean up after itself.
        pipe.tmp_dir = tmp_root
    except BaseException as exc:  # noqa: BLE001 (reported to rank 0)
        results.put((rank, "failed", f"GPU worker {rank} failed to start: {type(exc).__name__}: {exc}"))
        return
    results.put((rank, "ready", None))

    def count_step(_event) -> None:  # rank 0's watchdog reads the count to see this rank make progress
        steps[rank - 1] += 1

    while True:
        job = jobs.get()
        if job is None:
            break
        try:
            pipe.generate(job, Path(tmp_root) / f"rank{rank}.mp4", callback=count_step, show_progress=False)
            results.put((rank, "done", None))  # (only rank 0 writes the video: that path stays unused)
        except BaseException as exc:  # noqa: BLE001 (rank 0 raises its own error; this is for the log)
            results.put((rank, "error", f"{type(exc).__name__}: {exc}"))
    with contextlib.suppress(Exception):
        shutdown()


class _Watchdog:
    """Rank 0's watch over the workers during one job, from a thread: rank 0's own thread may be
    blocked inside a collective that only the failure of the group can end.

    A worker process that exits is seen at once (its sentinel); workers that finish no denoising
    step for ``hang_timeout()`` seconds are taken as hung (the ranks run in step, so when one hangs
    all of them stop counting). Either way every worker is killed, which fails rank 0's pending
    gloo collectives, and the group is aborted, which fails pending NCCL ones
    (:func:`infinitetalk.distributed.abort`); :attr:`failure` then says what happened.
    """

    def __init__(self, procs: list, steps, hang_timeout: Callable[[], float]):
        self.failure: str | None = None
        self._wake, self._stop = mp.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._run, args=(procs, steps, hang_timeout),
                                        name="infinitetalk-watchdog", daemon=True)
        self._thread.start()

    def _run(self, procs: list, steps, hang_timeout: Callable[[], float]) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(procs, start=1)}
        seen, progress = list(steps), time.monotonic()
        while self.failure is None:
            ready = wait([self._wake, *sentinels], timeout=min(1.0, hang_timeout() / 4))
            if self._wake in ready:
                return
            now = time.monotonic()
            if list(steps) != seen:
                seen, progress = list(steps), now
            if ready:
                rank = sentinels[ready[0]]
                procs[rank - 1].join()
                self.failure = f"GPU worker {rank} stopped during the job ({_how_it_ended(procs[rank - 1].exitcode)})"
            elif now - progress > hang_timeout():
                self.failure = f"a GPU worker stopped answering (no progress for {now - progress:.0f} s)"
        logger.error("%s: stopping the job", self.failure)
        for p in procs:
            p.kill()
        abort()

    def stop(self) -> str | None:
        """End the watch; what failed the job, if anything did."""
        self._stop.send(None)
        self._thread.join()
        self._stop.close()
        self._wake.close()
        return self.failure


class MultiGPUPipeline:
    """An :class:`~infinitetalk.pipeline.InfiniteTalkPipeline` split over ``num_gpus`` GPUs.

    ``loader(device)`` builds one rank's pipeline; it must be picklable (a module-level function or
    a ``functools.partial`` of one) because the workers are spawned processes.  ``generate`` has
    the pipeline's signature: rank 0 (this process) reports progress and writes the video.

    A worker that dies, or makes no progress for ``hang_timeout`` seconds (:data:`HANG_TIMEOUT_S`;
    read on every check, so it may be changed while a job runs), during a job fails the job with a
    :class:`~infinitetalk.pipeline.GenerationError` (no video is left behind); a worker found dead
    between jobs fails nothing. Either way the workers are restarted at once: the survivors
    are killed, new workers join a new process group and rank 0's pipeline, kept loaded, is split
    over it. The error returns as soon as the group is formed (seconds); the workers then load their
    weights (minutes at full size) while the server waits for the next job, which waits for them
    only if it comes sooner. Restarting before the error returns, rather than at the next job, keeps
    the reload off the next user's time, and a server (Cog, RunPod) holds this object across
    predictions, so it serves again without being restarted. A worker that cannot be restarted
    leaves the pipeline broken: every job then fails at once, asking for a server restart.
    """

    def __init__(self, loader: Callable, num_gpus: int, device_type: str | None = None,
                 ready_timeout: float = 3600.0, hang_timeout: float = HANG_TIMEOUT_S):
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        check_num_gpus(num_gpus, torch.cuda.device_count() if device_type == "cuda" else None)
        self.num_gpus = num_gpus
        self.ready_timeout, self.hang_timeout = ready_timeout, hang_timeout
        self._loader, self._device_type = loader, device_type
        self._procs: list = []
        self._closed = self._broken = False
        try:
            self._start_workers()
            self.pipeline = loader(self.context.device)
            self.pipeline.enable_sequence_parallel(self.context)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        logger.info("sequence parallel over %d %s devices", num_gpus, device_type)

    def __getattr__(self, name):  # device, dtype, load_timings, turbo_loaded, ...: rank 0's pipeline
        if name == "pipeline":
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    # ------------------------------------------------------------------ the workers
    def _start_workers(self) -> None:
        """Spawn ranks 1..N-1 and form the group with them (a new port each time); they then load
        their weights and report ``ready``, see :meth:`_wait_ready`."""
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx_mp = mp.get_context("spawn")
        self._tmp_root = tempfile.mkdtemp(prefix="infinitetalk-workers-")
        self._results = ctx_mp.Queue()
        self._jobs = [ctx_mp.Queue() for _ in range(1, self.num_gpus)]
        self._steps = ctx_mp.Array("q", self.num_gpus - 1, lock=False)  # denoising steps done, per worker
        self._procs = [
            ctx_mp.Process(target=_worker, args=(rank, self.num_gpus, self._device_type, init_method, self._loader,
                                                 self._jobs[rank - 1], self._results, self._steps, self._tmp_root),
                           daemon=True)
            for rank in range(1, self.num_gpus)
        ]
        for p in self._procs:
            p.start()
        self._ready = False
        self.context = init_distributed(0, self.num_gpus, self._device_type, init_method)

    def _wait_ready(self) -> None:
        """Wait until every worker has loaded its weights; fails fast when one died or failed."""
        deadline = time.monotonic() + self.ready_timeout
        for _ in self._procs:
            while True:
                try:
                    rank, status, detail = self._results.get(timeout=1.0)
                    break
                except queue.Empty:
                    for rank, p in enumerate(self._procs, start=1):
                        if not p.is_alive():
                            raise GenerationError(f"GPU worker {rank} exited while starting "
                                                  f"({_how_it_ended(p.exitcode)})") from None
                    if time.monotonic() > deadline:
                        raise GenerationError(f"the GPU workers were not ready within {self.ready_timeout:.0f} s") \
                            from None
            if status != "ready":
                raise GenerationError(detail)
        self._ready = True

    def _stop_workers(self, graceful: bool) -> None:
        """End the workers (asked to finish, or killed), leave the group, remove their temporary files."""
        if graceful:
            for q in self._jobs:
                with contextlib.suppress(Exception):
                    q.put(None)
        for p in self._procs:
            p.join(timeout=30 if graceful else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=30)  # a process stuck in the GPU driver may outlive even SIGKILL for a while
                if p.is_alive():
                    logger.error("GPU worker process %d did not end after SIGKILL", p.pid)
        for q in (*self._jobs, self._results):
            q.cancel_join_thread()  # nothing left to deliver to dead workers
            q.close()
        with contextlib.suppress(Exception):
            if not graceful:
                abort()  # NCCL: destroying the group would wait for collectives with the dead
            shutdown()
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    def _restart(self, reason: str) -> None:
        """Replace the workers: kill them, form a new group with new ones, split rank 0's pipeline
        over it. Returns once the group is formed; the new workers are still loading (:meth:`_wait_ready`)."""
        logger.warning("%s: restarting the %d GPU workers", reason, len(self._procs))
        self._stop_workers(graceful=False)
        try:
            self._start_workers()
            self.pipeline.enable_sequence_parallel(self.context)
        except Exception as exc:
            self._broken = True
            raise GenerationError(f"{reason}; the GPU workers could not be restarted ({type(exc).__name__}: "
                                  f"{exc}): restart the server") from exc
        logger.info("GPU workers restarted; they load their weights while no job runs")

    def _prepare_job(self) -> None:
        """Before a job: workers found dead are replaced, and the job waits for workers still loading."""
        if self._closed or self._broken:
            raise GenerationError("the multi-GPU pipeline is not running; restart the server")
        dead = [(rank, p.exitcode) for rank, p in enumerate(self._procs, start=1) if not p.is_alive()]
        if dead:  # killed between jobs (e.g. by the OOM killer): this job runs on new workers
            self._restart(f"GPU worker {dead[0][0]} stopped between jobs ({_how_it_ended(dead[0][1])})")
        if not self._ready:
            start = time.monotonic()
            try:
                self._wait_ready()
            except GenerationError as exc:
                self._broken = True
                raise GenerationError(f"{exc}; restart the server") from exc
            logger.info("the GPU workers are ready (the job waited %.1f s for them)", time.monotonic() - start)

    # ------------------------------------------------------------------ jobs
    def generate(self, request, output_path, callback=None, show_progress: bool = True, hls=None):
        self._prepare_job()
        watchdog = _Watchdog(self._procs, self._steps, lambda: self.hang_timeout)
        for q in self._jobs:  # a missing seed is drawn by rank 0 and broadcast inside generate()
            q.put(request)
        error = None
        try:
            result = self.pipeline.generate(request, output_path, callback=callback, show_progress=show_progress,
                                            hls=hls)  # rank 0 writes the video (and the live folder)
        except BaseException as exc:  # noqa: BLE001 (raised below, or as the cause of the failure)
            error = exc
        failure = self._end_job(watchdog)
        if failure is not None:
            self._restart(failure)
            if error is not None:
                traceback.clear_frames(error.__traceback__)  # they hold the failed job's tensors
                raise GenerationError(f"{failure}; the GPU workers were restarted: retry the prediction") from error
            # Rank 0 had passed every collective and written the video: the result stands.
        if error is not None:
            raise error
        return result

    def _end_job(self, watchdog: _Watchdog) -> str | None:
        """Wait for every worker to end the job, or for the watchdog to fail it; what failed it."""
        # Every rank stops at the same step (cancellation and input errors are agreed on), so the
        # workers answer promptly, unless one died or hangs: then the watchdog answers.
        problems, pending = [], len(self._procs)
        while pending and watchdog.failure is None:
            with contextlib.suppress(queue.Empty):
                rank, status, detail = self._results.get(timeout=0.2)
                pending -= 1
                if status != "done":
                    problems.append(f"rank {rank}: {detail}")
        if problems:
            logger.info("GPU workers stopped with: %s", "; ".join(problems))
        return watchdog.stop()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._procs:
            self._stop_workers(graceful=True)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


__all__ = ["HANG_TIMEOUT_S", "MultiGPUPipeline", "PipelineLoader"]
