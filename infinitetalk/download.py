"""Fetch the production weights from the Hugging Face Hub into the layout of ``weights/README.md``.

Only the files the pipeline reads are fetched (about 113 GB, not the 159 GB InfiniteTalk repo
plus the 80 GB Wan repo). ``huggingface_hub`` resumes interrupted downloads and shows progress
bars. A complete folder is detected from local files alone, so a filled ``weights/`` never
touches the network; otherwise only the missing groups are fetched.

The text-to-speech files (Kokoro-82M and spaCy's English tagger pipeline, for the ``text`` input)
are optional groups, planned only with ``tts=True``, as the turbo LoRA is with ``turbo=True``.

Used by ``scripts/download_weights.py`` (CLI) and by the servers' setup
(:func:`infinitetalk.service.load_pipeline`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import speech

logger = logging.getLogger(__name__)

#: The weights folder (default: ``weights/`` in the repo); see :func:`default_weights_dir`.
ENV_WEIGHTS = "INFINITETALK_WEIGHTS"
#: Revisions of the unpinned repos (read when this module is imported).
ENV_WAN_REVISION = "INFINITETALK_WAN_REVISION"
ENV_TURBO_REVISION = "INFINITETALK_TURBO_REVISION"
ENV_KOKORO_REVISION = "INFINITETALK_KOKORO_REVISION"
ENV_SPACY_REVISION = "INFINITETALK_SPACY_REVISION"

WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
#: No revision is published for the Diffusers base in SPEC.md; override with INFINITETALK_WAN_REVISION.
WAN_REVISION = os.environ.get(ENV_WAN_REVISION, "main")
WAN_DIR = "Wan2.1-I2V-14B-480P-Diffusers"
#: Components of the Diffusers base that the pipeline reads (``transformer/`` only without a prepared copy).
WAN_COMPONENTS = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")

INFINITETALK_REPO = "MeiGen-AI/InfiniteTalk"
INFINITETALK_REVISION = "d59847ebdacf19245bfca3fb23311c0cada8378a"
INFINITETALK_DIR = "InfiniteTalk"
INFINITETALK_FILES = ("single/infinitetalk.safetensors", "multi/infinitetalk.safetensors")

WAV2VEC_REPO = "TencentGameMate/chinese-wav2vec2-base"
#: The commit SPEC.md gives for config.json, preprocessor_config.json and model.safetensors: the
#: safetensors conversion the official README fetches from ``refs/pr/1`` (main has only .bin files).
WAV2VEC_REVISION = "5f7a6cfdfc5440ec78748f79a9dd66f077c2b463"
#: The official README's source of model.safetensors; used (with a warning) only if the pinned
#: commit does not have a file.
WAV2VEC_FALLBACK_REVISION = "refs/pr/1"
WAV2VEC_DIR = "chinese-wav2vec2-base"
WAV2VEC_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")

PREPARED_DIR = "prepared/transformer-single"

#: The step/CFG-distilled LoRA the official README uses for 4-step inference (turbo mode). Optional:
#: fetched by scripts/download_weights.py (unless --no-turbo), never required by setup().
TURBO_REPO = "Kijai/WanVideo_comfy"
TURBO_REVISION = os.environ.get(ENV_TURBO_REVISION, "main")
TURBO_DIR = "lightx2v"
TURBO_FILE = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"

#: Text to speech (the ``text`` input; :mod:`infinitetalk.speech`). Optional: fetched by
#: scripts/download_weights.py (unless --no-tts) and by the servers' setup, which only warns on failure.
KOKORO_REPO = "hexgrad/Kokoro-82M"
KOKORO_REVISION = os.environ.get(ENV_KOKORO_REVISION, "f3ff3571791e39611d31c381e3a41a3af07b4987")
KOKORO_FILES = speech.KOKORO_FILES

#: The Hub copy of spaCy's en_core_web_sm 3.8.0: the pipeline folder at its root, plus a wheel and a
#: README that are not fetched.
SPACY_REPO = "spacy/en_core_web_sm"
#: No commit of it is known to us (none could be checked offline); override with INFINITETALK_SPACY_REVISION.
SPACY_REVISION = os.environ.get(ENV_SPACY_REVISION, "main")
SPACY_COMPONENTS = ("tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer", "ner")
SPACY_PATTERNS = ("config.cfg", "meta.json", "tokenizer", "vocab/*", *(f"{c}/*" for c in SPACY_COMPONENTS))


class WeightsDownloadError(RuntimeError):
    """The weights are missing and could not be fetched; the message is one line for the user."""


@dataclass
class DownloadItem:
    """One fetch: a whole folder pattern set (``snapshot``) or a single file."""

    repo: str
    revision: str
    local_dir: Path
    files: tuple[str, ...] = ()  # single files (hf_hub_download)
    patterns: tuple[str, ...] = ()  # allow_patterns (snapshot_download)
    fallback_revision: str | None = None
    what: str = ""

    def describe(self) -> str:
        names = list(self.files or self.patterns)
        if len(names) > 10:  # Kokoro's voices: the first names and a count keep the line readable
            names = names[:3] + [f"... {len(names) - 3} more"]
        return f"{self.repo}@{self.revision[:12]} [{', '.join(names)}]"


@dataclass
class WeightsPlan:
    dest: Path
    items: list[DownloadItem] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.items


# ----------------------------------------------------------------------------------------------
# What is missing (local checks only)
# ----------------------------------------------------------------------------------------------


def _nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(p for p in path.iterdir() if not p.name.startswith("."))


def _sharded_complete(folder: Path) -> bool:
    """A model folder with config.json and all its weight files (every shard of an index)."""
    if not (folder / "config.json").is_file():
        return False
    indexes = list(folder.glob("*.safetensors.index.json"))
    if indexes:
        for index in indexes:
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError):
                return False
            if not all((folder / s).is_file() for s in shards):
                return False
        return True
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _component_complete(base: Path, name: str) -> bool:
    folder = base / name
    if name in ("transformer", "vae", "text_encoder", "image_encoder"):
        return _sharded_complete(folder)
    return _nonempty_dir(folder)


def _plan_tts(dest: Path) -> list[DownloadItem]:
    """The text-to-speech groups ``dest`` lacks: Kokoro's missing files; spaCy's whole pipeline folder."""
    items = []
    kokoro = dest / speech.KOKORO_DIR
    missing = speech.missing_kokoro_files(kokoro)
    if missing:
        items.append(DownloadItem(KOKORO_REPO, KOKORO_REVISION, kokoro, files=tuple(missing),
                                  what="Kokoro-82M text to speech"))
    if not speech.spacy_complete(dest / speech.SPACY_DIR):
        items.append(DownloadItem(SPACY_REPO, SPACY_REVISION, dest / speech.SPACY_DIR, patterns=SPACY_PATTERNS,
                                  what="spaCy English tagger (text to speech)"))
    return items


def plan_weights(dest: str | Path, turbo: bool = False, tts: bool = False) -> WeightsPlan:
    """The downloads ``dest`` still needs, decided from local files only (no network).

    ``turbo`` adds the optional distilled LoRA of the turbo mode; ``tts`` the optional text-to-speech
    groups (Kokoro-82M, spaCy's en_core_web_sm).
    """
    dest = Path(dest)
    plan = WeightsPlan(dest)
    base = dest / WAN_DIR
    prepared = (dest / PREPARED_DIR).is_dir()

    wan_missing = [c for c in WAN_COMPONENTS if not _component_complete(base, c)]
    if not prepared and not _component_complete(base, "transformer"):
        wan_missing.append("transformer")
    patterns = [f"{c}/*" for c in wan_missing]
    if not (base / "model_index.json").is_file():
        patterns.append("model_index.json")
    if patterns:
        plan.items.append(DownloadItem(WAN_REPO, WAN_REVISION, base, patterns=tuple(sorted(patterns)),
                                       what="Wan2.1 I2V 14B base (Diffusers)"))

    it_files = [f for f in INFINITETALK_FILES
                if not (dest / INFINITETALK_DIR / f).is_file() and not (prepared and f.startswith("single/"))]
    if it_files:
        plan.items.append(DownloadItem(INFINITETALK_REPO, INFINITETALK_REVISION, dest / INFINITETALK_DIR,
                                       files=tuple(it_files), what="InfiniteTalk audio weights"))

    w_files = [f for f in WAV2VEC_FILES if not (dest / WAV2VEC_DIR / f).is_file()]
    if w_files:
        plan.items.append(DownloadItem(WAV2VEC_REPO, WAV2VEC_REVISION, dest / WAV2VEC_DIR, files=tuple(w_files),
                                       fallback_revision=WAV2VEC_FALLBACK_REVISION, what="wav2vec2 audio encoder"))
    if turbo and not (dest / TURBO_DIR / TURBO_FILE).is_file():
        plan.items.append(DownloadItem(TURBO_REPO, TURBO_REVISION, dest / TURBO_DIR, files=(TURBO_FILE,),
                                       what="lightx2v distilled LoRA (turbo mode)"))
    if tts:
        plan.items.extend(_plan_tts(dest))
    return plan


# ----------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------


def _is_missing_on_remote(exc: BaseException) -> bool:
    """The Hub answered and the file or revision does not exist there."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError

    return isinstance(exc, (RemoteEntryNotFoundError, RevisionNotFoundError)) and not isinstance(
        exc, LocalEntryNotFoundError)


def _is_unreachable(exc: BaseException) -> bool:
    """Offline mode, DNS/connection failure or timeout (huggingface_hub reports these as LocalEntryNotFound)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)) or any(
                k in name for k in ("Connect", "Timeout", "NameResolution")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _short_reason(exc: BaseException) -> str:
    if _is_unreachable(exc):
        return "the Hub is unreachable (offline?)"
    text = " ".join(str(exc).split())
    if len(text) > 160:
        text = text[:160] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fetch_item(item: DownloadItem, hf_hub_download: Callable, snapshot_download: Callable, token) -> None:
    item.local_dir.mkdir(parents=True, exist_ok=True)
    if item.patterns:
        snapshot_download(item.repo, revision=item.revision, local_dir=str(item.local_dir),
                          allow_patterns=list(item.patterns), token=token)
        return
    for filename in item.files:
        try:
            hf_hub_download(item.repo, filename, revision=item.revision, local_dir=str(item.local_dir), token=token)
        except Exception as exc:
            if item.fallback_revision is None or not _is_missing_on_remote(exc):
                raise
            logger.warning("%s: %s is not at pinned revision %s; using %s as the official README does",
                           item.repo, filename, item.revision, item.fallback_revision)
            hf_hub_download(item.repo, filename, revision=item.fallback_revision, local_dir=str(item.local_dir),
                            token=token)


def ensure_weights(dest: str | Path | None = None, *, log: Callable[[str], None] | None = None,
                   hf_hub_download: Callable | None = None, snapshot_download: Callable | None = None,
                   turbo: bool = False, tts: bool = False) -> Path:
    """Make ``dest`` a complete weights folder and return it.

    Nothing is fetched when the folder is complete (local check only). Otherwise only the
    missing files are fetched from the Hub at pinned revisions; any failure (offline, no
    access, missing file) raises :class:`WeightsDownloadError` with one line naming what
    could not be fetched. ``turbo`` and ``tts`` add the optional groups (see :func:`plan_weights`).
    ``hf_hub_download`` / ``snapshot_download`` can be injected (tests).
    """
    dest = Path(dest if dest is not None else default_weights_dir())
    say = log or logger.info
    plan = plan_weights(dest, turbo, tts)
    if plan.complete:
        return dest
    if hf_hub_download is None or snapshot_download is None:
        import huggingface_hub

        hf_hub_download = hf_hub_download or huggingface_hub.hf_hub_download
        snapshot_download = snapshot_download or huggingface_hub.snapshot_download
    token = os.environ.get("HF_TOKEN") or None
    failed: list[str] = []
    unreachable = False
    for item in plan.items:
        if unreachable:  # do not wait through the Hub client's retries once more for every group
            failed.append(f"{item.describe()} (not tried)")
            continue
        t0 = time.perf_counter()
        say(f"downloading {item.what}: {item.describe()} -> {item.local_dir}")
        try:
            _fetch_item(item, hf_hub_download, snapshot_download, token)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
            logger.debug("download of %s failed", item.describe(), exc_info=True)
            unreachable = _is_unreachable(exc)
            failed.append(f"{item.describe()} ({_short_reason(exc)})")
            continue
        say(f"downloaded {item.what} in {time.perf_counter() - t0:.1f}s")
    if failed:
        raise WeightsDownloadError(
            f"could not fetch weights into {dest}: " + "; ".join(failed)
            + ". Check the network and HF_TOKEN, or put the files there by hand (see weights/README.md).")
    still = plan_weights(dest, turbo, tts)
    if not still.complete:
        raise WeightsDownloadError(
            f"weights in {dest} are still incomplete after downloading: "
            + "; ".join(i.describe() for i in still.items) + " (see weights/README.md)")
    return dest


def prepare_transformer(dest: str | Path, *, log: Callable[[str], None] | None = None) -> Path:
    """Write ``prepared/transformer-single``: Wan base + single audio weights merged, bf16, our key names.

    Written to a temporary sibling and renamed, so a crash never leaves a half-written folder
    that :class:`~infinitetalk.pipeline.WeightPaths` would take for a prepared copy.
    """
    import torch

    from .weights import load_transformer, save_prepared

    dest = Path(dest)
    say = log or logger.info
    out = dest / PREPARED_DIR
    if out.is_dir():
        say(f"prepared transformer already present: {out}")
        return out
    base = dest / WAN_DIR / "transformer"
    single = dest / INFINITETALK_DIR / "single" / "infinitetalk.safetensors"
    if not _component_complete(dest / WAN_DIR, "transformer") or not single.is_file():
        raise WeightsDownloadError(f"--prepare needs {base} and {single}; download them first")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    say(f"preparing {out} from {base} + {single}")
    model = load_transformer(base, single, device="cpu", dtype=torch.bfloat16)
    save_prepared(model, tmp, dtype=torch.bfloat16)
    del model
    os.replace(tmp, out)
    say(f"prepared transformer written in {time.perf_counter() - t0:.1f}s")
    return out


def default_weights_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$INFINITETALK_WEIGHTS`` (in ``env``, default ``os.environ``), else ``weights/`` next to the
    package (the repo root)."""
    value = (os.environ if env is None else env).get(ENV_WEIGHTS, "").strip()
    if value:
        return Path(value)
    return Path(__file__).resolve().parents[1] / "weights"


__all__ = [
    "WeightsDownloadError",
    "default_weights_dir",
    "ensure_weights",
    "plan_weights",
    "prepare_transformer",
]
