"""End-to-end CPU tests of the generation pipeline (issue 3) with the tiny weights.

Real inputs (the astronaut portrait, espeak-ng speech, an ffmpeg-made 30 fps video) go through
``InfiniteTalkPipeline.generate`` and every MP4 is checked with ffprobe: H.264 + AAC, 25 fps, the
requested size, and video, audio and container durations equal to the speech within one frame.
The tiny models produce noise, so content is only compared between runs (determinism) and the
V2V reference frames are checked against the source video itself.

Cost: 64x64, 1-2 steps; about 4 s per 81-frame chunk on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from decoding import decode_frames, ffprobe_streams  # noqa: E402  (tests/ is on sys.path for test modules)
from infinitetalk import pipeline as pipeline_mod
from infinitetalk.errors import InputError
from infinitetalk.media import VideoFrameReader
from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
    pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB"),  # skimage, colour correction of noise
]

FPS = 25
FRAME = 1 / FPS
SIZE = 64
SRC_FPS = 30


# --------------------------------------------------------------------------- helpers


def audio_seconds(path: Path) -> float:
    info = sf.info(str(path))
    return info.frames / info.samplerate


def check_mp4(path: Path, seconds: float, width: int = SIZE, height: int = SIZE) -> dict:
    """ffprobe ``path``: H.264 + AAC, 25 fps, ``width`` x ``height``, every duration == ``seconds`` +- 1 frame."""
    assert path.is_file(), f"{path} was not written"
    info = ffprobe_streams(path)
    v, a = info["video"], info["audio"]
    assert v is not None and a is not None, info
    assert v["codec"] == "h264" and v["pix_fmt"] == "yuv420p", v
    assert a["codec"] == "aac", a
    assert v["fps"] == pytest.approx(FPS), v
    assert (v["width"], v["height"]) == (width, height), v
    assert v["nb_frames"] is not None and abs(v["nb_frames"] / FPS - seconds) <= FRAME + 1e-6, (v, seconds)
    for name, d in (("video", v["duration"]), ("audio", a["duration"]), ("container", info["format_duration"])):
        assert d is not None and abs(d - seconds) <= FRAME + 1e-3, f"{name} duration {d} != {seconds:.3f} s ({info})"
    return info


def request(image: Path, audio: Path, **kw) -> GenerationRequest:
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("steps", 2)
    kw.setdefault("seed", 1234)
    return GenerationRequest(image=image, audio=audio, **kw)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipe(tiny_weights: Path) -> InfiniteTalkPipeline:
    return InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu")


@pytest.fixture(scope="module")
def speech5(make_speech) -> Path:
    return make_speech(5.0, "speech5")  # 125 frames: 2 chunks


@pytest.fixture(scope="module")
def single_run(pipe, portrait, speech5, tmp_path_factory):
    """Single speaker, portrait + 5 s speech, seed 1234, 2 steps (shared by the determinism test)."""
    out = tmp_path_factory.mktemp("single") / "single.mp4"
    result = pipe.generate(request(portrait, speech5), out, show_progress=False)
    return out, result


# --------------------------------------------------------------------------- 1. single speaker


def test_single_speaker_image(single_run, speech5):
    out, result = single_run
    seconds = audio_seconds(speech5)
    check_mp4(out, seconds)
    assert result.num_chunks == 2
    assert result.num_frames == int(seconds * FPS)
    assert (result.width, result.height, result.fps, result.seed) == (SIZE, SIZE, FPS, 1234)
    assert result.duration == pytest.approx(result.num_frames / FPS)
    assert not list(out.parent.glob(".*partial")), "temporary encoder output left behind"


# --------------------------------------------------------------------------- 2. two speakers


@pytest.fixture(scope="module")
def two_clips(make_speech) -> tuple[Path, Path]:
    return make_speech(3.6, "speaker1"), make_speech(2.4, "speaker2")


def test_two_speakers_para(pipe, portrait, two_clips, tmp_path):
    a1, a2 = two_clips
    out = tmp_path / "para.mp4"
    # Boxes in source pixels (512x512 portrait): left and right halves.
    req = request(portrait, a1, audio_2=a2, audio_mode="para", steps=1,
                  bboxes=[[0, 0, 512, 256], [0, 256, 512, 512]])
    result = pipe.generate(req, out, show_progress=False)
    seconds = max(audio_seconds(a1), audio_seconds(a2))  # simultaneous: the longer one
    check_mp4(out, seconds)
    assert result.num_chunks == 2
    assert pipe._active_audio_set == "multi"


def test_two_speakers_add(pipe, portrait, two_clips, tmp_path):
    a1, a2 = two_clips
    out = tmp_path / "add.mp4"
    result = pipe.generate(request(portrait, a1, audio_2=a2, audio_mode="add", steps=1), out, show_progress=False)
    seconds = audio_seconds(a1) + audio_seconds(a2)  # one after the other: 6.0 s
    check_mp4(out, seconds)
    assert result.num_chunks == 2
    assert result.audio_duration == pytest.approx(seconds, abs=1e-3)


# --------------------------------------------------------------------------- 3. V2V dubbing


@pytest.fixture(scope="module")
def source_video(portrait, tmp_path_factory) -> Path:
    """6 s, 30 fps, audio-less H.264 pan over the portrait: every frame differs from its neighbours."""
    out = tmp_path_factory.mktemp("v2v") / "source.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-loop", "1", "-framerate", str(SRC_FPS),
                    "-i", str(portrait), "-t", "6",
                    "-vf", "crop=256:256:x='2*n':y='n',scale=96:96", "-c:v", "libx264", "-qp", "0",
                    "-pix_fmt", "yuv420p", "-an", str(out)], check=True)
    info = ffprobe_streams(out)
    assert info["audio"] is None and info["video"]["fps"] == pytest.approx(SRC_FPS)
    assert info["video"]["nb_frames"] == 6 * SRC_FPS
    return out


@pytest.mark.slow
def test_v2v_reference_frame_follows_source(pipe, source_video, make_speech, tmp_path, monkeypatch):
    speech = make_speech(6.4, "v2v")  # 160 frames: 3 chunks, starting at output frames 0, 72, 144
    calls: list[tuple[float, np.ndarray]] = []
    real_frame_at = VideoFrameReader.frame_at

    def spy_frame_at(self, t):
        img = real_frame_at(self, t)
        calls.append((t, np.asarray(img).copy()))
        return img

    model_inputs: list[np.ndarray] = []
    real_to_model = pipeline_mod._to_model_frame

    def spy_to_model(image, size):
        model_inputs.append(np.asarray(image).copy())
        return real_to_model(image, size)

    monkeypatch.setattr(VideoFrameReader, "frame_at", spy_frame_at)
    monkeypatch.setattr(pipeline_mod, "_to_model_frame", spy_to_model)
    out = tmp_path / "dub.mp4"
    result = pipe.generate(request(source_video, speech, steps=1), out, show_progress=False)
    check_mp4(out, audio_seconds(speech))
    assert result.num_chunks == 3

    # Chunk k's reference is the source frame at the chunk's output time 72k / 25 s.
    times = [t for t, _ in calls]
    assert times == pytest.approx([72 * k / FPS for k in range(3)]), times
    # ... and it is what the model is conditioned on (the first-frame condition, then one per later chunk).
    assert len(model_inputs) == 3
    for (_, got), used in zip(calls, model_inputs):
        assert np.array_equal(got, used)

    # The frames returned are the source frames floor(t * 30) (independent decode of the source).
    src = np.frombuffer(decode_frames(source_video), np.uint8).reshape(-1, 96, 96, 3).astype(np.int16)
    for t, got in calls:
        expected = int(np.floor(t * SRC_FPS + 1e-6))  # 0, 86, 172
        err = np.abs(src - got.astype(np.int16)).mean(axis=(1, 2, 3))
        assert int(err.argmin()) == expected and err[expected] <= 1.0, (t, int(err.argmin()), err[expected])
    assert len({int(np.floor(t * SRC_FPS + 1e-6)) for t in times}) == 3


# --------------------------------------------------------------------------- 4. audio shorter than one chunk


def test_two_second_audio(pipe, portrait, make_speech, tmp_path):
    speech = make_speech(2.0, "short")  # 50 frames < 81: the official code refuses this
    out = tmp_path / "short.mp4"
    result = pipe.generate(request(portrait, speech, steps=1), out, show_progress=False)
    check_mp4(out, 2.0)
    assert result.num_chunks == 1 and result.num_frames == 50


# --------------------------------------------------------------------------- 5. seeds


@pytest.mark.slow
def test_same_seed_same_frames_different_seed_different_frames(pipe, portrait, speech5, single_run, tmp_path):
    first, _ = single_run
    # Swap the two-speaker weights in and out first: the single-speaker weights must come back exactly.
    pipe._use_audio_set("multi")
    again = tmp_path / "again.mp4"
    pipe.generate(request(portrait, speech5), again, show_progress=False)
    assert pipe._active_audio_set == "single"
    reference = decode_frames(first)
    assert decode_frames(again) == reference

    other = tmp_path / "other.mp4"
    result = pipe.generate(request(portrait, speech5, seed=1235), other, show_progress=False)
    assert result.seed == 1235
    frames = decode_frames(other)
    assert len(frames) == len(reference) and frames != reference
    # Both chunks change, not only the first (fresh noise per chunk from the one seeded generator).
    n = len(reference) // (SIZE * SIZE * 3)
    a = np.frombuffer(reference, np.uint8).reshape(n, -1)
    b = np.frombuffer(frames, np.uint8).reshape(n, -1)
    assert not np.array_equal(a[81:], b[81:])


# --------------------------------------------------------------------------- 6. max_duration


def test_max_duration_caps_output(pipe, portrait, speech5, tmp_path):
    out = tmp_path / "capped.mp4"
    result = pipe.generate(request(portrait, speech5, steps=1, max_duration=1.6), out, show_progress=False)
    check_mp4(out, 1.6)
    assert result.num_frames == 40 and result.num_chunks == 1
    assert result.audio_duration == pytest.approx(audio_seconds(speech5), abs=1e-3)


# --------------------------------------------------------------------------- 8. bad inputs


def test_bad_inputs_raise_input_error(pipe, portrait, speech5, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n" * 20)
    out = tmp_path / "bad.mp4"
    with pytest.raises(InputError, match=r"'notes\.png' is not a readable image, video or audio file"):
        pipe.generate(request(text, speech5), out, show_progress=False)
    with pytest.raises(InputError, match=r"portrait\.png.*(no audio stream|cannot (read|decode))"):
        pipe.generate(request(portrait, portrait), out, show_progress=False)
    with pytest.raises(InputError, match=r"width must be a multiple of 16 .*got 72"):
        pipe.generate(request(portrait, speech5, width=72), out, show_progress=False)
    with pytest.raises(InputError, match=r"does not exist"):
        pipe.generate(request(portrait, tmp_path / "missing.wav"), out, show_progress=False)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
