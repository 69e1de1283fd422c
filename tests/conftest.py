"""Shared fixtures: tiny weights in the real layout, real speech, a real portrait."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


#: Figures computed by the official implementation (tests/golden/README.md says how); part of the repository.
GOLDEN = ROOT / "tests" / "golden"


def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden() -> Path:
    # In the repository: a missing folder is a broken checkout, an error rather than a skip.
    assert (GOLDEN / "tiny_dit_cases.safetensors").is_file(), f"golden data missing from {GOLDEN}"
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A complete tiny weights folder, made once per test session by scripts/make_tiny_weights.py."""
    out = tmp_path_factory.mktemp("weights")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_weights.py"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def _espeak(text: str, path: Path) -> bool:
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return False
    subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(path), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path.exists() and path.stat().st_size > 1000


@pytest.fixture(scope="session")
def make_speech(tmp_path_factory):
    """``make_speech(seconds, name)`` -> a WAV of real (espeak-ng) speech of about that length."""
    folder = tmp_path_factory.mktemp("speech")
    sentence = "The quick brown fox jumps over the lazy dog, and then it speaks again to the camera. "

    def make(seconds: float, name: str = "speech") -> Path:
        import soundfile as sf

        raw = folder / f"{name}_raw.wav"
        words = max(1, int(seconds * 2.7))
        text = " ".join((sentence * (words // 15 + 1)).split()[:words])
        if not _espeak(text, raw):
            # Fallback: the golden espeak-ng sentence, tiled.
            data, sr = sf.read(str(golden_dir() / "speech_16k.wav"), dtype="float32")
            sf.write(str(raw), np.tile(data, int(np.ceil(seconds * sr / len(data)))), sr)
        data, sr = sf.read(str(raw), dtype="float32")
        n = int(round(seconds * sr))
        data = np.pad(data, (0, max(0, n - len(data))))[:n]
        out = folder / f"{name}.wav"
        sf.write(str(out), data, sr)
        return out

    return make


@pytest.fixture(scope="session")
def portrait(tmp_path_factory) -> Path:
    """A real public-domain portrait photo (scikit-image's astronaut, 512x512) as PNG."""
    from PIL import Image
    from skimage import data

    out = tmp_path_factory.mktemp("img") / "portrait.png"
    Image.fromarray(data.astronaut()).save(out)
    return out
