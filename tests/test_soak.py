"""Soak: 200 tiny predictions in one process (valid, invalid and cancelled, interleaved) do not leak.

One predictor (tiny weights, 64x64, 1 step, about 1 s of audio) runs 200 predictions: every 10th
a real generation (20, about 7 s each on 2 cores; the odd-but-valid pairs of the hostile corpus in
turn, V2V included), 4 cancelled at their first denoising step, the rest (176) hostile inputs that
must fail fast (about 0.1 s) with their InputError. About 3 minutes on 2 cores.
After a warm-up of 10 runs, resident memory (RSS) and open file descriptors are taken; at the end
they must not have grown (RSS by less than 150 MB, fds by at most 4), the temporary folder must
be as at the start and no ffmpeg child may be left. The numbers are printed at the start and the end.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import psutil
import pytest

cog = pytest.importorskip("cog")
if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not installed", allow_module_level=True)

from decoding import final_output  # noqa: E402
from infinitetalk.errors import InputError  # noqa: E402
from leaks import ffmpeg_children  # noqa: E402
from test_predict import one_torch_thread, predictor, private_tmp  # noqa: E402,F401
from test_robustness import CASES, _listing, _tiny, check_video, corpus  # noqa: E402,F401

RUNS = 200
WARMUP = 10
VALID_EVERY = 10
CANCEL_AT = {25, 75, 125, 175}
MAX_RSS_GROWTH_MB = 150.0
MAX_FD_GROWTH = 4

VALID = [(i, a) for i, a, expect in CASES if expect is None]
INVALID = [(i, a, {}, expect) for i, a, expect in CASES if expect is not None] + [
    ("portrait.png", "speech.wav", {"audio_2": "nan_float.wav"}, "the audio_2 input contains NaN"),
    ("portrait.png", "speech.wav", {"audio_2": "speech.wav", "box_1": "0,0,100,100", "box_2": "0,300,600,500"},
     "is not inside the 512x512 image"),
    ("portrait.png", "speech.wav", {"steps": 0}, "steps must be between 1 and 100"),
]


def _snapshot(proc: psutil.Process) -> tuple[float, int]:
    gc.collect()
    return proc.memory_info().rss / 2**20, proc.num_fds()


@pytest.mark.slow
def test_200_predictions_do_not_leak_memory_fds_files_or_processes(predictor, corpus, capsys):
    proc = psutil.Process()
    predictor._cleanup_previous()
    tmp_before = _listing()
    plain_metric = predictor.record_metric

    def cancel_at_first_step(key, value, mode="replace"):
        if key == "denoising_steps":
            raise cog.CancelationException()

    def path(name: str) -> cog.Path:
        return cog.Path(corpus[name])

    counts = {"valid": 0, "invalid": 0, "cancel": 0}
    seconds = {"valid": 0.0, "invalid": 0.0, "cancel": 0.0}
    series: list[tuple[int, float, int]] = []
    start = None
    t_all = time.perf_counter()
    for i in range(RUNS):
        if i == WARMUP:
            start = _snapshot(proc)
            with capsys.disabled():
                print(f"\nsoak start (after {WARMUP} warm-up runs): RSS {start[0]:.1f} MB, {start[1]} open fds",
                      flush=True)
        t0 = time.perf_counter()
        if i in CANCEL_AT:
            kind = "cancel"
            predictor.record_metric = cancel_at_first_step
            try:
                with pytest.raises(cog.CancelationException):
                    final_output(predictor.run(**_tiny(image=path("portrait.png"), audio=path("speech.wav"), seed=i)))
            finally:
                predictor.record_metric = plain_metric
        elif i % VALID_EVERY == 0:
            kind = "valid"
            image, audio = VALID[(i // VALID_EVERY) % len(VALID)]
            out = Path(final_output(predictor.run(**_tiny(image=path(image), audio=path(audio), seed=i))))
            check_video(out, corpus[audio])
        else:
            kind = "invalid"
            image, audio, extra, expect = INVALID[i % len(INVALID)]
            extra = {k: path(v) if k == "audio_2" else v for k, v in extra.items()}
            with pytest.raises(InputError) as err:
                final_output(predictor.run(**_tiny(image=path(image), audio=path(audio), **extra)))
            assert expect in str(err.value), (i, image, audio, str(err.value))
            del err
        counts[kind] += 1
        seconds[kind] += time.perf_counter() - t0
        if (i + 1) % 50 == 0:
            series.append((i + 1, *_snapshot(proc)))
    predictor._cleanup_previous()
    end = _snapshot(proc)
    total = time.perf_counter() - t_all
    with capsys.disabled():
        print(f"soak end after {RUNS} predictions ({counts['valid']} valid, {counts['invalid']} invalid, "
              f"{counts['cancel']} cancelled) in {total:.0f} s: RSS {end[0]:.1f} MB "
              f"({end[0] - start[0]:+.1f} MB), {end[1]} open fds ({end[1] - start[1]:+d})", flush=True)
        print("soak RSS/fds every 50 runs: " + ", ".join(f"{n}: {r:.0f} MB/{f}" for n, r, f in series)
              + "; mean seconds: " + ", ".join(f"{k} {seconds[k] / max(1, counts[k]):.2f}" for k in counts),
              flush=True)
    assert sum(counts.values()) >= 200 and counts["valid"] >= 20 and counts["invalid"] >= 150
    assert end[0] - start[0] < MAX_RSS_GROWTH_MB, (start, end, series)
    assert end[1] - start[1] <= MAX_FD_GROWTH, (start, end, series)
    assert _listing() == tmp_before
    assert not ffmpeg_children()
