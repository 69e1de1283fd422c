"""Weights download: the exact files fetched, the layout, the offline error (no network used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infinitetalk import download, speech
from infinitetalk.download import WeightsDownloadError, ensure_weights, plan_weights
from infinitetalk.pipeline import WeightPaths

ROOT = Path(__file__).resolve().parents[1]


class FakeHub:
    """Records calls and writes placeholder files where huggingface_hub would (local_dir layout)."""

    def __init__(self, missing_at: dict | None = None, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.missing_at = missing_at or {}
        self.fail = fail

    def hf_hub_download(self, repo_id, filename, *, revision, local_dir, token=None):
        self.calls.append(("file", repo_id, filename, revision))
        if self.fail:
            raise self.fail
        if (repo_id, filename, revision) in self.missing_at:
            from huggingface_hub.errors import RemoteEntryNotFoundError

            raise RemoteEntryNotFoundError("404 entry not found", response=_FakeResponse())
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return str(path)

    def snapshot_download(self, repo_id, *, revision, local_dir, allow_patterns, token=None):
        self.calls.append(("snapshot", repo_id, tuple(allow_patterns), revision))
        if self.fail:
            raise self.fail
        root = Path(local_dir)
        for pattern in allow_patterns:
            if "/" not in pattern:  # a single file: model_index.json, spaCy's config.cfg, meta.json, tokenizer
                (root / pattern).write_text(SPACY_CONFIG if pattern == "config.cfg" else "{}")
                continue
            comp = root / pattern.split("/")[0]
            comp.mkdir(parents=True, exist_ok=True)
            (comp / "config.json").write_text("{}")
            if comp.name in ("transformer", "text_encoder"):
                shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
                for s in shards:
                    (comp / s).write_text("x")
                (comp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0],
                                                                                              "b": shards[1]}}))
            elif comp.name in ("vae", "image_encoder"):
                (comp / "model.safetensors").write_text("x")
        return str(root)


#: The head of en_core_web_sm 3.8.0's config.cfg (the [nlp] section lists its components).
SPACY_CONFIG = """[paths]
train = null

[nlp]
lang = "en"
pipeline = ["tok2vec","tagger","parser","senter","attribute_ruler","lemmatizer","ner"]
disabled = ["senter"]
batch_size = 256

[components]

[components.tagger]
source = "en_core_web_sm"
"""


class _FakeResponse:
    status_code = 404
    headers: dict = {}
    url = "https://huggingface.co/x"
    request = None

    def json(self):
        return {}


def _ensure(dest, hub):
    return ensure_weights(dest, hf_hub_download=hub.hf_hub_download, snapshot_download=hub.snapshot_download,
                          log=lambda msg: None)


def test_fetches_exactly_the_needed_files_into_the_discover_layout(tmp_path):
    hub = FakeHub()
    assert _ensure(tmp_path, hub) == tmp_path
    assert ("snapshot", download.WAN_REPO,
            ("image_encoder/*", "image_processor/*", "model_index.json", "scheduler/*", "text_encoder/*",
             "tokenizer/*", "transformer/*", "vae/*"), download.WAN_REVISION) in hub.calls
    files = sorted(c[1:] for c in hub.calls if c[0] == "file")
    assert files == sorted([
        ("MeiGen-AI/InfiniteTalk", "single/infinitetalk.safetensors", "d59847ebdacf19245bfca3fb23311c0cada8378a"),
        ("MeiGen-AI/InfiniteTalk", "multi/infinitetalk.safetensors", "d59847ebdacf19245bfca3fb23311c0cada8378a"),
        ("TencentGameMate/chinese-wav2vec2-base", "config.json", "5f7a6cfdfc5440ec78748f79a9dd66f077c2b463"),
        ("TencentGameMate/chinese-wav2vec2-base", "preprocessor_config.json",
         "5f7a6cfdfc5440ec78748f79a9dd66f077c2b463"),
        ("TencentGameMate/chinese-wav2vec2-base", "model.safetensors", "5f7a6cfdfc5440ec78748f79a9dd66f077c2b463"),
    ])
    paths = WeightPaths.discover(tmp_path)
    assert paths.single is not None and paths.multi is not None and paths.prepared is None
    # Complete now: a second call decides from local files alone and fetches nothing.
    again = FakeHub(fail=AssertionError("no network expected"))
    assert _ensure(tmp_path, again) == tmp_path and again.calls == []


def test_tiny_weights_are_complete_without_network(tiny_weights):
    assert plan_weights(tiny_weights).complete
    hub = FakeHub(fail=AssertionError("no network expected"))
    assert _ensure(tiny_weights, hub) == tiny_weights and hub.calls == []


def test_only_missing_groups_are_fetched_and_prepared_skips_transformer(tmp_path):
    _ensure(tmp_path, FakeHub())
    (tmp_path / "InfiniteTalk" / "multi" / "infinitetalk.safetensors").unlink()
    shard = next((tmp_path / download.WAN_DIR / "text_encoder").glob("model-00002*"))
    shard.unlink()  # an interrupted download: the index names a shard that is not there
    hub = FakeHub()
    _ensure(tmp_path, hub)
    assert [c[:3] for c in hub.calls] == [
        ("snapshot", download.WAN_REPO, ("text_encoder/*",)),
        ("file", "MeiGen-AI/InfiniteTalk", "multi/infinitetalk.safetensors"),
    ]
    # With a prepared transformer, neither the base transformer nor the single file is needed.
    fresh = tmp_path / "fresh"
    (fresh / download.PREPARED_DIR).mkdir(parents=True)
    hub = FakeHub()
    _ensure(fresh, hub)
    snap = next(c for c in hub.calls if c[0] == "snapshot")
    assert "transformer/*" not in snap[2]
    assert not any(c[2] == "single/infinitetalk.safetensors" for c in hub.calls if c[0] == "file")


def test_wav2vec2_falls_back_to_the_readme_revision_only_when_the_pin_lacks_the_file(tmp_path):
    hub = FakeHub(missing_at={(download.WAV2VEC_REPO, "model.safetensors", download.WAV2VEC_REVISION)})
    _ensure(tmp_path, hub)
    assert ("file", download.WAV2VEC_REPO, "model.safetensors", "refs/pr/1") in hub.calls


def test_offline_is_one_clear_line_naming_what_is_missing(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = FakeHub(fail=LocalEntryNotFoundError("Cannot find the requested files in the local cache ..."))
    with pytest.raises(WeightsDownloadError) as err:
        _ensure(tmp_path, hub)
    msg = str(err.value)
    assert "\n" not in msg and "unreachable" in msg
    for name in (download.WAN_REPO, "single/infinitetalk.safetensors", "model.safetensors"):
        assert name in msg
    assert len(hub.calls) == 1  # no waiting through retries for every group once the Hub is unreachable


def test_real_client_offline_mode_fails_fast_without_network(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "download_weights.py"), "--dest", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "could not fetch weights" in lines[0] and download.WAN_REPO in lines[0]


def test_predictor_setup_reports_missing_weights_clearly(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    import predict

    hub = FakeHub(fail=LocalEntryNotFoundError("offline"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.setenv("INFINITETALK_WEIGHTS", str(tmp_path / "none"))
    with pytest.raises(WeightsDownloadError, match="could not fetch weights into"):
        predict.Predictor().setup()


# ----------------------------------------------------------------------------------------------
# Text to speech (optional groups: tts=True)
# ----------------------------------------------------------------------------------------------

KOKORO_PIN = "f3ff3571791e39611d31c381e3a41a3af07b4987"
VOICE_FILES = [f"voices/{v}.pt" for v in speech.VOICES]


def _tts_items(plan):
    return [i for i in plan.items if i.repo in (download.KOKORO_REPO, download.SPACY_REPO)]


def _write_tts_by_hand(dest: Path) -> None:
    """Tiny files in the layout of the real text-to-speech folders."""
    kokoro = dest / speech.KOKORO_DIR
    for name in ["config.json", "kokoro-v1_0.pth", *VOICE_FILES]:
        (kokoro / name).parent.mkdir(parents=True, exist_ok=True)
        (kokoro / name).write_text("x")
    nlp = dest / speech.SPACY_DIR
    nlp.mkdir(parents=True)
    (nlp / "config.cfg").write_text(SPACY_CONFIG)
    (nlp / "meta.json").write_text("{}")
    (nlp / "tokenizer").write_text("x")
    for component in ("vocab", *download.SPACY_COMPONENTS):
        (nlp / component).mkdir()
        (nlp / component / "cfg").write_text("{}")


def test_tts_is_planned_only_when_asked_with_the_pinned_files_and_patterns(tmp_path):
    assert _tts_items(plan_weights(tmp_path)) == []
    kokoro, nlp = _tts_items(plan_weights(tmp_path, tts=True))
    assert (kokoro.repo, kokoro.revision, kokoro.local_dir) == ("hexgrad/Kokoro-82M", download.KOKORO_REVISION,
                                                                  tmp_path / "Kokoro-82M")
    assert kokoro.files == ("config.json", "kokoro-v1_0.pth", *VOICE_FILES) and len(VOICE_FILES) == 41
    assert kokoro.patterns == ()
    assert (nlp.repo, nlp.revision, nlp.local_dir) == ("spacy/en_core_web_sm", download.SPACY_REVISION,
                                                       tmp_path / "en_core_web_sm")
    assert nlp.files == ()
    assert set(nlp.patterns) == {"config.cfg", "meta.json", "tokenizer", "vocab/*", "tok2vec/*", "tagger/*",
                                 "parser/*", "attribute_ruler/*", "lemmatizer/*", "ner/*", "senter/*"}
    # Neither the wheel nor the README is fetched.
    from fnmatch import fnmatch

    for unwanted in ("en_core_web_sm-any-py3-none-any.whl", "README.md", ".gitattributes"):
        assert not any(fnmatch(unwanted, p) for p in nlp.patterns), unwanted
    # One line per group, even for Kokoro's 43 files.
    assert kokoro.describe() == f"hexgrad/Kokoro-82M@{download.KOKORO_REVISION[:12]} [config.json, " \
                                "kokoro-v1_0.pth, voices/af_heart.pt, ... 40 more]"


def test_complete_tts_folders_plan_nothing_and_only_missing_pieces_are_planned(tmp_path):
    _write_tts_by_hand(tmp_path)
    assert _tts_items(plan_weights(tmp_path, tts=True)) == []
    assert speech.tts_paths(tmp_path) is not None
    (tmp_path / "Kokoro-82M" / "voices" / "bm_george.pt").unlink()
    (items,) = _tts_items(plan_weights(tmp_path, tts=True))
    assert items.repo == download.KOKORO_REPO and items.files == ("voices/bm_george.pt",)
    (tmp_path / "Kokoro-82M" / "voices" / "bm_george.pt").write_text("x")
    # A component that config.cfg's pipeline names but whose folder is missing (an interrupted download).
    (tmp_path / "en_core_web_sm" / "ner" / "cfg").unlink()
    (tmp_path / "en_core_web_sm" / "ner").rmdir()
    (items,) = _tts_items(plan_weights(tmp_path, tts=True))
    assert items.repo == download.SPACY_REPO


def test_spacy_pipeline_line_decides_which_components_are_needed(tmp_path):
    nlp = tmp_path / speech.SPACY_DIR
    nlp.mkdir()
    (nlp / "meta.json").write_text("{}")
    (nlp / "config.cfg").write_text('[nlp]\nlang = "en"\npipeline = ["tok2vec", "tagger", "custom"]\n')
    for component in ("tok2vec", "tagger"):
        (nlp / component).mkdir()
    assert not speech.spacy_complete(nlp)
    (nlp / "custom").mkdir()
    assert speech.spacy_complete(nlp)
    # A pipeline line outside [nlp] does not count; unreadable: the components the synthesiser loads.
    (nlp / "config.cfg").write_text('[other]\npipeline = ["missing"]\n[nlp]\npipeline = ["tok2vec"]\n')
    assert speech.spacy_pipeline(nlp / "config.cfg") == ["tok2vec"] and speech.spacy_complete(nlp)
    (nlp / "config.cfg").write_text("[nlp]\npipeline = not json\n")
    assert speech.spacy_pipeline(nlp / "config.cfg") == [] and speech.spacy_complete(nlp)
    (nlp / "tagger").rmdir()
    assert not speech.spacy_complete(nlp)


def test_tiny_weights_tts_folders_are_complete(tiny_weights, tiny_weights_tts):
    """What make_tiny_weights.py writes counts as a complete download; without it the plan has both groups."""
    assert speech.tts_paths(tiny_weights_tts) is not None and plan_weights(tiny_weights_tts, tts=True).complete
    repos = [i.repo for i in plan_weights(tiny_weights, tts=True).items]
    assert repos == ["hexgrad/Kokoro-82M", "spacy/en_core_web_sm"]


def test_ensure_weights_fetches_tts_into_a_complete_folder(tmp_path):
    _ensure(tmp_path, FakeHub())  # the required groups first, as the servers do
    hub = FakeHub()
    ensure_weights(tmp_path, hf_hub_download=hub.hf_hub_download, snapshot_download=hub.snapshot_download,
                   log=lambda msg: None, tts=True)
    files = [c[1:] for c in hub.calls if c[0] == "file"]
    assert files == [("hexgrad/Kokoro-82M", f, download.KOKORO_REVISION) for f in download.KOKORO_FILES]
    assert [c for c in hub.calls if c[0] == "snapshot"] == [
        ("snapshot", "spacy/en_core_web_sm", download.SPACY_PATTERNS, download.SPACY_REVISION)]
    assert plan_weights(tmp_path, tts=True).complete
    assert speech.tts_paths(tmp_path) == (tmp_path / "Kokoro-82M", tmp_path / "en_core_web_sm")
    again = FakeHub(fail=AssertionError("no network expected"))
    ensure_weights(tmp_path, hf_hub_download=again.hf_hub_download, snapshot_download=again.snapshot_download,
                   log=lambda msg: None, tts=True)
    assert again.calls == []


def _planned_revisions(dest: Path, **env: str) -> list[str]:
    """``repo@revision`` of each group planned with tts=True, in a fresh interpreter (the revisions are
    read from the environment when the module is imported)."""
    code = ("import sys; from infinitetalk import download as d; "
            "print(*[i.repo + '@' + i.revision for i in d.plan_weights(sys.argv[1], tts=True).items], sep='\\n')")
    clean = {k: v for k, v in os.environ.items() if k not in ("INFINITETALK_KOKORO_REVISION",
                                                               "INFINITETALK_SPACY_REVISION")}
    run = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True, timeout=60,
                         env={**clean, **env}, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_tts_revisions_default_to_the_pin_and_main_and_come_from_the_environment(tmp_path):
    default = _planned_revisions(tmp_path)
    assert f"hexgrad/Kokoro-82M@{KOKORO_PIN}" in default and "spacy/en_core_web_sm@main" in default
    chosen = _planned_revisions(tmp_path, INFINITETALK_KOKORO_REVISION="0123456789abcdef",
                                INFINITETALK_SPACY_REVISION="fedcba9876543210")
    assert "hexgrad/Kokoro-82M@0123456789abcdef" in chosen and "spacy/en_core_web_sm@fedcba9876543210" in chosen


def test_download_script_fetches_tts_unless_no_tts(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    import download_weights

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    assert download_weights.main(["--dest", str(tmp_path), "--no-turbo", "--no-tts"]) == 0
    assert hub.calls and not [c for c in hub.calls if c[1] in (download.KOKORO_REPO, download.SPACY_REPO)]
    assert not (tmp_path / "Kokoro-82M").exists() and not (tmp_path / "en_core_web_sm").exists()
    assert speech.tts_paths(tmp_path) is None
    hub.calls.clear()
    assert download_weights.main(["--dest", str(tmp_path), "--no-turbo"]) == 0  # the default: with TTS
    assert {c[1] for c in hub.calls} == {download.KOKORO_REPO, download.SPACY_REPO}
    assert speech.tts_paths(tmp_path) is not None
    assert "--no-tts" in download_weights.__doc__


class _StubPipe:
    device, dtype, compiled = "cpu", "torch.float32", False


def _serve(weights: Path, hub: FakeHub, monkeypatch) -> tuple[object, list[str]]:
    """service.load_pipeline as the servers call it, with the Hub faked and the models not loaded."""
    import huggingface_hub

    from infinitetalk import build, service
    from infinitetalk.settings import Settings

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(build, "build_pipeline", lambda settings: _StubPipe())
    monkeypatch.setattr(service, "_quiet_loading_bars", lambda: None)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # load_pipeline sets them; restored afterwards
        monkeypatch.setenv(name, "1")
    logs: list[str] = []
    return service.load_pipeline(Settings(weights=weights), log=logs.append), logs


def test_servers_fetch_tts_with_the_required_weights(tmp_path, monkeypatch):
    hub = FakeHub()
    pipe, logs = _serve(tmp_path, hub, monkeypatch)
    assert isinstance(pipe, _StubPipe)
    assert {download.WAN_REPO, download.KOKORO_REPO, download.SPACY_REPO} <= {c[1] for c in hub.calls}
    assert plan_weights(tmp_path, tts=True).complete and speech.tts_paths(tmp_path) is not None
    assert not [line for line in logs if "warning" in line]


def test_servers_start_without_tts_when_only_tts_cannot_be_fetched(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    _ensure(tmp_path, FakeHub())  # the required weights are present, the text-to-speech files are not
    hub = FakeHub(fail=LocalEntryNotFoundError("offline"))
    pipe, logs = _serve(tmp_path, hub, monkeypatch)
    assert isinstance(pipe, _StubPipe)
    assert {c[1] for c in hub.calls} == {download.KOKORO_REPO}  # unreachable: spaCy is not tried after it
    (warning,) = [line for line in logs if "warning" in line]
    assert "\n" not in warning and "text input is disabled" in warning
    assert download.KOKORO_REPO in warning and download.SPACY_REPO in warning and "unreachable" in warning
    assert speech.tts_paths(tmp_path) is None


def test_servers_still_fail_when_required_weights_cannot_be_fetched(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    _write_tts_by_hand(tmp_path)  # even with the text-to-speech files present
    hub = FakeHub(fail=LocalEntryNotFoundError("offline"))
    with pytest.raises(WeightsDownloadError, match="could not fetch weights into") as err:
        _serve(tmp_path, hub, monkeypatch)
    assert download.WAN_REPO in str(err.value)
