"""Chunk plan: official streaming rule plus the short-audio extension."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infinitetalk.audio import gather_windows, pad_audio_end
from infinitetalk.chunking import plan_chunks

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("T", [82, 100, 153, 154, 225, 226, 400, 1000, 2600, 15000])
@pytest.mark.parametrize("mx", [None, 1000])
def test_streaming_rule(T, mx):
    """Chunks of 81 frames overlap by exactly the 9 context frames, together cover every output
    frame, and there is no chunk too many: without the last one the video would be short."""
    plan = plan_chunks(T, mx)
    limit = min(T, mx or T)
    assert plan.official and plan.num_chunks >= 2
    assert plan.starts[0] == 0
    assert all(b - a == 81 - 9 for a, b in zip(plan.starts, plan.starts[1:]))  # 9 frames of context
    assert plan.final_frame_count == limit
    assert plan.generated_frames >= limit  # every frame of the video comes from some chunk
    assert plan.generated_frames - plan.kept_frames(plan.num_chunks - 1) < limit  # the last chunk is needed
    assert plan.motion_frames_per_chunk == (1,) + (9,) * (plan.num_chunks - 1)
    assert plan.motion_latents(0) == 1 and plan.motion_latents(plan.num_chunks - 1) == 3
    # the audio is padded only before the last chunk, and then reaches past that chunk's end
    assert all(p == 0 for p in plan.pad_before[:-1])
    assert plan.padded_lengths[-1] >= plan.ends[-1] or plan.pad_before[-1] == 0
    assert plan.padded_lengths[-1] == T + plan.pad_before[-1]


def test_no_cap_by_default():
    plan = plan_chunks(25 * 600)  # ten minutes
    assert plan.final_frame_count == 15000 and plan.max_frames is None


def test_clip_mode():
    plan = plan_chunks(400, 81)
    assert plan.num_chunks == 1 and plan.final_frame_count == 81


@pytest.mark.parametrize("T", [1, 2, 25, 80, 81])
def test_short_audio_extension(T):
    plan = plan_chunks(T)
    assert not plan.official
    assert plan.num_chunks == 1 and plan.starts == (0,)
    assert plan.final_frame_count == T
    assert plan.pad_before == (81 - T + 3,)
    emb = pad_audio_end(torch.arange(T, dtype=torch.float32).reshape(T, 1, 1), plan.pad_before[0])
    assert emb.shape[0] == plan.padded_lengths[0] >= 84
    w = gather_windows(emb, 0, 81)
    assert w.shape == (81, 5, 1, 1)
    assert w[:T, 2, 0, 0].tolist() == list(range(T))  # real frames see their own audio


def test_short_audio_respects_cap():
    assert plan_chunks(60, 40).final_frame_count == 40


def test_invalid_arguments():
    with pytest.raises(ValueError):
        plan_chunks(0)
    with pytest.raises(ValueError):
        plan_chunks(100, motion_frames=81)


@pytest.mark.skipif(not (GOLDEN / "schedule_and_windows.json").exists(), reason="golden missing")
def test_chunk_counts_match_golden():
    data = json.loads((GOLDEN / "schedule_and_windows.json").read_text())["chunk_counts"]
    for e in data.values():
        plan = plan_chunks(e["audio_frames"], e["max_frame_num"])
        if e["error"]:
            assert plan.num_chunks == 1 and not plan.official
            continue
        assert plan.num_chunks == e["num_chunks"]
        assert list(plan.starts) == e["chunk_starts"]
        assert plan.final_frame_count == e["final_frame_count"]
        assert plan.padded_lengths[-1] == e["last_chunk_padded_audio_len"]
