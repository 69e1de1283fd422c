"""Live previews (issue 14): every chunk an HLS segment at once, previews by stream copy, the final MP4
unchanged. Real ffmpeg throughout; the videos are checked with ffprobe and by decoding them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from decoding import decode_frames, ffprobe_streams
from infinitetalk.preview import INIT, PLAYLIST, HLSOutput, HLSWriter, playlist_segments, preview_mp4

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

FPS = 25
SIZE = 64
#: one solid colour per chunk, so the order of the frames in a preview can be read back
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
CHUNKS = [81, 72, 25]  # the pipeline's: 81 new frames, then 72 per chunk, then the rest


@pytest.fixture()
def soundtrack(tmp_path) -> Path:
    t = np.arange(int(sum(CHUNKS) / FPS * 48000)) / 48000
    path = tmp_path / "soundtrack.wav"
    sf.write(path, np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.3, 48000)
    return path


def _chunk(k: int) -> np.ndarray:
    return np.broadcast_to(np.array(COLOURS[k], np.uint8), (CHUNKS[k], SIZE, SIZE, 3)).copy()


def _mean_colours(path: Path) -> np.ndarray:
    raw = np.frombuffer(decode_frames(path), np.uint8).reshape(-1, SIZE, SIZE, 3)
    return raw.reshape(len(raw), -1, 3).mean(axis=1)


def test_each_chunk_is_a_segment_and_every_preview_plays_what_is_done(tmp_path, soundtrack):
    folder, seen = tmp_path / "live", []

    def on_segment(seg):  # on the writer's thread, right after the playlist lists the segment
        assert len(playlist_segments(seg.folder)) == seg.index + 1
        assert "#EXT-X-ENDLIST" not in (seg.folder / PLAYLIST).read_text()
        out = preview_mp4(seg.folder, tmp_path / f"preview-{seg.index}.mp4")
        seen.append((seg, ffprobe_streams(out), _mean_colours(out)))

    writer = HLSWriter(folder, SIZE, SIZE, fps=FPS, crf=20, audio_path=soundtrack, max_segment_frames=81,
                       on_segment=on_segment)
    for k in range(3):
        writer.write(_chunk(k))
    writer.close()
    assert writer.error is None and len(seen) == 3
    done = np.cumsum(CHUNKS)
    for (seg, info, colours), frames in zip(seen, done):
        assert seg.frames == frames and seg.seconds == pytest.approx(frames / FPS)
        v, a = info["video"], info["audio"]
        assert v["codec"] == "h264" and a["codec"] == "aac" and v["fps"] == pytest.approx(FPS)
        assert v["nb_frames"] == frames == len(colours)
        assert abs(info["format_duration"] - frames / FPS) <= 1 / FPS + 0.03
        starts = np.concatenate([[0], done])
        for k in range(seg.index + 1):  # every chunk's frames, in order, in their colour
            np.testing.assert_allclose(colours[starts[k]:starts[k + 1]], np.broadcast_to(COLOURS[k], (CHUNKS[k], 3)),
                                       atol=6)
    text = (folder / PLAYLIST).read_text()
    assert text.startswith("#EXTM3U") and "#EXT-X-PLAYLIST-TYPE:EVENT" in text and text.rstrip().endswith(
        "#EXT-X-ENDLIST")
    assert f'#EXT-X-MAP:URI="{INIT}"' in text and "#EXT-X-TARGETDURATION:4" in text
    assert [line for line in text.splitlines() if line.startswith("#EXTINF")] == [
        "#EXTINF:3.240000,", "#EXTINF:2.880000,", "#EXTINF:1.000000,"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([INIT, PLAYLIST, "seg-00000.m4s", "seg-00001.m4s",
                                                               "seg-00002.m4s"])
    # An HLS reader (ffmpeg's) plays the folder: the whole length, both streams.
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                            str(folder / PLAYLIST)], capture_output=True, text=True, check=True)
    assert float(probe.stdout) == pytest.approx(sum(CHUNKS) / FPS, abs=0.05)


def test_abort_removes_every_file_and_a_failure_stops_only_the_previews(tmp_path, soundtrack):
    folder = tmp_path / "live"
    writer = HLSWriter(folder, SIZE, SIZE, fps=FPS, crf=20, audio_path=soundtrack, max_segment_frames=81)
    writer.write(_chunk(0))
    writer.write(_chunk(1))
    writer.abort()
    assert list(folder.iterdir()) == []
    bad = HLSWriter(tmp_path / "bad", SIZE, SIZE, fps=FPS, crf=20, audio_path=soundtrack, max_segment_frames=81)
    bad.write(_chunk(0))
    bad.write(np.zeros((5, SIZE, SIZE + 2, 3), np.uint8))  # a wrong size: this segment fails
    bad.write(_chunk(2))  # ignored: the previews stopped
    bad.close()  # no exception: previews never fail the generation
    assert isinstance(bad.error, ValueError) and list((tmp_path / "bad").iterdir()) == []


@pytest.mark.slow
def test_pipeline_live_folder_leaves_the_mp4_unchanged(tiny_weights, portrait, make_speech, tmp_path):
    from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu")
    speech = make_speech(4.0, "live")  # 100 frames: 2 chunks
    req = dict(image=portrait, audio=speech, width=SIZE, height=SIZE, steps=1, seed=3)
    plain = pipe.generate(GenerationRequest(**req), tmp_path / "plain.mp4", show_progress=False)
    segments = []
    live = pipe.generate(GenerationRequest(**req), tmp_path / "live.mp4", show_progress=False,
                         hls=HLSOutput(tmp_path / "hls", on_segment=segments.append))
    assert (tmp_path / "live.mp4").read_bytes() == (tmp_path / "plain.mp4").read_bytes()
    assert [s.frames for s in segments] == [81, plain.num_frames] and live.num_frames == plain.num_frames == 100
    preview = preview_mp4(tmp_path / "hls", tmp_path / "all.mp4")
    info = ffprobe_streams(preview)
    assert info["video"]["nb_frames"] == 100 and abs(info["format_duration"] - 4.0) <= 1 / FPS + 0.03
    assert (tmp_path / "hls" / PLAYLIST).read_text().rstrip().endswith("#EXT-X-ENDLIST")


def test_cli_refuses_a_live_folder_that_is_not_empty(tmp_path, portrait, make_speech):
    from infinitetalk import cli

    (tmp_path / "hls").mkdir()
    (tmp_path / "hls" / "old.txt").write_text("x")
    rc = cli.main(["--image", str(portrait), "--audio", str(make_speech(1.0, "cli-live")), "--out",
                   str(tmp_path / "o.mp4"), "--hls", str(tmp_path / "hls"), "--weights", str(tmp_path / "none")])
    assert rc == 2


def test_fragment_times_move_by_track_in_both_tfdt_versions():
    import struct

    from infinitetalk.media import MediaToolError
    from infinitetalk.preview import _shift

    def box(kind: str, payload: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(payload), kind.encode()) + payload

    def fragment(track: int, version: int, time: int) -> bytes:
        tfhd = box("tfhd", struct.pack(">II", 0, track))
        tfdt = box("tfdt", bytes([version, 0, 0, 0]) + struct.pack(">Q" if version else ">I", time))
        return box("moof", box("mfhd", struct.pack(">II", 0, 1)) + box("traf", tfhd + tfdt)) + box("mdat", b"x")

    data = fragment(1, 1, 5) + fragment(2, 0, 7)
    shifted = _shift(data, {1: 2**40, 2: 100})
    assert shifted == fragment(1, 1, 5 + 2**40) + fragment(2, 0, 107)
    with pytest.raises(MediaToolError, match="overflows"):
        _shift(fragment(2, 0, 7), {2: 2**32})
    with pytest.raises(MediaToolError, match="unknown track 3"):
        _shift(fragment(3, 1, 0), {1: 0})
