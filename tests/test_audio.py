"""Audio decoding, loudness, wav2vec2 features, windows, padding and speaker mixing."""

from __future__ import annotations

import shutil
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from decoding import ffprobe_streams  # tests/ is on sys.path for test modules
from infinitetalk import audio as audio_mod
from infinitetalk.audio import (
    AAC_SAMPLE_RATES,
    SAMPLE_RATE,
    Wav2Vec2FeatureEncoder,
    audio_window_indices,
    combine_speakers,
    decode_audio,
    decode_audio_native,
    gather_windows,
    loudness_normalize,
    num_video_frames,
    pad_audio_end,
    probe_audio,
    soundtrack_rate,
    write_soundtrack,
)
from infinitetalk.errors import InputError
from infinitetalk.media import VideoWriter

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


# ----------------------------------------------------------------------------- the output's soundtrack
def _voice(make_speech, seconds: float, rate: int, name: str = "native") -> np.ndarray:
    """Real speech (espeak-ng) resampled to ``rate``, peak 0.5: float32 ``[N]``."""
    y, sr = sf.read(str(make_speech(seconds, name)), dtype="float32")
    y = soxr.resample(y, sr, rate, quality="HQ") if sr != rate else y
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def _stereo(make_speech, seconds: float, rate: int) -> np.ndarray:
    """Two different channels: the speech left, the speech backwards (at a lower level) right."""
    left = _voice(make_speech, seconds, rate)
    return np.stack([left, 0.6 * left[::-1]], axis=1)


def _lag(a: np.ndarray, b: np.ndarray, max_lag: int = 40) -> int:
    """Lag (samples) of ``a`` against ``b`` with the best correlation."""
    n = min(len(a), len(b)) - 2 * max_lag
    scores = [float(np.dot(a[max_lag + lag: max_lag + lag + n], b[max_lag: max_lag + n]))
              for lag in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag


def test_soundtrack_rates_are_aac_rates():
    for rate in AAC_SAMPLE_RATES:
        assert soundtrack_rate(rate) == rate
    assert soundtrack_rate(47999) == 48000 and soundtrack_rate(50000) == 64000
    assert soundtrack_rate(192000) == 96000 and soundtrack_rate(4000) == 7350


def test_native_decode_keeps_rate_channels_and_samples(make_speech, tmp_path):
    stereo = _stereo(make_speech, 1.5, 48000)
    path = tmp_path / "stereo48k.wav"
    sf.write(str(path), stereo, 48000, subtype="FLOAT")
    y, rate = decode_audio_native(path)
    assert rate == 48000 and y.shape == stereo.shape and y.dtype == np.float32
    assert np.array_equal(y, stereo)  # as given: no loudness normalisation, no resampling
    # The model's copy of the same file is 16 kHz mono and normalised.
    assert decode_audio(path).shape == (24000,)

    hi = tmp_path / "mono192k.wav"
    sf.write(str(hi), _voice(make_speech, 1.0, 192000), 192000, subtype="PCM_24")
    y, rate = decode_audio_native(hi)
    assert rate == 96000 and y.shape == (96000, 1)  # above what AAC takes: 96 kHz (soxr)


@needs_ffmpeg
def test_native_decode_through_ffmpeg(make_speech, tmp_path):
    wav = tmp_path / "mono44k.wav"
    sf.write(str(wav), _voice(make_speech, 1.5, 44100), 44100)
    mp3 = tmp_path / "speech.mp3"
    _ffmpeg("-i", str(wav), "-c:a", "libmp3lame", "-b:a", "128k", str(mp3))
    y, rate = decode_audio_native(mp3)
    assert rate == 44100 and y.shape[1] == 1
    opus = tmp_path / "stereo.opus"
    sf.write(str(tmp_path / "st.wav"), _stereo(make_speech, 1.5, 48000), 48000)
    _ffmpeg("-i", str(tmp_path / "st.wav"), "-c:a", "libopus", "-b:a", "128k", str(opus))
    y, rate = decode_audio_native(opus)
    assert rate == 48000 and y.shape[1] == 2
    assert not np.allclose(y[:, 0], y[:, 1], atol=0.05)


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a"])
def test_native_and_model_copies_start_together(make_speech, tmp_path, fmt):
    """Same start and length (within one 16 kHz sample) as the 16 kHz copy, through either reader."""
    wav = tmp_path / "s.wav"
    sf.write(str(wav), _stereo(make_speech, 2.0, 44100), 44100)
    path = wav
    if fmt != "wav":
        path = tmp_path / f"s.{fmt}"
        _ffmpeg("-i", str(wav), "-b:a", "192k", str(path))
    y, rate = decode_audio_native(path)
    model = decode_audio(path)
    back = soxr.resample(y.mean(axis=1), rate, SAMPLE_RATE, quality="HQ")
    assert abs(len(back) - len(model)) <= 1
    assert _lag(back, model) == 0
    n = min(len(back), len(model))
    corr = np.dot(back[:n], model[:n]) / (np.linalg.norm(back[:n]) * np.linalg.norm(model[:n]))
    assert corr > 0.999, corr  # the same signal (ffmpeg's resampler differs slightly from soxr)


@needs_ffmpeg
def test_native_decode_more_channels_become_stereo(make_speech, tmp_path):
    voice = _voice(make_speech, 1.0, 48000)
    six = np.zeros((len(voice), 6), np.float32)  # 5.1: FL FR FC LFE BL BR
    six[:, 0] = voice  # front left only
    path = tmp_path / "surround.wav"
    sf.write(str(path), six, 48000, subtype="PCM_24")
    y, rate = decode_audio_native(path)
    assert rate == 48000 and y.shape == (len(voice), 2)
    assert np.abs(y[:, 0]).max() > 0.2 and np.abs(y[:, 1]).max() < 1e-3  # stays on the left
    six[:, 0], six[:, 2] = 0.0, voice  # centre only: both sides alike
    sf.write(str(path), six, 48000, subtype="PCM_24")
    y, _ = decode_audio_native(path)
    np.testing.assert_allclose(y[:, 0], y[:, 1], atol=1e-6)
    assert np.abs(y[:, 0]).max() > 0.1


@needs_ffmpeg
def test_native_decode_refuses_what_decode_audio_refuses(tmp_path):
    nan = np.zeros(16000, np.float32)
    nan[100] = np.nan
    sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
    (tmp_path / "text.wav").write_text("not audio at all\n" * 50)
    (tmp_path / "empty.wav").write_bytes(b"")
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=32x32:r=25:d=1", "-c:v", "mpeg4", str(tmp_path / "silent.mp4"))
    for name in ("nan.wav", "text.wav", "empty.wav", "silent.mp4", "missing.wav"):
        with pytest.raises(InputError) as expected:
            decode_audio(tmp_path / name)
        with pytest.raises(InputError) as got:
            decode_audio_native(tmp_path / name)
        assert str(got.value) == str(expected.value)


def test_soundtrack_one_speaker_is_the_input_cut_or_padded(make_speech, tmp_path):
    stereo = 0.1 * _stereo(make_speech, 1.5, 48000)  # quiet: it stays quiet (no loudness normalisation)
    src = tmp_path / "in.wav"
    sf.write(str(src), stereo, 48000, subtype="FLOAT")
    for seconds in (1.0, 2.0):
        out = write_soundtrack(tmp_path / "track.wav", seconds, src)
        y, rate = sf.read(str(out), dtype="float32", always_2d=True)
        assert rate == 48000 and y.shape == (int(seconds * 48000), 2) and sf.info(str(out)).subtype == "FLOAT"
        n = min(len(y), len(stereo))
        assert np.array_equal(y[:n], stereo[:n])
        assert not y[n:].any()  # padded with silence up to the video's length


def test_soundtrack_para_mixes_in_speaker_1_layout_without_clipping(make_speech, tmp_path):
    one = _stereo(make_speech, 1.5, 48000)
    two = _voice(make_speech, 1.0, 16000, "other")[::-1].copy()
    sf.write(str(tmp_path / "one.wav"), one, 48000, subtype="FLOAT")
    sf.write(str(tmp_path / "two.wav"), two, 16000, subtype="FLOAT")
    out = write_soundtrack(tmp_path / "mix.wav", 1.5, tmp_path / "one.wav", tmp_path / "two.wav", "para")
    y, rate = sf.read(str(out), dtype="float32", always_2d=True)
    assert rate == 48000 and y.shape == one.shape
    up = soxr.resample(two, 16000, 48000, quality="HQ")
    expected = one.copy()
    expected[: len(up)] += up[:, None]  # mono speaker 2 in both channels, from t = 0
    assert np.abs(expected).max() < 1.0
    np.testing.assert_allclose(y, expected, atol=1e-6)  # under full scale: the plain sum

    loud = tmp_path / "loud.wav"
    sf.write(str(loud), 3.0 * one, 48000, subtype="FLOAT")  # peaks at 1.5: the sum would clip
    out = write_soundtrack(tmp_path / "mix.wav", 1.5, loud, tmp_path / "two.wav", "para")
    y, _ = sf.read(str(out), dtype="float32", always_2d=True)
    expected = 3.0 * one
    expected[: len(up)] += up[:, None]
    peak = np.abs(expected).max()
    assert peak > 1.0 and np.abs(y).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(y, expected / peak, atol=1e-6)  # scaled as a whole, nothing else


def test_soundtrack_stereo_speaker_2_into_mono_speaker_1(make_speech, tmp_path):
    one = 0.5 * _voice(make_speech, 1.0, 44100)
    two = 0.5 * _stereo(make_speech, 1.0, 44100)
    sf.write(str(tmp_path / "one.wav"), one, 44100, subtype="FLOAT")
    sf.write(str(tmp_path / "two.wav"), two, 44100, subtype="FLOAT")
    out = write_soundtrack(tmp_path / "mix.wav", 1.0, tmp_path / "one.wav", tmp_path / "two.wav", "para")
    y, rate = sf.read(str(out), dtype="float32", always_2d=True)
    assert rate == 44100 and y.shape == (44100, 1)
    np.testing.assert_allclose(y[:, 0], one + two.mean(axis=1), atol=1e-6)


def test_soundtrack_add_switches_where_the_model_track_does(make_speech, tmp_path):
    one = _stereo(make_speech, 1.0, 48000)
    two = _voice(make_speech, 0.8, 22050, "other")
    sf.write(str(tmp_path / "one.wav"), one, 48000, subtype="FLOAT")
    sf.write(str(tmp_path / "two.wav"), two, 22050, subtype="FLOAT")
    switch = 15999 / SAMPLE_RATE  # the 16 kHz track's speaker 1 length (one sample short of 1 s)
    out = write_soundtrack(tmp_path / "add.wav", 2.0, tmp_path / "one.wav", tmp_path / "two.wav", "add", switch)
    y, rate = sf.read(str(out), dtype="float32", always_2d=True)
    start = round(switch * 48000)  # 47997
    assert rate == 48000 and y.shape == (96000, 2)
    assert np.array_equal(y[:start], one[:start])  # speaker 1 (cut at the switch), level unchanged
    up = soxr.resample(two, 22050, 48000, quality="HQ")
    np.testing.assert_allclose(y[start: start + len(up)], np.repeat(up[:, None], 2, 1), atol=1e-6)
    assert not y[start + len(up):].any()
    with pytest.raises(InputError, match="audio_type must be 'para' or 'add'"):
        write_soundtrack(tmp_path / "x.wav", 1.0, tmp_path / "one.wav", tmp_path / "two.wav", "mix")


def test_soundtrack_memory_is_one_copy_per_speaker(tmp_path):
    rng = np.random.default_rng(0)
    seconds = 30.0
    one = (0.1 * rng.standard_normal((int(seconds * 48000), 2))).astype(np.float32)  # 11.5 MB as float32
    two = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)  # 1.9 MB, 5.8 MB at 48 kHz
    sf.write(str(tmp_path / "one.wav"), one, 48000, subtype="PCM_16")
    sf.write(str(tmp_path / "two.wav"), two, 16000, subtype="PCM_16")
    del one, two
    tracemalloc.start()
    try:
        write_soundtrack(tmp_path / "mix.wav", seconds, tmp_path / "one.wav", tmp_path / "two.wav", "para")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Speaker 1, speaker 2 at 48 kHz and its 16 kHz source (soxr's output is not even traced), plus a few
    # mixing blocks: a full-length mix (11.5 MB more) does not fit.
    copies = seconds * 48000 * 2 * 4 + seconds * 48000 * 4 + seconds * 16000 * 4
    assert peak < copies + 4e6, (peak, copies)


@needs_ffmpeg
def test_soundtrack_over_4_gb_is_rf64_and_muxes(make_speech, tmp_path, monkeypatch):
    monkeypatch.setattr(audio_mod, "_WAV_MAX_BYTES", 0)  # every track "too big" for RIFF
    sf.write(str(tmp_path / "in.wav"), _stereo(make_speech, 1.0, 48000), 48000)
    out = audio_mod.write_soundtrack(tmp_path / "track.wav", 1.0, tmp_path / "in.wav")
    assert out.read_bytes()[:4] == b"RF64"
    video = tmp_path / "v.mp4"
    with VideoWriter(video, 64, 64, audio_path=out, duration=1.0) as writer:
        writer.write(np.zeros((25, 64, 64, 3), np.uint8))
    a = ffprobe_streams(video)["audio"]
    assert a["sample_rate"] == 48000 and a["channels"] == 2 and a["duration"] == pytest.approx(1.0, abs=0.04)
