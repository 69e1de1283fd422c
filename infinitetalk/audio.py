"""Audio input: decoding, loudness normalisation, wav2vec2 features and per-frame windows.

Official semantics (SPEC §4.1-4.3, golden README §2-3):

* audio is loaded as 16 kHz mono float32 (``librosa.load(sr=16000)``) and normalised to
  -23 LUFS with pyloudnorm (skipped when the measured loudness is not finite or beyond
  +-100 LUFS);
* wav2vec2 features: ``T = int(len/16000*25)`` (float formula), the CNN features are
  linearly interpolated (align_corners=True) to ``T`` frames *before* the feature projection
  and the transformer; the result stacks every encoder layer output (``hidden_states[1:]``)
  -> ``[T, layers, hidden]``;
* each output frame gets the 5-frame window ``center + (-2..2)`` clamped to the current
  (possibly end-padded) embedding;
* end padding appends a time-reversed copy of the last ``miss`` frames.

The video's soundtrack is not that copy: :func:`write_soundtrack` decodes the speech again at its own
sample rate and channels, without loudness change, and mixes two speakers with the same timing.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .media import run_ffprobe

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLE_RATE",
    "FPS",
    "AudioInfo",
    "probe_audio",
    "decode_audio",
    "decode_audio_native",
    "soundtrack_rate",
    "write_soundtrack",
    "AAC_SAMPLE_RATES",
    "loudness_normalize",
    "load_speech",
    "num_video_frames",
    "Wav2Vec2FeatureEncoder",
    "audio_window_indices",
    "gather_windows",
    "pad_audio_end",
    "combine_speakers",
]

SAMPLE_RATE = 16000
FPS = 25
_DECODE_TIMEOUT_S = 900
#: Sample rates the AAC encoder takes; the soundtrack keeps a source's rate when it is one of them.
AAC_SAMPLE_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
#: Channels the soundtrack keeps; speech with more is downmixed to stereo.
SOUNDTRACK_MAX_CHANNELS = 2
#: Frames mixed and written at a time (the soundtrack is never held in memory whole).
_SOUNDTRACK_BLOCK = 1 << 16
#: Largest soundtrack written as plain WAV (RIFF sizes are 32-bit); longer ones are RF64.
_WAV_MAX_BYTES = 2**32 - 2**16

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- probing
@dataclass(frozen=True)
class AudioInfo:
    """First audio stream of a media file, as reported by ffprobe."""

    duration: Optional[float]
    sample_rate: Optional[int]
    channels: Optional[int]
    codec: Optional[str]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} was not found on PATH; install ffmpeg")
    return path


def _display(path: PathLike) -> str:
    return os.path.basename(os.fspath(path)) or os.fspath(path)


def _to_float(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def probe_audio(path: PathLike) -> AudioInfo:
    """Probe the first audio stream with ffprobe (JSON). Raises InputError if there is none."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"audio file {_display(path)} does not exist")
    info = run_ffprobe(Path(os.path.abspath(path)))  # absolute: a name starting with '-' is not an option
    if info is None:
        raise InputError(f"cannot read {_display(path)} as a media file")
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise InputError(f"{_display(path)} has no audio stream")
    s = streams[0]
    duration = _to_float(s.get("duration"))
    if duration is None:
        duration = _to_float(info.get("format", {}).get("duration"))
    sr = s.get("sample_rate")
    return AudioInfo(
        duration=duration,
        sample_rate=int(sr) if sr not in (None, "") else None,
        channels=int(s["channels"]) if s.get("channels") else None,
        codec=s.get("codec_name"),
    )


# --------------------------------------------------------------------------- decoding
def _to_mono(y: np.ndarray) -> np.ndarray:
    """``[N]`` or ``[N, C]`` -> ``[N]`` (mean of channels)."""
    if y.ndim == 1:
        return y
    return y.T.mean(axis=0) if y.shape[1] > 1 else y[:, 0]


def _read_soundfile(path: str, max_channels: Optional[int] = None) -> Optional[tuple[np.ndarray, int]]:
    """libsndfile decode at the file's own rate: ``([N, C] float32, rate)``; None if libsndfile cannot
    read it or it has more than ``max_channels`` channels (checked from the header, before decoding)."""
    try:
        import soundfile as sf
    except ImportError:  # pragma: no cover - soundfile is a dependency
        return None
    try:
        if max_channels is not None and sf.info(path).channels > max_channels:
            return None
        y, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 - any libsndfile failure means "try ffmpeg"
        return None
    return y, int(rate)


def _resample(y: np.ndarray, rate: int, sr: int) -> Optional[np.ndarray]:
    """soxr HQ resampling (as librosa.load does) of ``[N]`` or ``[N, C]``; None without soxr."""
    if rate == sr:
        return y
    try:
        import soxr
    except ImportError:  # pragma: no cover - soxr is a dependency
        return None
    return soxr.resample(y, rate, sr, quality="HQ")


def _decode_soundfile(path: str, sr: int) -> Optional[np.ndarray]:
    """libsndfile decode (+ soxr HQ resampling, as librosa.load does) to mono; None if unsupported."""
    read = _read_soundfile(path)
    if read is None:
        return None
    y = _resample(_to_mono(read[0]), read[1], sr)
    return None if y is None else np.ascontiguousarray(y, dtype=np.float32)


def _decode_ffmpeg(path: str, sr: Optional[int] = None,
                   max_channels: Optional[int] = None) -> tuple[np.ndarray, int]:
    """ffmpeg decode of the first audio stream: ``([N, C] float32, rate)``.

    ``rate`` is ``sr``, or with None the stream's own rate as :func:`soundtrack_rate` maps it. ``C`` is the
    stream's channel count, at most ``max_channels`` (ffmpeg downmixes by the stream's channel layout).
    The samples go through an unnamed temporary file, so the decoded audio is held in memory once.
    """
    info = probe_audio(path)
    channels = info.channels or 1
    if max_channels is not None:
        channels = min(channels, max_channels)
    rate = sr if sr is not None else soundtrack_rate(info.sample_rate or 48000)
    cmd = [_tool("ffmpeg"), "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-vn", "-sn", "-dn",
           "-ac", str(channels), "-ar", str(rate), "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, timeout=_DECODE_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # run() has killed and reaped ffmpeg
            raise InputError(f"the audio of {_display(path)} could not be decoded within "
                             f"{_DECODE_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            logger.debug("ffmpeg failed on %s: %s", path, msg[-1:] if msg else "")
            raise InputError(f"cannot decode the audio of {_display(path)}")
        out.seek(0)
        y = np.fromfile(out, dtype="<f4")
    usable = (y.size // channels) * channels
    return y[:usable].reshape(-1, channels).astype(np.float32, copy=False), rate


def _check_file(path: PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"audio file {_display(path)} does not exist")
    if os.path.getsize(path) == 0:
        raise InputError(f"audio file {_display(path)} is empty")
    return path


def _check_samples(path: str, y: np.ndarray) -> None:
    if y.size == 0:
        raise InputError(f"audio file {_display(path)} contains no samples")
    if not np.isfinite(y).all():
        raise InputError(f"audio file {_display(path)} contains NaN or infinite samples")


def decode_audio(path: PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any audio (or the first audio track of a video) to mono float32 at ``sr`` Hz.

    Files libsndfile can read (wav, flac, ogg, ...) are read directly and resampled with
    soxr HQ when needed, which reproduces ``librosa.load(path, sr=sr)`` (bit-exact for
    16 kHz PCM). Anything else goes through an ffmpeg subprocess. The format is detected
    from the content, not the file name.

    Raises:
        InputError: missing file, no audio stream, undecodable, empty, or non-finite samples.
    """
    path = _check_file(path)
    y = _decode_soundfile(path, sr)
    if y is None:
        y = np.ascontiguousarray(_to_mono(_decode_ffmpeg(path, sr)[0]), dtype=np.float32)
    _check_samples(path, y)
    return y


def soundtrack_rate(rate: int) -> int:
    """The output's sample rate for a source at ``rate`` Hz: ``rate`` itself when AAC takes it
    (:data:`AAC_SAMPLE_RATES`), else the next higher rate AAC takes, at most 96 kHz."""
    for candidate in AAC_SAMPLE_RATES:
        if candidate >= rate:
            return candidate
    return AAC_SAMPLE_RATES[-1]


def _decode_soundfile_native(path: str) -> Optional[tuple[np.ndarray, int]]:
    """libsndfile decode at the file's own rate (or :func:`soundtrack_rate`'s, soxr HQ), all channels;
    None if unsupported or the file has more than :data:`SOUNDTRACK_MAX_CHANNELS` channels."""
    read = _read_soundfile(path, max_channels=SOUNDTRACK_MAX_CHANNELS)
    if read is None:
        return None
    sr = soundtrack_rate(read[1])
    y = _resample(read[0], read[1], sr)
    return None if y is None else (np.ascontiguousarray(y, dtype=np.float32), sr)


def decode_audio_native(path: PathLike) -> tuple[np.ndarray, int]:
    """Decode speech as it is, for the soundtrack: ``([N, C] float32, rate)``, no loudness change.

    The rate is the file's own when AAC can carry it, else :func:`soundtrack_rate`'s (soxr HQ). One or
    two channels are kept as they are; more are downmixed to stereo by ffmpeg with its standard matrix
    for the stream's channel layout (the layout ffmpeg assumes for the count when the file names none).
    Same readers, checks and messages as :func:`decode_audio`, and the same start: the 16 kHz copy and
    this one line up sample for sample (both readers resample without delay).
    """
    path = _check_file(path)
    decoded = _decode_soundfile_native(path)
    y, rate = decoded if decoded is not None else _decode_ffmpeg(path, None, SOUNDTRACK_MAX_CHANNELS)
    _check_samples(path, y)
    return y, rate


def loudness_normalize(wav: np.ndarray, sr: int = SAMPLE_RATE, target_lufs: float = -23.0) -> np.ndarray:
    """Normalise integrated loudness (ITU-R BS.1770, pyloudnorm) to ``target_lufs``.

    Returns the input unchanged (as float32) when the clip is too short to measure
    (< 0.4 s) or its loudness is not finite or beyond +-100 LUFS (e.g. silence).
    """
    import pyloudnorm as pyln

    wav = np.asarray(wav)
    try:
        loudness = pyln.Meter(sr).integrated_loudness(wav)
    except ValueError:
        return wav.astype(np.float32, copy=False)
    if not math.isfinite(loudness) or abs(loudness) > 100:
        return wav.astype(np.float32, copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns about possible clipping
        out = pyln.normalize.loudness(wav, loudness, target_lufs)
    return np.asarray(out, dtype=np.float32)


def load_speech(path: PathLike, sr: int = SAMPLE_RATE, target_lufs: float = -23.0) -> np.ndarray:
    """:func:`decode_audio` followed by :func:`loudness_normalize` (the official input path)."""
    return loudness_normalize(decode_audio(path, sr), sr, target_lufs)


def num_video_frames(num_samples: int, sr: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """Video frames of an audio clip: ``int(num_samples / sr * fps)`` (float formula, as official)."""
    return int(num_samples / sr * fps)


# --------------------------------------------------------------------------- two speakers
def combine_speakers(
    wav1: Optional[np.ndarray], wav2: Optional[np.ndarray], audio_type: str = "para"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-speaker waveforms and their sum (the muxed track) for two speakers.

    ``para``: both play at the same time. The official code requires equal lengths (it
    sums the arrays); we zero-pad the shorter one at the end instead.
    ``add``: person1 speaks, then person2: ``[w1, 0*len(w2)]`` and ``[0*len(w1), w2]``.
    A missing speaker (None, the official ``'None'``) becomes silence of the other's length.

    Returns:
        ``(speaker1, speaker2, summed)``, float32, all the same length.
    """
    if wav1 is None and wav2 is None:
        raise InputError("at least one speaker needs audio")
    if wav1 is None:
        wav1 = np.zeros(len(wav2), dtype=np.float32)
    if wav2 is None:
        wav2 = np.zeros(len(wav1), dtype=np.float32)
    w1 = np.asarray(wav1, dtype=np.float32)
    w2 = np.asarray(wav2, dtype=np.float32)
    if audio_type == "para":
        n = max(len(w1), len(w2))
        s1 = np.pad(w1, (0, n - len(w1)))
        s2 = np.pad(w2, (0, n - len(w2)))
    elif audio_type == "add":
        s1 = np.concatenate([w1, np.zeros(len(w2), dtype=np.float32)])
        s2 = np.concatenate([np.zeros(len(w1), dtype=np.float32), w2])
    else:
        raise InputError(f"audio_type must be 'para' or 'add', got {audio_type!r}")
    return s1, s2, (s1 + s2).astype(np.float32)


# --------------------------------------------------------------------------- the output's soundtrack
def write_soundtrack(path: PathLike, duration: float, speech: PathLike, speech_2: Optional[PathLike] = None,
                     audio_type: str = "para", switch: Optional[float] = None) -> Path:
    """Write the video's soundtrack: the speech as given, at its own rate and channels, ``duration`` s long.

    The model hears a 16 kHz mono, loudness-normalised copy (:func:`load_speech`); the soundtrack is
    decoded again from the files (:func:`decode_audio_native`) and keeps their quality:

    * one speaker: the decoded speech, unchanged (no loudness normalisation, no limiting);
    * two speakers: the track has speaker 1's rate and channels. Speaker 2 is resampled to that rate
      (soxr HQ); it keeps its channels when it has as many as speaker 1, else its mean over channels goes
      into every channel (stereo into mono: (L+R)/2; mono into stereo: the same signal left and right).
      ``para``: both start at 0 and are summed; only when the sum's peak exceeds full scale (1.0) is the
      whole mix scaled down by ``1 / peak`` so it cannot clip; nothing else changes its level.
      ``add``: speaker 1 until ``switch`` seconds, then speaker 2 (no level change). ``switch`` is the
      16 kHz track's switch point (speaker 1's length there), so lips and sound change speaker at the
      same sample; None uses speaker 1's length at its own rate.
    * Cut at ``duration`` (the video's length), or padded with silence to it.

    The file is 32-bit float WAV (RF64 beyond 4 GB): lossless for any source, also float sources beyond
    full scale. It is mixed and written in blocks, so the decoded speakers are the only full-length arrays
    in memory (one float32 copy each; a resampled speaker 2 briefly has two).

    Raises:
        InputError: what :func:`decode_audio_native` raises, or an unknown ``audio_type``.
    """
    if audio_type not in ("para", "add"):
        raise InputError(f"audio_type must be 'para' or 'add', got {audio_type!r}")
    if not duration > 0:
        raise ValueError(f"duration must be positive, got {duration!r}")
    y1, rate = decode_audio_native(speech)
    channels = y1.shape[1]
    parts = [(y1, 0)]
    gain = 1.0
    if speech_2 is not None:
        y2, rate_2 = decode_audio_native(speech_2)
        y2 = _conform(y2, rate_2, rate, channels)
        start = 0
        if audio_type == "add":
            start = len(y1) if switch is None else int(round(switch * rate))
            parts = [(y1[:start], 0)]
        parts.append((y2, start))
    total = max(1, int(round(duration * rate)))
    if speech_2 is not None and audio_type == "para":
        peak = max(float(np.abs(_mix_block(parts, a, min(total, a + _SOUNDTRACK_BLOCK), channels)).max())
                   for a in range(0, total, _SOUNDTRACK_BLOCK))
        gain = 1.0 / peak if peak > 1.0 else 1.0
    _write_blocks(Path(path), parts, total, channels, rate, gain)
    logger.info("soundtrack: %d Hz, %d channel(s), %.2f s%s", rate, channels, total / rate,
                f", mix scaled by {gain:.3f} to stay below full scale" if gain != 1.0 else "")
    return Path(path)


def _conform(y: np.ndarray, rate: int, to_rate: int, channels: int) -> np.ndarray:
    """Speaker 2 in speaker 1's layout: mean over channels unless the counts match (mono is then spread
    over the channels when mixing), resampled to ``to_rate``."""
    if y.shape[1] not in (1, channels):
        y = y.mean(axis=1, keepdims=True, dtype=np.float32)
    resampled = _resample(y, rate, to_rate)
    if resampled is None:  # pragma: no cover - soxr is a dependency
        raise RuntimeError("soxr is needed to mix speakers of different sample rates")
    return np.asarray(resampled, dtype=np.float32).reshape(-1, y.shape[1])


def _mix_block(parts: Sequence[tuple[np.ndarray, int]], a: int, b: int, channels: int) -> np.ndarray:
    """Frames ``[a, b)`` of the sum of ``(samples [N, C or 1], start frame)`` parts, silence elsewhere."""
    block = np.zeros((b - a, channels), dtype=np.float32)
    for y, start in parts:
        lo, hi = max(a, start), min(b, start + len(y))
        if hi > lo:
            block[lo - a:hi - a] += y[lo - start:hi - start]
    return block


def _write_blocks(path: Path, parts, total: int, channels: int, rate: int, gain: float) -> None:
    import soundfile as sf

    fmt = "WAV" if total * channels * 4 <= _WAV_MAX_BYTES else "RF64"
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=channels, subtype="FLOAT", format=fmt) as out:
        for a in range(0, total, _SOUNDTRACK_BLOCK):
            block = _mix_block(parts, a, min(total, a + _SOUNDTRACK_BLOCK), channels)
            if gain != 1.0:
                block *= np.float32(gain)
            out.write(block)


# --------------------------------------------------------------------------- windows / padding
def audio_window_indices(center_frames: Union[torch.Tensor, Sequence[int]], length: int,
                         window: int = 5) -> torch.Tensor:
    """Indices ``center + (-w//2 .. w//2)`` clamped to ``[0, length - 1]``: long ``[N, window]``."""
    centers = torch.as_tensor(center_frames, dtype=torch.long).reshape(-1, 1)
    half = window // 2
    offsets = torch.arange(-half, window - half, dtype=torch.long).reshape(1, -1)
    return torch.clamp(centers + offsets, min=0, max=int(length) - 1)


def gather_windows(emb: torch.Tensor, start: int, num_frames: int = 81, window: int = 5,
                   index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-frame audio windows of frames ``[start, start + num_frames)``.

    Args:
        emb: ``[T, L, C]`` embedding.
        index: optional frame map ``[T']`` into ``emb`` for an end-padded sequence (e.g.
            ``pad_audio_end(torch.arange(T), miss)``): the windows are taken from
            ``emb[index]`` without building it, so padding never copies the whole audio.

    Returns:
        ``[num_frames, window, L, C]``.
    """
    centers = torch.arange(start, start + num_frames, dtype=torch.long)
    if index is None:
        return emb[audio_window_indices(centers, emb.shape[0], window)]
    return emb[index[audio_window_indices(centers, index.shape[0], window)]]


def pad_audio_end(emb: torch.Tensor, miss: int) -> torch.Tensor:
    """Append ``miss`` frames made of the time-reversed tail (frame T-1 appears twice).

    ``emb``: ``[T, ...]``. When ``miss > T`` (only possible with our short-audio extension)
    the mirroring is repeated so the sequence stays continuous.
    """
    if miss <= 0:
        return emb
    if emb.shape[0] == 0:
        raise ValueError("cannot pad an empty embedding")
    out = emb
    added = 0
    while added < miss:
        take = min(miss - added, out.shape[0])
        out = torch.cat([out, torch.flip(out[out.shape[0] - take :], dims=[0])], dim=0)
        added += take
    return out


# --------------------------------------------------------------------------- wav2vec2
class Wav2Vec2FeatureEncoder:
    """wav2vec2 audio encoder producing per-video-frame features ``[T, layers, hidden]``.

    Runs the Hugging Face submodules directly (works with transformers 4.x and 5.x): CNN
    feature extractor -> linear interpolation to ``T`` frames -> feature projection ->
    positional conv + encoder layers, collecting every layer output.

    Long clips: the CNN is run in windows (exactly aligned to its stride and receptive field;
    a first-layer GroupNorm uses statistics over the whole clip) so memory stays bounded; the
    transformer runs in one pass over all frames, as the official code does (SDPA keeps the
    attention memory linear on CPU and GPU).
    """

    def __init__(self, model, feature_extractor, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, cnn_chunk_frames: int = 1500):
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.dtype = dtype
        self.cnn_chunk_frames = int(cnn_chunk_frames)
        cfg = model.config
        self._kernels = list(cfg.conv_kernel)
        self._strides = list(cfg.conv_stride)
        self.sampling_rate = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE))

    @classmethod
    def from_pretrained(cls, folder: PathLike, device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Wav2Vec2FeatureEncoder":
        """Load ``Wav2Vec2Model`` + ``Wav2Vec2FeatureExtractor`` from a local folder."""
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"wav2vec2 folder not found: {folder}")
        model = Wav2Vec2Model.from_pretrained(folder, local_files_only=True)
        model = model.to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        fe = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        return cls(model, fe, device=device, dtype=dtype)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    # ---- input values
    def input_values(self, wav: np.ndarray) -> torch.Tensor:
        """Feature-extractor output (honours ``do_normalize``): float32 ``[1, N]`` on the device."""
        wav = np.asarray(wav)
        if wav.ndim != 1 or wav.size == 0:
            raise InputError("audio must be a non-empty mono waveform")
        values = np.squeeze(self.feature_extractor(wav, sampling_rate=self.sampling_rate).input_values)
        return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(1, -1).to(self.device, self.dtype)

    # ---- CNN
    def _cnn_frames(self, n: int) -> int:
        for k, s in zip(self._kernels, self._strides):
            n = (n - k) // s + 1
            if n <= 0:
                return 0
        return n

    def _receptive(self) -> tuple[int, int]:
        """(receptive field, total stride) of the CNN in samples."""
        rf, jump = 1, 1
        for k, s in zip(self._kernels, self._strides):
            rf += (k - 1) * jump
            jump *= s
        return rf, jump

    @torch.no_grad()
    def cnn_features(self, input_values: torch.Tensor) -> torch.Tensor:
        """CNN features ``[1, N_cnn, C]`` (50 Hz for the standard stack)."""
        n_out = self._cnn_frames(input_values.shape[-1])
        if n_out <= 0:
            raise InputError("audio is too short for the wav2vec2 encoder")
        if n_out <= self.cnn_chunk_frames:
            return self.model.feature_extractor(input_values).transpose(1, 2)
        return self._cnn_features_chunked(input_values, n_out)

    def _first_layer_stats(self, layer, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel mean/var of the first conv output over the whole clip (GroupNorm case)."""
        norm = getattr(layer, "layer_norm", None)
        if not isinstance(norm, torch.nn.GroupNorm):
            return None
        if norm.num_groups != norm.num_channels:
            raise NotImplementedError("chunked wav2vec2 CNN supports per-channel GroupNorm only")
        k, s = self._kernels[0], self._strides[0]
        n0 = (x.shape[-1] - k) // s + 1
        step = self.cnn_chunk_frames * 64
        total = torch.zeros(norm.num_channels, dtype=torch.float64, device=x.device)
        total_sq = torch.zeros_like(total)
        for a in range(0, n0, step):
            b = min(n0, a + step)
            y = layer.conv(x[..., a * s : (b - 1) * s + k]).double()[0]
            total += y.sum(-1)
            total_sq += (y * y).sum(-1)
        mean = total / n0
        var = (total_sq / n0 - mean * mean).clamp_min(0)
        return mean, var

    def _run_cnn_window(self, x: torch.Tensor, stats) -> torch.Tensor:
        layers = self.model.feature_extractor.conv_layers
        h = x
        for i, layer in enumerate(layers):
            if i == 0 and stats is not None:
                mean, var = stats
                norm = layer.layer_norm
                y = layer.conv(h)
                y = (y - mean.to(y.dtype)[None, :, None]) / torch.sqrt(var.to(y.dtype) + norm.eps)[None, :, None]
                if norm.affine:
                    y = y * norm.weight[None, :, None] + norm.bias[None, :, None]
                h = layer.activation(y)
            else:
                h = layer(h)
        return h

    def _cnn_features_chunked(self, x: torch.Tensor, n_out: int) -> torch.Tensor:
        x = x[:, None]  # [1, 1, N], as the HF feature encoder does
        stats = self._first_layer_stats(self.model.feature_extractor.conv_layers[0], x)
        rf, jump = self._receptive()
        parts = []
        for a in range(0, n_out, self.cnn_chunk_frames):
            b = min(n_out, a + self.cnn_chunk_frames)
            window = x[..., a * jump : (b - 1) * jump + rf]
            out = self._run_cnn_window(window, stats)
            parts.append(out[..., : b - a])
        return torch.cat(parts, dim=-1).transpose(1, 2)

    # ---- encoder
    @staticmethod
    def interpolate(features: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Linear interpolation (align_corners=True) of ``[1, N, C]`` to ``[1, num_frames, C]``."""
        y = F.interpolate(features.transpose(1, 2), size=num_frames, mode="linear", align_corners=True)
        return y.transpose(1, 2)

    @torch.no_grad()
    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Projection + transformer on interpolated CNN features ``[1, T, C]`` -> ``[T, L, H]``."""
        proj = self.model.feature_projection(features)
        h = proj[0] if isinstance(proj, tuple) else proj
        enc = self.model.encoder
        stable = bool(getattr(self.model.config, "do_stable_layer_norm", False))
        h = h + enc.pos_conv_embed(h)
        if not stable:
            h = enc.layer_norm(h)
        h = enc.dropout(h)
        states = []
        for layer in enc.layers:
            out = layer(h, attention_mask=None)
            h = out[0] if isinstance(out, (tuple, list)) else out
            states.append(h)
        if stable:
            states[-1] = enc.layer_norm(states[-1])
        return torch.stack([s[0] for s in states], dim=1)  # [T, L, H]

    @torch.no_grad()
    def encode(self, wav: np.ndarray) -> torch.Tensor:
        """Per-video-frame features of a 16 kHz mono waveform.

        Returns float32 ``[T, num_layers, hidden]`` on CPU with ``T = int(len/16000*25)``.
        """
        num_frames = num_video_frames(len(wav), self.sampling_rate)
        if num_frames < 1:
            raise InputError("audio is shorter than one video frame (40 ms)")
        x = self.input_values(wav)
        feats = self.cnn_features(x)
        feats = self.interpolate(feats, num_frames)
        emb = self.encode_features(feats)  # [T, L, H]
        return emb.float().cpu()
