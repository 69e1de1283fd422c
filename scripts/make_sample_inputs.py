#!/usr/bin/env python
"""Write a sample portrait and a few seconds of speech to try the model with (no download).

Usage::

    python scripts/make_sample_inputs.py DIR [--seconds 3.0]

Writes ``DIR/portrait.png``: scikit-image's bundled astronaut photo (a public-domain NASA portrait
of Eileen Collins), 256x256; and ``DIR/speech.wav``: a spoken English sentence made with espeak-ng
when it is installed, otherwise a synthetic voiced signal (a glottal pulse train through vowel
formants, in syllables with a falling pitch): not words, but speech-like audio the model accepts.
The speech is padded or cut to exactly ``--seconds`` (default 3.0 s: 75 video frames, one chunk).
Prints which voice it used.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SENTENCE = "Hello! This is a tiny test on a CPU."  # about 2.9 s with espeak-ng at 170 words per minute
RATE = 16000


def write_portrait(path: Path, size: int = 256) -> None:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS).save(path)


def espeak_speech(text: str) -> tuple[np.ndarray, int] | None:
    """espeak-ng's rendering of ``text`` as float32 mono, or None where espeak-ng is not installed."""
    import soundfile as sf

    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        run = subprocess.run([exe, "-v", "en-us", "-s", "170", "-w", str(raw), text], capture_output=True)
        if run.returncode != 0 or not raw.exists():
            return None
        audio, rate = sf.read(str(raw), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def synthetic_speech(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: pulses at a falling pitch through two vowel formants, 4 syllables/s."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    pitch = 150.0 - 30.0 * t / max(seconds, 1e-3) + 8.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = np.cumsum(pitch / rate)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
    source = lfilter([1.0], [1.0, -0.95], pulses) + 0.02 * rng.standard_normal(n)
    vowels = [(730, 1090), (270, 2290), (530, 1840), (570, 840), (300, 870)]  # a, i, e, o, u
    out = np.zeros(n)
    syllable = rate // 4
    for start in range(0, n, syllable):
        f1, f2 = vowels[rng.integers(len(vowels))]
        seg = source[start:start + syllable]
        for freq, bw in ((f1, 80.0), (f2, 120.0)):
            r = np.exp(-np.pi * bw / rate)
            seg = lfilter([1 - r], [1.0, -2 * r * np.cos(2 * np.pi * freq / rate), r * r], seg)
        env = np.sin(np.pi * np.linspace(0, 1, len(seg))) ** 0.5  # each syllable rises and falls
        out[start:start + len(seg)] = seg * env
    out[(t % 1.5) > 1.3] = 0.0  # a short pause every 1.5 s
    return (0.3 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def write_speech(path: Path, seconds: float) -> str:
    import soundfile as sf

    spoken = espeak_speech(SENTENCE)
    if spoken is not None:
        audio, rate = spoken
        voice = "espeak-ng"
    else:
        audio, rate = synthetic_speech(seconds), RATE
        voice = "synthetic (espeak-ng not installed)"
    n = int(round(seconds * rate))
    audio = np.pad(audio, (0, max(0, n - len(audio))))[:n]
    sf.write(str(path), audio, rate, subtype="PCM_16")
    return voice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a sample portrait (PNG) and speech (WAV) to try the model with.")
    ap.add_argument("out_dir", type=Path, help="destination folder (created)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of the speech in seconds (default 3.0)")
    args = ap.parse_args(argv)
    if not 0.1 <= args.seconds <= 600:
        ap.error("--seconds must be between 0.1 and 600")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    portrait, speech = args.out_dir / "portrait.png", args.out_dir / "speech.wav"
    write_portrait(portrait)
    voice = write_speech(speech, args.seconds)
    print(f"wrote {portrait} and {speech} ({args.seconds:g} s, {voice})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
