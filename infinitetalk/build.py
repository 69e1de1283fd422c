"""One way to load the pipeline, for every front end (CLI, Cog predictor, RunPod worker, benchmarks).

:func:`build_pipeline` turns validated :class:`~infinitetalk.settings.Settings` into a loaded
pipeline: under ``torchrun`` this process's rank of the sequence-parallel group; with several GPUs
(``num_gpus``) a :class:`~infinitetalk.parallel.MultiGPUPipeline` whose other ranks are spawned
processes; else one :class:`~infinitetalk.pipeline.InfiniteTalkPipeline`. The ``auto`` choices of
the settings (memory mode, compile, GPU count) are resolved here, where the device is known.
"""

from __future__ import annotations

import torch

from . import distributed
from .parallel import MultiGPUPipeline, PipelineLoader
from .pipeline import InfiniteTalkPipeline
from .settings import Settings

#: ``memory_mode="auto"`` offloads the transformer's blocks on GPUs with less memory than this.
AUTO_OFFLOAD_BELOW_BYTES = 75e9


def resolve_memory_mode(mode: str, device: torch.device) -> str:
    """``auto``: ``offload`` on a GPU under 75 GB (exact results in about 12 GB at 480p, 24 GB at
    720p), else ``none``; any other mode as it is."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "none"
    return "offload" if torch.cuda.get_device_properties(device).total_memory < AUTO_OFFLOAD_BELOW_BYTES else "none"


def load_options(settings: Settings, device: torch.device) -> dict:
    """The keyword arguments of :meth:`InfiniteTalkPipeline.from_pretrained` (besides the folder and
    the device) for ``settings`` on ``device``."""
    return dict(memory_mode=resolve_memory_mode(settings.memory_mode, device),
                compile=device.type == "cuda" if settings.compile is None else settings.compile,
                fuse_turbo=settings.fuse_turbo, turbo_lora=settings.turbo_lora,
                attention_backend=settings.attention_backend, text_to_speech=settings.text_to_speech)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_pipeline(settings: Settings, *, device: str | torch.device | None = None):
    """Load the pipeline ``settings`` describe from ``settings.weights`` (which must be complete:
    the servers fetch missing files first, see :func:`infinitetalk.service.load_pipeline`).

    ``device``: ``cuda``, ``cuda:1``, ``cpu``; default CUDA when available. How many ranks:

    * started by ``torchrun`` with several processes: this rank's pipeline, its transformer split
      over the group (every rank calls this; the caller leaves the group with :func:`close_pipeline`);
    * else ``settings.num_gpus`` (None: every visible GPU), lowered to the GPUs present: more than
      one gives a :class:`MultiGPUPipeline` (rank 0 here, the others spawned); with an explicit CPU
      ``device`` the count is used as given, as gloo processes (tests, debugging);
    * else one :class:`InfiniteTalkPipeline`.
    """
    context = distributed.init_from_env()
    if context is not None:
        try:
            pipe = InfiniteTalkPipeline.from_pretrained(settings.weights, device=context.device,
                                                        **load_options(settings, context.device))
            pipe.enable_sequence_parallel(context)
        except BaseException:
            distributed.shutdown()
            raise
        return pipe
    options = load_options(settings, torch.device(device) if device is not None else _default_device())
    ranks = num_ranks(settings, device)
    if ranks > 1:
        on_cpu = device is not None and torch.device(device).type == "cpu"
        return MultiGPUPipeline(PipelineLoader(str(settings.weights), options), ranks,
                                device_type="cpu" if on_cpu else None, hang_timeout=settings.hang_timeout_s)
    return InfiniteTalkPipeline.from_pretrained(settings.weights, device=device, **options)


def num_ranks(settings: Settings, device: str | torch.device | None = None) -> int:
    """How many processes :func:`build_pipeline` splits each forward over (outside ``torchrun``):
    ``settings.num_gpus`` (None: all) lowered to the visible GPUs, so one setting serves any machine;
    with an explicit CPU ``device``, the count as given (gloo processes)."""
    if device is not None and torch.device(device).type == "cpu":
        return settings.num_gpus or 1
    return distributed.usable_num_gpus(settings.num_gpus)


def close_pipeline(pipe) -> None:
    """Stop a multi-GPU pipeline's workers, or leave the ``torchrun`` group; nothing for one process."""
    if isinstance(pipe, MultiGPUPipeline):
        pipe.close()
    elif getattr(pipe, "parallel", None) is not None:
        distributed.shutdown()


def placement(pipe) -> str:
    """Where ``pipe`` runs, for logs: ``cpu (torch.float32)``, ``cuda:0 (torch.bfloat16), split over 2 GPUs``."""
    text = f"{pipe.device} ({pipe.dtype})"
    context = getattr(pipe, "parallel", None)
    if context is not None and context.world_size > 1:
        what = "GPUs" if torch.device(pipe.device).type == "cuda" else "processes"
        text += f", split over {context.world_size} {what}"
    return text


__all__ = ["build_pipeline", "close_pipeline", "load_options", "num_ranks", "placement", "resolve_memory_mode"]
