"""``python -m infinitetalk``: one real run with the tiny weights, flag mapping, and clean errors (exit 2);
a bad input file fails on its probe, before any weight is read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from decoding import ffprobe_streams  # tests/ is on sys.path for test modules
from file_audit import SEEN, WATCHED
from file_audit import forbidden as audit_forbidden  # tests/ is on sys.path for test modules
from infinitetalk import build, cli, download, weights
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


def _tiny_video(path: Path, seconds: float = 0.4, audio: bool = False) -> Path:
    """A 128x128 25 fps H.264 clip (with a sine soundtrack when ``audio``), made by ffmpeg."""
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=128x128:rate=25:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac"]
    subprocess.run([*cmd, "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def good_files(tmp_path_factory, portrait, make_speech) -> dict[str, Path]:
    """Valid inputs (they pass the probe): a portrait, two speech files and a short video."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    files = {"p.png": folder / "p.png", "a.wav": folder / "a.wav", "b.wav": folder / "b.wav",
             "in.mp4": _tiny_video(folder / "in.mp4")}
    shutil.copy(portrait, files["p.png"])
    shutil.copy(make_speech(1.0, "cli_a"), files["a.wav"])
    shutil.copy(make_speech(1.0, "cli_b"), files["b.wav"])
    return files


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path, good_files):
    """Replace model loading: record the load arguments and the request instead of generating.
    Runs in ``tmp_path``, where the valid input files the tests name exist."""
    seen: dict = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INFINITETALK_WEIGHTS", raising=False)  # the default folder is the repository's weights/
    for name, path in good_files.items():
        shutil.copy(path, tmp_path / name)

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
    assert fake_pipeline["weights"] == ROOT / "weights" and fake_pipeline["show_progress"] is True
    assert req.crf == 16  # --quality 8, the servers' default quality


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
    assert fake_pipeline["weights"] == ROOT / "weights" and "request" in fake_pipeline
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


def test_cli_quality_maps_to_crf_like_the_servers(fake_pipeline, tmp_path, capsys):
    out = str(tmp_path / "o.mp4")
    assert cli.main(["--image", "p.png", "--audio", "a.wav", "--out", out, "--quality", "10"]) == 0
    assert fake_pipeline["request"].crf == 10
    assert cli.main(["--image", "p.png", "--audio", "a.wav", "--out", out, "--crf", "23"]) == 0
    assert fake_pipeline["request"].crf == 23
    for bad in (["--quality", "11"], ["--quality", "8", "--crf", "20"]):  # out of range; both given
        with pytest.raises(SystemExit) as exc:
            cli.main(["--image", "p.png", "--audio", "a.wav", "--out", out, *bad])
        assert exc.value.code == 2 and "usage:" in capsys.readouterr().err


def test_cli_weights_folder_rule(monkeypatch):
    """``--weights``, else ``$INFINITETALK_WEIGHTS``, else the repository's ``weights/``: the servers' rule."""
    args = cli.build_parser().parse_args(["--image", "p.png", "--audio", "a.wav", "--out", "o.mp4"])
    assert cli.settings_from_args(args, {}).weights == download.default_weights_dir({}) == ROOT / "weights"
    assert cli.settings_from_args(args, {"INFINITETALK_WEIGHTS": "/data/w"}).weights == Path("/data/w")
    args.weights = Path("W")
    assert cli.settings_from_args(args, {"INFINITETALK_WEIGHTS": "/data/w"}).weights == Path("W")


def test_cli_missing_weights(tmp_path, portrait, make_speech, capsys):
    rc = cli.main(["--image", str(portrait), "--audio", str(make_speech(1.0, "cli_a")), "--out",
                   str(tmp_path / "o.mp4"), "--weights", str(tmp_path / "nowhere"), "--device", "cpu"])
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




def _corrupt(kind: str, folder: Path, good: dict[str, Path]) -> Path:
    """A bad input file of one kind, in ``folder``."""
    if kind == "random.png":
        path = folder / "face.png"
        path.write_bytes(os.urandom(4096))
    elif kind == "empty.wav":
        path = folder / "speech.wav"
        path.touch()
    elif kind == "text.wav":
        path = folder / "speech.wav"
        path.write_text("this is not speech\n" * 50)
    elif kind == "picture.wav":
        path = folder / "speech.wav"
        shutil.copy(good["p.png"], path)
    elif kind == "speech.mp4":
        path = folder / "clip.mp4"
        shutil.copy(good["a.wav"], path)
    else:
        path = folder / "short.wav"
        import numpy as np
        import soundfile as sf

        sf.write(str(path), np.zeros(320, dtype=np.float32), 16000)  # 20 ms
    return path


# (the flag given the bad file, its kind, the one-line error)
CORRUPT = [
    ("--image", "random.png", "error: input file 'face.png' is not a readable image, video or audio file"),
    ("--audio", "empty.wav", "error: audio file 'speech.wav' is empty (0 bytes)"),
    ("--audio", "text.wav", "error: cannot read speech.wav as a media file"),
    ("--audio", "picture.wav", "error: speech.wav has no audio stream"),
    ("--audio2", "empty.wav", "error: audio file 'speech.wav' is empty (0 bytes)"),
    ("--audio", "short.wav", "error: the --audio input is 20 ms long; the minimum is one video frame (40 ms)"),
    ("--video", "speech.mp4", "error: the --video input has no picture: give an image or a video file"),
]


@pytest.mark.parametrize("flag, kind, message", CORRUPT, ids=[f"{f}-{k}" for f, k, _ in CORRUPT])
def test_cli_bad_input_fails_before_any_weight_is_read(tiny_weights, good_files, tmp_path, monkeypatch, capsys,
                                                        flag, kind, message):
    """A complete (tiny) weights folder and one bad input: the probe refuses the file in well under 2 s,
    with one line that names it, and no loader runs and nothing in the weights folder is opened."""
    called: list[str] = []

    def forbidden(what):
        return audit_forbidden(called, what, "for a bad input")

    monkeypatch.setattr(build, "build_pipeline", forbidden("build_pipeline"))
    monkeypatch.setattr(InfiniteTalkPipeline, "from_pretrained", staticmethod(forbidden("from_pretrained")))
    monkeypatch.setattr(weights, "load_transformer", forbidden("load_transformer"))
    files = {"--image": good_files["p.png"], "--audio": good_files["a.wav"]}
    if flag == "--audio2":
        files["--audio2"] = good_files["b.wav"]
    if flag == "--video":
        del files["--image"]
    files[flag] = _corrupt(kind, tmp_path, good_files)
    argv = [*(x for pair in files.items() for x in (pair[0], str(pair[1]))), "--out", str(tmp_path / "o.mp4"),
            "--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    WATCHED.append(str(tiny_weights))
    SEEN.clear()
    try:
        t0 = time.perf_counter()
        rc = cli.main(argv)
        seconds = time.perf_counter() - t0
    finally:
        WATCHED.clear()
    err = capsys.readouterr().err
    assert rc == 2 and err == message + "\n", err
    assert seconds < 2.0, f"took {seconds:.2f} s"
    assert not called and not SEEN, (called, SEEN)
    assert not (tmp_path / "o.mp4").exists()


def test_cli_fast_asks_for_the_fast_request_and_compiles(fake_pipeline, tmp_path):
    assert cli.main(["--image", "p.png", "--audio", "a.wav", "--out", str(tmp_path / "o.mp4"), "--fast",
                     "--turbo"]) == 0
    assert fake_pipeline["request"].fast and fake_pipeline["request"].turbo
    assert fake_pipeline["load_kwargs"]["compile"] is True  # FP8 GEMMs are only faster compiled
    assert cli.main(["--image", "p.png", "--audio", "a.wav", "--out", str(tmp_path / "o.mp4")]) == 0
    assert not fake_pipeline["request"].fast and fake_pipeline["load_kwargs"]["compile"] is not True
