"""The Cog predictor called directly (no server): tiny weights, 64x64, a few steps, on CPU."""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import pytest

cog = pytest.importorskip("cog")

import predict  # noqa: E402  (tests/conftest.py puts the repo root on sys.path)
from decoding import ffprobe_streams, final_output  # noqa: E402  (tests/ is on sys.path for test modules)
from infinitetalk.errors import InputError  # noqa: E402
from leaks import ffmpeg_children  # noqa: E402  (tests/ is on sys.path for test modules)

FPS = 25


def run_defaults() -> dict:
    """The run() defaults as values: cog's Input() defaults are FieldInfo objects."""
    out = {}
    for name, param in inspect.signature(predict.Predictor.run).parameters.items():
        if name == "self":
            continue
        default = param.default
        out[name] = default.default if isinstance(default, cog.FieldInfo) else default
    return out


def _run_dirs() -> set[str]:
    tmp = Path(tempfile.gettempdir())
    return {p.name for p in tmp.glob("infinitetalk-*")}


@pytest.fixture(scope="module", autouse=True)
def private_tmp(tmp_path_factory):
    """All temporary files of these tests in a private folder, so leftovers are ours to see."""
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("predict_tmp"))
    yield Path(tempfile.tempdir)
    tempfile.tempdir = old


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; with OpenMP's spin-waiting, 2 threads next to ffmpeg (or
    other load) on a 2-core box made one 64x64 prediction 5-7x slower (6 s vs 42 s measured)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def predictor(tiny_weights, private_tmp):
    old = os.environ.get("INFINITETALK_WEIGHTS")
    os.environ["INFINITETALK_WEIGHTS"] = str(tiny_weights)
    try:
        p = predict.Predictor()
        p.setup()
    finally:
        if old is None:
            os.environ.pop("INFINITETALK_WEIGHTS", None)
        else:
            os.environ["INFINITETALK_WEIGHTS"] = old
        # setup() switches the Hub clients off for the predictions; do not leak that into other tests.
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ.pop("TRANSFORMERS_OFFLINE", None)
    metrics: dict = {}
    p.record_metric = lambda key, value, mode="replace": metrics.__setitem__(key, value)  # type: ignore[method-assign]
    p.test_metrics = metrics
    yield p
    p._cleanup_previous()


def args(**overrides) -> dict:
    kw = run_defaults()
    kw.update(width=64, height=64, steps=2, seed=123, quality=8)
    kw.update(overrides)
    return kw


def test_inputs_are_documented_with_defaults_and_ranges():
    params = inspect.signature(predict.Predictor.run).parameters
    expected = {"image", "audio", "audio_2", "text", "voice", "voice_2", "speech_speed", "audio_mode", "box_1",
                "box_2", "prompt", "negative_prompt",
                "resolution", "width", "height", "max_duration", "steps", "text_guidance", "audio_guidance",
                "shift", "seed", "color_correction", "apg", "quality", "turbo", "fast", "step_cache", "preview"}
    assert set(params) - {"self"} == expected
    for name in expected:
        field = params[name].default
        assert isinstance(field, cog.FieldInfo) and field.description, name
    d = run_defaults()
    # Empty steps/guidance/shift take the mode's official defaults (exact 40/5/4, turbo 4/1/2).
    assert (d["steps"], d["text_guidance"], d["audio_guidance"], d["turbo"], d["resolution"], d["audio_mode"]) == (
        None, None, None, False, "480p", "para")
    from infinitetalk.pipeline import GenerationRequest

    exact = GenerationRequest(image="x", audio="y").resolved()
    turbo = GenerationRequest(image="x", audio="y", turbo=True).resolved()
    assert (exact.steps, exact.text_guidance, exact.audio_guidance, exact.shift) == (40, 5.0, 4.0, 7.0)
    assert (turbo.steps, turbo.text_guidance, turbo.audio_guidance, turbo.shift) == (4, 1.0, 2.0, 2.0)
    assert d["seed"] is None and d["audio_2"] is None and d["width"] is None
    assert (d["audio"], d["text"], d["voice"], d["voice_2"], d["speech_speed"]) == (None, None, "af_heart",
                                                                                  "am_michael", 1.0)
    from infinitetalk import speech

    assert params["voice"].default.choices == params["voice_2"].default.choices == list(speech.VOICES)
    assert (d["voice"], d["voice_2"]) == (speech.DEFAULT_VOICE, speech.DEFAULT_VOICE_2)
    assert (params["speech_speed"].default.ge, params["speech_speed"].default.le) == speech.SPEED_RANGE
    assert predict.quality_to_crf(d["quality"]) == 16
    assert GenerationRequest(image="x", audio="y").crf == 16  # the library's own default is the servers'
    # Literals in the Input() calls (for cog build's static parser) agree with the code's constants.
    from infinitetalk.pipeline import DEFAULT_PROMPT

    assert d["prompt"] == predict.DEFAULT_PROMPT == DEFAULT_PROMPT
    assert params["max_duration"].default.le == predict.MAX_VIDEO_SECONDS
    assert params["seed"].default.le == predict.MAX_SEED == 2**32 - 1
    assert [predict.quality_to_crf(q) for q in (1, 10)] == [37, 10]


def test_generates_mp4_with_audio_duration(predictor, portrait, make_speech, capsys):
    speech = make_speech(1.6, "predict_ok")
    before = _run_dirs()
    out = final_output(predictor.run(**args(image=cog.Path(portrait), audio=cog.Path(speech))))
    assert isinstance(out, Path) and out.suffix == ".mp4" and out.is_file()
    info = ffprobe_streams(out)
    v, a = info["video"], info["audio"]
    assert v["codec"] == "h264" and (v["width"], v["height"]) == (64, 64) and v["fps"] == pytest.approx(FPS)
    assert a is not None and a["codec"] == "aac"
    assert v["nb_frames"] == round(1.6 * FPS)
    assert abs(info["format_duration"] - 1.6) <= 1.0 / FPS + 1e-3
    logs = capsys.readouterr()
    assert "seed: 123" in logs.out
    m = predictor.test_metrics
    assert m["chunks"] == 1 and m["denoising_steps"] == 2 and m["frames"] == 40
    assert m["video_seconds"] == pytest.approx(1.6) and m["seed"] == 123
    # Only this prediction's own folder (holding the output) is left, and the next run removes it.
    assert _run_dirs() - before == {out.parent.name}
    predictor._cleanup_previous()
    assert not out.exists() and _run_dirs() <= before


def test_random_seed_is_logged_and_cancel_cleans_up(predictor, portrait, make_speech, capsys):
    """CancelationException (a BaseException) between steps: no temp folder, no partial file, no ffmpeg left."""
    speech = make_speech(1.0, "predict_cancel")
    before = _run_dirs()
    calls = []

    def cancel_on_first_step(key, value, mode="replace"):
        calls.append(key)
        if key == "denoising_steps":
            raise cog.CancelationException()

    predictor.record_metric = cancel_on_first_step
    try:
        with pytest.raises(cog.CancelationException):
            final_output(predictor.run(**args(image=cog.Path(portrait), audio=cog.Path(speech), seed=None, steps=4)))
    finally:
        metrics = predictor.test_metrics
        predictor.record_metric = lambda key, value, mode="replace": metrics.__setitem__(key, value)
    assert calls == ["denoising_steps"]
    seed_lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("seed: ")]
    assert len(seed_lines) == 1 and 0 <= int(seed_lines[0].split()[1]) <= predict.MAX_SEED
    assert _run_dirs() <= before
    assert not list(Path(tempfile.gettempdir()).glob("**/*.partial"))
    assert not ffmpeg_children()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"box_1": "10,10,50,50", "box_2": "10,60,50,120"}, "only used with two speakers"),
        ({"width": 64, "height": None}, "width and height must be given together"),
        ({"width": 72, "height": 64}, "multiple of 16"),
        ({"quality": 0}, "quality must be between 1 and 10"),
        ({"steps": 0}, "steps must be between 1 and 100"),
        ({"max_duration": 601.0}, "max_duration must be at most 600"),
        ({"resolution": "1080p"}, "resolution must be"),
        ({"seed": -1}, "seed must be between"),
    ],
)
def test_invalid_input_is_a_clear_input_error(predictor, portrait, make_speech, overrides, message):
    speech = make_speech(1.0, "predict_bad")
    before = _run_dirs()
    with pytest.raises(InputError) as err:
        final_output(predictor.run(**args(image=cog.Path(portrait), audio=cog.Path(speech), **overrides)))
    assert message in str(err.value)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert _run_dirs() <= before


def test_boxes_need_both_and_a_second_speaker(predictor, portrait, make_speech):
    speech = make_speech(1.0, "predict_bad")
    with pytest.raises(InputError, match="give both box_1 and box_2"):
        final_output(predictor.run(**args(image=cog.Path(portrait), audio=cog.Path(speech), audio_2=cog.Path(speech),
                             box_1="1,2,30,40")))
    with pytest.raises(InputError, match="top,left,bottom,right"):
        predict.parse_box("a,b,c,d", "box_1")
    with pytest.raises(InputError, match="bottom > top"):
        predict.parse_box("50,0,10,20", "box_1")
    assert predict.parse_box(" 1, 2 ,30,40 ", "box_1") == [1.0, 2.0, 30.0, 40.0]
    assert predict.parse_box("", "box_1") is None


def test_audio_that_is_an_image_fails_cleanly(predictor, portrait):
    before = _run_dirs()
    with pytest.raises(InputError) as err:
        final_output(predictor.run(**args(image=cog.Path(portrait), audio=cog.Path(portrait))))
    assert "Traceback" not in str(err.value)
    assert _run_dirs() <= before


@pytest.mark.slow
def test_two_rank_predictor_gives_the_same_video(predictor, tiny_weights, portrait, make_speech, monkeypatch):
    """INFINITETALK_NUM_GPUS > 1 on a multi-GPU machine: setup() starts the worker rank(s) and every
    prediction is split over them (here 2 gloo ranks on the CPU); the video equals one rank's."""
    import numpy as np

    from decoding import decode_frames
    from infinitetalk import distributed, parallel

    def frames(path):
        return np.frombuffer(decode_frames(path), np.uint8).astype(int)

    speech = make_speech(1.6, "predict_two_ranks")
    ref = frames(final_output(predictor.run(**args(image=cog.Path(portrait), audio=cog.Path(speech)))))
    # This machine has no GPU: pretend the 2 asked for are visible (the ranks are gloo processes on the CPU).
    monkeypatch.setattr(distributed, "usable_num_gpus", lambda wanted=None: wanted or 1)
    monkeypatch.setenv("INFINITETALK_NUM_GPUS", "2")
    monkeypatch.setenv("INFINITETALK_WEIGHTS", str(tiny_weights))
    # The spawned rank must sum in the same order as this process (one torch thread, see
    # one_torch_thread): a different thread count changes fp32 rounding, which H.264 then amplifies.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p = predict.Predictor()
    try:
        p.setup()
        assert isinstance(p.pipe, parallel.MultiGPUPipeline) and p.pipe.num_gpus == 2
        out = final_output(p.run(**args(image=cog.Path(portrait), audio=cog.Path(speech))))
        got = frames(out)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1
    finally:
        if isinstance(getattr(p, "pipe", None), parallel.MultiGPUPipeline):
            p.pipe.close()
        p._cleanup_previous()
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ.pop("TRANSFORMERS_OFFLINE", None)


@pytest.mark.slow
def test_preview_yields_the_video_so_far_after_each_chunk_then_the_same_video(predictor, portrait, make_speech):
    speech = make_speech(4.0, "predict_preview")  # 100 frames: 2 chunks
    kw = args(image=cog.Path(portrait), audio=cog.Path(speech), steps=1)
    outputs = list(predictor.run(**dict(kw, preview=True)))
    assert len(outputs) == 3 and outputs[-1].name == "output.mp4"
    infos = [ffprobe_streams(o) for o in outputs]
    assert [i["video"]["nb_frames"] for i in infos] == [81, 100, 100]
    assert all(i["video"]["codec"] == "h264" and i["audio"]["codec"] == "aac" for i in infos)
    assert all(i["video"]["fps"] == pytest.approx(FPS) for i in infos)
    with_previews = outputs[-1].read_bytes()
    assert final_output(predictor.run(**kw)).read_bytes() == with_previews  # previews leave the video as it is


@pytest.mark.slow
def test_closing_the_preview_stream_cancels_the_generation_and_removes_its_files(predictor, portrait, make_speech):
    import threading

    from leaks import ffmpeg_children

    speech = make_speech(8.0, "predict_preview_cancel")  # 4 chunks
    stream = predictor.run(**args(image=cog.Path(portrait), audio=cog.Path(speech), steps=1, preview=True))
    first = next(stream)
    assert ffprobe_streams(first)["video"]["nb_frames"] == 81
    workdir = predictor._last_workdir
    stream.close()  # what cog does to a cancelled generator prediction: the generation stops at its next step
    assert not Path(workdir).exists()
    assert not [t for t in threading.enumerate() if t.name in ("generate",) or t.name.startswith("HLSWriter")]
    assert ffmpeg_children() == []
