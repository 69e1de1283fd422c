"""The served benchmark's records: the interface other checks read (issue #13), on the committed H200
records and on a CPU dry run of the whole flow (tiny weights, a fresh process running the Cog
predictor's setup() and run(), real ffmpeg encoding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREDICTION_FIELDS = ("path", "gpu", "mode", "resolution", "speakers", "lora", "encoder", "seconds_per_chunk",
                     "gpu_seconds_per_video_second", "first_prediction_seconds", "recompiles", "gpu_idle_fraction",
                     "peak_memory_gb", "measured")
SETUP_FIELDS = ("path", "kind", "setup_seconds", "weights_gb", "page_cache", "measured")
PREVIEW_FIELDS = ("path", "kind", "seconds_to_first_preview", "overhead_fraction", "measured")  # issue 14


def _check(record: dict) -> None:
    assert record["path"] == "served"
    fields = {"setup": SETUP_FIELDS, "preview": PREVIEW_FIELDS}.get(record.get("kind"), PREDICTION_FIELDS)
    assert [f for f in fields if f not in record] == [], record.get("name")
    assert record["measured"] is True or (isinstance(record["measured"], str) and record["measured"])
    if record.get("kind") == "setup":
        assert record["page_cache"] in ("cold", "warm") and record["setup_seconds"] > 0
    elif record.get("kind") == "preview":
        assert 0 < record["seconds_to_first_preview"] < record["prediction_seconds"]
    else:
        assert record["mode"] in ("exact", "turbo", "turbo-1nfe", "fp8-turbo")
        assert record["lora"] in ("adapter", "fused", "none", "adapter-disabled", "unmerged")


def test_committed_served_records_carry_the_interface_fields():
    files = sorted((ROOT / "benchmarks").glob("*-served-*.json"))
    assert files
    for f in files:
        records = json.loads(f.read_text())
        assert records, f
        for record in records:
            _check(record)
            assert record["gpu"] == "NVIDIA H200"


@pytest.mark.slow
def test_served_benchmark_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "served.json"
    env = dict(os.environ, BENCH_SMOKE="1", PYTHONPATH=str(ROOT))
    env = {k: v for k, v in env.items() if not k.startswith("INFINITETALK_")}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "served", "--plan", "smoke", "--scratch",
                    str(tmp_path / "scratch"), "--json", str(out)], env=env, check=True, capture_output=True,
                   text=True, timeout=900)
    records = json.loads(out.read_text())
    for record in records:
        _check(record)
    setup, turbo, two, with_previews, preview, text = records
    assert setup["kind"] == "setup" and setup["server"] == "switchable"
    assert turbo["mode"] == "turbo" and turbo["num_chunks"] == 2
    assert turbo["lora"] == "fused" and turbo["lora_strategy"] == "merge"  # a switchable server runs turbo merged
    assert turbo["encoder"] == "ffmpeg" and turbo["output"]["video_codec"] == "h264"
    assert turbo["output"]["audio_codec"] == "aac" and turbo["output"]["frames"] == 150
    assert turbo["gpu_seconds_per_video_second"] > 0 and turbo["recompiles"] == 0  # no compile on the CPU
    assert two["speakers"] == 2 and two["lora"] == "unmerged" and two["output"]["frames"] == 50
    assert two["lora_switch_seconds"] > 0  # exact after turbo: the adapted weights read again
    # issue 14's record: the previews came before the video, and their cost against the same prediction
    assert with_previews["output"]["frames"] == 150 and preview["kind"] == "preview" and preview["previews"] == 2
    assert preview["output_arrivals"] == sorted(preview["output_arrivals"]) and len(preview["output_arrivals"]) == 3
    assert preview["baseline_seconds"] == turbo["prediction_seconds"] and preview["overhead_fraction"] > -1
    # issue 16's record: a dialogue from text, two speakers, with the synthesis time inside the prediction
    assert text["input"] == "text" and text["speakers"] == 2 and text["output"]["audio_codec"] == "aac"
    assert 0 < text["speech_seconds"] < text["prediction_seconds"] and turbo["speech_seconds"] is None


def test_fast_predictions_are_compared_with_their_bf16_twin(tmp_path):
    """The fast plan's frame comparison: the twin's video is kept, the fast one's decoded frames are measured
    against it (0 for the same frames, the true relative L2 otherwise)."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_served as bs
    from infinitetalk.media import VideoWriter

    def video(name: str, value: int) -> Path:
        path = tmp_path / name
        with VideoWriter(path, 64, 64, fps=25, crf=0) as writer:
            writer.write(np.full((5, 64, 64, 3), value, dtype=np.uint8))
        return path

    class Pipe:
        class fast:  # noqa: N801 - stands for FastPreset
            last_switch_seconds = 1.234

    keep = tmp_path / "keep"
    keep.mkdir()
    assert bs._fast_fields("turbo", False, video("a.mp4", 100), Pipe, keep) == {}
    assert (keep / "turbo.mp4").is_file()
    same = bs._fast_fields("fast-turbo", True, video("b.mp4", 100), Pipe, keep)
    assert same == {"fast_switch_seconds": 1.23, "frames_rel_l2_vs_bf16": 0.0}
    other = bs._fast_fields("fast-turbo", True, video("c.mp4", 110), Pipe, keep)
    assert other["frames_rel_l2_vs_bf16"] == pytest.approx(0.1, abs=0.02)  # 10 of 100, through yuv420 and back
    assert bs._fast_fields("fast-turbo-720p", True, video("d.mp4", 100), Pipe, keep)["frames_rel_l2_vs_bf16"] is None
