"""Collectives of sequence-parallel generation: the process group and what the pipeline asks of it.

The transformer's video tokens are split evenly over ``N`` GPUs with diffusers' context
parallelism (Ulysses: the self-attention exchanges heads for tokens with all-to-all; text, image
and audio attention run on each rank's slice, see ``InfiniteTalkTransformer3DModel._cp_plan``).
Every rank holds the whole model and runs the same chunk loop; the VAE, encoders and the sampler
arithmetic are replicated (they are a few percent of the work), only rank 0 writes the video.

This module is what :mod:`infinitetalk.pipeline` needs for that (joining the group, splitting the
transformer, ranks agreeing on a seed and on stopping, the token-split check); it does not import
the pipeline. Starting the ranks of one host from one process (:class:`~infinitetalk.parallel.MultiGPUPipeline`) is
:mod:`infinitetalk.parallel`; choosing between the two ways is :func:`infinitetalk.build.build_pipeline`.
On one GPU (or ``N == 1``) nothing of this is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from .errors import GenerationCancelled, InputError
from .settings import SUPPORTED_NUM_GPUS, check_num_gpus

logger = logging.getLogger(__name__)

_COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass
class ParallelContext:
    """This process's place in the sequence-parallel group."""

    rank: int
    world_size: int
    device: torch.device
    mesh: Any = None  # the (ring 1, ulysses N) DeviceMesh the transformer's tokens are split over

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


def init_distributed(rank: int, world_size: int, device_type: str, init_method: str = "env://") -> ParallelContext:
    """Join the process group (NCCL on GPUs, gloo on the CPU) as ``rank``.

    The device mesh of the token split is made here too, while every rank joins: the groups it
    needs are then in place before any rank loads its weights, and splitting a transformer later
    (:func:`enable_sequence_parallel`) waits for no other rank.
    """
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=_COLLECTIVE_TIMEOUT)
    mesh = init_device_mesh(device_type, (1, world_size), mesh_dim_names=("ring", "ulysses"))
    mesh["ring", "ulysses"]._flatten()  # the group diffusers splits over (it flattens the mesh the same way)
    return ParallelContext(rank, world_size, device, mesh)


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


def abort() -> None:
    """Make this rank's collectives that wait on dead peers fail now (kill the peers first).

    gloo needs nothing more: its collectives fail as soon as a peer's socket closes (measured on
    the CPU: a killed peer fails rank 0's pending all-reduce within milliseconds, while aborting
    the group leaves it blocked). NCCL kernels never notice a dead peer and would spin until the
    collective timeout, so its communicators are aborted, which also leaves the group
    (``destroy_process_group`` would wait for those kernels to finish).
    """
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()


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


def enable_sequence_parallel(transformer, context: ParallelContext) -> None:
    """Split the transformer's token sequence over the ranks of ``context`` (diffusers context
    parallelism, Ulysses degree ``world_size``, on the mesh made by :func:`init_distributed`).

    A transformer split before, over a group that has since been left (the workers of a
    :class:`~infinitetalk.parallel.MultiGPUPipeline` restarted), is moved to ``context``'s mesh:
    diffusers' hooks and attention processors read the mesh from the one config they share.
    """
    from diffusers import ContextParallelConfig

    world_size = context.world_size
    config = getattr(transformer, "_parallel_config", None)
    if config is not None:
        config.context_parallel_config.mesh = context.mesh
        config.setup(context.rank, world_size, context.device, mesh=context.mesh)
        return
    check_num_gpus(world_size)
    heads = transformer.config.num_attention_heads
    if heads % world_size:
        raise ValueError(f"{heads} attention heads cannot be split over {world_size} GPUs")
    with _accelerator_count_for_cpu():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size, mesh=context.mesh))


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
    "ParallelContext",
    "SUPPORTED_NUM_GPUS",
    "abort",
    "check_num_gpus",
    "check_token_split",
    "enable_sequence_parallel",
    "init_distributed",
    "init_from_env",
    "shutdown",
    "stop_together",
    "usable_num_gpus",
]
