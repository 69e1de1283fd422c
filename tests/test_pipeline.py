"""End-to-end CPU tests of the generation pipeline (issue 3) with the tiny weights.

Real inputs (the astronaut portrait, espeak-ng speech, an ffmpeg-made 30 fps video) go through
``InfiniteTalkPipeline.generate`` and every MP4 is checked with ffprobe: H.264 + AAC, 25 fps, the
requested size, and video, audio and container durations equal to the speech within one frame.
The tiny models produce noise, so content is only compared between runs (determinism) and the
V2V reference frames are checked against the source video itself.

Cost: 64x64, 1-2 steps; about 4 s per 81-frame chunk on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from decoding import decode_frames, ffprobe_streams  # noqa: E402  (tests/ is on sys.path for test modules)
from infinitetalk import pipeline as pipeline_mod
from infinitetalk.errors import InputError
from infinitetalk.media import VideoFrameReader, VideoWriter
from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline
from leaks import ffmpeg_children, writer_threads

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
    assert len(result.timings["write_per_chunk"]) == result.num_chunks


def test_threaded_encoding_gives_the_synchronous_bytes(pipe, portrait, speech5, single_run, tmp_path, monkeypatch):
    """The same request with every chunk piped into ffmpeg before sampling goes on (the synchronous
    encoding of before) gives the very same file as the writer thread did."""
    flushed = []
    write = VideoWriter.write

    def synchronous(self, frames):
        write(self, frames)
        self.flush()
        flushed.append(len(frames))

    monkeypatch.setattr(VideoWriter, "write", synchronous)
    out = tmp_path / "synchronous.mp4"
    pipe.generate(request(portrait, speech5), out, show_progress=False)
    assert flushed == [81, 44]
    threaded, _ = single_run
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(threaded.read_bytes()).digest()


class _Cancel(BaseException):
    """Stands in for cog's CancelationException (a BaseException)."""


def test_cancel_while_the_encoder_is_stuck_leaves_nothing(pipe, portrait, speech5, tmp_path):
    """ffmpeg is stopped during chunk 0, so its frames stay queued: chunk 1 still samples (encoding is
    off the loop's path), and cancelling there leaves no output, partial file, thread or ffmpeg."""
    stopped: list[psutil.Process] = []
    resumed = threading.Event()

    def resume() -> None:  # a watchdog: a loop that waited for the encoder would get going again
        resumed.set()
        for proc in stopped:
            proc.resume()

    watchdog = threading.Timer(60, resume)

    def callback(event):
        if event.chunk == 0 and not stopped:
            stopped.extend(ffmpeg_children())
            assert len(stopped) == 1
            stopped[0].suspend()
            watchdog.start()
        elif event.chunk == 1:
            raise _Cancel()

    out = tmp_path / "cancelled.mp4"
    try:
        with pytest.raises(_Cancel):
            pipe.generate(request(portrait, speech5, steps=1), out, callback=callback, show_progress=False)
    finally:
        watchdog.cancel()
    assert stopped and not resumed.is_set()
    assert list(tmp_path.iterdir()) == []
    assert not writer_threads() and not ffmpeg_children()


def test_cancel_with_a_live_folder_removes_its_segments_too(pipe, portrait, speech5, tmp_path):
    """Cancelled after chunk 0 was written: the MP4's partial file and every live segment and playlist go,
    and no writer thread or ffmpeg is left."""
    from infinitetalk.preview import HLSOutput

    segments = []

    def callback(event):
        if event.chunk == 1:
            deadline = time.monotonic() + 60
            while not segments and time.monotonic() < deadline:  # chunk 0's segment is in the playlist
                time.sleep(0.05)
            raise _Cancel()

    with pytest.raises(_Cancel):
        pipe.generate(request(portrait, speech5, steps=1), tmp_path / "out.mp4", callback=callback,
                      show_progress=False, hls=HLSOutput(tmp_path / "live", on_segment=segments.append))
    assert len(segments) == 1  # there was something to remove
    assert list((tmp_path / "live").iterdir()) == [] and not (tmp_path / "out.mp4").exists()
    assert not writer_threads() and not ffmpeg_children()


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


# --------------------------------------------------------------------------- 9. soundtrack: the input's quality


def voice(make_speech, seconds: float, rate: int, name: str, peak: float = 0.4) -> np.ndarray:
    """Real speech resampled to ``rate`` (soxr), scaled to ``peak``: float32 ``[N]``."""
    import soxr

    y, sr = sf.read(str(make_speech(seconds, name)), dtype="float32")
    y = soxr.resample(y, sr, rate, quality="HQ") if sr != rate else y
    return (peak * y / np.abs(y).max()).astype(np.float32)


def output_audio(path: Path) -> tuple[np.ndarray, int]:
    """The MP4's audio stream decoded by ffmpeg: float32 ``[N, channels]`` and its rate."""
    a = ffprobe_streams(path)["audio"]
    raw = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:a:0",
                          "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, "<f4").reshape(-1, a["channels"]), a["sample_rate"]


def placed(signal: np.ndarray, start: int, n: int) -> np.ndarray:
    """``signal`` starting at sample ``start`` of ``n`` samples of silence (cut at ``n``)."""
    out = np.zeros(n, np.float32)
    part = signal[: max(0, n - start)]
    out[start: start + len(part)] = part
    return out


def fit(y: np.ndarray, *refs: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares weights of ``refs`` that make ``y``, and the residual's energy relative to ``y``'s."""
    a = np.stack(refs, axis=1).astype(np.float64)
    w, *_ = np.linalg.lstsq(a, y.astype(np.float64), rcond=None)
    return w, float(np.sum((a @ w - y) ** 2) / np.sum(y.astype(np.float64) ** 2))


def check_soundtrack(out: Path, result, rate: int, channels: int) -> np.ndarray:
    """AAC at ``rate`` Hz with ``channels`` channels, as long as the video within one frame; its samples
    over the video's length."""
    info = ffprobe_streams(out)
    a, v = info["audio"], info["video"]
    assert (a["codec"], a["sample_rate"], a["channels"]) == ("aac", rate, channels), a
    assert abs(a["duration"] - v["duration"]) <= FRAME, info
    y, got = output_audio(out)
    n = result.num_frames * rate // FPS
    assert got == rate and len(y) >= n
    return y[:n]


def test_soundtrack_keeps_48k_stereo_at_its_level(pipe, portrait, make_speech, tmp_path):
    left = voice(make_speech, 2.0, 48000, "stereo", peak=0.1)  # quiet: the model's copy is normalised, this is not
    stereo = np.stack([left, 0.6 * left[::-1]], axis=1)  # two different channels
    src = tmp_path / "stereo48k.flac"
    sf.write(str(src), stereo, 48000)
    out = tmp_path / "stereo.mp4"
    result = pipe.generate(request(portrait, src, steps=1), out, show_progress=False)
    check_mp4(out, 2.0)
    y = check_soundtrack(out, result, 48000, 2)
    assert np.abs(y[:, 0] - y[:, 1]).max() > 0.05  # left and right stay distinct
    n = len(y)
    for c in range(2):  # each channel is its own input channel, at its own level, at the same time
        w, residual = fit(y[:, c], stereo[:n, 0], stereo[:n, 1])
        assert w[c] == pytest.approx(1.0, abs=0.05) and abs(w[1 - c]) < 0.05 and residual < 0.05, (c, w, residual)


def test_soundtrack_keeps_44k_mono(pipe, portrait, make_speech, tmp_path):
    wav = tmp_path / "mono44k.wav"
    mono = voice(make_speech, 1.6, 44100, "mono")
    sf.write(str(wav), mono, 44100)
    src = tmp_path / "mono44k.mp3"  # decoded by ffmpeg
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(wav), "-c:a", "libmp3lame",
                    "-b:a", "192k", str(src)], check=True)
    out = tmp_path / "mono.mp4"
    result = pipe.generate(request(portrait, src, steps=1), out, show_progress=False)
    check_mp4(out, 1.6)
    y = check_soundtrack(out, result, 44100, 1)
    w, residual = fit(y[:, 0], mono[: len(y)])
    assert w[0] == pytest.approx(1.0, abs=0.05) and residual < 0.05, (w, residual)


@pytest.fixture(scope="module")
def two_voices(make_speech, tmp_path_factory) -> tuple[Path, np.ndarray, Path, np.ndarray]:
    """Speaker 1: 48 kHz stereo FLAC, 2 s; speaker 2: 16 kHz mono WAV, 1.2 s (other content: backwards)."""
    folder = tmp_path_factory.mktemp("voices")
    left = voice(make_speech, 2.0, 48000, "voice1", peak=0.3)
    one = np.stack([left, 0.5 * left], axis=1)
    two = voice(make_speech, 1.2, 16000, "voice2", peak=0.3)[::-1].copy()
    sf.write(str(folder / "one.flac"), one, 48000)
    sf.write(str(folder / "two.wav"), two, 16000)
    return folder / "one.flac", one, folder / "two.wav", two


def test_soundtrack_para_mixes_both_speakers_at_48k_stereo(pipe, portrait, two_voices, tmp_path):
    import soxr

    path_1, one, path_2, two = two_voices
    out = tmp_path / "para.mp4"
    result = pipe.generate(request(portrait, path_1, audio_2=path_2, audio_mode="para", steps=1), out,
                           show_progress=False)
    check_mp4(out, 2.0)
    y = check_soundtrack(out, result, 48000, 2)
    n = len(y)
    two_48k = placed(soxr.resample(two, 16000, 48000, quality="HQ"), 0, n)  # both from t = 0
    for c in range(2):
        w, residual = fit(y[:, c], one[:n, c], two_48k)
        assert w == pytest.approx([1.0, 1.0], abs=0.05) and residual < 0.05, (c, w, residual)


def test_soundtrack_add_plays_speaker_1_then_speaker_2(pipe, portrait, two_voices, tmp_path):
    import soxr

    path_1, one, path_2, two = two_voices
    out = tmp_path / "add.mp4"
    result = pipe.generate(request(portrait, path_1, audio_2=path_2, audio_mode="add", steps=1), out,
                           show_progress=False)
    check_mp4(out, 3.2)
    y = check_soundtrack(out, result, 48000, 2)
    n, switch = len(y), 2 * 48000  # the 16 kHz track switches after speaker 1's 2 s
    two_48k = soxr.resample(two, 16000, 48000, quality="HQ")
    for c in range(2):
        w, residual = fit(y[:, c], placed(one[:, c], 0, n), placed(two_48k, switch, n))
        assert w == pytest.approx([1.0, 1.0], abs=0.05) and residual < 0.05, (c, w, residual)
    # Each half is one speaker alone, and speaker 2 starts on the sample where the lips switch.
    for c in range(2):
        w1, r1 = fit(y[:switch, c], one[:switch, c])
        w2, r2 = fit(y[switch:, c], two_48k[: n - switch])
        assert w1[0] == pytest.approx(1.0, abs=0.05) and r1 < 0.05, (w1, r1)
        assert w2[0] == pytest.approx(1.0, abs=0.05) and r2 < 0.05, (w2, r2)
    scores = [fit(y[:, 0], placed(two_48k, switch + lag, n))[0][0] for lag in range(-6, 7)]
    assert int(np.argmax(scores)) - 6 == 0, scores


def test_v2v_soundtrack_is_the_new_speech_not_the_source_audio(pipe, portrait, make_speech, tmp_path):
    source = tmp_path / "with_sound.mp4"  # a 30 fps video with its own (tone) soundtrack
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-loop", "1", "-framerate", "30",
                    "-i", str(portrait), "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=44100", "-t", "3",
                    "-vf", "scale=96:96", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(source)], check=True)
    assert ffprobe_streams(source)["audio"] is not None
    speech = voice(make_speech, 1.6, 44100, "dub")
    src = tmp_path / "dub.wav"
    sf.write(str(src), speech, 44100)
    out = tmp_path / "dubbed.mp4"
    result = pipe.generate(request(source, src, steps=1), out, show_progress=False)
    check_mp4(out, 1.6)
    y = check_soundtrack(out, result, 44100, 1)[:, 0]
    tone = np.sin(2 * np.pi * 1000 * np.arange(len(y)) / 44100).astype(np.float32)
    tone_q = np.cos(2 * np.pi * 1000 * np.arange(len(y)) / 44100).astype(np.float32)
    w, residual = fit(y, speech[: len(y)], tone, tone_q)
    assert w[0] == pytest.approx(1.0, abs=0.05) and np.hypot(w[1], w[2]) < 0.01 and residual < 0.05, (w, residual)
