"""torch.compile for a server whose shapes come from users: the policy, and every compile logged.

The transformer's 40 blocks share one class, so diffusers' regional compile
(``compile_repeated_blocks``) compiles one block graph that all 40 run. A graph is specialised to
what it was traced with; a request that differs makes torch recompile inside that request:

* the token count (the size bucket; any multiple-of-16 size can be asked for),
* one or two speakers (the audio tensor's speaker axis, the speaker masks),
* the turbo adapter on or off (PEFT's flags are Python attributes the graph is guarded on).

The policy (BENCHMARKS.md, "compile as served"): ``dynamic=None``, torch's *automatic dynamic
shapes*. The first graph of each variant is static (the fastest kernels: the warmed default bucket
keeps them); the first request at another size recompiles that variant once with the changed
dimensions symbolic, and that graph then serves every other size without compiling again. So a
server compiles at most two graphs per (speakers, adapter) variant, whatever sizes users send,
instead of one per size with ``dynamic=False``. The recompile limit is raised above the number of
variants so dynamo never silently falls back to eager; should it happen anyway, it is logged as an
error and counted.

:class:`CompileLog` turns torch's compile events into INFO lines of the ``infinitetalk.compile``
logger (``compiled graph 0/1 in 9.2 s (recompile: tensor 'hidden_states' size mismatch at index
1. expected 33600, actual 25200)``) and counts them (:func:`compile_stats`), so a benchmark or an
operator sees every compile and its cause.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("infinitetalk.compile")

#: Compiled graphs one code object (the block's forward) may collect before dynamo gives up on it
#: and runs it eagerly. Our variants: 2 speaker counts x adapter on/off x (static, dynamic) = 8,
#: which is exactly torch's default; fp8 and the step cache's paths add a few.
RECOMPILE_LIMIT = 64

#: How the block graphs treat sizes (``compile_repeated_blocks(dynamic=...)``): None = automatic
#: dynamic shapes (see the module doc); False would compile once per size.
DYNAMIC = None


class CompileLog:
    """Counts and logs the compiles of this process (dynamo's start/end callbacks for the count and
    duration, its ``recompiles`` log for the cause, its recompile-limit warning for eager fallbacks).
    One per process: :func:`install` returns it."""

    def __init__(self) -> None:
        self.compiles = 0
        self.recompiles = 0
        self.eager_fallbacks = 0
        self.seconds = 0.0
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self._reason: str | None = None

    # -- dynamo callbacks
    def on_start(self, args=None) -> None:
        if not self._is_dynamo(args):
            return
        self._started[self._id(args)] = time.perf_counter()

    def on_end(self, args=None) -> None:
        if not self._is_dynamo(args):
            return
        compile_id = self._id(args)
        seconds = time.perf_counter() - self._started.pop(compile_id, time.perf_counter())
        with self._lock:
            recompile = not compile_id.endswith("/0")
            reason, self._reason = self._reason, None
            self.compiles += 1
            self.recompiles += recompile
            self.seconds += seconds
            self.events.append({"id": compile_id, "seconds": round(seconds, 2), "recompile": recompile,
                                "reason": reason})
        if recompile:
            logger.info("torch.compile: recompiled the block graph (%s) in %.1f s; cause: %s", compile_id,
                        seconds, reason or "unknown")
        else:
            logger.info("torch.compile: compiled the block graph (%s) in %.1f s", compile_id, seconds)

    @staticmethod
    def _is_dynamo(args) -> bool:
        trigger = getattr(args, "callback_trigger", None)
        return trigger is None or getattr(trigger, "name", "DYNAMO") == "DYNAMO"

    @staticmethod
    def _id(args) -> str:
        return str(getattr(args, "compile_id", "?/?"))

    # -- log records
    def on_recompile_reason(self, message: str) -> None:
        # "Recompiling function forward in <file>\n  triggered by the following guard failure(s):\n
        #  - 0/1: tensor 'x' size mismatch at index 1. expected 4, actual 6   # <source line>", one per graph.
        failures = []
        for line in message.splitlines():
            line = line.strip().lstrip("-").strip()
            if re.match(r"\d+/\d+: ", line):
                failures.append(re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", line)))
        self._reason = "; ".join(failures) or message.strip()

    def on_limit_hit(self, message: str) -> None:
        with self._lock:
            self.eager_fallbacks += 1
        logger.error("torch.compile gave up recompiling the transformer block (%s): it now runs uncompiled "
                     "(slower) for this input; raise infinitetalk.compilation.RECOMPILE_LIMIT",
                     message.splitlines()[0])

    def stats(self) -> dict:
        with self._lock:
            return {"compiles": self.compiles, "recompiles": self.recompiles,
                    "eager_fallbacks": self.eager_fallbacks, "compile_seconds": round(self.seconds, 2)}


class _Forward(logging.Handler):
    def __init__(self, fn) -> None:
        super().__init__(logging.DEBUG)
        self.fn = fn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.fn(record.getMessage())
        except Exception:  # noqa: BLE001 (logging must never break a compile)
            pass


class _LimitFilter(_Forward):
    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("torch._dynamo hit config."):  # "... hit config.recompile_limit (8)"
            super().emit(record)


_LOG: CompileLog | None = None


def install() -> CompileLog:
    """Raise the recompile limit and hook the process's :class:`CompileLog` into dynamo. Idempotent;
    call it before compiling (``torch._dynamo.reset()`` drops the callbacks, this adds them back)."""
    global _LOG
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    if _LOG is None:
        _LOG = CompileLog()
        # The cause of each recompile: dynamo's "recompiles" log artifact, switched on for this process
        # only; its records come here and not to stderr (our INFO line carries them).
        reasons = logging.getLogger("torch._dynamo.guards.__recompiles")
        reasons.addHandler(_Forward(_LOG.on_recompile_reason))
        reasons.setLevel(logging.DEBUG)
        reasons.propagate = False
        torch._logging._internal.log_state.enable_artifact("recompiles")
        logging.getLogger("torch._dynamo.convert_frame").addHandler(_LimitFilter(_LOG.on_limit_hit))
    handler = torch._dynamo.callback_handler
    if _LOG.on_start not in handler.start_callbacks:
        handler.register_start_callback(_LOG.on_start)
        handler.register_end_callback(_LOG.on_end)
    return _LOG


def compile_stats() -> dict:
    """``compiles`` (graphs compiled in this process), ``recompiles`` (of those, the ones caused by
    a guard failure: a new size, speaker count or adapter state), ``eager_fallbacks`` (the limit
    was hit: should stay 0), ``compile_seconds``. All 0 when nothing was compiled."""
    if _LOG is None:
        return {"compiles": 0, "recompiles": 0, "eager_fallbacks": 0, "compile_seconds": 0.0}
    return _LOG.stats()


def warm_up(pipe, sizes, log=logger.info, fast: bool = False) -> float:
    """Compile (and run once) every graph the server needs at ``sizes`` before the first request.

    ``sizes``: ``(width, height)`` pairs, or ``None`` for the 480p bucket of a square image. ``fast``:
    the fast option's graphs and FP8 weights too (``INFINITETALK_WARMUP_FAST``), where the pipeline
    can serve it (else logged and skipped). For each size and each mode the server serves (exact
    and/or turbo; each also fast when asked), one real generation of a synthetic
    request (a grey square, one second of quiet noise, 1 step, guidance 1: one forward) goes through
    :meth:`generate`, so everything on the way is warm too: the ranks of a multi-GPU pipeline, the
    VAE, the encoders, the default prompt's text states (cached), ffmpeg. Returns the seconds taken.
    """
    import tempfile

    import numpy as np
    import soundfile
    import torch._dynamo.exc
    from PIL import Image

    from .request import GenerationRequest

    t0 = time.perf_counter()
    turbo_modes = [] if getattr(pipe, "turbo_only", False) else [False]
    if getattr(pipe, "turbo_loaded", False):
        turbo_modes.append(True)
    fast_modes = [False]
    if fast and getattr(pipe, "fast", None) is not None:
        fast_modes.append(True)
    elif fast:
        log(f"warm-up: fast skipped: {getattr(pipe, 'fast_unavailable', None) or 'not available here'}")
    modes = [(turbo, quick) for turbo in turbo_modes for quick in fast_modes]
    with tempfile.TemporaryDirectory(prefix="infinitetalk-warmup-") as tmp:
        image, audio = Path(tmp) / "warmup.png", Path(tmp) / "warmup.wav"
        Image.new("RGB", (512, 512), (128, 128, 128)).save(image)
        noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.01
        soundfile.write(str(audio), noise, 16000)
        for size in sizes:
            for turbo, quick in modes:
                width, height = size if size is not None else (None, None)
                request = GenerationRequest(image=image, audio=audio, width=width, height=height, steps=1,
                                            text_guidance=1.0, audio_guidance=1.0, turbo=turbo, seed=0, fast=quick)
                t = time.perf_counter()
                try:
                    result = pipe.generate(request, Path(tmp) / "warmup.mp4", show_progress=False)
                except torch._dynamo.exc.BackendCompilerFailed as exc:
                    _serve_uncompiled(pipe, exc)
                    result = pipe.generate(request, Path(tmp) / "warmup.mp4", show_progress=False)
                mode = ("turbo" if turbo else "exact") + (" fast" if quick else "")
                log(f"warm-up: {result.width}x{result.height} {mode} in "
                    f"{time.perf_counter() - t:.1f}s (" + ", ".join(
                        f"{k} {v:.1f}s" for k, v in result.timings.items() if isinstance(v, (int, float))) + ")")
    return time.perf_counter() - t0


def _serve_uncompiled(pipe, exc: BaseException) -> None:
    """The compiler failed in setup (e.g. no C compiler for Triton's launcher in the image): serve
    uncompiled, loudly, rather than not at all (or failing every request). With several processes
    the stance would have to change in each; there it stays an error."""
    if getattr(pipe, "parallel", None) is not None:
        raise RuntimeError(f"torch.compile failed in setup: {exc}; set INFINITETALK_COMPILE=0 or fix the "
                           "image (Triton needs a C compiler)") from exc
    logger.error("torch.compile failed in setup, serving uncompiled (slower; set INFINITETALK_COMPILE=0 to "
                 "skip the attempt): %s", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    torch.compiler.set_stance("force_eager")
    pipe.compiled = False


#: Where :func:`save_compile_cache` keeps torch's compile artifacts, inside the weights folder.
COMPILE_CACHE_DIR = "compile-cache"


def compile_cache_file(weights: Path, device) -> Path:
    """The artifact file for this torch version and device (a cache written for another GPU or torch
    would only miss, but keeping them apart lets one weights volume serve several kinds of machine)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device)).replace(" ", "-")
    else:
        name = "cpu"
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"torch-{torch.__version__}-{name}")
    return Path(weights) / COMPILE_CACHE_DIR / f"{safe}.bin"


def load_compile_cache(path: Path) -> bool:
    """Preload torch's compile caches from ``path`` (written by :func:`save_compile_cache` on an
    earlier start, e.g. into a persistent weights volume): the warm-up's compiles then take seconds
    instead of tens of seconds on a machine that never compiled (BENCHMARKS.md section 10: 21.4 s
    cold, 4.3 s warm). A missing or unreadable file only means a cold compile."""
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 (an optimisation: never fail the server for it)
        logger.warning("compile cache %s not used: %s", path, exc)
        return False
    logger.info("compile cache loaded from %s", path)
    return info is not None


def save_compile_cache(path: Path) -> bool:
    """Write the compile artifacts of this process to ``path`` (atomically); False when there is
    nothing to write or the folder is read-only (a baked image: nothing is lost but the speed-up)."""
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(saved[0])
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001
        logger.warning("compile cache not saved to %s: %s", path, exc)
        return False
    logger.info("compile cache saved to %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return True


def compile_transformer(transformer) -> bool:
    """Regional ``torch.compile`` of the repeated blocks (compiled once, reused by all 40) under the
    policy of the module doc. Returns False (and logs why) when compile is unavailable."""
    try:
        install()
        transformer.compile_repeated_blocks(dynamic=DYNAMIC)
        return True
    except Exception as exc:  # compile is an optimisation: never fail the server for it
        logger.warning("torch.compile unavailable, running eager: %s", exc)
        return False


__all__ = [
    "COMPILE_CACHE_DIR",
    "DYNAMIC",
    "RECOMPILE_LIMIT",
    "CompileLog",
    "compile_cache_file",
    "compile_stats",
    "compile_transformer",
    "install",
    "load_compile_cache",
    "save_compile_cache",
    "warm_up",
]
