"""The serving core shared by every front end (the Cog predictor, the RunPod worker).

One place for what a service does around :meth:`InfiniteTalkPipeline.generate`:

* :data:`INPUTS` and :func:`build_request` (re-exported from :mod:`infinitetalk.request`, the one
  rule table): a job's named inputs -> a validated :class:`GenerationRequest`, or an
  :class:`InputError` with one line that names the input (the Cog ``Input()`` literals in
  ``predict.py`` are checked against the table by a test);
* :func:`run_job`: build, fetch the input files (optional hook), probe them
  (:func:`infinitetalk.inputs.probe_request`: a bad file fails before any model work), generate into
  a per-run folder, report progress (metrics and snapshots), rename file names in input errors to
  the input's name, and remove the folder on any failure or cancellation;
* :func:`load_pipeline`: load every model once per process (weights fetched first if absent; the
  optional text-to-speech files too, with only a warning if they cannot be), as the validated
  :class:`~infinitetalk.settings.Settings` say.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GenerationCancelled, InputError
from .inputs import name_inputs, probe_request
from .pipeline import FPS, GenerationResult, ProgressEvent
from .request import (  # noqa: F401  (the serving core's public names; the rules live in request.py)
    DEFAULT_PROMPT,
    FILE_INPUTS,
    INPUTS,
    MAX_SEED,
    MAX_VIDEO_SECONDS,
    REQUIRED,
    GenerationRequest,
    InputSpec,
    build_request,
    choose_seed,
    parse_box,
    parse_boxes,
    quality_to_crf,
)

if TYPE_CHECKING:
    from .settings import Settings

# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class ProgressTracker:
    """Pipeline progress events -> metrics and snapshots; also the place where a cancel is noticed.

    The pipeline reports every denoising step, then the last step's ``(chunk, step)`` again once
    the chunk is encoded. Metrics: ``denoising_steps`` (per step), ``chunks_done`` and
    ``video_seconds_done`` (per chunk). ``on_progress`` gets a snapshot dict after each event;
    ``should_stop()`` true raises :class:`GenerationCancelled` (the pipeline stops within a step).
    """

    def __init__(self, on_metric: Callable[[str, Any], None] | None = None,
                 on_progress: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.on_metric = on_metric or (lambda key, value: None)
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.steps_done = 0
        self.chunks_done = 0
        self.last: tuple[int, int] | None = None

    def __call__(self, ev: ProgressEvent) -> None:
        if self.should_stop is not None and self.should_stop():
            raise GenerationCancelled("the job was cancelled")
        chunk_done = (ev.chunk, ev.step) == self.last
        if chunk_done:
            self.chunks_done = ev.chunk + 1
            self.on_metric("chunks_done", ev.chunk + 1)
            self.on_metric("video_seconds_done", round(ev.frames_done / FPS, 2))
        else:
            self.steps_done += 1
            self.on_metric("denoising_steps", self.steps_done)
        self.last = (ev.chunk, ev.step)
        if self.on_progress is not None:
            self.on_progress({
                "chunks_done": self.chunks_done, "num_chunks": ev.num_chunks,
                "chunk_finished": chunk_done, "denoising_steps": self.steps_done,
                "step": ev.step, "num_steps": ev.num_steps,
                "video_seconds_done": round(ev.frames_done / FPS, 2),
                "video_seconds_total": round(ev.total_frames / FPS, 2),
            })


# ----------------------------------------------------------------------------------------------
# One job
# ----------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    path: Path  # the MP4, inside the job's workdir (the caller removes the folder once delivered)
    workdir: Path
    request: GenerationRequest
    result: GenerationResult
    metrics: dict = field(default_factory=dict)


def new_workdir() -> Path:
    """A fresh per-run folder in the temporary directory (``infinitetalk-run-*``)."""
    return Path(tempfile.mkdtemp(prefix="infinitetalk-run-"))


def remove_workdir(path: str | os.PathLike | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _log(message: str) -> None:
    print(message, flush=True)


def run_job(pipe, inputs: Mapping[str, Any], workdir: str | os.PathLike, *,
            fetch: Callable[[str, Any, Path], str | os.PathLike] | None = None,
            on_metric: Callable[[str, Any], None] | None = None,
            on_progress: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_preview: Callable[[Path, float], None] | None = None,
            log: Callable[[str], None] = _log, show_progress: bool = True) -> JobResult:
    """Validate ``inputs``, fetch the files, generate the MP4 into ``workdir``; see the module doc.

    ``fetch(name, value, workdir)`` turns a file input into a local path (the RunPod worker
    downloads URLs); without it file inputs must be local paths. ``workdir`` is created if needed
    and belongs to this run: on any failure or cancellation (also a BaseException raised by a
    callback, such as cog's CancelationException) it is removed before the exception propagates.
    On success it holds the output, and the caller removes it after delivering the video.

    ``on_preview(path, seconds)``: after each chunk, a playable MP4 of the video so far
    (``preview-NNN.mp4`` in ``workdir``, by stream copy of the live segments, ``infinitetalk/preview.py``),
    called from the segment writer's thread; the final MP4 is the same as without it.
    """
    workdir = Path(workdir)
    metrics: dict[str, Any] = {}

    def metric(key: str, value: Any) -> None:
        metrics[key] = value
        if on_metric is not None:
            on_metric(key, value)

    labels: dict[str, Any] = {}
    try:
        request = build_request(inputs)
        log(f"seed: {request.seed}")
        workdir.mkdir(parents=True, exist_ok=True)
        if fetch is not None:
            files = {name: getattr(request, name) for name in FILE_INPUTS}
            labels = {name: fetch(name, value, workdir) if value is not None else None for name, value in files.items()}
            request = replace(request, **labels)
        labels = {name: getattr(request, name) for name in FILE_INPUTS}
        tracker = ProgressTracker(metric, on_progress, should_stop)
        try:
            probe_request(request)  # every file's header and limits, before any model work
            live = {"hls": _previews(workdir, on_preview, log)} if on_preview is not None else {}
            result = pipe.generate(request, workdir / "output.mp4", callback=tracker, show_progress=show_progress,
                                   **live)
        except InputError as exc:
            # Input files have generated names (cog's tmpab12cd34file.png, our downloads): name the input.
            raise InputError(name_inputs(str(exc), labels)) from None
    except BaseException:
        # Failure or cancellation (cog's CancelationException is a BaseException): nothing of this run stays.
        remove_workdir(workdir)
        raise
    if inputs.get("max_duration") is None and result.audio_duration > result.duration + 1.0 / FPS:
        log(f"note: the audio is {result.audio_duration:.1f} s; the video stops at {result.duration:.1f} s "
            f"(limit {MAX_VIDEO_SECONDS:g} s per prediction)")
    for key, value in (("seed", result.seed), ("chunks", result.num_chunks), ("denoising_steps", tracker.steps_done),
                       ("frames", result.num_frames), ("video_seconds", round(result.duration, 3)),
                       ("width", result.width), ("height", result.height)):
        metric(key, value)
    log(f"done: {result.num_frames} frames ({result.duration:.2f} s) at {result.width}x{result.height}, "
        f"{result.num_chunks} chunk(s), seed {result.seed}, "
        + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items() if isinstance(v, (int, float))))
    return JobResult(Path(result.path), workdir, request, result, metrics)


def _previews(workdir: Path, on_preview: Callable[[Path, float], None], log: Callable[[str], None]):
    """The live segments of a job in ``workdir/live``; after each one a preview MP4 of the video so far."""
    from .preview import HLSOutput, preview_mp4

    def on_segment(segment) -> None:
        try:
            path = preview_mp4(segment.folder, workdir / f"preview-{segment.index:03d}.mp4")
        except Exception as exc:  # noqa: BLE001 (a preview is never worth the job)
            log(f"preview {segment.index} skipped: {exc}")
            return
        on_preview(path, segment.seconds)

    return HLSOutput(workdir / "live", on_segment=on_segment)


# ----------------------------------------------------------------------------------------------
# Start-up
# ----------------------------------------------------------------------------------------------


def load_pipeline(settings: Settings | None = None, log: Callable[[str], None] = _log):
    """Load every model once (GPU when present, else CPU), fetching the weights first if absent.

    The text-to-speech files are fetched too (:func:`_fetch_tts`); failing to fetch them is a warning.

    ``settings``: validated :class:`~infinitetalk.settings.Settings` (default: read from the environment);
    the pipeline is built by :func:`infinitetalk.build.build_pipeline`. Afterwards the Hub clients
    are switched off for this process: nothing may reach for the network during a job.
    """
    from .build import build_pipeline, placement
    from .download import ensure_weights
    from .settings import Settings

    settings = Settings.from_env() if settings is None else settings
    t0 = time.perf_counter()
    weights = ensure_weights(settings.weights, log=log)
    _fetch_tts(weights, log)
    t_fetch = time.perf_counter() - t0
    _quiet_loading_bars()
    pipe = build_pipeline(settings)
    timings = getattr(pipe, "load_timings", {})
    log(f"setup: loaded InfiniteTalk from {weights} on {placement(pipe)} in "
        f"{time.perf_counter() - t0:.1f}s (weights check/download {t_fetch:.1f}s; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if isinstance(v, (int, float))) + ")")
    compiled = bool(getattr(pipe, "compiled", False))
    sizes = settings.warmup_sizes(compiled)
    if sizes:  # compile before the first request, not inside it (infinitetalk/compilation.py)
        from .compilation import compile_cache_file, compile_stats, load_compile_cache, save_compile_cache, warm_up

        cache = compile_cache_file(weights, pipe.device)
        t1 = time.perf_counter()
        had_cache = compiled and load_compile_cache(cache)
        timings["compile_cache_load"] = time.perf_counter() - t1
        timings["warmup"] = seconds = warm_up(pipe, sizes, log=log, fast=settings.warmup_fast)
        log(f"setup: warm-up done in {seconds:.1f}s ({compile_stats()['compiles']} graph(s) compiled, "
            f"compile cache {'loaded' if had_cache else 'cold'})")
        if pipe.compiled and not had_cache:  # still compiled: the warm-up may have fallen back to eager
            t1 = time.perf_counter()
            save_compile_cache(cache)  # the next start from this weights folder compiles from it
            timings["compile_cache_save"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if getattr(pipe, "speech", None) is not None:  # loaded on a thread beside the warm-up; READY includes it
        log(f"setup: text to speech ready ({timings.get('tts', 0.0):.1f}s beside the warm-up; "
            f"waited {time.perf_counter() - t1:.1f}s for it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return pipe


def _fetch_tts(weights: Path, log: Callable[[str], None]) -> None:
    """Fetch the optional text-to-speech files into a weights folder whose required groups are complete.

    A failure is one warning line, not a failed setup: the server starts and refuses only the ``text``
    input (the pipeline checks :func:`infinitetalk.speech.tts_paths`).
    """
    from .download import WeightsDownloadError, ensure_weights

    try:
        ensure_weights(weights, log=log, tts=True)  # the required groups are complete: only TTS is planned
    except WeightsDownloadError as exc:
        log(f"setup: warning: the text input is disabled, its text-to-speech weights are missing: {exc}")


def _quiet_loading_bars() -> None:
    """Off a terminal (Cog, RunPod), transformers' and diffusers' "Loading weights" bars would put
    carriage returns into the setup logs, and they say nothing the timings of the setup line do not."""
    import sys

    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return
    except (AttributeError, ValueError, OSError):
        pass
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def configure_logging() -> None:
    """Show the library's INFO logs (loading, plan, warnings) on stderr (Cog and RunPod collect it)."""
    import logging
    import sys

    log = logging.getLogger("infinitetalk")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


__all__ = [
    "FILE_INPUTS",
    "INPUTS",
    "MAX_SEED",
    "MAX_VIDEO_SECONDS",
    "InputSpec",
    "JobResult",
    "ProgressTracker",
    "build_request",
    "choose_seed",
    "configure_logging",
    "load_pipeline",
    "new_workdir",
    "parse_box",
    "parse_boxes",
    "quality_to_crf",
    "remove_workdir",
    "run_job",
]
