"""The RunPod worker end to end through the SDK's own local API server, plus the handler in-process.

Module server: ``python runpod_worker.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port P``
(runpod 1.12.0) with the tiny weights, outputs to moto's S3-compatible server on loopback, inputs
from a loopback http.server thread (``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1`` lets the SDK's
SSRF-safe fetcher reach 127.0.0.1) or as data URLs.

What the SDK's local server really does (runpod/serverless/modules/rp_fastapi.py): ``POST /run``
only stores the job and answers ``IN_PROGRESS``; the job runs inside the first ``POST /status/<id>``
call, which answers ``COMPLETED`` or ``FAILED`` when the handler returns, and forgets the job (a
second ``/status`` says "Job ID not found"). There is no ``/cancel``, no ``IN_QUEUE``, no progress
channel and no execution timeout there, so cancellation is tested in-process the way the
production loop (rp_scale.JobScaler.stop_job) does it: by cancelling the handler's asyncio task.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("runpod")
pytest.importorskip("moto")
if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not installed", allow_module_level=True)

from decoding import ffprobe_streams, final_output  # noqa: E402
from infinitetalk import service  # noqa: E402
from infinitetalk.errors import InputError  # noqa: E402
from loopback import data_url, ffmpeg_descendants, free_port, stop_process_group  # noqa: E402
from s3_server import s3_server  # noqa: E402,F401  (tests/ is on sys.path for test modules)

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 240.0
FPS = 25


def _post(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body if body is not None else {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


class FileServer:
    """Serves one folder on 127.0.0.1 from a thread."""

    def __init__(self, folder: Path) -> None:
        handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Worker:
    """The worker process with the SDK's local API server; its process group is killed at the end."""

    def __init__(self, env: dict, log_path: Path, tmpdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmpdir = tmpdir
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "runpod_worker.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
             "--rp_api_port", str(self.port)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/openapi.json", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"worker API not up after {timeout:.0f}s: {self.log_tail()}")

    def run(self, job_input: dict) -> str:
        status, body = _post(self.url + "/run", {"input": job_input})
        assert status == 200 and body["status"] in ("IN_QUEUE", "IN_PROGRESS"), body
        return body["id"]

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        """Poll /status/<id> until a final status, bounded by ``timeout`` in total. One request never outlives
        the deadline (the local server runs the job inside the call: a retried call would run it again)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"job {job_id} not finished after {timeout:.0f}s: {self.log_tail()}"
            status, body = _post(f"{self.url}/status/{job_id}", timeout=remaining)
            assert status == 200, body
            if body.get("status") not in ("IN_QUEUE", "IN_PROGRESS"):
                return body
            time.sleep(0.5)

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        try:
            stop_process_group(self.proc)
        finally:
            self.log.close()


def _worker_env(tiny_weights: Path, tmpdir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "INFINITETALK_", "AWS_"))}
    env.update(
        INFINITETALK_WEIGHTS=str(tiny_weights), TMPDIR=str(tmpdir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # tiny models: no OpenMP spin-waiting against ffmpeg on a 2-core box
        RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="1",  # inputs come from a loopback server here
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        AWS_SHARED_CREDENTIALS_FILE=str(tmpdir / "none"), AWS_CONFIG_FILE=str(tmpdir / "none"),
        AWS_EC2_METADATA_DISABLED="true", **extra)
    return env


@pytest.fixture(scope="module")
def files(tmp_path_factory, portrait, make_speech):
    folder = tmp_path_factory.mktemp("served")
    shutil.copy(portrait, folder / "face.png")
    shutil.copy(make_speech(1.2, "rp_speech"), folder / "speech.wav")
    shutil.copy(make_speech(1.6, "rp_speech_b"), folder / "speech_b.wav")
    shutil.copy(make_speech(4.0, "rp_speech_4s"), folder / "speech4.wav")  # 2 chunks
    server = FileServer(folder)
    try:
        yield server, folder
    finally:
        server.close()


@pytest.fixture(scope="module")
def worker(tiny_weights, s3_server, tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("rp_tmp")
    env = _worker_env(tiny_weights, tmpdir, **s3_server.env(INFINITETALK_OUTPUT_URL_EXPIRY="600"))
    w = Worker(env, tmp_path_factory.mktemp("rp_log") / "worker.log", tmpdir)
    try:
        w.wait_ready(READY_TIMEOUT_S)
        yield w
    finally:
        w.stop()


def _tiny(**extra) -> dict:
    return {"width": 64, "height": 64, "steps": 2, "seed": 7, **extra}


def _fetch(url: str, dest: Path) -> Path:
    with urllib.request.urlopen(url, timeout=60) as resp:
        assert resp.status == 200
        dest.write_bytes(resp.read())
    return dest


def _check_mp4(path: Path, seconds: float) -> dict:
    info = ffprobe_streams(path)
    v, a = info["video"], info["audio"]
    assert v["codec"] == "h264" and a is not None and a["codec"] == "aac", info
    assert (v["width"], v["height"]) == (64, 64) and v["fps"] == pytest.approx(FPS), info
    assert abs(info["format_duration"] - seconds) <= 1.0 / FPS + 1e-3, (info, seconds)
    assert abs(v["nb_frames"] - seconds * FPS) <= 1, info
    return info


def _leftovers(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.rglob("infinitetalk-*"))


@pytest.mark.slow
def test_run_then_status_completes_with_a_presigned_url_to_the_mp4(worker, files, s3_server, tmp_path):
    server, folder = files
    job_id = worker.run(_tiny(image=server.url + "/face.png", audio=data_url(folder / "speech.wav", "audio/wav")))
    body = worker.wait(job_id)
    assert body["status"] == "COMPLETED", (body, worker.log_tail())
    assert isinstance(body["output"], list) and len(body["output"]) == 1  # the handler's items; no preview asked
    out = body["output"][-1]
    assert out["storage"] == "s3" and out["bucket"] == s3_server.bucket and out["expires_in"] == 600
    assert out["key"].startswith(f"infinitetalk/{job_id}/") and out["key"] in s3_server.keys()
    assert out["video_url"].startswith(s3_server.endpoint + f"/{s3_server.bucket}/infinitetalk/")
    assert "X-Amz-Expires=600" in out["video_url"] and "X-Amz-Signature=" in out["video_url"]
    assert out["seed"] == 7 and out["chunks"] == 1 and out["frames"] == 30 and out["duration"] == pytest.approx(1.2)
    assert out["metrics"]["denoising_steps"] == 2 and out["metrics"]["video_seconds_done"] == pytest.approx(1.2)
    mp4 = _fetch(out["video_url"], tmp_path / "out.mp4")
    assert mp4.stat().st_size == out["bytes"]
    _check_mp4(mp4, 1.2)
    # The local server forgets a job once /status has returned it (production keeps it for a while).
    status, again = _post(f"{worker.url}/status/{job_id}")
    assert again["status"] == "FAILED" and again["error"] == "Job ID not found"
    logs = worker.log_tail(20000)
    assert "seed: 7" in logs and "progress: {'chunks_done': 1" in logs  # progress reaches the log locally
    # The pipeline's progress as plain lines (no tqdm bars), and no bar at boot either: nothing here is a terminal.
    assert "chunk 1/1, step 2/2\n" in logs and "chunk 1/1 done: 1.20 s of 1.20 s video in " in logs, logs[-3000:]
    assert "\r" not in logs and "\x1b" not in logs, repr(logs[-3000:])
    assert _leftovers(worker.tmpdir) == []  # inputs, output and run folder removed after the upload


@pytest.mark.slow
def test_stream_carries_a_preview_url_per_chunk_then_the_result(worker, files, s3_server, tmp_path):
    """``preview: true``: ``/stream/<id>`` (the SDK's local server runs the job inside that call) gives one
    item per chunk whose presigned URL downloads a playable MP4 of the video so far, then the result,
    the same dict as without previews."""
    server, folder = files
    job = _tiny(image=server.url + "/face.png", audio=server.url + "/speech4.wav", steps=1, preview=True)
    status, body = _post(worker.url + "/run", {"input": job})
    assert status == 200, body
    status, body = _post(f"{worker.url}/stream/{body['id']}", timeout=JOB_TIMEOUT_S)
    assert status == 200 and body["status"] == "COMPLETED", (body, worker.log_tail())
    items = [entry["output"] for entry in body["stream"]]
    assert [item.get("preview") for item in items] == [0, 1, None], items
    for item, frames in zip(items[:2], (81, 100)):
        assert item["preview_url"].startswith(s3_server.endpoint) and item["key"] in s3_server.keys()
        info = ffprobe_streams(_fetch(item["preview_url"], tmp_path / f"preview-{item['preview']}.mp4"))
        assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
        assert info["video"]["nb_frames"] == frames and item["seconds"] == pytest.approx(frames / FPS)
    result = items[-1]
    assert result["storage"] == "s3" and result["frames"] == 100 and result["chunks"] == 2
    _check_mp4(_fetch(result["video_url"], tmp_path / "final.mp4"), 4.0)
    assert _leftovers(worker.tmpdir) == []


@pytest.mark.slow
def test_invalid_jobs_fail_with_the_predictor_messages(worker, files):
    server, folder = files
    speech = server.url + "/speech.wav"
    boxes = _tiny(image=server.url + "/face.png", audio=speech, box_1="10,10,50,50", box_2="10,60,50,120")
    with pytest.raises(InputError) as predictor_error:  # what the Cog predictor raises for the same input
        service.build_request(boxes)
    cases = [
        (boxes, str(predictor_error.value)),
        (_tiny(image=server.url + "/face.png", audio=speech, quality=11), "quality must be between 1 and 10, got 11"),
        (_tiny(image=server.url + "/face.png", audio=speech, steps="many"), "steps must be an integer, got 'many'"),
        (_tiny(image="file:///etc/passwd", audio=speech), "image must be an http(s) URL or a data: URL"),
        (_tiny(image="/etc/hostname", audio=speech), "image must be an http(s) URL or a data: URL"),
        (_tiny(image=server.url + "/missing.png", audio=speech), "could not download the image input: HTTP 404"),
        (_tiny(image=server.url + "/face.png", audio=server.url + "/face.png"), "the audio input has no audio stream"),
        (_tiny(image=server.url + "/face.png", audio=data_url(folder / "face.png", "audio/wav")),
         "the audio input has no audio stream"),
        (_tiny(image=server.url + "/face.png", audio=speech, text="Hello"), "give audio or text, not both"),
        # This worker's weights have no text-to-speech folders (its setup warned and went on): text is refused.
        (_tiny(image=server.url + "/face.png", text="Hello"),
         "text input is not available here: the text-to-speech weights (Kokoro-82M/, en_core_web_sm/) are not"),
        ({"audio": speech}, "image is required"),
    ]
    ids = [(worker.run(job), message) for job, message in cases]
    for job_id, message in ids:
        body = worker.wait(job_id, timeout=60)
        # The handler's last item is {"error": <line>}: production's job loop turns it into status FAILED with
        # that error (test_production_job_loop_...); the SDK's development server lists it as the output.
        assert body["status"] == "COMPLETED" and list(body["output"][-1]) == ["error"], (message, body)
        error = body["output"][-1]["error"]
        assert message in error, (message, body)
        assert "\n" not in error and "Traceback" not in error and "tmp" not in error
    assert error == "image is required"  # the error is the one line itself, no JSON wrapping
    assert _leftovers(worker.tmpdir) == []


@pytest.mark.slow
def test_two_jobs_back_to_back_both_complete_with_distinct_objects(worker, files, s3_server, tmp_path):
    server, folder = files
    jobs = [worker.run(_tiny(image=server.url + "/face.png", audio=server.url + name, seed=None))
            for name in ("/speech.wav", "/speech_b.wav")]
    outputs = []
    for job_id, seconds in zip(jobs, (1.2, 1.6)):
        body = worker.wait(job_id)
        assert body["status"] == "COMPLETED", (body, worker.log_tail())
        outputs.append(body["output"][-1])
        _check_mp4(_fetch(body["output"][-1]["video_url"], tmp_path / f"{job_id}.mp4"), seconds)
    keys = [o["key"] for o in outputs]
    assert len(set(keys)) == 2 and all(k.startswith(f"infinitetalk/{j}/") for k, j in zip(keys, jobs))
    assert set(keys) <= set(s3_server.keys())
    assert outputs[0]["sha256"] != outputs[1]["sha256"]


@pytest.mark.slow
def test_bad_configuration_stops_the_worker_at_boot(tiny_weights, s3_server, tmp_path):
    """Before any model is loaded: one line on stderr and exit status 2."""
    cases = [
        ({**s3_server.env(), "INFINITETALK_OUTPUT_BUCKET": "no-such-bucket"},
         "the bucket 'no-such-bucket' does not exist"),
        ({"INFINITETALK_REQUIRE_BUCKET": "1", "INFINITETALK_INLINE_MAX_MB": "5"},
         "no output bucket configured: set INFINITETALK_OUTPUT_BUCKET"),
    ]
    for extra, message in cases:
        env = _worker_env(tiny_weights, tmp_path, **extra)
        result = subprocess.run([sys.executable, "runpod_worker.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
                                 "--rp_api_port", str(free_port())], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert "setup: loaded" not in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# In-process: the handler with the tiny pipeline (cancellation, inline output, progress, inputs)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_weights):
    import torch

    from infinitetalk.pipeline import InfiniteTalkPipeline

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu")
    finally:
        torch.set_num_threads(old)


def test_cancelling_the_handler_task_stops_within_a_step_and_cleans_up(pipe, portrait, make_speech, tmp_path,
                                                                       monkeypatch):
    """Production cancels (RunPod /cancel, execution timeout) by cancelling the job's asyncio task."""
    from infinitetalk.runpod_worker import RunPodWorker, WorkerSettings

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    updates: list[dict] = []
    started = threading.Event()

    def progress(job, update):
        updates.append(update)
        started.set()

    worker = RunPodWorker(pipe, WorkerSettings(progress_interval_s=0), None, progress=progress)
    job = {"id": "cancel-me", "input": _tiny(image=data_url(portrait, "image/png"), steps=100,
                                              audio=data_url(make_speech(10.0, "rp_long"), "audio/wav"))}

    async def consume():
        return [item async for item in worker.handler(job)]

    async def scenario():
        task = asyncio.create_task(consume())
        while not started.is_set():
            assert not task.done(), task.result()
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    elapsed = asyncio.run(asyncio.wait_for(scenario(), timeout=JOB_TIMEOUT_S))
    assert elapsed < 15.0, elapsed
    assert updates[0]["denoising_steps"] >= 1 and updates[0]["num_steps"] == 100 and updates[0]["num_chunks"] == 4
    assert len(updates) < 20  # it stopped: 100 steps x 4 chunks were asked for
    assert _leftovers(tmp_path) == [] and not ffmpeg_descendants()
    # The worker is usable again: the next job completes (inline: no bucket configured).
    out = worker.run({"id": "after", "input": _tiny(image=data_url(portrait, "image/png"), steps=1,
                                                     audio=data_url(make_speech(1.2, "rp_speech"), "audio/wav"))})
    assert out["storage"] == "inline", out
    head, b64 = out["video_url"].split(",", 1)
    assert head == "data:video/mp4;base64" and out["bytes"] == len(base64.b64decode(b64))
    mp4 = tmp_path / "inline.mp4"
    mp4.write_bytes(base64.b64decode(b64))
    _check_mp4(mp4, 1.2)
    assert updates[-1]["chunks_done"] == 1 and updates[-1]["video_seconds_done"] == pytest.approx(1.2)
    assert _leftovers(tmp_path) == []


def test_production_job_loop_fails_an_invalid_job_and_aggregates_the_stream(pipe, portrait, make_speech, tmp_path,
                                                                           monkeypatch):
    """The SDK's production job loop (``rp_job.handle_job``, its HTTP calls captured): an invalid input ends the
    job with ``{"error": <the predictor's line>}`` (status FAILED); with previews every item is streamed and the
    job's output is the list of them (``return_aggregate_stream``), the result last; inline previews play."""
    from runpod.serverless.modules import rp_job

    from infinitetalk.runpod_worker import RunPodWorker, WorkerSettings

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    sent, streamed = [], []

    async def send_result(session, result, job, is_stream=False):
        sent.append(result)

    async def stream_result(session, output, job):
        streamed.append(output)

    monkeypatch.setattr(rp_job, "send_result", send_result)
    monkeypatch.setattr(rp_job, "stream_result", stream_result)
    worker = RunPodWorker(pipe, WorkerSettings(progress_interval_s=0), None, progress=lambda job, update: None)
    config = {"handler": worker.handler, "return_aggregate_stream": True}
    image = data_url(portrait, "image/png")
    asyncio.run(rp_job.handle_job(None, config, {"id": "bad", "input": _tiny(
        image=image, audio=data_url(make_speech(1.2, "rp_speech"), "audio/wav"), quality=11)}))
    assert sent == [{"error": "quality must be between 1 and 10, got 11"}] and streamed == []
    asyncio.run(rp_job.handle_job(None, config, {"id": "good", "input": _tiny(
        image=image, audio=data_url(make_speech(4.0, "rp_speech_4s"), "audio/wav"), steps=1, preview=True)}))
    items = [entry["output"] for entry in streamed]
    assert [item.get("preview") for item in items] == [0, 1, None], items
    assert sent[-1] == {"output": items}
    for item, frames in zip(items[:2], (81, 100)):
        mp4 = tmp_path / f"preview-{item['preview']}.mp4"
        mp4.write_bytes(base64.b64decode(item["preview_url"].split(",", 1)[1]))
        assert ffprobe_streams(mp4)["video"]["nb_frames"] == frames
    assert items[-1]["storage"] == "inline" and items[-1]["frames"] == 100
    assert _leftovers(tmp_path) == []


def test_a_cancelled_job_removes_the_previews_it_uploaded(pipe, portrait, make_speech, s3_server, tmp_path,
                                                         monkeypatch):
    """Cancelled after its first preview was uploaded and streamed: the job stops, its files go, and the
    uploaded preview is deleted from the bucket (nothing of an unfinished job stays)."""
    from infinitetalk.runpod_worker import RunPodWorker, WorkerSettings
    from infinitetalk.storage import storage_from_env

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    worker = RunPodWorker(pipe, WorkerSettings(progress_interval_s=0), storage_from_env(s3_server.env()),
                          progress=lambda job, update: None)
    job = {"id": "cancel-previews", "input": _tiny(image=data_url(portrait, "image/png"), steps=1, preview=True,
                                                    audio=data_url(make_speech(10.0, "rp_long"), "audio/wav"))}
    before = set(s3_server.keys())
    seen: list[dict] = []

    async def scenario():
        async def consume():
            async for item in worker.handler(job):
                seen.append(item)

        task = asyncio.create_task(consume())
        while not seen:
            assert not task.done(), task.result()
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), timeout=JOB_TIMEOUT_S))
    assert seen[0]["preview"] == 0 and seen[0]["key"].startswith("infinitetalk/cancel-previews/")
    assert seen[0]["key"] not in s3_server.keys() and set(s3_server.keys()) == before
    assert _leftovers(tmp_path) == [] and not ffmpeg_descendants()


def test_too_big_for_inline_without_a_bucket_is_a_clear_error(pipe, portrait, make_speech, tmp_path, monkeypatch):
    from infinitetalk.runpod_worker import RunPodWorker, WorkerSettings

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    worker = RunPodWorker(pipe, WorkerSettings(inline_max_bytes=1000), None, progress=lambda job, update: None)
    out = worker.run({"id": "big", "input": _tiny(image=data_url(portrait, "image/png"), steps=1,
                                                   audio=data_url(make_speech(1.2, "rp_speech"), "audio/wav"))})
    assert "more than the 1000 bytes that can be returned inline" in out["error"]
    assert "INFINITETALK_OUTPUT_BUCKET" in out["error"] and _leftovers(tmp_path) == []


def test_fetch_input_schemes_limits_and_private_addresses(files, tmp_path, monkeypatch):
    from infinitetalk.runpod_worker import fetch_input

    server, folder = files
    fetch = partial(fetch_input, dest_dir=tmp_path, max_bytes=10_000_000, timeout_s=30)
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    with pytest.raises(InputError, match=r"the image input URL is not allowed \(host '127.0.0.1' resolves to "
                                         r"non-public address"):
        fetch("image", server.url + "/face.png")
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    got = fetch("image", server.url + "/face.png")
    assert got.read_bytes() == (folder / "face.png").read_bytes() and got.suffix == ".png"
    assert fetch("audio", "data:audio/wav;base64," + base64.b64encode(b"RIFF1234").decode()).read_bytes() == b"RIFF1234"
    for bad in ("file:///etc/passwd", "/etc/passwd", "s3://bucket/key", "ftp://host/x", "face.png"):
        with pytest.raises(InputError, match="image must be an http\\(s\\) URL or a data: URL"):
            fetch("image", bad)
    with pytest.raises(InputError, match="the image input is larger than the limit of 1000 bytes"):
        fetch_input("image", server.url + "/face.png", tmp_path, max_bytes=1000, timeout_s=30)
    with pytest.raises(InputError, match="the audio input is larger than the limit"):
        fetch_input("audio", "data:audio/wav;base64," + "A" * 4000, tmp_path, max_bytes=1000, timeout_s=30)
    with pytest.raises(InputError, match="not valid base64"):
        fetch("audio", "data:audio/wav;base64,@@@@")
    with pytest.raises(InputError, match="could not download the audio input from 127.0.0.1"):
        fetch("audio", f"http://127.0.0.1:{free_port()}/x.wav")  # nothing listens there


def test_cog_predictor_uploads_to_the_bucket_too_and_still_returns_the_file(pipe, portrait, make_speech,
                                                                           s3_server, capsys):
    """The self-hosted Cog option: same upload path; the output stays a file, the URL goes to logs and metrics."""
    cog = pytest.importorskip("cog")
    import predict
    from infinitetalk.storage import storage_from_env
    from test_predict import args

    p = predict.Predictor()
    p.pipe, p.storage, p._last_workdir = pipe, storage_from_env(s3_server.env()), None
    metrics: dict = {}
    p.record_metric = lambda key, value, mode="replace": metrics.__setitem__(key, value)
    try:
        speech = make_speech(1.2, "rp_speech")
        out = final_output(p.run(**args(image=cog.Path(portrait), audio=cog.Path(speech), steps=1)))
        assert isinstance(out, Path) and out.is_file()
        url = metrics["output_url"]
        assert f"output_url: {url}" in capsys.readouterr().out
        key = url.split(f"/{s3_server.bucket}/", 1)[1].split("?", 1)[0]
        assert key.startswith("infinitetalk/") and key in s3_server.keys()
        with urllib.request.urlopen(url, timeout=60) as resp:
            assert resp.read() == out.read_bytes()
        assert metrics["video_seconds"] == pytest.approx(1.2)
    finally:
        p._cleanup_previous()


def test_progress_goes_to_the_sdk_on_runpod_and_to_the_log_elsewhere(monkeypatch, capsys):
    import runpod

    from infinitetalk import runpod_worker

    sent = []
    monkeypatch.setattr(runpod.serverless, "progress_update", lambda job, progress: sent.append((job["id"], progress)))
    monkeypatch.delenv("RUNPOD_WEBHOOK_POST_OUTPUT", raising=False)
    runpod_worker._runpod_progress({"id": "j1"}, {"chunks_done": 1})
    assert sent == [] and "progress: {'chunks_done': 1}" in capsys.readouterr().out
    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "https://api.runpod.ai/v2/x/job-done/$ID?gpu=1")
    runpod_worker._runpod_progress({"id": "j1"}, {"chunks_done": 2})
    assert sent == [("j1", {"chunks_done": 2})]


def test_worker_settings_from_the_environment():
    from infinitetalk.runpod_worker import MB, WorkerConfigError, WorkerSettings

    s = WorkerSettings.from_env({})
    assert (s.input_max_bytes, s.input_timeout_s, s.inline_max_bytes) == (1024 * MB, 300.0, 10 * MB)
    s = WorkerSettings.from_env({"INFINITETALK_INLINE_MAX_MB": "0", "INFINITETALK_INPUT_TIMEOUT_S": "20"})
    assert s.inline_max_bytes == 0 and s.input_timeout_s == 20.0
    with pytest.raises(WorkerConfigError, match="INFINITETALK_INLINE_MAX_MB must be a number, got 'ten'"):
        WorkerSettings.from_env({"INFINITETALK_INLINE_MAX_MB": "ten"})
    with pytest.raises(WorkerConfigError, match="INFINITETALK_INPUT_MAX_MB must be between 1 and"):
        WorkerSettings.from_env({"INFINITETALK_INPUT_MAX_MB": "0"})
