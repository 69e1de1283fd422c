"""Shared fixtures: tiny weights in the real layout, real speech, a real portrait."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
# No test touches the Hugging Face Hub: a server's setup on a folder without the optional text-to-speech
# weights would otherwise try to fetch them (350 MB) where the network allows it. Inherited by subprocesses.
os.environ["HF_HUB_OFFLINE"] = "1"


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
    # Without the text-to-speech folders (120 MB, and 3 s more for every pipeline load): tiny_weights_tts has them.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_weights.py"), str(out), "--no-tts"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="session")
def model_paths(tiny_weights) -> tuple[Path, Path]:
    """The tiny transformer's files as ``load_transformer`` takes them: the Wan base folder, the single checkpoint."""
    single = tiny_weights / "InfiniteTalk" / "single" / "infinitetalk.safetensors"
    return tiny_weights / "Wan2.1-I2V-14B-480P-Diffusers" / "transformer", single


@pytest.fixture(scope="session")
def tiny_weights_tts(tiny_weights, tmp_path_factory) -> Path:
    """``tiny_weights`` plus the tiny text-to-speech folders (Kokoro-82M/, en_core_web_sm/): the other
    folders are links to tiny_weights' (read only by the tests that use this)."""
    import make_tiny_weights as mtw

    out = tmp_path_factory.mktemp("weights_tts")
    tts = {mtw.speech.KOKORO_DIR, mtw.speech.SPACY_DIR}
    for sub in tiny_weights.iterdir():
        # Not the TTS folders: a server's offline fetch attempt may have left empty ones in tiny_weights, and
        # writing through a link to them would give tiny_weights the TTS too.
        if sub.name not in tts:
            (out / sub.name).symlink_to(sub, target_is_directory=sub.is_dir())
    mtw.write_tts(out)
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


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


@pytest.fixture(scope="session")
def editable_venv(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install -e <repo>`` in it, made offline; its bin/ has the ``infinitetalk`` command.

    The venv has no pip of its own and sees this test environment's packages through a .pth file (what
    ``--system-site-packages`` does for a base interpreter; the test interpreter is usually a venv itself).
    ``--no-build-isolation`` builds with this environment's setuptools (>= 70.1, pinned in requirements-dev.txt).
    """
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True, env=_clean_env()).stdout.strip())
    paths = sysconfig.get_paths()
    parent = [p for p in dict.fromkeys([*site.getsitepackages(), paths["purelib"], paths["platlib"]])
              if Path(p).is_dir()]
    (purelib / "_test_environment.pth").write_text("\n".join(parent) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "-e", str(ROOT)], cwd=env_dir.parent, env=_clean_env(), capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return env_dir


@pytest.fixture(scope="session")
def venv_env(editable_venv) -> dict[str, str]:
    """Environment for commands run "inside" :func:`editable_venv` (its bin/ first on PATH, as when activated)."""
    env = _clean_env()
    env["PATH"] = str(editable_venv / "bin") + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(editable_venv)
    return env
