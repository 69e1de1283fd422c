"""What one generation is asked for: the one rule table of the inputs and :class:`GenerationRequest`.

:data:`INPUTS` names every public input with its type, default and range. The Cog predictor
declares the same inputs as literals (cog's static parser needs them; a test keeps the two
equal), :func:`build_request` turns a job's named inputs (Cog, RunPod JSON) into a request, and
:meth:`GenerationRequest.validate` checks a request built in Python (the CLI, the library) with
the same table. Every failure is an :class:`InputError` with one line that names the input.

A leaf module: it imports nothing of the pipeline, so every front end can validate a request
before any model (or torch) is loaded.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from . import speech
from .errors import InputError

DEFAULT_PROMPT = "A person is talking naturally, looking at the camera."
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
#: Longest video one server job makes, in seconds (longer audio is cut). The library has no cap.
MAX_VIDEO_SECONDS = 600.0
MAX_SEED = 4294967295  # 2**32 - 1: seeds given and seeds drawn
#: Inputs that are files (local paths for Cog and the CLI; URLs or data URLs for the RunPod worker).
FILE_INPUTS = ("image", "audio", "audio_2")
REQUIRED = object()  # default of a required input


@dataclass(frozen=True)
class InputSpec:
    """One input: ``kind`` is file, str, int, float or bool; ``default`` None = optional (empty)."""

    kind: str
    default: Any = None
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None


#: The public inputs, in the order of the Cog predictor's ``run()``.
INPUTS: dict[str, InputSpec] = {
    "image": InputSpec("file", REQUIRED),
    "audio": InputSpec("file"),  # audio or text: exactly one (GenerationRequest.validate)
    "audio_2": InputSpec("file"),
    "text": InputSpec("str"),
    "voice": InputSpec("str", speech.DEFAULT_VOICE, choices=speech.VOICES),
    "voice_2": InputSpec("str", speech.DEFAULT_VOICE_2, choices=speech.VOICES),
    "speech_speed": InputSpec("float", 1.0, *speech.SPEED_RANGE),
    "audio_mode": InputSpec("str", "para", choices=("para", "add")),
    "box_1": InputSpec("str"),
    "box_2": InputSpec("str"),
    "prompt": InputSpec("str", DEFAULT_PROMPT),
    "negative_prompt": InputSpec("str"),
    "resolution": InputSpec("str", "480p", choices=("480p", "720p")),
    "width": InputSpec("int", None, 64, 2048, multiple_of=16),
    "height": InputSpec("int", None, 64, 2048, multiple_of=16),
    "max_duration": InputSpec("float", None, 0.04, MAX_VIDEO_SECONDS),
    "turbo": InputSpec("bool", False),
    "fast": InputSpec("bool", False),  # FP8 GEMMs + 8-bit self-attention (fast.py); servers that can say so
    "steps": InputSpec("int", None, 1, 100),
    "text_guidance": InputSpec("float", None, 0.0, 20.0),
    "audio_guidance": InputSpec("float", None, 0.0, 20.0),
    "shift": InputSpec("float", None, 0.1, 50.0),
    "seed": InputSpec("int", None, 0, MAX_SEED),
    "color_correction": InputSpec("float", 1.0, 0.0, 1.0),
    "apg": InputSpec("bool", False),
    "step_cache": InputSpec("float", 0.0, 0.0, 1.0),
    "quality": InputSpec("int", 8, 1, 10),
    "preview": InputSpec("bool", False),  # an output option: the video so far after each chunk (not a request field)
}

#: Request fields that are not public inputs, and the library's own relaxations of the table:
#: the CLI and the library take an x264 CRF directly, and have no length cap.
REQUEST_ONLY: dict[str, InputSpec] = {
    "crf": InputSpec("int", 16, 0, 51),  # 16 = quality_to_crf(8): the front ends' default quality
    "max_duration": replace(INPUTS["max_duration"], le=None),
}


def quality_to_crf(quality: int) -> int:
    """Output ``quality`` 1..10 (higher is better) -> x264 CRF: ``40 - 3 * quality`` (8 -> 16, 10 -> 10, 1 -> 37)."""
    return 40 - 3 * int(quality)


def choose_seed(seed: int | None) -> int:
    """The given seed, or a random one in 0..MAX_SEED."""
    return secrets.randbelow(MAX_SEED + 1) if seed is None else int(seed)


# ----------------------------------------------------------------------------------------------
# One value against its rule
# ----------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_file(name: str, spec: InputSpec, value: Any) -> Any:
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{name} must be a file (a URL), got {_shown(value)}")
    return value


def _check_str(name: str, spec: InputSpec, value: Any) -> Any:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {_shown(value)}")
    if spec.choices is not None and value not in spec.choices:
        if len(spec.choices) > 3:
            raise InputError(f"{name} must be one of {', '.join(spec.choices)}; got {value!r}")
        raise InputError(f"{name} must be " + " or ".join(repr(c) for c in spec.choices) + f", got {value!r}")
    return value


def _check_bool(name: str, spec: InputSpec, value: Any) -> Any:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {_shown(value)}")
    return value


def _check_number(name: str, spec: InputSpec, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "an integer" if spec.kind == "int" else "a number"
        raise InputError(f"{name} must be {what}, got {_shown(value)}")
    if spec.kind == "int":
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise InputError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    elif not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if name == "max_duration":  # its messages since the first release
        if spec.le is not None and value > spec.le:
            raise InputError(f"{name} must be at most {spec.le:g} s, got {value}")
        if value < spec.ge:
            raise InputError(f"{name} must be at least {spec.ge:g} s (one frame), got {value}")
    elif (spec.ge is not None and value < spec.ge) or (spec.le is not None and value > spec.le):
        raise InputError(f"{name} must be between {_num(spec.ge)} and {_num(spec.le)}, got {value}")
    if spec.multiple_of and value % spec.multiple_of:
        raise InputError(f"{name} must be a multiple of {spec.multiple_of} between {_num(spec.ge)} and "
                         f"{_num(spec.le)}, got {value}")
    return value


_CHECKS = {"file": _check_file, "str": _check_str, "bool": _check_bool, "int": _check_number, "float": _check_number}


def check_value(name: str, spec: InputSpec, value: Any) -> Any:
    """One input's value (None = empty) with its type and range checked; InputError names the input."""
    blank = isinstance(value, str) and not value.strip()
    if value is None or (blank and (spec.kind == "file" or (spec.kind == "str" and spec.default is None))):
        if spec.default is REQUIRED:
            raise InputError(f"{name} is required")
        if spec.default is not None:
            # Like Cog's schema: only inputs whose default is empty accept null.
            raise InputError(f"{name} must not be null (leave it out for the default {spec.default!r})")
        return None
    return _CHECKS[spec.kind](name, spec, value)


# ----------------------------------------------------------------------------------------------
# Speaker boxes
# ----------------------------------------------------------------------------------------------


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
        raise InputError("box_1/box_2 are only used with two speakers: give audio_2 too (or (s2) turns in text), "
                         "or leave the boxes empty")
    if b1 is None or b2 is None:
        raise InputError("give both box_1 and box_2 (one region per speaker), or neither")
    return [b1, b2]


# ----------------------------------------------------------------------------------------------
# The request
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """Everything one generation needs.  Paths are local files; checked by :meth:`validate`."""

    image: str | Path  # image or video (V2V dubbing)
    audio: str | Path | None = None  # speech; or give text instead
    audio_2: str | Path | None = None
    audio_mode: str = "para"  # para: simultaneous; add: speaker 1 then speaker 2
    bboxes: Sequence[Sequence[float]] | None = None  # [[top, left, bottom, right], [..]] in source pixels
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str | None = None  # None -> the official default
    resolution: str = "480p"
    width: int | None = None
    height: int | None = None
    max_duration: float | None = None  # seconds; None -> whole audio
    steps: int | None = None  # None -> 40 (exact) / 4 (turbo)
    text_guidance: float | None = None  # None -> 5 (exact) / 1 (turbo: 2 forwards per step)
    audio_guidance: float | None = None  # None -> 4 (exact) / 2 (turbo)
    shift: float | None = None  # None -> 7 (480p) / 11 (720p) exact, 2 turbo
    seed: int | None = None  # None -> drawn in 0..MAX_SEED by the pipeline
    color_correction: float = 1.0
    apg: bool = False
    crf: int = 16  # the servers' and the CLI's default (quality 8); the CLI's --crf and the library take any 0-51
    turbo: bool = False  # distilled LoRA mode: needs a pipeline loaded with the LoRA
    step_cache: float = 0.0  # TeaCache-rule threshold (0 = off; 0.2-0.5 trade quality for speed)
    # Text input instead of audio (last, so the fields before keep their positions for positional callers)
    text: str | None = None  # words to speak (speech.py): plain, or a dialogue of (s1)/(s2) turns
    voice: str = speech.DEFAULT_VOICE  # the voice of the text (of speaker 1 in a dialogue)
    voice_2: str = speech.DEFAULT_VOICE_2  # the voice of speaker 2 in a dialogue
    speech_speed: float = 1.0
    fast: bool = False  # FP8 GEMMs + 8-bit self-attention on Hopper (infinitetalk/fast.py): approximate

    @property
    def speakers(self) -> int:
        if self.text is not None:
            return speech.speakers_of(speech.parse_script(self.text))
        return 1 if self.audio_2 is None else 2

    def turns(self) -> list[speech.Turn]:
        """The text's turns, checked against the voices (an InputError names what is wrong)."""
        return speech.script_turns(self.text, (self.voice, self.voice_2))

    def resolved(self) -> GenerationRequest:
        """A copy with the mode's defaults filled in (official values for exact and LoRA modes)."""
        if self.turbo:
            defaults = dict(steps=4, text_guidance=1.0, audio_guidance=2.0, shift=2.0)
        else:
            defaults = dict(steps=40, text_guidance=5.0, audio_guidance=4.0,
                            shift=7.0 if self.resolution == "480p" else 11.0)
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self) -> None:
        """Check every field (with the mode's defaults filled in) against :data:`INPUTS`."""
        req = self.resolved()
        for f in fields(req):
            spec = REQUEST_ONLY.get(f.name) or INPUTS.get(f.name)
            if spec is not None and spec.kind != "file":
                check_value(f.name, spec, getattr(req, f.name))
        if (req.width is None) != (req.height is None):
            raise InputError("width and height must be given together")
        _check_speech_source(req)
        if req.bboxes is not None:
            if req.speakers == 1:
                raise InputError("boxes are only used with two speakers (audio_2, or (s2) turns in text)")
            if len(req.bboxes) != 2 or not all(len(b) == 4 for b in req.bboxes):
                raise InputError("boxes must be two [top, left, bottom, right] boxes, one per speaker")


def _check_speech_source(req: GenerationRequest) -> None:
    """Speech comes from audio files or from text, never both."""
    if req.text is None:
        if req.audio is None:
            raise InputError("give audio (a speech file) or text (the words to speak)")
        return
    if req.audio is not None:
        raise InputError("give audio or text, not both")
    if req.audio_2 is not None:
        raise InputError("audio_2 cannot be used with text: write a dialogue as (s1) ... (s2) ... turns in text")
    req.turns()


def build_request(inputs: Mapping[str, Any]) -> GenerationRequest:
    """A job's inputs (the names of :data:`INPUTS`; absent = default) -> a validated request.

    File inputs are passed through as given (paths, or URLs that the caller fetches later).
    The seed is chosen here when empty, so the request is reproducible and can be logged; the
    length is capped at :data:`MAX_VIDEO_SECONDS`. Raises :class:`InputError` (one line naming
    the input) for any invalid value.
    """
    if not isinstance(inputs, Mapping):
        raise InputError(f"the input must be an object of named inputs, got {type(inputs).__name__}")
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise InputError(f"unknown input(s) {', '.join(map(repr, unknown))}; the inputs are: {', '.join(INPUTS)}")
    v = {name: check_value(name, spec, inputs.get(name, None if spec.default is REQUIRED else spec.default))
         for name, spec in INPUTS.items()}
    boxes = v.pop("box_1"), v.pop("box_2")
    quality = v.pop("quality")
    v.pop("preview")  # how the video is delivered, not how it is made: the front ends read it
    if v["max_duration"] is None:
        v["max_duration"] = MAX_VIDEO_SECONDS
    request = GenerationRequest(**v, crf=quality_to_crf(quality))
    request.bboxes = parse_boxes(*boxes, request.speakers == 2)
    request.seed = choose_seed(request.seed)
    request.validate()
    return request


__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_PROMPT",
    "FILE_INPUTS",
    "INPUTS",
    "MAX_SEED",
    "MAX_VIDEO_SECONDS",
    "REQUEST_ONLY",
    "REQUIRED",
    "GenerationRequest",
    "InputSpec",
    "build_request",
    "check_value",
    "choose_seed",
    "parse_box",
    "parse_boxes",
    "quality_to_crf",
]
