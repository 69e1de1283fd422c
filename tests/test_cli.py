"""``python -m infinitetalk``: one real run with the tiny weights, flag mapping, and clean errors (exit 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from decoding import ffprobe_streams  # tests/ is on sys.path for test modules
from infinitetalk import cli
from infinitetalk.pipeline import InfiniteTalkPipeline

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
    pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB"),
]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_end_to_end(tiny_weights, portrait, make_speech, tmp_path):
    speech = make_speech(2.0, "cli")
    out = tmp_path / "talk.mp4"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "infinitetalk", "--image", str(portrait), "--audio", str(speech), "--out", str(out),
         "--weights", str(tiny_weights), "--width", "64", "--height", "64", "--steps", "1", "--seed", "7",
         "--device", "cpu", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {out}: 50 frames, 2.00 s, 64x64, 1 chunk(s), seed 7" in proc.stdout
    info = ffprobe_streams(out)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert info["video"]["fps"] == pytest.approx(25) and (info["video"]["width"], info["video"]["height"]) == (64, 64)
    assert info["video"]["nb_frames"] == 50
    assert abs(info["audio"]["duration"] - 2.0) <= 1 / 25 + 1e-3


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path):
    """Replace model loading: record the load arguments and the request instead of generating.
    Runs in ``tmp_path``, where the (empty) input files the tests name exist."""
    seen: dict = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INFINITETALK_WEIGHTS", raising=False)  # the default folder is weights/
    for name in ("p.png", "a.wav", "b.wav", "in.mp4"):
        (tmp_path / name).touch()

    class Fake:
        def generate(self, request, output_path, show_progress=True, callback=None):
            request.validate()
            seen.update(request=request, out=Path(output_path), show_progress=show_progress)
            return SimpleNamespace(path=Path(output_path), num_frames=50, duration=2.0, width=64, height=64,
                                   num_chunks=1, seed=request.seed)

    def from_pretrained(weights, **kw):
        seen.update(weights=Path(weights), load_kwargs=kw)
        return Fake()

    monkeypatch.setattr(InfiniteTalkPipeline, "from_pretrained", staticmethod(from_pretrained))
    return seen


def test_cli_flags_map_to_request(fake_pipeline, tmp_path, capsys):
    rc = cli.main([
        "--video", "in.mp4", "--audio", "a.wav", "--audio2", "b.wav", "--audio-mode", "add",
        "--bbox", "0,0,100,50", "--bbox", "0, 50, 100, 100", "--out", str(tmp_path / "o.mp4"), "--weights", "W",
        "--resolution", "720p", "--steps", "3", "--text-guidance", "1", "--audio-guidance", "2.5", "--shift", "2",
        "--seed", "11", "--max-duration", "9.5", "--color-correction", "0.3", "--apg", "--prompt", "hello",
        "--negative-prompt", "ugly", "--crf", "30", "--device", "cpu", "--quiet",
        "--turbo", "--lora", "L.safetensors", "--memory-mode", "offload", "--compile",
    ])
    assert rc == 0
    req = fake_pipeline["request"]
    assert (str(req.image), str(req.audio), str(req.audio_2), req.audio_mode) == ("in.mp4", "a.wav", "b.wav", "add")
    assert req.bboxes == [[0, 0, 100, 50], [0, 50, 100, 100]]
    assert (req.resolution, req.width, req.height) == ("720p", None, None)
    assert (req.steps, req.text_guidance, req.audio_guidance, req.shift, req.seed) == (3, 1.0, 2.5, 2.0, 11)
    assert (req.max_duration, req.color_correction, req.apg, req.crf) == (9.5, 0.3, True, 30)
    assert (req.prompt, req.negative_prompt, req.turbo) == ("hello", "ugly", True)
    kw = fake_pipeline["load_kwargs"]
    assert fake_pipeline["weights"] == Path("W") and kw["device"] == "cpu"
    assert (kw["turbo_lora"], kw["memory_mode"], kw["compile"]) == (Path("L.safetensors"), "offload", True)
    assert fake_pipeline["show_progress"] is False and fake_pipeline["out"] == tmp_path / "o.mp4"
    assert "seed 11" in capsys.readouterr().out


def test_cli_explicit_size_and_defaults(fake_pipeline, tmp_path):
    assert cli.main(["--image", "p.png", "--audio", "a.wav", "--out", str(tmp_path / "o.mp4"),
                     "--width", "320", "--height", "448"]) == 0
    req = fake_pipeline["request"]
    assert (req.width, req.height, req.audio_2, req.bboxes, req.seed, req.turbo) == (320, 448, None, None, None, False)
    assert req.negative_prompt is None and req.prompt  # official negative prompt, default prompt
    eff = req.resolved()  # unset sampling options take the official (non-turbo) values
    assert (eff.steps, eff.text_guidance, eff.audio_guidance, eff.shift) == (40, 5.0, 4.0, 7.0)
    assert fake_pipeline["weights"] == Path("weights") and fake_pipeline["show_progress"] is True


@pytest.mark.parametrize("extra, message", [
    (["--width", "72", "--height", "64"], "width must be a multiple of 16"),
    (["--width", "64"], "width and height must be given together"),
    (["--steps", "0"], "steps must be between 1 and 100"),
    (["--bbox", "0,0,10,10", "--bbox", "0,10,10,20"], "boxes are only used with two speakers"),
])
def test_cli_invalid_options_fail_before_loading(fake_pipeline, tmp_path, capsys, extra, message):
    rc = cli.main(["--image", "p.png", "--audio", "a.wav", "--out", str(tmp_path / "o.mp4"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert "weights" not in fake_pipeline  # rejected before the (slow) model load


def test_cli_num_gpus_is_lowered_without_gpus_and_checked(fake_pipeline, tmp_path, capsys):
    out = str(tmp_path / "o.mp4")
    # No GPU here: --num-gpus 2 falls back to the one-process pipeline (the same load as without it).
    assert cli.main(["--image", "p.png", "--audio", "a.wav", "--out", out, "--num-gpus", "2"]) == 0
    assert fake_pipeline["weights"] == Path("weights") and "request" in fake_pipeline
    fake_pipeline.clear()
    assert cli.main(["--image", "p.png", "--audio", "a.wav", "--out", out, "--num-gpus", "3"]) == 2
    assert "num_gpus must be one of (1, 2, 4, 8)" in capsys.readouterr().err
    assert "weights" not in fake_pipeline


@pytest.mark.parametrize("argv", [
    ["--image", "p.png", "--video", "v.mp4", "--audio", "a.wav", "--out", "o.mp4"],  # both references
    ["--audio", "a.wav", "--out", "o.mp4"],  # no reference
    ["--image", "p.png", "--audio", "a.wav", "--out", "o.mp4", "--bbox", "1,2,3"],  # box needs 4 numbers
    ["--image", "p.png", "--audio", "a.wav", "--out", "o.mp4", "--audio-mode", "mix"],
])
def test_cli_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: python -m infinitetalk" in capsys.readouterr().err


def test_cli_missing_weights(tmp_path, portrait, capsys):
    (tmp_path / "a.wav").touch()
    rc = cli.main(["--image", str(portrait), "--audio", str(tmp_path / "a.wav"), "--out", str(tmp_path / "o.mp4"),
                   "--weights", str(tmp_path / "nowhere"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: weights folder is incomplete" in err and "download_weights.py" in err


@pytest.mark.parametrize("which, message", [
    ("image", "--image file not found: missing.png"),
    ("audio", "--audio file not found: missing.wav"),
    ("out", "--out folder does not exist: nodir"),
])
def test_cli_missing_files_fail_before_loading(fake_pipeline, capsys, which, message):
    argv = {"image": "p.png", "audio": "a.wav", "out": "o.mp4"}
    argv[which] = {"image": "missing.png", "audio": "missing.wav", "out": "nodir/o.mp4"}[which]
    rc = cli.main(["--image", argv["image"], "--audio", argv["audio"], "--out", argv["out"]])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: {message}", err
    assert "weights" not in fake_pipeline  # no model load for a typo


def test_cli_bad_input_file_is_one_line(tiny_weights, make_speech, tmp_path, capsys):
    text = tmp_path / "face.png"
    text.write_text("not an image\n" * 10)
    out = tmp_path / "o.mp4"
    rc = cli.main(["--image", str(text), "--audio", str(make_speech(2.0, "cli_bad")), "--out", str(out),
                   "--weights", str(tiny_weights), "--width", "64", "--height", "64", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: input file 'face.png' is not a readable image, video or audio file" in err, err
    assert "Traceback" not in err and not out.exists()
