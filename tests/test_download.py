"""Weights download: the exact files fetched, the layout, the offline error (no network used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infinitetalk import download
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
            if pattern == "model_index.json":
                (root / pattern).write_text("{}")
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
