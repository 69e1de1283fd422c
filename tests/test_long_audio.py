"""Long audio: a 60 s generation (21 chunks) does not use more memory than an 8 s one (3 chunks).

Each length runs in a fresh subprocess so ``ru_maxrss`` is the peak of that run alone. Frames
stream into the encoder chunk by chunk, so the peak must not grow with the number of chunks.

The children run with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``): big buffers
are then returned to the OS when freed instead of glibc's adaptive threshold parking them in the
heap, which made RSS swing by ~100 MB from chunk to chunk and the peak of a 21-chunk run drift
~40 MB above a 3-chunk run with no leak at all. With it, RSS after each chunk is flat to ~1 MB.

Sensitivity: at 64x64 one chunk of decoded float32 frames is 81*64*64*3*4 B = 4 MB, so keeping
every chunk (the official code's ``gen_video_list``) adds 18 * 4 = 72 MB to the 60 s peak (limit:
+40 MB; seen: +4 MB). Keeping the uint8 output frames (12 KB each, ~0.9 MB a chunk) is caught by
the second check: RSS after chunk 3..21 of the 60 s run within 10 MB of RSS after chunk 3.

This is the one long test (about 24 chunks, ~2 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from decoding import ffprobe_streams  # tests/ is on sys.path for test modules

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

ROOT = Path(__file__).resolve().parents[1]
MARGIN_MB = 40.0  # peak, 60 s vs 8 s
DRIFT_MB = 10.0  # RSS after chunks 3..21 vs after chunk 3, 60 s run

CHILD = r"""
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline

def vm_rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

weights, image, audio, out = sys.argv[1:5]
pipe = InfiniteTalkPipeline.from_pretrained(weights, device="cpu")
after_chunk = []

def on_progress(ev):
    if ev.step == ev.num_steps and len(after_chunk) == ev.chunk:
        after_chunk.append(round(vm_rss_mb(), 1))

res = pipe.generate(GenerationRequest(image=image, audio=audio, width=64, height=64, steps=1, seed=0,
                                      color_correction=1.0), out, callback=on_progress, show_progress=False)
print("RESULT " + json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "frames": res.num_frames, "chunks": res.num_chunks, "rss_after_chunk": after_chunk}))
"""


def run_child(weights: Path, image: Path, audio: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(weights), str(image), str(audio), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_audio_length(tiny_weights, portrait, make_speech, tmp_path):
    runs = {}
    for seconds, chunks in ((8, 3), (60, 21)):
        speech = make_speech(seconds, f"long{seconds}")
        out = tmp_path / f"long{seconds}.mp4"
        runs[seconds] = run_child(tiny_weights, portrait, speech, out)
        assert runs[seconds]["chunks"] == chunks and runs[seconds]["frames"] == seconds * 25
        info = ffprobe_streams(out)
        assert info["video"]["nb_frames"] == seconds * 25
        assert abs(info["audio"]["duration"] - seconds) <= 1 / 25 + 1e-3
        assert len(runs[seconds]["rss_after_chunk"]) == chunks
    short, long = runs[8]["peak_mb"], runs[60]["peak_mb"]
    print(f"\npeak RSS: 8 s audio (3 chunks) {short:.1f} MB, 60 s audio (21 chunks) {long:.1f} MB, "
          f"difference {long - short:+.1f} MB (limit +{MARGIN_MB:.0f} MB)")
    rss = runs[60]["rss_after_chunk"]
    print("RSS after each chunk, 60 s run (MB):", rss)
    assert long <= short + MARGIN_MB, f"peak RSS grew with length: {short:.1f} MB (8 s) -> {long:.1f} MB (60 s)"
    drift = max(rss[2:]) - rss[2]
    assert drift <= DRIFT_MB, f"RSS grows chunk by chunk: {rss}"
