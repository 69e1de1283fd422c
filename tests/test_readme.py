"""The README's runnable sections, run as written: "Try it on a CPU in one minute" and "Cog's HTTP server
without Docker" (whose server command must also be the one tests/test_http.py starts).

Each line of a section's bash block runs with ``bash -c`` in a temporary folder that stands for the
repository root (its ``scripts`` is a link to the real one), with the ``infinitetalk`` command of a fresh
``pip install -e .`` first on PATH (conftest's ``editable_venv``), as after the README's CPU install.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from decoding import ffprobe_streams
from loopback import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
TRY_IT = "Try it on a CPU in one minute"
HTTP = "Cog's HTTP server without Docker"
TRY_IT_LIMIT_S = 120.0

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="ffmpeg not installed")


def readme_blocks(heading: str) -> list[list[str]]:
    """The ```bash blocks of README section ``## heading``, as lines (backslash continuations joined)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no section {heading!r}"
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", match.group(1), flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        blocks.append([ln for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")])
    assert blocks, f"README section {heading!r} has no bash block"
    return blocks


def _bash(line: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _server_command(line: str) -> tuple[dict[str, str], list[str]]:
    tokens = shlex.split(line)
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    return env, tokens


def _test_http_server_command() -> tuple[dict[str, str | None], list[str]]:
    """The environment (literal values, or None where computed) and argv that tests/test_http.py starts."""
    tree = ast.parse((ROOT / "tests" / "test_http.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CogServer")
    env: dict[str, str | None] = {}
    argv: list[str] = []
    for node in ast.walk(cls):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "update" and getattr(node.func.value, "id", "") == "env":
            for kw in node.keywords:
                env[kw.arg] = kw.value.value if isinstance(kw.value, ast.Constant) else None
        elif node.func.attr == "Popen":
            for elt in node.args[0].elts:
                argv.append("python" if ast.unparse(elt) == "sys.executable" else elt.value)
    assert env and argv, "tests/test_http.py: CogServer no longer builds env/argv as this test expects"
    return env, argv


#: What tests/test_http.py sets only for a test run (isolation, logs, a busy 2-core box), not for users.
TEST_ONLY_ENV = {"PATH", "TMPDIR", "HF_HUB_OFFLINE", "PYTHONUNBUFFERED", "OMP_NUM_THREADS"}


def test_readme_server_command_is_the_one_test_http_starts():
    [server], _ = readme_blocks(HTTP)
    doc_env, doc_argv = _server_command(server)
    test_env, test_argv = _test_http_server_command()
    assert doc_argv == test_argv
    assert {"COG_PREDICT_TYPE_STUB", "INFINITETALK_WEIGHTS", "PORT"} <= set(doc_env)
    assert set(doc_env) <= set(test_env), f"README sets what test_http.py does not: {set(doc_env) - set(test_env)}"
    for name, value in test_env.items():
        if value is not None and name in doc_env:
            assert doc_env[name] == value, name
    undocumented = set(test_env) - set(doc_env) - TEST_ONLY_ENV
    assert not undocumented, f"test_http.py starts the server with {undocumented}: document them in README or " \
                             "add them to TEST_ONLY_ENV"
    assert doc_env["COG_PREDICT_TYPE_STUB"] == yaml.safe_load((ROOT / "cog.yaml").read_text())["run"]
    try_it = "\n".join(readme_blocks(TRY_IT)[0])
    assert f"--weights {doc_env['INFINITETALK_WEIGHTS']} " in try_it  # the weights the try-it section made


@pytest.fixture(scope="module")
def tried(tmp_path_factory, venv_env) -> dict:
    """The try-it block run line by line in a fresh folder: its outputs, timings and the folder."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "scripts").symlink_to(ROOT / "scripts", target_is_directory=True)
    [lines] = readme_blocks(TRY_IT)
    results = []
    start = time.monotonic()
    for line in lines:
        t0 = time.monotonic()
        run = _bash(line, cwd, venv_env, timeout=TRY_IT_LIMIT_S * 2)
        results.append((line, run, time.monotonic() - t0))
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return {"cwd": cwd, "lines": lines, "results": results, "seconds": time.monotonic() - start}


@needs_ffmpeg
@pytest.mark.slow
def test_try_it_commands_make_a_playable_mp4_in_two_minutes(tried):
    lines = tried["lines"]
    assert any(ln.startswith("infinitetalk ") for ln in lines), "the try-it block runs the installed command"
    assert tried["seconds"] < TRY_IT_LIMIT_S, [(ln, round(t, 1)) for ln, _, t in tried["results"]]
    out = tried["cwd"] / "try.mp4"
    info = ffprobe_streams(out)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert (info["video"]["width"], info["video"]["height"]) == (64, 64)
    assert info["format_duration"] == pytest.approx(3.0, abs=0.05)
    spoken = ffprobe_streams(tried["cwd"] / "try-text.mp4")  # the text line: as long as the synthesised speech
    assert spoken["audio"]["codec"] == "aac" and abs(spoken["audio"]["duration"] - spoken["video"]["duration"]) <= 0.04
    probe = tried["results"][-1][1].stdout  # the README's own ffprobe line shows the two streams
    assert "codec_name=h264" in probe and "codec_name=aac" in probe
    print(f"try-it: {tried['seconds']:.1f} s", *(f"  {t:5.1f} s  {ln[:80]}" for ln, _, t in tried["results"]),
          sep="\n")


def _health(url: str) -> dict:
    import json

    try:
        with urllib.request.urlopen(url + "/health-check", timeout=5) as resp:
            return json.loads(resp.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return {}


@pytest.mark.slow
@needs_ffmpeg
def test_http_server_commands_work_as_written(tried, venv_env):
    """The server line and the client lines of the README, with only the port changed (to a free one)."""
    [server], client = readme_blocks(HTTP)
    port = str(free_port())
    cwd = tried["cwd"]
    (cwd / "predict.py").symlink_to(ROOT / "predict.py")  # the server imports the predictor from its folder
    log = open(cwd / "server.log", "wb")
    proc = subprocess.Popen(["bash", "-c", server.replace("5000", port)], cwd=cwd, env=venv_env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while _health(url).get("status") != "READY":
            assert proc.poll() is None, (cwd / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (cwd / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        for line in client:
            run = _bash(line.replace("5000", port), cwd, venv_env, timeout=300)
            assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        assert run.stdout.split()[0] == "succeeded", run.stdout
    finally:
        stop_process_group(proc, polite=lambda: urllib.request.urlopen(
            urllib.request.Request(url + "/shutdown", method="POST"), timeout=5))
        log.close()
    info = ffprobe_streams(cwd / "http.mp4")
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert (info["video"]["width"], info["video"]["height"]) == (64, 64)


def test_sample_inputs_script_without_espeak(tmp_path):
    """make_sample_inputs.py falls back to a synthetic voice where espeak-ng is missing."""
    env = {"PATH": str(Path(sys.executable).parent)}  # no espeak-ng on this PATH
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_inputs.py"), str(tmp_path),
                          "--seconds", "2.5"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "synthetic" in run.stdout
    import soundfile as sf
    from PIL import Image

    audio, rate = sf.read(str(tmp_path / "speech.wav"))
    assert len(audio) == round(2.5 * rate) and 0.05 < abs(audio).max() <= 1.0
    with Image.open(tmp_path / "portrait.png") as im:
        assert im.size == (256, 256) and im.mode == "RGB"
