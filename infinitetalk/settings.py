"""The settings of one server or CLI run, read and validated in one place before anything loads.

:meth:`Settings.from_env` reads every ``INFINITETALK_*`` variable (model switches, the output
storage, the RunPod worker's limits) and raises :class:`SettingsError` with one line naming the
variable and the values it accepts; an unknown ``INFINITETALK_*`` variable (a typo such as
``INFINITETALK_MEMROY_MODE``) is an error too, naming the closest known one. The Cog predictor, the
RunPod worker and the CLI do this first, before any weight is read or downloaded and before CUDA
is touched; :func:`infinitetalk.build.build_pipeline` then loads the pipeline the settings describe.

Model switches (the storage variables are documented in :mod:`infinitetalk.storage`, the worker's
in :class:`WorkerSettings`):

==============================  ==================================================================
``INFINITETALK_WEIGHTS``        weights folder; default ``weights/`` in the repo (created and filled
                                by the servers' setup when absent)
``INFINITETALK_MEMORY_MODE``    ``auto`` (default: ``offload`` on a GPU under 75 GB, else ``none``),
                                ``none``, ``fp8``, ``offload``
``INFINITETALK_COMPILE``        1 (default): regional torch.compile on CUDA; 0: eager
``INFINITETALK_FUSE_TURBO``     1: fold the turbo LoRA into the weights (a turbo-only server); default 0
``INFINITETALK_NUM_GPUS``       ``auto`` (default: every visible GPU, lowered to 1, 2, 4 or 8), 1, 2, 4, 8
``INFINITETALK_WARMUP``         sizes compiled and run once in the servers' setup, so no request waits
                                for a compile there: ``auto`` (default: the 480p bucket of a square
                                image, 640x640, when the transformer is compiled), ``off``, or
                                ``WxH[,WxH...]`` (multiples of 16, 64..2048); each in every mode served
==============================  ==================================================================

The Modal app's deploy-time choices (``modal_app.py``) are :class:`ModalSettings`.
This module imports no torch: reading the settings takes milliseconds.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import download, storage
from .envvars import PREFIX, SettingsError, env_choice, env_flag, env_number, env_text
from .request import INPUTS
from .storage import StorageConfig

ENV_WEIGHTS = download.ENV_WEIGHTS
ENV_MEMORY_MODE = "INFINITETALK_MEMORY_MODE"
ENV_COMPILE = "INFINITETALK_COMPILE"
ENV_FUSE_TURBO = "INFINITETALK_FUSE_TURBO"
ENV_NUM_GPUS = "INFINITETALK_NUM_GPUS"
ENV_INPUT_MAX_MB = "INFINITETALK_INPUT_MAX_MB"
ENV_INPUT_TIMEOUT_S = "INFINITETALK_INPUT_TIMEOUT_S"
ENV_INLINE_MAX_MB = "INFINITETALK_INLINE_MAX_MB"
ENV_PROGRESS_INTERVAL_S = "INFINITETALK_PROGRESS_INTERVAL_S"
ENV_WARMUP = "INFINITETALK_WARMUP"
ENV_HANG_TIMEOUT_S = "INFINITETALK_HANG_TIMEOUT_S"
ENV_WARMUP_FAST = "INFINITETALK_WARMUP_FAST"
ENV_MODAL_APP = "INFINITETALK_MODAL_APP"
ENV_MODAL_GPU = "INFINITETALK_MODAL_GPU"
ENV_MODAL_VOLUME = "INFINITETALK_MODAL_VOLUME"
ENV_MODAL_TIMEOUT_S = "INFINITETALK_MODAL_TIMEOUT_S"
ENV_MODAL_MAX_CONTAINERS = "INFINITETALK_MODAL_MAX_CONTAINERS"
MODAL_VARIABLES = (ENV_MODAL_APP, ENV_MODAL_GPU, ENV_MODAL_VOLUME, ENV_MODAL_TIMEOUT_S, ENV_MODAL_MAX_CONTAINERS)

#: Every ``INFINITETALK_*`` variable the code reads; any other one is refused as a likely typo.
KNOWN_VARIABLES = (
    ENV_WEIGHTS, ENV_MEMORY_MODE, ENV_COMPILE, ENV_FUSE_TURBO, ENV_NUM_GPUS, ENV_WARMUP, ENV_WARMUP_FAST,
    ENV_HANG_TIMEOUT_S,
    ENV_INPUT_MAX_MB, ENV_INPUT_TIMEOUT_S, ENV_INLINE_MAX_MB, ENV_PROGRESS_INTERVAL_S,
    *storage.ENV_VARS, download.ENV_WAN_REVISION, download.ENV_TURBO_REVISION,
    download.ENV_KOKORO_REVISION, download.ENV_SPACY_REVISION, *MODAL_VARIABLES,
)

#: ``auto`` (resolved when the pipeline is built) and the pipeline's memory modes.
MEMORY_MODES = ("auto", "none", "fp8", "offload")
#: GPU counts that split all 40 heads and every bucket's token count evenly.
SUPPORTED_NUM_GPUS = (1, 2, 4, 8)
MB = 1024 * 1024

#: Modal's GPU types as its ``gpu=`` takes them (any case; https://modal.com/docs/guide/gpu); a count
#: (``H100:2``) must be one of :data:`SUPPORTED_NUM_GPUS`, as every GPU holds the whole model.
MODAL_GPU_TYPES = ("T4", "L4", "A10", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000", "H100",
                   "H100!", "H200", "B200", "B200+")
#: Modal's rule for App and Volume names (modal._utils.name_utils.is_valid_object_name).
_MODAL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MODAL_APP_ID = re.compile(r"ap-[A-Za-z0-9]{22}")

#: The name the RunPod worker's settings errors had; the same class.
WorkerConfigError = SettingsError


#: Seconds a worker may go without finishing a denoising step during a job before it is taken as
#: hung (several GPUs: :mod:`infinitetalk.parallel`). The longest honest gap is the first step of a job:
#: preparing the inputs (seconds), the regional compile of the blocks for a new size or mode (a minute or
#: more; "minutes" for fp8, BENCHMARKS.md) and one step, which at 720p is up to 3 forwards of about 12 s
#: each on one H200 (less when split; several times more with block offloading on smaller GPUs). Ten
#: minutes leaves a margin and still ends a hung job three times sooner than the 30-minute collective
#: timeout; ``INFINITETALK_HANG_TIMEOUT_S`` sets another.
HANG_TIMEOUT_S = 600.0


def check_num_gpus(num_gpus: int, available: int | None = None) -> None:
    """``num_gpus`` is a supported count (and, given ``available``, no more than that)."""
    if num_gpus not in SUPPORTED_NUM_GPUS:
        raise SettingsError(f"num_gpus must be one of {SUPPORTED_NUM_GPUS} (the 40 attention heads and the token "
                            f"counts of all size buckets split evenly over them), got {num_gpus}")
    if available is not None and num_gpus > available:
        raise SettingsError(f"num_gpus is {num_gpus} but only {available} GPU(s) are visible")


def parse_warmup(raw: str | None) -> tuple[tuple[int, int], ...] | None:
    """``INFINITETALK_WARMUP``: None for ``auto`` (or unset), ``()`` for ``off``, else the ``(width,
    height)`` pairs of ``WxH[,WxH...]``."""
    text = (raw or "").strip().lower()
    if text in ("", "auto"):
        return None
    if text in ("off", "0", "none"):
        return ()
    spec = INPUTS["width"]  # the same rule as a request's width and height (INPUTS["height"] is equal)
    lo, hi, step = int(spec.ge), int(spec.le), spec.multiple_of
    sizes = []
    for item in text.split(","):
        w, _, h = item.strip().partition("x")
        if not (w.isdigit() and h.isdigit() and all(lo <= int(v) <= hi and int(v) % step == 0 for v in (w, h))):
            raise SettingsError(f"{ENV_WARMUP} must be auto, off or sizes WxH[,WxH...] with width and height "
                                f"multiples of {step} in {lo}..{hi} (e.g. 640x640,832x480); got {raw!r}")
        sizes.append((int(w), int(h)))
    return tuple(sizes)


def check_known(env: Mapping[str, str]) -> None:
    """Refuse an ``INFINITETALK_*`` variable that no code reads (it would silently do nothing)."""
    unknown = sorted(name for name in env if name.startswith(PREFIX) and name not in KNOWN_VARIABLES)
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name[len(PREFIX):], [k[len(PREFIX):] for k in KNOWN_VARIABLES], n=1, cutoff=0.7)
    hint = f"did you mean {PREFIX}{close[0]}?" if close else "the settings are " + ", ".join(sorted(KNOWN_VARIABLES))
    raise SettingsError(f"{name} is not an InfiniteTalk setting; {hint}")


@dataclass(frozen=True)
class WorkerSettings:
    """The RunPod worker's limits: ``INFINITETALK_INPUT_MAX_MB`` (largest input file, default 1024),
    ``INFINITETALK_INPUT_TIMEOUT_S`` (longest download of one input, default 300),
    ``INFINITETALK_INLINE_MAX_MB`` (largest video returned inline without a bucket, default 10),
    ``INFINITETALK_PROGRESS_INTERVAL_S`` (least time between two step progress updates, default 5)."""

    input_max_bytes: int = 1024 * MB
    input_timeout_s: float = 300.0
    inline_max_bytes: int = 10 * MB
    progress_interval_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        return cls(input_max_bytes=int(env_number(env, ENV_INPUT_MAX_MB, 1024, 1, 100_000) * MB),
                   input_timeout_s=float(env_number(env, ENV_INPUT_TIMEOUT_S, 300, 1, 86_400)),
                   inline_max_bytes=int(env_number(env, ENV_INLINE_MAX_MB, 10, 0, 1024) * MB),
                   progress_interval_s=float(env_number(env, ENV_PROGRESS_INTERVAL_S, 5, 0, 3600)))


def check_modal_gpu(value: str, name: str = "gpu") -> str:
    """``value`` as Modal's ``gpu=`` takes it (``H100``, ``a100-80gb:2``), upper-cased; else one line naming
    ``name``."""
    kind, sep, count = str(value).strip().partition(":")
    if kind.upper() not in MODAL_GPU_TYPES or (sep and count not in map(str, SUPPORTED_NUM_GPUS)):
        raise SettingsError(f"{name} must be a Modal GPU type ({', '.join(MODAL_GPU_TYPES)}), optionally with "
                            f":2, :4 or :8 for that many GPUs; got {value!r}")
    return kind.upper() + (f":{count}" if sep and count != "1" else "")


def check_modal_name(value: str, name: str) -> str:
    """A Modal App or Volume name: 1 to 64 letters, digits, ``-``, ``_`` or ``.``, not an App id."""
    value = str(value).strip()
    if not _MODAL_NAME.fullmatch(value) or _MODAL_APP_ID.fullmatch(value):
        raise SettingsError(f"{name} must be 1 to 64 letters, digits, '-', '_' or '.' (a Modal name); got {value!r}")
    return value


@dataclass(frozen=True)
class ModalSettings:
    """The deploy-time choices of ``modal_app.py`` (read when ``modal deploy`` imports it):
    ``INFINITETALK_MODAL_APP`` (App name, default ``infinitetalk``), ``INFINITETALK_MODAL_GPU`` (GPU type per
    container, default ``H100``: 80 GB runs the default memory mode), ``INFINITETALK_MODAL_VOLUME`` (the Volume
    that keeps the weights, default ``infinitetalk-weights``, created when missing),
    ``INFINITETALK_MODAL_TIMEOUT_S`` (longest request, and longest start-up, which downloads the weights into an
    empty Volume; default 3600, at most 86400) and ``INFINITETALK_MODAL_MAX_CONTAINERS`` (most GPU containers at
    once, default 1; more requests wait in Modal's queue)."""

    app_name: str = "infinitetalk"
    gpu: str = "H100"
    volume: str = "infinitetalk-weights"
    timeout_s: int = 3600
    max_containers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "app_name", check_modal_name(self.app_name, "app_name"))
        object.__setattr__(self, "gpu", check_modal_gpu(self.gpu))
        object.__setattr__(self, "volume", check_modal_name(self.volume, "volume"))
        if not (isinstance(self.timeout_s, int) and 60 <= self.timeout_s <= 86_400):
            raise SettingsError(f"timeout_s must be a whole number of seconds from 60 to 86400, got {self.timeout_s!r}")
        if not (isinstance(self.max_containers, int) and 1 <= self.max_containers <= 1000):
            raise SettingsError(f"max_containers must be a whole number from 1 to 1000, got {self.max_containers!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ModalSettings:
        env = os.environ if env is None else env
        text = {name: env_text(env, name) for name in (ENV_MODAL_APP, ENV_MODAL_GPU, ENV_MODAL_VOLUME)}
        return cls(
            app_name=check_modal_name(text[ENV_MODAL_APP] or cls.app_name, ENV_MODAL_APP),
            gpu=check_modal_gpu(text[ENV_MODAL_GPU] or cls.gpu, ENV_MODAL_GPU),
            volume=check_modal_name(text[ENV_MODAL_VOLUME] or cls.volume, ENV_MODAL_VOLUME),
            timeout_s=int(env_number(env, ENV_MODAL_TIMEOUT_S, cls.timeout_s, 60, 86_400, integer=True,
                                     unit="seconds")),
            max_containers=int(env_number(env, ENV_MODAL_MAX_CONTAINERS, cls.max_containers, 1, 1000, integer=True)))


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``INFINITETALK_*`` settings of ``env`` (default ``os.environ``) for a server started elsewhere (a
    Modal container): every known one that is set, except ``INFINITETALK_WEIGHTS`` (a local path here; the
    server has its own). Call :meth:`Settings.from_env` first: it refuses unknown names and bad values."""
    env = os.environ if env is None else env
    return {name: env[name] for name in KNOWN_VARIABLES if name != ENV_WEIGHTS and env_text(env, name) is not None}


@dataclass(frozen=True)
class Settings:
    """How to load the pipeline and serve it.  The defaults are the servers' (= ``from_env({})``).

    ``memory_mode``: ``auto`` (resolved when the pipeline is built: ``offload`` on a GPU under
    75 GB, else ``none``), ``none``, ``fp8`` or ``offload``.  ``compile``: None compiles on CUDA
    only (the servers' ``INFINITETALK_COMPILE=1``), True on any device (the CLI's ``--compile``),
    False never.  ``num_gpus``: None uses every visible GPU (lowered to 1, 2, 4 or 8); a count is
    lowered to the GPUs present.  ``turbo_lora`` (default: the one in the weights folder) and
    ``attention_backend`` are the CLI's ``--lora`` and ``--attention-backend``.  ``text_to_speech``: None
    loads the text-to-speech model where its weights are present (the servers), True requires it, False
    leaves it out (the CLI loads it only for ``--text``).  ``storage`` is None
    without a bucket; ``check_bucket`` asks for the start-up ``HeadBucket``.
    """

    weights: Path = field(default_factory=lambda: download.default_weights_dir({}))
    memory_mode: str = "auto"
    compile: bool | None = None
    fuse_turbo: bool = False
    num_gpus: int | None = None
    turbo_lora: Path | None = None
    attention_backend: str | None = None
    text_to_speech: bool | None = None
    storage: StorageConfig | None = None
    check_bucket: bool = True
    warmup: tuple[tuple[int, int], ...] | None = None  # None: auto (see warmup_sizes)
    warmup_fast: bool = False  # the warm-up also compiles the fast option's graphs (where it runs)
    hang_timeout_s: float = HANG_TIMEOUT_S  # several GPUs: a worker silent this long fails the job
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    modal: ModalSettings = field(default_factory=ModalSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", Path(self.weights))
        if self.turbo_lora is not None:
            object.__setattr__(self, "turbo_lora", Path(self.turbo_lora))
        if self.memory_mode not in MEMORY_MODES:
            raise SettingsError(f"memory_mode must be one of {', '.join(MEMORY_MODES)}; got {self.memory_mode!r}")
        if self.compile not in (None, True, False):
            raise SettingsError(f"compile must be None (on CUDA only), True or False, got {self.compile!r}")
        if self.num_gpus is not None:
            check_num_gpus(self.num_gpus)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every ``INFINITETALK_*`` variable of ``env`` (default ``os.environ``).

        No file is read and nothing is downloaded or connected to (the bucket's network check is
        :func:`infinitetalk.storage.open_storage`); raises :class:`SettingsError`.
        """
        env = os.environ if env is None else env
        check_known(env)
        weights = download.default_weights_dir(env)
        if weights.exists() and not weights.is_dir():
            raise SettingsError(f"{ENV_WEIGHTS} must be a folder (it is created when missing), got {str(weights)!r}")
        memory_mode = env_choice(env, ENV_MEMORY_MODE, "auto", MEMORY_MODES)
        compile_on_cuda = env_flag(env, ENV_COMPILE, True)
        fuse_turbo = env_flag(env, ENV_FUSE_TURBO, False)
        num_gpus = env_choice(env, ENV_NUM_GPUS, "auto", ("auto", *map(str, SUPPORTED_NUM_GPUS)))
        hang_timeout_s = float(env_number(env, ENV_HANG_TIMEOUT_S, HANG_TIMEOUT_S, 10, 86_400, unit="seconds"))
        config = StorageConfig.from_env(env)
        storage.check_required(config, storage.bucket_required(env))
        return cls(weights=weights, memory_mode=memory_mode, compile=None if compile_on_cuda else False,
                   fuse_turbo=fuse_turbo, num_gpus=None if num_gpus == "auto" else int(num_gpus),
                   storage=config, check_bucket=storage.bucket_check(env), warmup=parse_warmup(env.get(ENV_WARMUP)),
                   warmup_fast=env_flag(env, ENV_WARMUP_FAST, False), hang_timeout_s=hang_timeout_s,
                   worker=WorkerSettings.from_env(env), modal=ModalSettings.from_env(env))

    def warmup_sizes(self, compiled: bool) -> tuple:
        """The sizes :func:`infinitetalk.compilation.warm_up` runs in setup: ``auto`` warms the 480p
        square bucket (``None``) when the transformer is compiled, nothing otherwise."""
        if self.warmup is None:
            return (None,) if compiled else ()
        return self.warmup


__all__ = [
    "ENV_COMPILE",
    "ENV_HANG_TIMEOUT_S",
    "ENV_WARMUP_FAST",
    "HANG_TIMEOUT_S",
    "ENV_FUSE_TURBO",
    "ENV_INLINE_MAX_MB",
    "ENV_INPUT_MAX_MB",
    "ENV_INPUT_TIMEOUT_S",
    "ENV_MEMORY_MODE",
    "ENV_MODAL_APP",
    "ENV_MODAL_GPU",
    "ENV_MODAL_MAX_CONTAINERS",
    "ENV_MODAL_TIMEOUT_S",
    "ENV_MODAL_VOLUME",
    "ENV_NUM_GPUS",
    "ENV_PROGRESS_INTERVAL_S",
    "ENV_WARMUP",
    "ENV_WEIGHTS",
    "KNOWN_VARIABLES",
    "MB",
    "MEMORY_MODES",
    "MODAL_GPU_TYPES",
    "MODAL_VARIABLES",
    "SUPPORTED_NUM_GPUS",
    "ModalSettings",
    "Settings",
    "SettingsError",
    "WorkerConfigError",
    "WorkerSettings",
    "check_known",
    "check_modal_gpu",
    "check_modal_name",
    "check_num_gpus",
    "parse_warmup",
    "server_env",
]
