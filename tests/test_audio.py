"""Audio decoding, loudness, wav2vec2 features, windows, padding and speaker mixing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from infinitetalk.audio import (
    Wav2Vec2FeatureEncoder,
    audio_window_indices,
    combine_speakers,
    decode_audio,
    gather_windows,
    loudness_normalize,
    num_video_frames,
    pad_audio_end,
    probe_audio,
)
from infinitetalk.errors import InputError

GOLDEN = Path(__file__).resolve().parent / "golden"
SPEECH = GOLDEN / "speech_16k.wav"
TINY_W2V = GOLDEN / "tiny_wav2vec2"
HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="ffmpeg not installed")
needs_golden = pytest.mark.skipif(not SPEECH.exists(), reason="golden speech not available")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    if not SPEECH.exists():
        pytest.skip("golden speech not available")
    y, sr = sf.read(SPEECH, dtype="float32")
    assert sr == 16000
    return y


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """The golden speech in many containers/codecs, made with ffmpeg."""
    if not HAVE_FFMPEG or not SPEECH.exists():
        pytest.skip("ffmpeg or golden speech not available")
    d = tmp_path_factory.mktemp("media")
    src = str(SPEECH)
    out = {}
    specs = {
        "mp3": ["-c:a", "libmp3lame", "-b:a", "128k"],
        "ogg": ["-c:a", "libvorbis"],
        "opus": ["-c:a", "libopus"],
        "flac": ["-c:a", "flac"],
        "m4a": ["-c:a", "aac", "-b:a", "128k"],
    }
    for ext, codec in specs.items():
        p = d / f"speech.{ext}"
        _ffmpeg("-i", src, *codec, str(p))
        out[ext] = p
    # 44.1 kHz stereo wav (resampling + downmix path)
    p = d / "speech_44k_stereo.wav"
    _ffmpeg("-i", src, "-ar", "44100", "-ac", "2", "-c:a", "pcm_s16le", str(p))
    out["wav44"] = p
    # Video containers with and without audio.
    video = ["-f", "lavfi", "-i", "color=c=gray:s=32x32:r=25:d=4.1"]
    p = d / "talk.mp4"
    _ffmpeg(*video, "-i", src, "-c:v", "mpeg4", "-c:a", "aac", "-shortest", str(p))
    out["mp4"] = p
    p = d / "talk.webm"
    _ffmpeg(*video, "-i", src, "-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libopus", "-shortest", str(p))
    out["webm"] = p
    p = d / "silent_video.mp4"
    _ffmpeg(*video, "-c:v", "mpeg4", str(p))
    out["noaudio"] = p
    return out


def _aligned_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 2000) -> float:
    """Best normalised correlation over small lags (lossy codecs add encoder delay)."""
    n = min(len(a), len(b)) - max_lag
    best = 0.0
    ref = b[:n]
    for lag in range(0, max_lag, 8):
        x = a[lag : lag + n]
        c = float(np.dot(x, ref) / (np.linalg.norm(x) * np.linalg.norm(ref) + 1e-12))
        best = max(best, c)
    return best


# ----------------------------------------------------------------------------- decoding
@needs_golden
def test_decode_16k_wav_is_bit_exact(speech):
    y = decode_audio(SPEECH)
    assert y.dtype == np.float32 and y.ndim == 1
    raw, _ = sf.read(SPEECH, dtype="int16")
    np.testing.assert_array_equal(y, raw.astype(np.float32) / 32768.0)


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["mp3", "ogg", "opus", "flac", "m4a", "mp4", "webm", "wav44"])
def test_decode_many_formats(media, speech, fmt):
    y = decode_audio(media[fmt])
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(speech)) < 0.1 * 16000, (len(y), len(speech))
    assert np.isfinite(y).all()
    if fmt == "flac":
        np.testing.assert_array_equal(y, speech)
    else:
        assert _aligned_corr(y, speech) > 0.9


@needs_ffmpeg
def test_extensionless_file_detected_by_content(media, speech, tmp_path):
    for fmt in ("m4a", "mp3"):
        p = tmp_path / f"noext_{fmt}"
        shutil.copyfile(media[fmt], p)
        y = decode_audio(p)
        assert _aligned_corr(y, speech) > 0.9


@needs_ffmpeg
def test_video_without_audio_rejected(media):
    with pytest.raises(InputError, match="no audio stream"):
        decode_audio(media["noaudio"])


@needs_ffmpeg
def test_garbage_and_empty_rejected(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(InputError):
        decode_audio(bad)
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        decode_audio(empty)
    with pytest.raises(InputError, match="does not exist"):
        decode_audio(tmp_path / "missing.wav")


def test_nan_wav_rejected(tmp_path):
    y = np.zeros(16000, dtype=np.float32)
    y[100] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(p, y, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match="NaN"):
        decode_audio(p)


def test_stereo_is_mean_of_channels(tmp_path):
    rng = np.random.default_rng(0)
    st = (rng.standard_normal((8000, 2)) * 0.1).astype(np.float32)
    p = tmp_path / "st.wav"
    sf.write(p, st, 16000, subtype="FLOAT")
    np.testing.assert_allclose(decode_audio(p), st.mean(axis=1), atol=1e-7)


@needs_ffmpeg
def test_probe(media):
    info = probe_audio(media["mp4"])
    assert info.channels == 1 and info.sample_rate in (16000, 44100, 48000)
    assert 3.9 < probe_audio(media["m4a"]).duration < 4.4
    with pytest.raises(InputError):
        probe_audio(media["noaudio"])


# ----------------------------------------------------------------------------- loudness
def test_loudness_normalize_hits_target_and_skips_silence():
    import pyloudnorm as pyln

    rng = np.random.default_rng(1)
    y = (rng.standard_normal(32000) * 0.3).astype(np.float32)
    out = loudness_normalize(y, target_lufs=-23.0)
    assert out.dtype == np.float32
    assert abs(pyln.Meter(16000).integrated_loudness(out) + 23.0) < 0.05
    silence = np.zeros(32000, dtype=np.float32)
    np.testing.assert_array_equal(loudness_normalize(silence), silence)
    short = y[:3000]  # < 0.4 s: pyloudnorm cannot measure it
    np.testing.assert_array_equal(loudness_normalize(short), short)


# ----------------------------------------------------------------------------- frames, windows, padding
def test_num_video_frames_uses_float_formula():
    assert num_video_frames(18560) == 28  # exactly 29 frames in integer arithmetic
    assert num_video_frames(65600) == 102
    assert num_video_frames(639) == 0


def test_windows_clamp_to_current_length():
    idx = audio_window_indices([0, 1, 5, 9], length=10)
    assert idx.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [3, 4, 5, 6, 7], [7, 8, 9, 9, 9]]
    emb = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1).expand(10, 2, 3)
    w = gather_windows(emb, start=2, num_frames=8)
    assert w.shape == (8, 5, 2, 3)
    assert w[:, :, 0, 0][:, 2].tolist() == list(range(2, 10))
    assert w[-1, :, 1, 2].tolist() == [7, 8, 9, 9, 9]


def test_end_padding_mirrors_tail():
    emb = torch.arange(400, dtype=torch.float32).reshape(400, 1)
    p = pad_audio_end(emb, 44)
    assert p.shape[0] == 444
    assert p[398:402, 0].tolist() == [398, 399, 399, 398]
    assert p[-1, 0].item() == 356
    assert pad_audio_end(emb, 0) is emb
    # Our short-audio extension: more padding than frames stays continuous.
    short = torch.arange(5, dtype=torch.float32).reshape(5, 1)
    q = pad_audio_end(short, 13)[:, 0].tolist()
    assert len(q) == 18 and q[:7] == [0, 1, 2, 3, 4, 4, 3]
    assert all(abs(a - b) <= 1 for a, b in zip(q, q[1:]))


@pytest.mark.parametrize(("length", "miss", "start"), [(400, 44, 360), (5, 13, 0), (90, 3, 9), (30, 54, 0)])
def test_windows_through_a_padded_index_equal_the_padded_copy(length, miss, start):
    """The pipeline pads a frame index, not the features: same windows, no whole-audio copy."""
    g = torch.Generator().manual_seed(length)
    emb = torch.randn(length, 3, 4, generator=g)
    index = pad_audio_end(torch.arange(length), miss)
    assert index.dtype == torch.long and index.shape[0] == length + miss
    copied = gather_windows(pad_audio_end(emb, miss), start, 81)
    assert torch.equal(gather_windows(emb, start, 81, index=index), copied)


# ----------------------------------------------------------------------------- speakers
def test_combine_speakers_para_and_add():
    a = np.ones(5, dtype=np.float32)
    b = np.full(3, 2.0, dtype=np.float32)
    s1, s2, tot = combine_speakers(a, b, "para")
    assert len(s1) == len(s2) == len(tot) == 5
    assert tot.tolist() == [3, 3, 3, 1, 1]
    s1, s2, tot = combine_speakers(a, b, "add")
    assert s1.tolist() == [1] * 5 + [0] * 3 and s2.tolist() == [0] * 5 + [2] * 3
    assert tot.tolist() == [1] * 5 + [2] * 3
    s1, s2, tot = combine_speakers(None, b, "para")
    assert s1.tolist() == [0, 0, 0] and tot.tolist() == [2, 2, 2]
    with pytest.raises(InputError):
        combine_speakers(a, b, "mix")


# ----------------------------------------------------------------------------- wav2vec2
@pytest.fixture(scope="module")
def encoder() -> Wav2Vec2FeatureEncoder:
    if not TINY_W2V.exists():
        pytest.skip("tiny wav2vec2 not available")
    return Wav2Vec2FeatureEncoder.from_pretrained(TINY_W2V)


def test_encoder_matches_golden_embedding(encoder):
    from safetensors.numpy import load_file

    ref = load_file(str(GOLDEN / "wav2vec_case.safetensors"))
    emb = encoder.encode(ref["waveform_normalized"])
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert emb.shape == (102, encoder.num_layers, encoder.hidden_size)
    e, r = emb.double().numpy(), ref["embedding"].astype(np.float64)
    assert np.linalg.norm(e - r) / np.linalg.norm(r) < 1e-4


def test_encoder_deterministic_and_windowed_cnn_matches(encoder):
    import copy

    rng = np.random.default_rng(3)
    wav = (rng.standard_normal(16000 * 3 + 77) * 0.1).astype(np.float32)
    a = encoder.encode(wav)
    assert torch.equal(a, encoder.encode(wav))
    assert a.shape[0] == num_video_frames(len(wav))
    windowed = copy.copy(encoder)
    windowed.cnn_chunk_frames = 17
    b = windowed.encode(wav)
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_encoder_rejects_too_short(encoder):
    with pytest.raises(InputError):
        encoder.encode(np.zeros(500, dtype=np.float32))
