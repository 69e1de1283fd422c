"""End to end through cog's own HTTP server (``python -m cog.server.http``, coglet), no Docker.

One server for the module, on loopback, with the tiny weights. Covers: sync prediction with
data-URL inputs and a data-URL MP4 output whose logs are plain lines (no carriage returns or
terminal codes), schema validation (422), a failing input with a clear message, a second prediction
sent while one runs (409 "At capacity", not queued; the first completes, a later one succeeds), an
async prediction cancelled mid-denoising (webhook ``completed`` with ``canceled``, no temp files
left), and an async prediction after it that succeeds (webhook ``completed``).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("cog")
pytestmark = pytest.mark.slow  # a real server: setup, then whole predictions and a cancel

from decoding import ffprobe_streams  # noqa: E402
from loopback import data_url, ffmpeg_descendants, free_port, stop_process_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 300.0
PREDICT_TIMEOUT_S = 300.0
#: What cog 0.23 (coglet) puts before the message of an exception raised by run(), a generator (its output is
#: a list of files): "Prediction failed: " (its PredictionError's Display), "Generator iteration error: " (its
#: generator driver) and the exception type's __qualname__ (predict.py names its user-facing errors "invalid
#: input" and "cannot generate"). Fixed: cannot be removed.
COG_PREFIX = "Prediction failed: Generator iteration error: "
#: cog 0.23.1's answer, with HTTP 409, to a prediction sent while its one slot is busy (coglet's create-prediction
#: route, CreatePredictionError::AtCapacity; the same for sync and async POSTs and a PUT with a new id). The
#: prediction is refused, not queued: a direct client must send it again later.
AT_CAPACITY = {"error": "At capacity - all prediction slots busy", "status": "failed"}
FINAL = ("canceled", "failed", "succeeded")
#: A carriage return or any ANSI/VT100 escape sequence (tqdm's bars move the cursor with ESC[A).
TERMINAL_CODES = re.compile(r"\r|\x1b")


def _request(method: str, url: str, body: dict | None = None, headers: dict | None = None,
             timeout: float = 30.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}


def _predict(server, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    """A prediction (sync, or async with ``Prefer: respond-async``). cog frees the slot of the previous
    prediction asynchronously after its response (coglet's service spawns the slot's return to idle), so
    a request sent right after a quick failure can meet "At capacity" (409): that one is sent again, for
    up to 10 s."""
    deadline = time.monotonic() + 10.0
    while True:
        status, out = _request("POST", server.url + "/predictions", body, headers, timeout=PREDICT_TIMEOUT_S)
        if status != 409 or time.monotonic() > deadline:
            return status, out
        time.sleep(0.1)


class WebhookReceiver:
    """Collects webhook POSTs on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict] = queue.Queue()
        self.received: list[dict] = []  # every event ever received, of any prediction (wait_for drops others)
        events, received = self.events, self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    event = json.loads(self.rfile.read(length) or b"{}")
                    received.append(event)
                    events.put(event)
                finally:
                    self.send_response(200)
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, pred_id: str, condition, timeout: float) -> tuple[dict | None, list[dict]]:
        """First event of ``pred_id`` matching ``condition`` (bounded by time), and all events seen."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if ev.get("id") != pred_id:
                continue
            seen.append(ev)
            if condition(ev):
                return ev, seen
        return None, seen

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CogServer:
    def __init__(self, weights: Path, tmpdir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmpdir = tmpdir
        env = dict(os.environ)
        env.update(
            COG_PREDICT_TYPE_STUB="predict.py:Predictor",
            PORT=str(self.port),
            PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
            INFINITETALK_WEIGHTS=str(weights),
            TMPDIR=str(tmpdir),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",  # tiny models: no OpenMP spin-waiting against ffmpeg on a 2-core box
        )
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cog server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, last = _request("GET", self.url + "/health-check", timeout=5)
                if status == 200 and last.get("status") == "READY":
                    return last
                if last.get("status") == "SETUP_FAILED":
                    raise RuntimeError(f"setup failed: {last}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"cog server not READY after {timeout:.0f}s: {last} {self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        try:
            return Path(self.log.name).read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            stop_process_group(self.proc, polite=lambda: _request("POST", self.url + "/shutdown", timeout=5))
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def server(tiny_weights_tts, tmp_path_factory):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    tmpdir = tmp_path_factory.mktemp("cog_tmp")
    log_path = tmp_path_factory.mktemp("cog_log") / "server.log"
    srv = CogServer(tiny_weights_tts, tmpdir, log_path)
    try:
        health = srv.wait_ready(READY_TIMEOUT_S)
        assert health["setup"]["status"] == "succeeded", health
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def webhook():
    rec = WebhookReceiver()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def inputs(portrait, make_speech):
    return {
        "image": data_url(portrait, "image/png"),
        "speech": data_url(make_speech(1.2, "http_speech"), "audio/wav"),
        "long_speech": data_url(make_speech(10.0, "http_long"), "audio/wav"),
        "preview_speech": data_url(make_speech(4.0, "http_preview"), "audio/wav"),
    }


def _tiny(inputs: dict, **extra) -> dict:
    return {"image": inputs["image"], "audio": inputs["speech"], "width": 64, "height": 64, "steps": 2,
            "seed": 7, **extra}


def _leftovers(tmpdir: Path) -> list[str]:
    return sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*")
                  if p.name.startswith("infinitetalk-") or p.name.endswith(".partial"))


def test_sync_prediction_returns_the_mp4(server, inputs, tmp_path):
    status, body = _predict(server, {"input": _tiny(inputs)})
    assert status == 200, body
    assert body["status"] == "succeeded", (body.get("error"), body.get("logs"), server.log_tail())
    assert "seed: 7" in body["logs"]
    # Plain log lines, one per denoising step and per chunk: no tqdm bar (carriage returns, cursor codes).
    assert not TERMINAL_CODES.search(body["logs"]), repr(body["logs"])
    lines = body["logs"].splitlines()
    assert "chunk 1/1, step 1/2" in lines and "chunk 1/1, step 2/2" in lines, lines
    assert any(re.fullmatch(r"chunk 1/1 done: 1\.20 s of 1\.20 s video in \d+\.\d s", line) for line in lines), lines
    assert body["metrics"]["chunks"] == 1 and body["metrics"]["denoising_steps"] == 2
    assert body["metrics"]["video_seconds"] == pytest.approx(1.2)
    assert isinstance(body["output"], list) and len(body["output"]) == 1  # preview off: the video alone
    head, b64 = body["output"][-1].split(",", 1)
    assert head == "data:video/mp4;base64", head
    out = tmp_path / "out.mp4"
    out.write_bytes(base64.b64decode(b64))
    info = ffprobe_streams(out)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert (info["video"]["width"], info["video"]["height"]) == (64, 64)
    assert info["video"]["fps"] == pytest.approx(25)
    assert abs(info["format_duration"] - 1.2) <= 0.04 + 1e-3


def test_text_input_one_speaker_and_dialogue(server, inputs, tmp_path):
    """Text instead of audio (issue 16): one speaker, then an (s1)/(s2) dialogue (two speakers, the multi
    weights): each a decodable MP4 with sound whose length is the synthesised speech's."""
    for name, extra in (("one", {"text": "Hello from the Cog server.", "voice": "bm_george"}),
                        ("two", {"text": "(s1) Good morning! (s2) Good morning to you.", "voice": "af_bella",
                                 "voice_2": "am_adam", "speech_speed": 1.25})):
        body_in = {"image": inputs["image"], "width": 64, "height": 64, "steps": 1, "seed": 5, **extra}
        status, body = _predict(server, {"input": body_in})
        assert status == 200 and body["status"] == "succeeded", (body.get("error"), server.log_tail())
        assert ("'multi' weights active" in server.log_tail(200_000)) or name == "one"
        out = tmp_path / f"{name}.mp4"
        out.write_bytes(base64.b64decode(body["output"][-1].split(",", 1)[1]))
        info = ffprobe_streams(out)
        assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
        seconds = body["metrics"]["video_seconds"]
        assert info["video"]["nb_frames"] == round(seconds * 25)
        assert abs(info["audio"]["duration"] - seconds) <= 0.04 + 1e-3
    bad = {"image": inputs["image"], "audio": inputs["speech"], "text": "Hello"}
    status, body = _predict(server, {"input": bad})
    assert body["status"] == "failed" and body["error"] == COG_PREFIX + "invalid input: give audio or text, not both"
    status, body = _predict(server, {"input": {"image": inputs["image"], "text": "Привет"}})
    assert body["status"] == "failed" and "text has Cyrillic letters" in body["error"], body["error"]
    status, body = _predict(server, {"input": {"image": inputs["image"], "text": "Hi", "voice": "zf_xiaoxiao"}})
    assert status == 422, body  # not in the schema's list of voices


def test_setup_logs_are_plain_lines_naming_the_device(server):
    status, health = _request("GET", server.url + "/health-check")
    assert status == 200 and health["setup"]["status"] == "succeeded", health
    logs = health["setup"]["logs"]
    assert not TERMINAL_CODES.search(logs), repr(logs)  # no "Loading weights" bars of transformers/diffusers
    assert re.search(r"setup: loaded InfiniteTalk from \S+ on cpu \(torch\.float32\) in \d+\.\ds", logs), logs


def test_schema_rejects_out_of_range_with_422(server, inputs):
    status, body = _request("GET", server.url + "/openapi.json")
    assert status == 200 and "quality" in body["components"]["schemas"]["Input"]["properties"]
    for bad in ({"steps": 1000}, {"quality": 11}, {"resolution": "1080p"}, {"width": "wide"}):
        status, body = _request("POST", server.url + "/predictions", {"input": _tiny(inputs, **bad)})
        assert status == 422, (bad, body)
        assert body["detail"][0]["loc"][-1] == next(iter(bad)), body


def test_invalid_input_fails_with_a_clear_message(server, inputs):
    # An invalid pair of inputs: cog's fixed prefix, then "invalid input: " and our one line; no class name.
    bad = _tiny(inputs)
    del bad["height"]
    status, body = _predict(server, {"input": bad})
    assert status == 200 and body["status"] == "failed", body
    assert body["error"] == COG_PREFIX + "invalid input: width and height must be given together", body["error"]
    assert "Error" not in body["error"] and "Traceback" not in body["error"]
    bad = _tiny(inputs, box_1="10,10,50,50", box_2="10,60,50,120")  # boxes without a second speaker
    status, body = _predict(server, {"input": bad})
    assert status == 200 and body["status"] == "failed", body
    assert body["error"] == (COG_PREFIX + "invalid input: box_1/box_2 are only used with two speakers: give audio_2 "
                             "too (or (s2) turns in text), or leave the boxes empty"), body["error"]
    assert "Traceback" not in body["error"] and "\n" not in body["error"].strip()
    bad = _tiny(inputs, audio=inputs["image"])  # a picture where the speech should be
    status, body = _predict(server, {"input": bad})
    assert body["status"] == "failed" and "Traceback" not in body["error"], body
    # cog's temporary file name (tmp....png) is replaced by the input's name.
    assert body["error"] == COG_PREFIX + "invalid input: the audio input has no audio stream", body["error"]


def test_a_second_prediction_while_one_runs_gets_409_and_is_not_queued(server, inputs, webhook, tmp_path):
    """One prediction at a time per server (run() is synchronous: cog gives it one slot). While it runs, a new
    prediction is refused at once with 409 and cog's body, whatever the form (sync, async, PUT with a new id); it is
    not queued and never runs. The running prediction is not disturbed, and the server takes the next one after."""
    steps = 60  # 1 chunk x 60 steps: many seconds of denoising on 2 cores, against milliseconds for the refusals
    status, body = _predict(server, {"id": "runs-first", "input": _tiny(inputs, steps=steps), "webhook": webhook.url},
                            headers={"Prefer": "respond-async"})
    assert status == 202, body
    # No fixed sleep: wait until the first prediction is processing (its webhook carries a denoising step's log line).
    running, seen = webhook.wait_for("runs-first", lambda ev: ev.get("status") == "processing"
                                     and f"chunk 1/1, step 1/{steps}" in (ev.get("logs") or ""), PREDICT_TIMEOUT_S)
    assert running is not None, (seen[-1:] if seen else None, server.log_tail())
    status, health = _request("GET", server.url + "/health-check")
    assert status == 200 and health["status"] == "BUSY", health

    for pred_id, method, path, headers in (("refused-sync", "POST", "/predictions", None),
                                           ("refused-async", "POST", "/predictions", {"Prefer": "respond-async"}),
                                           ("refused-put", "PUT", "/predictions/refused-put",
                                            {"Prefer": "respond-async"})):
        second = {"id": pred_id, "input": _tiny(inputs), "webhook": webhook.url}
        status, answer = _request(method, server.url + path, second, headers)
        assert (status, answer) == (409, AT_CAPACITY), (pred_id, status, answer)

    # The first prediction runs to the end, all its steps, and its video is whole.
    done, seen = webhook.wait_for("runs-first", lambda ev: ev.get("status") in FINAL, PREDICT_TIMEOUT_S)
    assert done is not None and done["status"] == "succeeded", (done and done.get("error"), server.log_tail())
    assert done["metrics"]["denoising_steps"] == steps and done["metrics"]["chunks"] == 1, done["metrics"]
    out = tmp_path / "first.mp4"
    out.write_bytes(base64.b64decode(done["output"][-1].split(",", 1)[1]))
    info = ffprobe_streams(out)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert abs(info["format_duration"] - 1.2) <= 0.04 + 1e-3, info

    # Free again: the health check says READY (cog frees the slot a moment after the prediction ends), and the
    # next prediction is taken and succeeds.
    deadline = time.monotonic() + 10.0
    while (health := _request("GET", server.url + "/health-check")[1])["status"] != "READY":
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    status, body = _predict(server, {"input": _tiny(inputs)})
    assert status == 200 and body["status"] == "succeeded", (body.get("error"), server.log_tail())
    # The refused predictions never ran: no webhook ever came for them (they were not queued).
    assert [ev for ev in webhook.received if str(ev.get("id", "")).startswith("refused")] == []


def test_cancel_mid_denoising_then_next_prediction_succeeds(server, inputs, webhook):
    long_input = _tiny(inputs, audio=inputs["long_speech"], steps=100)  # 4 chunks x 100 steps
    status, body = _predict(server, {"id": "cancel-me", "input": long_input, "webhook": webhook.url},
                            headers={"Prefer": "respond-async"})
    assert status == 202, body

    # Wait until denoising has started (a step's log line is in the streamed logs), then cancel.
    started, seen = webhook.wait_for("cancel-me", lambda ev: "chunk 1/4, step 1/100" in (ev.get("logs") or "")
                                     and (ev.get("metrics") or {}).get("denoising_steps", 0) >= 1, PREDICT_TIMEOUT_S)
    assert started is not None, (seen[-1:] if seen else None, server.log_tail())
    status, busy = _request("POST", server.url + "/predictions", {"input": _tiny(inputs)})
    assert status == 409, busy  # one slot: a second prediction is refused while this one runs
    t_cancel = time.monotonic()
    status, _ = _request("POST", server.url + "/predictions/cancel-me/cancel")
    assert status == 200
    done, seen = webhook.wait_for("cancel-me", lambda ev: ev.get("status") in ("canceled", "failed", "succeeded"),
                                  60.0)
    elapsed = time.monotonic() - t_cancel
    assert done is not None and done["status"] == "canceled", (done, server.log_tail())
    assert elapsed < 15.0, f"cancel took {elapsed:.1f}s"
    # Within one denoising step: at most the step in flight when the cancel arrived, plus one step of slack for
    # the webhook that reported the count, ran after it. The first chunk (100 steps) never finished.
    steps_seen = int(started["metrics"]["denoising_steps"])
    steps_done = int(done["metrics"]["denoising_steps"])
    assert steps_done - steps_seen <= 2 and steps_done < 100, (steps_seen, steps_done, elapsed)
    assert "chunks_done" not in done["metrics"], done["metrics"]
    assert "chunk 1/4, step 1/100" in done["logs"] and "done: " not in done["logs"]
    assert not TERMINAL_CODES.search(done["logs"]), repr(done["logs"][-500:])

    # Nothing of the cancelled run is left: no pipeline temp folder, no partial MP4, no ffmpeg.
    deadline = time.monotonic() + 10
    while _leftovers(server.tmpdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(server.tmpdir) == []
    assert ffmpeg_descendants(server.proc.pid) == []

    # The server is usable again: an async prediction completes and its webhook says so.
    status, body = _predict(server, {"id": "after-cancel", "input": _tiny(inputs), "webhook": webhook.url,
                                     "webhook_events_filter": ["start", "completed"]},
                            headers={"Prefer": "respond-async"})
    assert status == 202, body
    done, seen = webhook.wait_for("after-cancel", lambda ev: ev.get("status") in ("canceled", "failed", "succeeded"),
                                  PREDICT_TIMEOUT_S)
    assert done is not None and done["status"] == "succeeded", (done and done.get("error"), server.log_tail())
    assert len(done["output"]) == 1 and done["output"][-1].startswith("data:") and done["metrics"]["chunks"] == 1


def test_previews_arrive_as_output_webhooks_before_completed(server, inputs, webhook, tmp_path):
    """``preview=true``: after each chunk an ``output`` webhook whose last file is a playable MP4 of the
    video so far, before the ``completed`` one; the final output's last item is the whole video."""
    body = {"id": "previews", "input": _tiny(inputs, audio=inputs["preview_speech"], steps=1, preview=True),
            "webhook": webhook.url}
    status, reply = _predict(server, body, headers={"Prefer": "respond-async"})
    assert status == 202, reply
    done, seen = webhook.wait_for("previews", lambda ev: ev.get("status") in FINAL, PREDICT_TIMEOUT_S)
    assert done is not None and done["status"] == "succeeded", (done and done.get("error"), server.log_tail())
    early = [ev for ev in seen if ev.get("status") == "processing" and ev.get("output")]
    assert early, [ev.get("status") for ev in seen]
    first = tmp_path / "first-preview.mp4"
    first.write_bytes(base64.b64decode(early[0]["output"][-1].split(",", 1)[1]))
    info = ffprobe_streams(first)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert info["video"]["fps"] == pytest.approx(25) and info["video"]["nb_frames"] >= 81  # at least chunk 1
    outputs = done["output"]
    assert len(outputs) == 3  # two previews (2 chunks), then the video
    final = tmp_path / "final.mp4"
    final.write_bytes(base64.b64decode(outputs[-1].split(",", 1)[1]))
    info = ffprobe_streams(final)
    assert info["video"]["nb_frames"] == 100 and abs(info["format_duration"] - 4.0) <= 0.04 + 1e-3
