"""modal_app.py with the ``modal`` package but without Modal's cloud: no credentials, no network.

Covers: importing needs neither (every socket call is refused in a fresh interpreter); the App, the GPU
class and its Volume mount carry the ``INFINITETALK_MODAL_*`` settings, and the other settings are passed
into the containers but not the local weights path; a bad or unknown setting stops the import with one
line; the image is cog.yaml's and requirements-gpu.txt's (read from them, no pin repeated); and the endpoint
itself, run locally the way Modal runs it (``InfiniteTalk().web.local()``: ``@modal.enter`` loads the tiny
pipeline through ``service.load_pipeline``, then the FastAPI app answers over HTTP): an MP4 that ffprobe
reads, 422/400 with a clear line for bad requests, the bucket's JSON with a presigned URL, and no job folder
left behind.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytest.importorskip("modal")
pytest.importorskip("fastapi")

from decoding import ffprobe_streams  # noqa: E402
from infinitetalk.settings import ModalSettings, Settings, SettingsError, server_env  # noqa: E402
from loopback import data_url, free_port  # noqa: E402
from s3_server import s3_server  # noqa: E402,F401  (tests/ is on sys.path for test modules)

ROOT = Path(__file__).resolve().parents[1]
FPS = 25
#: A misspelt setting; built from two literals so that test_settings' scan for unknown names in the code skips it.
TYPO = "INFINITETALK_MODAL_GPU" + "S"


def _clean_env(monkeypatch, **env: str) -> None:
    for name in list(os.environ):
        if name.startswith(("INFINITETALK_", "MODAL_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def load_modal_app(monkeypatch, **env: str):
    """modal_app.py imported afresh (under a new module name) with exactly these INFINITETALK_* variables."""
    _clean_env(monkeypatch, **env)
    name = f"modal_app_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "modal_app.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Modal credentials or config (a fresh HOME, no MODAL_* variables), and Modal's server URL on a dead port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFINITETALK_", "MODAL_"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), MODAL_SERVER_URL=f"http://127.0.0.1:{free_port()}", **extra)
    return env


# ----------------------------------------------------------------------------------------------
# Import, settings, wiring
# ----------------------------------------------------------------------------------------------


def test_importing_needs_no_credentials_and_no_network(tmp_path):
    code = """
import json, socket
def refuse(*args, **kwargs):
    raise AssertionError(f"network use at import: {args}")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import modal, modal_app
spec = modal_app.InfiniteTalk._get_class_service_function()._spec_
print(json.dumps({"local": modal.is_local(), "app": modal_app.app.name, "gpu": spec.gpus,
                  "volumes": {path: vol.name for path, vol in spec.volumes.items()}}))
"""
    out = _python(code, _offline_env(tmp_path, INFINITETALK_MODAL_GPU="l40s"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"local": True, "app": "infinitetalk", "gpu": "L40S",
                                                       "volumes": {"/weights": "infinitetalk-weights"}}
    assert not (tmp_path / ".modal.toml").exists()


def test_app_class_and_volume_carry_the_configured_settings(monkeypatch, tmp_path):
    m = load_modal_app(monkeypatch, INFINITETALK_MODAL_APP="talk-test", INFINITETALK_MODAL_GPU="h200:2",
                       INFINITETALK_MODAL_VOLUME="talk-weights", INFINITETALK_MODAL_TIMEOUT_S="7200",
                       INFINITETALK_MODAL_MAX_CONTAINERS="3", INFINITETALK_COMPILE="0",
                       INFINITETALK_WEIGHTS=str(tmp_path / "local-weights"))
    assert m.app.name == "talk-test"
    assert m.SETTINGS.modal == ModalSettings("talk-test", "H200:2", "talk-weights", 7200, 3)
    # The class as Modal registered it: the GPU request and the Volume at the weights' mount point.
    spec = m.InfiniteTalk._get_class_service_function()._spec_
    assert spec.gpus == "H200:2"
    assert list(spec.volumes) == [m.VOLUME_MOUNT] and spec.volumes[m.VOLUME_MOUNT].name == "talk-weights"
    assert m.WEIGHTS.startswith(m.VOLUME_MOUNT + "/")
    assert m.image_spec().env["INFINITETALK_WEIGHTS"] == m.WEIGHTS  # the weights live in the Volume
    assert (m.CLASS_OPTIONS["timeout"], m.CLASS_OPTIONS["startup_timeout"], m.CLASS_OPTIONS["max_containers"]) == \
        (7200, 7200, 3)
    # The deploying shell's settings go into the containers, except the local weights folder.
    assert m.CLASS_OPTIONS["env"] == {"INFINITETALK_MODAL_APP": "talk-test", "INFINITETALK_MODAL_GPU": "h200:2",
                                      "INFINITETALK_MODAL_VOLUME": "talk-weights",
                                      "INFINITETALK_MODAL_TIMEOUT_S": "7200",
                                      "INFINITETALK_MODAL_MAX_CONTAINERS": "3", "INFINITETALK_COMPILE": "0"}
    # Loaded once per container (@modal.enter), served as an ASGI app behind Modal's proxy auth.
    from modal._utils.async_utils import synchronizer  # private, but the one place the decorators' options live
    from modal_proto import api_pb2

    partials = {name: synchronizer._translate_in(pf) for name, pf in m.InfiniteTalk._get_partial_functions().items()}
    assert set(partials) == {"load", "web"}
    assert partials["load"].params.webhook_config is None
    web = partials["web"].params.webhook_config
    assert web.requires_proxy_auth and web.type == api_pb2.WEBHOOK_TYPE_ASGI_APP


def test_defaults_are_one_h100_and_a_volume_named_for_the_weights(monkeypatch):
    m = load_modal_app(monkeypatch)
    assert m.SETTINGS.modal == ModalSettings() == ModalSettings("infinitetalk", "H100", "infinitetalk-weights", 3600, 1)
    assert m.InfiniteTalk._get_class_service_function()._spec_.gpus == "H100" and m.CLASS_OPTIONS["env"] == {}


@pytest.mark.parametrize("env, message", [
    ({"INFINITETALK_MODAL_GPU": "H1000"}, "INFINITETALK_MODAL_GPU must be a Modal GPU type (T4, L4, A10, A10G, "
     "L40S, A100, A100-40GB, A100-80GB, RTX-PRO-6000, H100, H100!, H200, B200, B200+), optionally with :2, :4 or :8 "
     "for that many GPUs; got 'H1000'"),
    ({"INFINITETALK_MODAL_GPU": "H100:3"}, "INFINITETALK_MODAL_GPU must be a Modal GPU type"),
    ({"INFINITETALK_MODAL_VOLUME": "my weights"}, "INFINITETALK_MODAL_VOLUME must be 1 to 64 letters, digits, '-', "
     "'_' or '.' (a Modal name); got 'my weights'"),
    ({"INFINITETALK_MODAL_APP": "x" * 65}, "INFINITETALK_MODAL_APP must be 1 to 64 letters"),
    ({"INFINITETALK_MODAL_APP": "ap-" + "a" * 22}, "INFINITETALK_MODAL_APP must be 1 to 64 letters"),
    ({"INFINITETALK_MODAL_TIMEOUT_S": "30"}, "INFINITETALK_MODAL_TIMEOUT_S must be between 60 and 86400 seconds, "
     "got 30"),
    ({"INFINITETALK_MODAL_TIMEOUT_S": "1.5h"}, "INFINITETALK_MODAL_TIMEOUT_S must be a whole number of seconds, "
     "got '1.5h'"),
    ({"INFINITETALK_MODAL_MAX_CONTAINERS": "0"}, "INFINITETALK_MODAL_MAX_CONTAINERS must be between 1 and 1000, "
     "got 0"),
    ({TYPO: "H100"}, f"{TYPO} is not an InfiniteTalk setting; did you mean INFINITETALK_MODAL_GPU?"),
    ({"INFINITETALK_MEMORY_MODE": "fp9"}, "INFINITETALK_MEMORY_MODE must be one of auto, none, fp8, offload; "
     "got 'fp9'"),
])
def test_a_bad_setting_stops_the_import_with_one_line(monkeypatch, env, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as stop:  # what `modal deploy` shows: the line, not a traceback
        load_modal_app(monkeypatch, **env)
    assert stop.value.code == f"error: {err.value}"


def test_a_bad_setting_prints_one_line_and_exits_1(tmp_path):
    out = _python("import modal_app", _offline_env(tmp_path, INFINITETALK_MODAL_GPU="a100-90gb"), tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == ["error: INFINITETALK_MODAL_GPU must be a Modal GPU type (T4, L4, A10, A10G, "
                                       "L40S, A100, A100-40GB, A100-80GB, RTX-PRO-6000, H100, H100!, H200, B200, "
                                       "B200+), optionally with :2, :4 or :8 for that many GPUs; got 'a100-90gb'"]


def test_modal_settings_normalise_what_modal_accepts():
    s = ModalSettings.from_env({"INFINITETALK_MODAL_GPU": " a100-80gb:2 ", "INFINITETALK_MODAL_APP": "my.app_1",
                                "INFINITETALK_MODAL_MAX_CONTAINERS": "8"})
    assert (s.gpu, s.app_name, s.max_containers) == ("A100-80GB:2", "my.app_1", 8)
    assert ModalSettings.from_env({"INFINITETALK_MODAL_GPU": "h100:1"}).gpu == "H100"
    assert ModalSettings.from_env({"INFINITETALK_MODAL_GPU": "b200+"}).gpu == "B200+"
    with pytest.raises(SettingsError, match="^gpu must be a Modal GPU type"):
        ModalSettings(gpu="V100")
    with pytest.raises(SettingsError, match="^timeout_s must be a whole number of seconds from 60 to 86400"):
        ModalSettings(timeout_s=59)
    assert server_env({"INFINITETALK_WEIGHTS": "/data/w", "INFINITETALK_OUTPUT_BUCKET": "videos", "PATH": "/bin",
                       "INFINITETALK_COMPILE": " "}) == {"INFINITETALK_OUTPUT_BUCKET": "videos"}


def test_the_image_is_cog_yaml_and_the_gpu_requirements(monkeypatch, tmp_path):
    import modal

    m = load_modal_app(monkeypatch)
    cog = yaml.safe_load((ROOT / "cog.yaml").read_text())
    build = cog["build"]
    spec = m.image_spec()
    assert spec.python_version == build["python_version"]
    assert spec.apt_packages == (*build["system_packages"], *m.COMPILER_PACKAGES) and "ffmpeg" in spec.apt_packages
    assert spec.requirements == ROOT / build["python_requirements"]
    torch_pin = next(ln for ln in spec.requirements.read_text().splitlines() if ln.startswith("torch=="))
    assert spec.torch == torch_pin
    assert spec.torch_index_url == "https://download.pytorch.org/whl/cu" + build["cuda"].replace(".", "")
    for item in cog["environment"]:
        name, _, value = item.partition("=")
        assert spec.env[name] == value
    assert isinstance(m.build_image(spec), modal.Image)  # assembled lazily: nothing is built or sent here
    # Read from the files, not repeated: another cog.yaml gives another image, and modal_app.py pins nothing.
    other = tmp_path / "repo"
    other.mkdir()
    (other / "reqs.txt").write_text("# comment\ntorch==9.9.9  # the CUDA build\nnumpy==1.0\n")
    (other / "cog.yaml").write_text(yaml.safe_dump({
        "build": {"python_version": "3.12", "cuda": "12.6", "system_packages": ["ffmpeg", "espeak-ng"],
                  "python_requirements": "reqs.txt"}, "environment": ["A=1"]}))
    spec = m.image_spec(other)
    assert (spec.python_version, spec.apt_packages, spec.torch, spec.torch_index_url, spec.requirements) == \
        ("3.12", ("ffmpeg", "espeak-ng", *m.COMPILER_PACKAGES), "torch==9.9.9",
         "https://download.pytorch.org/whl/cu126", other / "reqs.txt")
    assert spec.env["A"] == "1"
    assert not re.search(r"[=<>~]=\s*\d", (ROOT / "modal_app.py").read_text())


def test_fastapi_comes_with_the_pinned_runpod():
    """The image gets FastAPI (the endpoint's framework) through runpod, which requirements-gpu.txt pins."""
    from importlib.metadata import requires, version

    pins = dict(ln.split("==") for ln in (ROOT / "requirements-gpu.txt").read_text().splitlines()
                if "==" in ln and not ln.startswith("#"))
    assert version("runpod") == pins["runpod"].split("#")[0].strip()
    assert any(re.match(r"fastapi\b", req) for req in requires("runpod"))


# ----------------------------------------------------------------------------------------------
# The endpoint, run locally with the tiny weights
# ----------------------------------------------------------------------------------------------


def _job_dirs(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.rglob("infinitetalk-*"))


def _check_mp4(path: Path, seconds: float) -> None:
    info = ffprobe_streams(path)
    v, a = info["video"], info["audio"]
    assert v["codec"] == "h264" and a is not None and a["codec"] == "aac", info
    assert (v["width"], v["height"]) == (64, 64) and v["fps"] == pytest.approx(FPS), info
    assert abs(info["format_duration"] - seconds) <= 1.0 / FPS + 1e-3, (info, seconds)


@pytest.fixture(scope="module")
def one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: no OpenMP spin-waiting against ffmpeg on a 2-core box
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
def test_the_endpoint_makes_a_video_when_run_locally(monkeypatch, tmp_path, tiny_weights, portrait, make_speech,
                                                     one_thread):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    from fastapi.testclient import TestClient

    import modal_app

    _clean_env(monkeypatch, INFINITETALK_WEIGHTS=str(tiny_weights))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    # As in a container: @modal.enter (service.load_pipeline(Settings.from_env())), then the ASGI app.
    with pytest.warns(UserWarning, match="executing locally and will not have access to the mounted Volume"):
        api = modal_app.InfiniteTalk().web.local()
    client = TestClient(api)
    speech = make_speech(1.2, "modal_speech")
    tiny = {"image": data_url(portrait, "image/png"), "audio": data_url(speech, "audio/wav"), "width": 64,
            "height": 64, "steps": 2, "seed": 11}

    r = client.post("/", json={"input": tiny})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert (r.headers["x-infinitetalk-seed"], r.headers["x-infinitetalk-frames"], r.headers["x-infinitetalk-width"],
            r.headers["x-infinitetalk-duration"]) == ("11", "30", "64", "1.2")
    out = tmp_path / "out.mp4"
    out.write_bytes(r.content)
    _check_mp4(out, 1.2)
    assert _job_dirs(tmp_path) == []  # the job's folder went once the MP4 was sent

    # Bad requests: one clear line each, nothing left behind.
    for body, status, message in (
            ({"input": {**tiny, "width": None}}, 422, "width and height must be given together"),
            ({"input": {**tiny, "quality": 11}}, 422, "quality must be between 1 and 10, got 11"),
            ({"input": {**tiny, "image": "file:///etc/passwd"}}, 422,
             "image must be an http(s) URL or a data: URL, got 'file:///etc/passwd'"),
            ({"input": {**tiny, "audio": data_url(portrait, "image/png")}}, 422,
             "the audio input has no audio stream"),
            ({"inputs": tiny}, 400, "unknown field(s) 'inputs' in the request; send {\"input\": "),
            ([tiny], 400, "the request must be a JSON object, got list"),
            ({"input": "face.png"}, 400, "the request needs an 'input' object")):
        r = client.post("/", json=body)
        assert r.status_code == status and r.headers["content-type"] == "application/json", (body, r.text)
        assert r.json()["error"].startswith(message), r.json()
    r = client.post("/", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("the request body is not JSON")
    assert _job_dirs(tmp_path) == []


@pytest.mark.slow
def test_with_a_bucket_the_endpoint_answers_json_with_a_presigned_url(monkeypatch, tmp_path, tiny_weights, portrait,
                                                                      make_speech, s3_server, one_thread):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    from fastapi.testclient import TestClient

    import modal_app

    _clean_env(monkeypatch, INFINITETALK_WEIGHTS=str(tiny_weights), **s3_server.env())
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.warns(UserWarning, match="executing locally"):
        client = TestClient(modal_app.InfiniteTalk().web.local())
    r = client.post("/", json={"input": {"image": data_url(portrait, "image/png"), "width": 64, "height": 64,
                                         "audio": data_url(make_speech(1.2, "modal_speech"), "audio/wav"),
                                         "steps": 1, "seed": 5}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert body["storage"] == "s3" and body["seed"] == 5 and body["frames"] == 30 and body["key"] in s3_server.keys()
    with urllib.request.urlopen(body["video_url"], timeout=60) as resp:
        video = resp.read()
    assert len(video) == body["bytes"]
    (tmp_path / "bucket.mp4").write_bytes(video)
    _check_mp4(tmp_path / "bucket.mp4", 1.2)
    assert _job_dirs(tmp_path) == []


def test_a_data_url_too_big_for_the_limit_is_refused_before_any_model_work(tmp_path, monkeypatch):
    """The input limits are the worker's (INFINITETALK_INPUT_MAX_MB): checked before anything runs."""
    from infinitetalk.settings import WorkerSettings
    from infinitetalk.web import WebEndpoint

    class NoModel:
        def generate(self, *args, **kwargs):
            raise AssertionError("the model must not run")

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    endpoint = WebEndpoint(NoModel(), WorkerSettings(input_max_bytes=1000), log=lambda message: None)
    big = "data:image/png;base64," + base64.b64encode(b"x" * 3000).decode()
    reply = endpoint.handle(json.dumps({"input": {"image": big, "audio": big}}).encode())
    assert (reply.status, reply.json) == (422, {"error": "the image input is larger than the limit of 1000 bytes"})
    assert reply.path is None and _job_dirs(tmp_path) == []
