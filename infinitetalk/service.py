"""The serving core shared by every front end (the Cog predictor, the RunPod worker).

One place for what a service does around :meth:`InfiniteTalkPipeline.generate`:

* :data:`INPUTS`: the public inputs, their types, defaults and ranges (the Cog ``Input()``
  declarations in ``predict.py`` must be literals for cog's static parser; a test checks that
  they agree with this table);
* :func:`build_request`: a job's inputs (a dict with those names) -> a validated
  :class:`GenerationRequest` (types, ranges, boxes, quality -> CRF, the max-duration cap, the
  seed choice), raising :class:`InputError` with one line that names the input;
* :func:`run_job`: build, fetch the input files (optional hook), generate into a per-run folder,
  report progress (metrics and snapshots), rename file names in input errors to the input's name,
  and remove the folder on any failure or cancellation;
* :func:`load_pipeline`: load every model once per process (weights fetched first if absent), as
  the validated :class:`~infinitetalk.settings.Settings` say.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GenerationCancelled, InputError
from .inputs import name_inputs
from .pipeline import DEFAULT_PROMPT, FPS, GenerationRequest, GenerationResult, ProgressEvent

if TYPE_CHECKING:
    from .settings import Settings

#: Longest video one job makes, in seconds; longer audio is cut (and max_duration is capped to it).
MAX_VIDEO_SECONDS = 600.0
MAX_SEED = 4294967295  # 2**32 - 1
#: Inputs that are files (local paths for Cog; URLs or data URLs for the RunPod worker).
FILE_INPUTS = ("image", "audio", "audio_2")
REQUIRED = object()  # default of a required input


@dataclass(frozen=True)
class InputSpec:
    """One public input: ``kind`` is file, str, int, float or bool; ``default`` None = optional (empty)."""

    kind: str
    default: Any = None
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None


#: The public inputs, in the order of the Cog predictor's ``run()``.
INPUTS: dict[str, InputSpec] = {
    "image": InputSpec("file", REQUIRED),
    "audio": InputSpec("file", REQUIRED),
    "audio_2": InputSpec("file"),
    "audio_mode": InputSpec("str", "para", choices=("para", "add")),
    "box_1": InputSpec("str"),
    "box_2": InputSpec("str"),
    "prompt": InputSpec("str", DEFAULT_PROMPT),
    "negative_prompt": InputSpec("str"),
    "resolution": InputSpec("str", "480p", choices=("480p", "720p")),
    "width": InputSpec("int", None, 64, 2048),
    "height": InputSpec("int", None, 64, 2048),
    "max_duration": InputSpec("float", None, 0.04, MAX_VIDEO_SECONDS),
    "turbo": InputSpec("bool", False),
    "steps": InputSpec("int", None, 1, 100),
    "text_guidance": InputSpec("float", None, 0.0, 20.0),
    "audio_guidance": InputSpec("float", None, 0.0, 20.0),
    "shift": InputSpec("float", None, 0.1, 50.0),
    "seed": InputSpec("int", None, 0, MAX_SEED),
    "color_correction": InputSpec("float", 1.0, 0.0, 1.0),
    "apg": InputSpec("bool", False),
    "step_cache": InputSpec("float", 0.0, 0.0, 1.0),
    "quality": InputSpec("int", 8, 1, 10),
}


def quality_to_crf(quality: int) -> int:
    """Output ``quality`` 1..10 (higher is better) -> x264 CRF: ``40 - 3 * quality`` (8 -> 16, 10 -> 10, 1 -> 37)."""
    return 40 - 3 * int(quality)


def parse_box(text: str | None, name: str) -> list[float] | None:
    """``"top,left,bottom,right"`` in source pixels -> 4 floats; empty -> None; InputError when malformed."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"{name} must be 'top,left,bottom,right' in pixels of the image, got {text!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise InputError(f"{name} must be 4 non-negative numbers 'top,left,bottom,right', got {text!r}")
    top, left, bottom, right = values
    if bottom <= top or right <= left:
        raise InputError(f"{name} must have bottom > top and right > left, got {text!r}")
    return values


def parse_boxes(box_1: str | None, box_2: str | None, two_speakers: bool) -> list[list[float]] | None:
    """Both boxes or neither, and only with a second speaker."""
    b1, b2 = parse_box(box_1, "box_1"), parse_box(box_2, "box_2")
    if b1 is None and b2 is None:
        return None
    if not two_speakers:
        raise InputError("box_1/box_2 are only used with two speakers: give audio_2 too, or leave the boxes empty")
    if b1 is None or b2 is None:
        raise InputError("give both box_1 and box_2 (one region per speaker), or neither")
    return [b1, b2]


def choose_seed(seed: int | None) -> int:
    """The given seed, or a random one in 0..MAX_SEED."""
    return secrets.randbelow(MAX_SEED + 1) if seed is None else int(seed)


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_value(name: str, spec: InputSpec, value: Any) -> Any:
    """One input's value (None = empty) with its type and range checked; InputError names the input."""
    blank = isinstance(value, str) and not value.strip()
    if value is None or (blank and (spec.kind == "file" or (spec.kind == "str" and spec.default is None))):
        if spec.default is REQUIRED:
            raise InputError(f"{name} is required")
        if spec.default is not None:
            # Like Cog's schema: only inputs whose default is empty accept null.
            raise InputError(f"{name} must not be null (leave it out for the default {spec.default!r})")
        return None
    if spec.kind == "file":
        if not isinstance(value, (str, os.PathLike)):
            raise InputError(f"{name} must be a file (a URL), got {_shown(value)}")
        return value
    if spec.kind == "str":
        if not isinstance(value, str):
            raise InputError(f"{name} must be a string, got {_shown(value)}")
        if spec.choices is not None and value not in spec.choices:
            raise InputError(f"{name} must be " + " or ".join(repr(c) for c in spec.choices) + f", got {value!r}")
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{name} must be true or false, got {_shown(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "an integer" if spec.kind == "int" else "a number"
        raise InputError(f"{name} must be {what}, got {_shown(value)}")
    if spec.kind == "int":
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise InputError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    elif not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if name == "max_duration":  # the messages of the Cog predictor since the first release
        if value > MAX_VIDEO_SECONDS:
            raise InputError(f"max_duration must be at most {MAX_VIDEO_SECONDS:g} s, got {value}")
        if value < 0.04:
            raise InputError(f"max_duration must be at least 0.04 s (one frame), got {value}")
    elif (spec.ge is not None and value < spec.ge) or (spec.le is not None and value > spec.le):
        raise InputError(f"{name} must be between {_num(spec.ge)} and {_num(spec.le)}, got {value}")
    return value


def build_request(inputs: Mapping[str, Any]) -> GenerationRequest:
    """A job's inputs (the names of :data:`INPUTS`; absent = default) -> a validated request.

    File inputs are passed through as given (paths, or URLs that the caller fetches later).
    The seed is chosen here when empty, so the request is reproducible and can be logged.
    Raises :class:`InputError` (one line naming the input) for any invalid value.
    """
    if not isinstance(inputs, Mapping):
        raise InputError(f"the input must be an object of named inputs, got {type(inputs).__name__}")
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise InputError(f"unknown input(s) {', '.join(map(repr, unknown))}; the inputs are: {', '.join(INPUTS)}")
    v = {name: _check_value(name, spec, inputs.get(name, None if spec.default is REQUIRED else spec.default))
         for name, spec in INPUTS.items()}
    bboxes = parse_boxes(v["box_1"], v["box_2"], v["audio_2"] is not None)
    max_duration = v["max_duration"]
    request = GenerationRequest(
        image=v["image"], audio=v["audio"], audio_2=v["audio_2"], audio_mode=v["audio_mode"], bboxes=bboxes,
        prompt=v["prompt"], negative_prompt=v["negative_prompt"], resolution=v["resolution"],
        width=v["width"], height=v["height"],
        max_duration=min(max_duration, MAX_VIDEO_SECONDS) if max_duration is not None else MAX_VIDEO_SECONDS,
        steps=v["steps"], text_guidance=v["text_guidance"], audio_guidance=v["audio_guidance"], shift=v["shift"],
        seed=choose_seed(v["seed"]), color_correction=v["color_correction"], apg=v["apg"],
        crf=quality_to_crf(v["quality"]), turbo=v["turbo"], step_cache=v["step_cache"],
    )
    request.validate()
    return request


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
            log: Callable[[str], None] = _log, show_progress: bool = True) -> JobResult:
    """Validate ``inputs``, fetch the files, generate the MP4 into ``workdir``; see the module doc.

    ``fetch(name, value, workdir)`` turns a file input into a local path (the RunPod worker
    downloads URLs); without it file inputs must be local paths. ``workdir`` is created if needed
    and belongs to this run: on any failure or cancellation (also a BaseException raised by a
    callback, such as cog's CancelationException) it is removed before the exception propagates.
    On success it holds the output, and the caller removes it after delivering the video.
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
            result = pipe.generate(request, workdir / "output.mp4", callback=tracker, show_progress=show_progress)
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


# ----------------------------------------------------------------------------------------------
# Start-up
# ----------------------------------------------------------------------------------------------


def load_pipeline(settings: Settings | None = None, log: Callable[[str], None] = _log):
    """Load every model once (GPU when present, else CPU), fetching the weights first if absent.

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
    t_fetch = time.perf_counter() - t0
    pipe = build_pipeline(settings)
    timings = getattr(pipe, "load_timings", {})
    log(f"setup: loaded InfiniteTalk from {weights} on {placement(pipe)} in "
        f"{time.perf_counter() - t0:.1f}s (weights check/download {t_fetch:.1f}s; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if isinstance(v, (int, float))) + ")")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return pipe


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
