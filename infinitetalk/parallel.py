"""Sequence-parallel generation on the GPUs of one host.

The transformer's video tokens are split evenly over ``N`` GPUs with diffusers' context
parallelism (Ulysses: the self-attention exchanges heads for tokens with all-to-all; text, image
and audio attention run on each rank's slice, see ``InfiniteTalkTransformer3DModel._cp_plan``).
Every rank holds the whole model and runs the same chunk loop; the VAE, encoders and the sampler
arithmetic are replicated (they are a few percent of the work), only rank 0 writes the video.

Two ways to start the ranks:

* ``torchrun --nproc-per-node N -m infinitetalk ...``: every process runs the CLI;
  :func:`init_from_env` joins them.
* :class:`MultiGPUPipeline` (the predictor, ``python -m infinitetalk --num-gpus N``): rank 0 is
  the calling process, ranks 1..N-1 are spawned worker processes that load their own copy of the
  pipeline and follow rank 0's jobs through queues.

On one GPU (or ``N == 1``) nothing of this is used.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .errors import GenerationCancelled, InputError

logger = logging.getLogger(__name__)

#: GPU counts that split all 40 heads and every bucket's token count evenly.
SUPPORTED_NUM_GPUS = (1, 2, 4, 8)
_COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass
class ParallelContext:
    """This process's place in the sequence-parallel group."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _flag_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (used to stop all ranks together)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._flag_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._flag_device())
        return box[0]


def check_num_gpus(num_gpus: int, available: int | None = None) -> None:
    if num_gpus not in SUPPORTED_NUM_GPUS:
        raise ValueError(f"num_gpus must be one of {SUPPORTED_NUM_GPUS} (the 40 attention heads and the token "
                         f"counts of all size buckets split evenly over them), got {num_gpus}")
    if available is not None and num_gpus > available:
        raise ValueError(f"num_gpus is {num_gpus} but only {available} GPU(s) are visible")


def usable_num_gpus(wanted: int | None = None) -> int:
    """``wanted`` GPUs (None: as many as possible), lowered to the largest supported count of
    visible GPUs, so one setting serves any machine and one GPU means no parallelism."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    usable = max(n for n in SUPPORTED_NUM_GPUS if n <= max(visible, 1))
    if wanted is None:
        return usable
    check_num_gpus(wanted)
    if wanted > usable:
        logger.warning("%d GPUs asked for but %d visible: using %d", wanted, visible, usable)
        return usable
    return wanted


def num_gpus_from_env() -> int:
    """``INFINITETALK_NUM_GPUS`` for the servers: ``auto`` (default) or 1, 2, 4, 8, through
    :func:`usable_num_gpus`."""
    value = os.environ.get("INFINITETALK_NUM_GPUS", "auto").strip().lower()
    if value == "auto":
        return usable_num_gpus()
    try:
        wanted = int(value)
    except ValueError:
        raise ValueError(f"INFINITETALK_NUM_GPUS must be 'auto' or one of {SUPPORTED_NUM_GPUS}, got {value!r}") from None
    return usable_num_gpus(wanted)


def init_distributed(rank: int, world_size: int, device_type: str, init_method: str = "env://") -> ParallelContext:
    """Join the process group (NCCL on GPUs, gloo on the CPU) as ``rank``."""
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=_COLLECTIVE_TIMEOUT)
    return ParallelContext(rank, world_size, device)


def init_from_env() -> ParallelContext | None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the group and return this rank's context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    check_num_gpus(world_size)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_distributed(int(os.environ["RANK"]), world_size, device_type)


def shutdown() -> None:
    """Leave the process group (end of a torchrun job)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _accelerator_count_for_cpu():
    """diffusers 0.42 picks the rank's device as ``rank % torch.accelerator.device_count()``, which
    divides by zero on a CPU-only build; report one (CPU) device while the mesh is built."""
    accel = getattr(torch, "accelerator", None)
    if accel is None or torch.cuda.is_available() or accel.device_count() > 0:
        yield
        return
    original = accel.device_count
    accel.device_count = lambda: 1
    try:
        yield
    finally:
        accel.device_count = original


def enable_sequence_parallel(transformer, world_size: int) -> None:
    """Split the transformer's token sequence over the ``world_size`` ranks of the current group
    (diffusers context parallelism, Ulysses degree ``world_size``)."""
    from diffusers import ContextParallelConfig

    check_num_gpus(world_size)
    heads = transformer.config.num_attention_heads
    if heads % world_size:
        raise ValueError(f"{heads} attention heads cannot be split over {world_size} GPUs")
    with _accelerator_count_for_cpu():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))


# ----------------------------------------------------------------------------------------------
# Rank 0 in this process, ranks 1..N-1 in spawned workers
# ----------------------------------------------------------------------------------------------


@dataclass
class PipelineLoader:
    """``loader(device)`` for :class:`MultiGPUPipeline`: ``InfiniteTalkPipeline.from_pretrained``
    with fixed arguments (picklable, so spawned workers can run it)."""

    weights_dir: str
    options: dict

    def __call__(self, device: torch.device):
        from .pipeline import InfiniteTalkPipeline

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


def stop_together(ctx: ParallelContext | None, error: BaseException | None) -> None:
    """Raise on every rank when any rank is stopping (cancelled or failed) at this step."""
    if ctx is None:
        if error is not None:
            raise error
        return
    if ctx.any(error is not None):
        raise error if error is not None else GenerationCancelled("stopped by another GPU's rank")


def check_token_split(height: int, width: int, frames_latent: int, world_size: int) -> None:
    """The sequence must split evenly over the GPUs; buckets always do, explicit sizes may not."""
    tokens = frames_latent * (height // 16) * (width // 16)
    if tokens % world_size:
        raise InputError(f"{width}x{height} gives {tokens} video tokens per chunk, which do not split evenly "
                         f"over {world_size} GPUs; use a resolution bucket or a width/height that are "
                         f"multiples of {16 * world_size}")


__all__ = [
    "MultiGPUPipeline",
    "ParallelContext",
    "PipelineLoader",
    "SUPPORTED_NUM_GPUS",
    "check_num_gpus",
    "check_token_split",
    "enable_sequence_parallel",
    "init_distributed",
    "init_from_env",
    "num_gpus_from_env",
    "shutdown",
    "stop_together",
    "usable_num_gpus",
]
