"""Cog predictor for InfiniteTalk: a portrait (or a video to dub) + speech -> lip-synced MP4.

A thin adapter: every model and algorithm lives in the ``infinitetalk`` package. This file maps
Cog inputs to :class:`infinitetalk.pipeline.GenerationRequest`, reports progress, metrics and
the seed in the logs, and keeps each prediction's files in its own temporary folder.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from typing import Optional

from cog import BaseRunner, Input, Path

from infinitetalk.download import default_weights_dir, ensure_weights
from infinitetalk.errors import InputError
from infinitetalk.inputs import name_inputs
from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline, ProgressEvent, options_from_env

# `cog build` reads the inputs with a static parser: it resolves only literals and module-level
# literal assignments, and silently drops anything else (an imported default would make the input
# required; a computed ge/le would vanish). So every Input() below uses literals; tests check
# that they match these constants and the library's defaults.
#: Longest video one prediction makes, in seconds; longer audio is cut (and max_duration is capped to it).
MAX_VIDEO_SECONDS = 600.0
MAX_SEED = 4294967295  # 2**32 - 1
#: = infinitetalk.pipeline.DEFAULT_PROMPT (a literal here for the static schema parser).
DEFAULT_PROMPT = "A person is talking naturally, looking at the camera."


def quality_to_crf(quality: int) -> int:
    """Output ``quality`` 1..10 (higher is better) -> x264 CRF: ``40 - 3 * quality`` (8 -> 16, 10 -> 10, 1 -> 37)."""
    return 40 - 3 * int(quality)


def parse_box(text: Optional[str], name: str) -> Optional[list[float]]:
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


def _configure_logging() -> None:
    """Show the library's INFO logs (loading, plan, warnings) in Cog's logs."""
    log = logging.getLogger("infinitetalk")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load every model once (GPU when present, else CPU); fetch the weights first if absent."""
        _configure_logging()
        t0 = time.perf_counter()
        weights = ensure_weights(default_weights_dir(), log=print)
        t_fetch = time.perf_counter() - t0
        self.pipe = InfiniteTalkPipeline.from_pretrained(weights, **options_from_env())
        timings = getattr(self.pipe, "load_timings", {})
        print(f"setup: loaded InfiniteTalk from {weights} on {self.pipe.device} ({self.pipe.dtype}) in "
              f"{time.perf_counter() - t0:.1f}s (weights check/download {t_fetch:.1f}s; "
              + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if isinstance(v, (int, float))) + ")",
              flush=True)
        # Everything is local from here on: never let a library reach for the Hub during a prediction.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self._last_workdir: Optional[Path] = None

    def run(
        self,
        image: Path = Input(
            description="Reference: a portrait image (PNG, JPEG, WebP, ...) or a video to dub (MP4, MOV, WebM, ...). "
            "A video is followed frame by frame; an image is animated. Limits: at most 67108864 pixels "
            "(8192x8192) and at least 64 pixels a side; animated images use their first frame; a video at most "
            "3600 s.",
            accept="image/*,video/*",
        ),
        audio: Path = Input(
            description="Speech of speaker 1 (WAV, MP3, M4A, FLAC, OGG, or a video with sound). "
            "The video is as long as the audio (see max_duration; at most 600 s). Any sample rate and channel "
            "count, silence included; at least 40 ms; NaN/infinite samples are rejected.",
            accept="audio/*,video/*",
        ),
        audio_2: Optional[Path] = Input(
            default=None,
            description="Optional speech of speaker 2: makes a two-person conversation with the multi-speaker weights. "
            "Same formats and limits as audio.",
            accept="audio/*,video/*",
        ),
        audio_mode: str = Input(
            default="para",
            choices=["para", "add"],
            description="Two speakers only: 'para' plays both tracks at the same time; "
            "'add' plays speaker 1, then speaker 2.",
        ),
        box_1: Optional[str] = Input(
            default=None,
            description="Two speakers only: region of speaker 1 as 'top,left,bottom,right' in pixels of the image "
            "(e.g. '40,10,300,250'), inside the image. Give box_1 and box_2 together; empty: left and right halves.",
        ),
        box_2: Optional[str] = Input(
            default=None,
            description="Two speakers only: region of speaker 2 as 'top,left,bottom,right' in pixels of the image, "
            "inside the image.",
        ),
        prompt: str = Input(default=DEFAULT_PROMPT, description="What the video shows (scene, person, motion). "
                         "Longer than 512 tokens: truncated (noted in the logs)."),
        negative_prompt: Optional[str] = Input(
            default=None,
            description="What to avoid. Empty: the official Wan negative prompt.",
        ),
        resolution: str = Input(
            default="480p",
            choices=["480p", "720p"],
            description="Output size class; the exact size is the bucket nearest the image's aspect ratio "
            "(480p: about 640x640 pixels in area, 720p: about 960x960).",
        ),
        width: Optional[int] = Input(
            default=None, ge=64, le=2048,
            description="Explicit output width (multiple of 16); overrides the resolution bucket. Give with height.",
        ),
        height: Optional[int] = Input(
            default=None, ge=64, le=2048,
            description="Explicit output height (multiple of 16); overrides the resolution bucket. Give with width.",
        ),
        max_duration: Optional[float] = Input(
            default=None, ge=0.04, le=600.0,
            description="Longest video in seconds; empty: the whole audio (at most 600 s).",
        ),
        turbo: bool = Input(
            default=False,
            description="Turbo: the lightx2v step/CFG-distilled LoRA, 4 steps x 2 forwards instead of 40 x 3 "
            "(about 14x faster, slightly less motion detail). Sets the defaults of steps, guidance and shift.",
        ),
        steps: Optional[int] = Input(
            default=None, ge=1, le=100,
            description="Denoising steps per 81-frame chunk; empty: 40 (turbo: 4).",
        ),
        text_guidance: Optional[float] = Input(
            default=None, ge=0.0, le=20.0,
            description="Prompt guidance scale; empty: 5 (turbo: 1). At 1 each step needs 2 forwards instead of 3.",
        ),
        audio_guidance: Optional[float] = Input(
            default=None, ge=0.0, le=20.0,
            description="Audio guidance scale (lip-sync strength); empty: 4 (turbo: 2).",
        ),
        shift: Optional[float] = Input(
            default=None, ge=0.1, le=50.0,
            description="Noise schedule shift; empty: 7 at 480p, 11 at 720p (turbo: 2).",
        ),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295,
            description="Random seed for a reproducible result; empty: random (the seed used is in the logs).",
        ),
        color_correction: float = Input(
            default=1.0, ge=0.0, le=1.0,
            description="How strongly each chunk's colours are matched to the reference (0: off).",
        ),
        apg: bool = Input(default=False, description="Adaptive projected guidance: fewer artefacts at high guidance."),
        quality: int = Input(
            default=8, ge=1, le=10,
            description="Output video quality 1-10, higher is better and bigger: H.264 CRF = 40 - 3 x quality "
            "(8: CRF 16, 10: CRF 10).",
        ),
    ) -> Path:
        """Generate one lip-synced MP4."""
        self._cleanup_previous()
        bboxes = self._boxes(box_1, box_2, audio_2 is not None)
        if not 1 <= int(quality) <= 10:
            raise InputError(f"quality must be between 1 and 10, got {quality}")
        if max_duration is not None and max_duration > MAX_VIDEO_SECONDS:
            raise InputError(f"max_duration must be at most {MAX_VIDEO_SECONDS:g} s, got {max_duration}")
        if seed is not None and not 0 <= int(seed) <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
        print(f"seed: {seed}", flush=True)
        request = GenerationRequest(
            image=str(image), audio=str(audio), audio_2=str(audio_2) if audio_2 is not None else None,
            audio_mode=audio_mode, bboxes=bboxes, prompt=prompt, negative_prompt=negative_prompt,
            resolution=resolution, width=width, height=height,
            max_duration=min(max_duration, MAX_VIDEO_SECONDS) if max_duration is not None else MAX_VIDEO_SECONDS,
            steps=steps, text_guidance=text_guidance, audio_guidance=audio_guidance, shift=shift, seed=int(seed),
            color_correction=color_correction, apg=apg, crf=quality_to_crf(quality), turbo=bool(turbo),
        )
        request.validate()

        workdir = Path(tempfile.mkdtemp(prefix="infinitetalk-run-"))
        steps_done = 0
        last = None

        def on_progress(ev: ProgressEvent) -> None:
            # One event per denoising step, then the last step's (chunk, step) again once the chunk is encoded.
            nonlocal steps_done, last
            if (ev.chunk, ev.step) == last:
                self.record_metric("chunks_done", ev.chunk + 1)
                self.record_metric("video_seconds_done", round(ev.frames_done / 25.0, 2))
            else:
                steps_done += 1
                self.record_metric("denoising_steps", steps_done)
            last = (ev.chunk, ev.step)

        self._last_workdir = workdir  # removed by the next run even if a cancel lands after generate() returns
        try:
            result = self.pipe.generate(request, workdir / "output.mp4", callback=on_progress, show_progress=True)
        except InputError as exc:
            # The inputs are cog's temporary files (tmpab12cd34file.png): name the input, not the file.
            self._cleanup_previous()
            raise InputError(name_inputs(str(exc), {"image": image, "audio": audio, "audio_2": audio_2})) from None
        except BaseException:
            # Failure or cancellation (CancelationException is a BaseException): nothing of this run stays.
            self._cleanup_previous()
            raise
        if max_duration is None and result.audio_duration > result.duration + 0.04:
            print(f"note: the audio is {result.audio_duration:.1f} s; the video stops at {result.duration:.1f} s "
                  f"(limit {MAX_VIDEO_SECONDS:g} s per prediction)", flush=True)
        for key, value in (("seed", result.seed), ("chunks", result.num_chunks), ("denoising_steps", steps_done),
                           ("frames", result.num_frames), ("video_seconds", round(result.duration, 3)),
                           ("width", result.width), ("height", result.height)):
            self.record_metric(key, value)
        print(f"done: {result.num_frames} frames ({result.duration:.2f} s) at {result.width}x{result.height}, "
              f"{result.num_chunks} chunk(s), seed {result.seed}, "
              + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items() if isinstance(v, (int, float))),
              flush=True)
        return Path(result.path)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _boxes(box_1: Optional[str], box_2: Optional[str], two_speakers: bool) -> Optional[list[list[float]]]:
        b1, b2 = parse_box(box_1, "box_1"), parse_box(box_2, "box_2")
        if b1 is None and b2 is None:
            return None
        if not two_speakers:
            raise InputError("box_1/box_2 are only used with two speakers: give audio_2 too, or leave the boxes empty")
        if b1 is None or b2 is None:
            raise InputError("give both box_1 and box_2 (one region per speaker), or neither")
        return [b1, b2]

    def _cleanup_previous(self) -> None:
        """Remove the previous prediction's folder: its MP4 has been uploaded by now."""
        last = getattr(self, "_last_workdir", None)
        if last is not None:
            shutil.rmtree(last, ignore_errors=True)
            self._last_workdir = None
