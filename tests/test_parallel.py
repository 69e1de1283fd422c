"""Sequence parallelism on the CPU: 2 and 4 gloo processes must reproduce the single process.

The GPU runs (NCCL, full-size model) are in BENCHMARKS.md; here the same code paths run with
tiny weights: the transformer split with diffusers' context parallelism (shard boundaries inside
latent frames, one and two speakers, the step cache), the CLI under ``torchrun``, the CLI with
``--num-gpus`` (spawned worker ranks), the multi-GPU pipeline's agreement on cancellation and on
input errors, and its recovery from a worker killed or stopped in the middle of a job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from decoding import decode_frames  # noqa: E402  (tests/ is on sys.path for test modules)
from infinitetalk.build import num_ranks
from infinitetalk.distributed import check_num_gpus
from infinitetalk.errors import GenerationCancelled, InputError
from infinitetalk.parallel import HANG_TIMEOUT_S, MultiGPUPipeline, PipelineLoader
from infinitetalk.pipeline import GenerationError, GenerationRequest, InfiniteTalkPipeline
from infinitetalk.settings import Settings
from loopback import free_port  # noqa: E402

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
    pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB"),
]

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _frames(path: Path) -> np.ndarray:
    return np.frombuffer(decode_frames(path), np.uint8)


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.slow
def test_transformer_split_over_ranks_equals_single_process(tmp_path, nproc):
    script = ROOT / "tests" / "parallel_forward.py"
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single.pt")], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    proc = _torchrun(nproc, str(script), str(tmp_path / "split.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(tmp_path / "single.pt")
    out = torch.load(tmp_path / "split.pt")
    assert int(ref["skipped"]) == int(out["skipped"]) == 1  # the cached call really skipped the blocks
    for key in ("speakers1", "speakers2", "cached"):
        assert out[key].shape == ref[key].shape == (1, 16, 5, 8, 12)
        err = (out[key] - ref[key]).abs().max().item()
        assert err <= 1e-5 * ref[key].abs().max().item(), (key, err)
    # The two-speaker path differs from the one-speaker path, so the check above covers it.
    assert (ref["speakers2"] - ref["speakers1"]).abs().max() > 1e-3


@pytest.mark.slow
def test_cli_torchrun_and_num_gpus_equal_single_process(tiny_weights, portrait, make_speech, tmp_path):
    speech = make_speech(4.0, "parallel")  # 2 chunks: the context frames cross the chunk boundary
    common = ["--image", str(portrait), "--audio", str(speech), "--weights", str(tiny_weights), "--width", "64",
              "--height", "64", "--steps", "2", "--seed", "5", "--quiet"]
    single = subprocess.run([sys.executable, "-m", "infinitetalk", *common, "--out", str(tmp_path / "single.mp4")],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    split = _torchrun(2, "-m", "infinitetalk", *common, "--out", str(tmp_path / "torchrun.mp4"), cwd=tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout.count("wrote ") == 1  # only rank 0 reports (and writes)
    spawned = subprocess.run([sys.executable, "-m", "infinitetalk", *common, "--num-gpus", "2", "--device", "cpu",
                              "--out", str(tmp_path / "spawned.mp4")],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert spawned.returncode == 0, spawned.stderr[-3000:]
    ref = _frames(tmp_path / "single.mp4")
    assert ref.size == 64 * 64 * 3 * int(single.stdout.split(": ")[1].split(" frames")[0])
    for name in ("torchrun.mp4", "spawned.mp4"):
        frames = _frames(tmp_path / name)
        assert frames.shape == ref.shape
        assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1, name
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["single.mp4", "spawned.mp4", "torchrun.mp4"]


@pytest.mark.slow
def test_multi_gpu_pipeline_stops_all_ranks_together(tiny_weights, portrait, make_speech, tmp_path):
    speech = make_speech(2.0, "parallel-cancel")
    pipe = MultiGPUPipeline(PipelineLoader(str(tiny_weights), {}), 2, device_type="cpu", ready_timeout=300)
    try:
        base = dict(image=portrait, audio=speech, width=64, height=64, steps=3, seed=1)

        def cancel_at_second_step(event):
            if event.step == 2:
                raise GenerationCancelled("cancelled by the user")

        with pytest.raises(GenerationCancelled, match="by the user"):
            pipe.generate(GenerationRequest(**base), tmp_path / "cancelled.mp4", callback=cancel_at_second_step,
                          show_progress=False)
        # A size whose tokens do not split over 2 ranks is refused on every rank, with the limit named.
        with pytest.raises(InputError, match="multiples of 32"):
            pipe.generate(GenerationRequest(**dict(base, width=80, height=80)), tmp_path / "odd.mp4",
                          show_progress=False)
        # The group is still in step: the next request runs to the end.
        result = pipe.generate(GenerationRequest(**dict(base, steps=1)), tmp_path / "ok.mp4", show_progress=False)
        assert result.num_frames == 50 and (tmp_path / "ok.mp4").stat().st_size > 0
        assert not (tmp_path / "cancelled.mp4").exists()
        # A worker that died between predictions (say, the OOM killer) is replaced before the next one,
        # which then runs as usual instead of failing.
        dead = pipe._procs[0]
        dead.kill()
        dead.join(timeout=30)
        result = pipe.generate(GenerationRequest(**dict(base, steps=1)), tmp_path / "late.mp4", show_progress=False)
        assert result.num_frames == 50 and pipe._procs[0] is not dead
    finally:
        pipe.close()
    assert all(not p.is_alive() for p in pipe._procs)
    with pytest.raises(GenerationError, match="not running"):
        pipe.generate(GenerationRequest(**base), tmp_path / "later.mp4", show_progress=False)


def _fail_worker_mid_job(pipe: MultiGPUPipeline, request: GenerationRequest, sig: signal.Signals, tmp_path: Path,
                         match: str, **set_at_signal) -> float:
    """Send ``sig`` to worker 1 at step 1 of chunk 0 (setting the pipeline's ``set_at_signal``
    attributes); check the job fails with ``match``, leaving no video, no partial file and no
    temporary file of either rank behind, and that the workers were replaced. Returns the seconds
    from the signal to the failure."""
    out, rank0_tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    rank0_tmp.mkdir()
    pipe.pipeline.tmp_dir = str(rank0_tmp)
    worker, workers_tmp = pipe._procs[0], Path(pipe._tmp_root)
    seen, sent = [], []

    def signal_worker(event):
        if event.chunk == 0 and event.step == 1:
            seen.extend(p.name for p in workers_tmp.iterdir())  # the worker's job folder lives there
            os.kill(worker.pid, sig)
            sent.append(time.monotonic())
            for name, value in set_at_signal.items():
                setattr(pipe, name, value)

    with pytest.raises(GenerationError, match=match) as failure:
        pipe.generate(request, out / "failed.mp4", callback=signal_worker, show_progress=False)
    seconds = time.monotonic() - sent[0]
    assert str(failure.value).endswith("; the GPU workers were restarted: retry the prediction")
    assert seen and all(name.startswith("infinitetalk-") for name in seen)
    assert list(out.iterdir()) == [] and list(rank0_tmp.iterdir()) == []
    assert not workers_tmp.exists()  # the killed worker's files went with it
    assert not worker.is_alive() and pipe._procs[0] is not worker and pipe._procs[0].is_alive()
    return seconds


def _request(portrait, make_speech, name: str) -> GenerationRequest:
    # 2 s of speech: one chunk of 50 frames; 2 steps, so step 1 is in the middle of the chunk.
    return GenerationRequest(image=portrait, audio=make_speech(2.0, name), width=64, height=64, steps=2, seed=4)


@pytest.mark.slow
def test_killed_worker_fails_the_job_fast_and_the_next_job_succeeds(tiny_weights, portrait, make_speech, tmp_path):
    request = _request(portrait, make_speech, "parallel-kill")
    pipe = MultiGPUPipeline(PipelineLoader(str(tiny_weights), {}), 2, device_type="cpu", ready_timeout=300)
    try:
        seconds = _fail_worker_mid_job(pipe, request, signal.SIGKILL, tmp_path,
                                       r"^GPU worker 1 stopped during the job \(killed by SIGKILL\)")
        print(f"killed worker: the job failed {seconds:.1f} s after the kill")
        assert seconds < 60
        pipe.generate(request, tmp_path / "after.mp4", show_progress=False)
    finally:
        pipe.close()
    InfiniteTalkPipeline.from_pretrained(tiny_weights).generate(request, tmp_path / "single.mp4", show_progress=False)
    ref, frames = _frames(tmp_path / "single.mp4"), _frames(tmp_path / "after.mp4")
    assert frames.shape == ref.shape == (50 * 64 * 64 * 3,)
    assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.slow
def test_hung_worker_fails_the_job_fast_and_the_next_job_succeeds(tiny_weights, portrait, make_speech, tmp_path):
    request = _request(portrait, make_speech, "parallel-hang")
    pipe = MultiGPUPipeline(PipelineLoader(str(tiny_weights), {}), 2, device_type="cpu", ready_timeout=300)
    try:
        # A tiny CPU job on a busy 2-core machine can go half a minute without a step (preparing,
        # decoding), so the short timeout is set as the worker is stopped.
        seconds = _fail_worker_mid_job(pipe, request, signal.SIGSTOP, tmp_path,
                                       r"^a GPU worker stopped answering \(no progress for \d+ s\)",
                                       hang_timeout=2.0)
        print(f"stopped worker: the job failed {seconds:.1f} s after the stop")
        assert seconds < 60
        pipe.hang_timeout = HANG_TIMEOUT_S
        result = pipe.generate(request, tmp_path / "after.mp4", show_progress=False)
        assert result.num_frames == 50 and (tmp_path / "after.mp4").stat().st_size > 0
    finally:
        pipe.close()


@pytest.mark.parametrize("n", [0, 3, 5, 16])
def test_unsupported_gpu_counts_are_refused(n):
    with pytest.raises(ValueError, match="num_gpus must be one of"):
        check_num_gpus(n)


@pytest.mark.parametrize("value, expected", [(None, 1), ("auto", 1), ("1", 1), ("2", 1), ("8", 1)])
def test_num_gpus_setting_is_ignored_without_several_gpus(value, expected):
    # This machine has no GPU: every setting falls back to the plain one-process pipeline.
    env = {} if value is None else {"INFINITETALK_NUM_GPUS": value}
    assert num_ranks(Settings.from_env(env)) == expected


def test_num_gpus_setting_lowered_to_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 6)

    def ranks(value: str) -> int:
        return num_ranks(Settings.from_env({"INFINITETALK_NUM_GPUS": value}))

    assert ranks("auto") == 4  # 6 visible: 4 split the heads and every bucket evenly
    assert ranks("8") == 4
    assert ranks("2") == 2
    for bad in ("3", "two"):
        with pytest.raises(ValueError, match=f"INFINITETALK_NUM_GPUS must be one of auto, 1, 2, 4, 8; got '{bad}'"):
            ranks(bad)
    # An explicit CPU device runs the count as given, as gloo processes (tests, debugging).
    assert num_ranks(Settings(num_gpus=2), "cpu") == 2 and num_ranks(Settings(), "cpu") == 1
