"""The live viewer (issue 14) in a real browser: headless Chromium (the Debian package) plays the HLS
folder of a CLI run that is still generating.

The CLI runs with ``--hls`` (tiny weights, 12 s of speech: 5 chunks) in a subprocess; a loopback HTTP
server serves ``viewer/`` and the growing folder. The page under test is the repository's
``viewer/index.html`` (with hls.js from ``viewer/node_modules``: ``npm ci`` in ``viewer/``, as
``.ci/run`` does), loaded in an iframe by a small page of this test that reads the iframe's video
element every 200 ms and posts its time and the mean brightness of the frame it shows (drawn onto a
canvas) back to the server. The test needs a report past 1 s of playback, sent while the playlist
has no ``#EXT-X-ENDLIST`` yet (the video is still being generated), of a frame that is not black.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loopback import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HLS_JS = ROOT / "viewer" / "node_modules" / "hls.js" / "dist" / "hls.min.js"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs the Debian package)"),
    pytest.mark.skipif(not HLS_JS.is_file(), reason="viewer/node_modules missing: run `npm ci` in viewer/"),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
]

PROBE_PAGE = """<!doctype html><meta charset="utf-8">
<iframe id="viewer" src="/viewer/index.html?src=/live/index.m3u8" width="400" height="400"></iframe>
<canvas id="frame" width="64" height="64"></canvas>
<script>
setInterval(() => {
  const video = document.getElementById("viewer").contentDocument?.querySelector("video");
  if (!video) return;
  const report = {t: video.currentTime, readyState: video.readyState, error: video.error && video.error.code,
                  status: video.ownerDocument.getElementById("status").textContent, mean: null};
  if (video.readyState >= 2 && video.videoWidth) {
    const ctx = document.getElementById("frame").getContext("2d");
    ctx.drawImage(video, 0, 0, 64, 64);
    const px = ctx.getImageData(0, 0, 64, 64).data;
    let sum = 0;
    for (let i = 0; i < px.length; i += 4) sum += px[i] + px[i + 1] + px[i + 2];
    report.mean = sum / (px.length / 4 * 3);
  }
  fetch("/report", {method: "POST", body: JSON.stringify(report)});
}, 200);
</script>
"""


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, reports: list, live: Path, **kwargs):
        self.reports, self.live = reports, live
        super().__init__(*args, **kwargs)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        playlist = self.live / "index.m3u8"
        body["ended_playlist"] = playlist.is_file() and "#EXT-X-ENDLIST" in playlist.read_text()
        self.reports.append(body)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_viewer_plays_the_live_folder_while_the_video_is_generated(tiny_weights, portrait, make_speech, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "viewer").symlink_to(ROOT / "viewer")
    live = site / "live"
    (site / "probe.html").write_text(PROBE_PAGE)
    reports: list[dict] = []
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(_Handler, directory=str(site), reports=reports,
                                                               live=live))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    speech = make_speech(12.0, "viewer")  # 300 frames: 5 chunks
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    gen = subprocess.Popen([sys.executable, "-m", "infinitetalk", "--image", str(portrait), "--audio", str(speech),
                            "--weights", str(tiny_weights), "--width", "64", "--height", "64", "--steps", "1",
                            "--seed", "1", "--out", str(tmp_path / "out.mp4"), "--hls", str(live), "--quiet"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    browser = None
    try:
        deadline = time.monotonic() + 300
        while not (live / "index.m3u8").is_file():  # the first segment
            assert gen.poll() is None, gen.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no segment within 300 s"
            time.sleep(0.2)
        browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--mute-audio",
                                    "--disable-dev-shm-usage",
                                    "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'ch'}",
                                    f"http://127.0.0.1:{port}/probe.html"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        played = None
        while played is None and time.monotonic() < deadline:
            played = next((r for r in reports if r["t"] > 1.0 and r["mean"] is not None), None)
            time.sleep(0.2)
        assert played is not None, (reports[-5:], gen.poll())
        assert not played["ended_playlist"], "playback passed 1 s only after the video was complete"
        assert played["mean"] > 8, played  # a real frame, not a black one
        print(f"viewer: {played}")
        assert gen.wait(timeout=300) == 0, gen.stderr.read().decode()[-2000:]
        assert "#EXT-X-ENDLIST" in (live / "index.m3u8").read_text()
    finally:
        for proc in (browser, gen):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        server.shutdown()
