"""Reading one request's input files with the limits of the API.

Limits (stated in the predictor's input descriptions):

* image: decodable, at most :data:`media.DEFAULT_MAX_PIXELS` pixels (checked from the header, so
  decompression bombs fail before any pixel is decoded), at least :data:`media.DEFAULT_MIN_SIDE`
  pixels a side; animated images use their first frame;
* video (V2V): a decodable first frame, at least the same minimum side, at most
  :data:`MAX_VIDEO_SECONDS` long;
* audio: an audio stream with finite samples (NaN/inf rejected), at least one video frame (40 ms)
  long; any channel count and sample rate; silence is accepted. The model gets :func:`load_audio`'s
  16 kHz mono copy; the output's soundtrack is decoded again as given (``audio.write_soundtrack``,
  same readers, limits and messages);
* two-speaker boxes: inside the reference image.

:func:`probe_request` checks all of a request's files against these limits from their headers
(ffprobe; a still image's first frame is decoded so a truncated file fails too) without decoding
audio or video, so the front ends refuse a bad file before any model work: the CLI before it loads
the weights, the servers first in each job. What only a full decode can tell (NaN samples, a video
with no decodable frame) is still refused when the pipeline reads the files.

Messages of the media/audio readers name the *file* (what a command-line user wants). Cog hands
the predictor temporary files with generated names (``tmpabc123file.png``), so the predictor
rewrites them with :func:`name_inputs` into ``the image input ...`` / ``the audio_2 input ...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import audio as audio_lib
from . import media
from .errors import InputError

#: Longest accepted reference video (V2V), in seconds.
MAX_VIDEO_SECONDS = 3600.0
#: How much longer than its container says a speech file may decode (the probe's benefit of the doubt).
PROBE_SLACK_S = 0.005


def name_inputs(message: str, paths: Mapping[str, str | os.PathLike | None]) -> str:
    """``message`` with each input's file name replaced by ``the <input> input``.

    ``{"image": "/tmp/tmpab12file.png"}``: ``"image 'tmpab12file.png' is empty"`` -> ``"the image
    input is empty"``; ``"cannot read tmpab12file.png as a media file"`` -> ``"cannot read the image
    input as a media file"``.
    """
    for label, path in paths.items():
        if path is None:
            continue
        full = os.fspath(path)
        name = os.path.basename(full) or full
        forms = [f"'{re.escape(full)}'", re.escape(full), f"'{re.escape(name)}'", f'"{re.escape(name)}"']
        if not re.fullmatch(r"[A-Za-z_]+", name):  # a bare word ("image") could be any word of the message
            forms.append(rf"(?<![\w.]){re.escape(name)}(?![\w.])")
        pattern = rf"(?:\b(?:input file|image|video|audio file|file) )?(?:{'|'.join(forms)})"
        message = re.sub(pattern, f"the {label} input", message)  # one pass: replaced text is not rescanned
    return message


def load_reference(path: str | os.PathLike, label: str = "image"):
    """The reference picture: ``(info, reader or None, first frame as an RGB PIL image)``.

    For a video the reader's decoder is stopped again after the first frame (it restarts with a
    seek when a later chunk needs a frame), so a failure before generation leaves no ffmpeg behind.
    """
    info, still = media.probe_and_load(path)
    _check_reference(info, label)
    if still is not None:
        return info, None, still
    reader = media.VideoFrameReader(path, info)
    try:
        first = reader.first_frame()
    finally:
        reader.close()
    return info, reader, first


def _check_reference(info: media.MediaInfo, label: str) -> None:
    """The limits of a reference whose probe succeeded: a picture, and for a video its size and length."""
    if info.kind == "audio" or not info.has_video:
        raise InputError(f"the {label} input has no picture: give an image or a video file")
    if info.kind == "image":
        return  # the size limits of a still image are checked when it is opened (media.probe_and_load)
    if min(info.width or 0, info.height or 0) < media.DEFAULT_MIN_SIDE:
        raise InputError(f"the {label} input is a video of {info.width}x{info.height}; "
                         f"the minimum side is {media.DEFAULT_MIN_SIDE} pixels")
    if info.duration is not None and info.duration > MAX_VIDEO_SECONDS:
        raise InputError(f"the {label} input is a video of {info.duration:.1f} s; "
                         f"the maximum is {MAX_VIDEO_SECONDS:g} s")


def _check_short(seconds: float, label: str, slack: float = 0.0) -> None:
    if audio_lib.num_video_frames(int(round((seconds + slack) * audio_lib.SAMPLE_RATE))) < 1:
        raise InputError(f"the {label} input is {seconds * 1000:.0f} ms long; "
                         "the minimum is one video frame (40 ms)")


def load_audio(path: str | os.PathLike, label: str = "audio") -> np.ndarray:
    """Speech as 16 kHz mono float32, loudness-normalised (:func:`audio.load_speech`), at least one frame long."""
    wav = audio_lib.load_speech(path)
    _check_short(len(wav) / audio_lib.SAMPLE_RATE, label)
    return wav


def check_boxes(bboxes: Sequence[Sequence[float]] | None, width: int, height: int) -> None:
    """Each ``[top, left, bottom, right]`` box must lie inside the ``width`` x ``height`` reference."""
    for i, box in enumerate(bboxes or (), start=1):
        top, left, bottom, right = (float(v) for v in box)
        if min(top, left) < 0 or bottom > height or right > width or bottom <= top or right <= left:
            shown = ",".join(f"{v:g}" for v in box)
            raise InputError(f"box_{i} '{shown}' is not inside the {width}x{height} image: need "
                             f"0 <= top < bottom <= {height} and 0 <= left < right <= {width}")


def probe_reference(path: str | os.PathLike, label: str = "image") -> media.MediaInfo:
    """The reference's limits from its header, as :func:`load_reference` checks them: a missing, empty,
    unreadable, truncated (still image), oversized or undersized file, an audio-only file, or a video
    over :data:`MAX_VIDEO_SECONDS` raise InputError. A video is only probed (ffprobe), not decoded."""
    info, _still = media.probe_and_load(path)  # a still is decoded once here: truncation shows only then
    _check_reference(info, label)
    return info


def probe_speech(path: str | os.PathLike, label: str = "audio") -> None:
    """Speech (an audio file or a video with sound) as far as ffprobe can tell: the file exists and is
    not empty, has an audio stream, and (when the container states its length) lasts one video frame.
    A container's length can differ from the decoded one by a few milliseconds: the probe leaves
    :data:`PROBE_SLACK_S` of doubt to :func:`load_audio`, which counts the decoded samples."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"audio file {p.name!r} does not exist or is not a regular file")
    if p.stat().st_size == 0:
        raise InputError(f"audio file {p.name!r} is empty (0 bytes)")
    info = audio_lib.probe_audio(p)
    if info.duration is not None:
        _check_short(info.duration, label, slack=PROBE_SLACK_S)


def probe_request(request, labels: Mapping[str, str] | None = None) -> None:
    """Check every input file of ``request`` (a :class:`~infinitetalk.request.GenerationRequest`) from
    its header, before any model work: the reference (``image``: an image or a video), the speech
    (``audio``, ``audio_2``: audio or a video with sound; none for a text request) and the two-speaker boxes against the
    reference's size. Raises :class:`InputError` with the message the pipeline would give for the
    same file. ``labels`` names the inputs in messages (default: the field names; the CLI passes its
    flags)."""
    labels = {"image": "image", "audio": "audio", "audio_2": "audio_2", **(labels or {})}
    info = probe_reference(request.image, labels["image"])
    for name in ("audio", "audio_2"):  # text requests have none: their rules are checked with the request's
        if getattr(request, name) is not None:
            probe_speech(getattr(request, name), labels[name])
    check_boxes(request.bboxes, info.width, info.height)


__all__ = ["MAX_VIDEO_SECONDS", "check_boxes", "load_audio", "load_reference", "name_inputs", "probe_reference",
           "probe_request", "probe_speech"]
