"""The shared serving core (infinitetalk/service.py): one table of inputs, one validation, both front ends.

No model here: the predictor's Input() literals must agree with service.INPUTS (cog's static
parser needs literals, so the table is necessarily written twice; this test keeps them equal), and
build_request checks JSON-typed inputs (what the RunPod worker receives) with the predictor's rules
and messages.
"""

from __future__ import annotations

import inspect

import pytest

from infinitetalk import service
from infinitetalk.errors import InputError
from infinitetalk.pipeline import DEFAULT_PROMPT


def test_predictor_inputs_are_the_service_table():
    cog = pytest.importorskip("cog")
    import predict

    params = {n: p for n, p in inspect.signature(predict.Predictor.run).parameters.items() if n != "self"}
    assert list(params) == list(service.INPUTS)  # same names, same order
    for name, spec in service.INPUTS.items():
        field = params[name].default
        assert isinstance(field, cog.FieldInfo), name
        default = None if spec.default is service.REQUIRED else spec.default
        assert field.default == default, name
        assert field.ge == spec.ge and field.le == spec.le, name
        assert (tuple(field.choices) if field.choices else None) == spec.choices, name
        kind = {"file": "Path", "str": "str", "int": "int", "float": "float", "bool": "bool"}[spec.kind]
        assert kind in str(params[name].annotation), (name, params[name].annotation)
    assert predict.MAX_SEED == service.MAX_SEED and predict.MAX_VIDEO_SECONDS == service.MAX_VIDEO_SECONDS
    assert predict.DEFAULT_PROMPT == DEFAULT_PROMPT
    # predict.py is a thin adapter: the rules live in the service module.
    assert predict.parse_box is service.parse_box and predict.quality_to_crf is service.quality_to_crf


def test_build_request_defaults_and_mapping():
    req = service.build_request({"image": "https://x/face.png", "audio": "data:audio/wav;base64,AAAA"})
    assert (req.image, req.audio, req.audio_2) == ("https://x/face.png", "data:audio/wav;base64,AAAA", None)
    assert req.crf == 16 and req.max_duration == service.MAX_VIDEO_SECONDS and req.prompt == DEFAULT_PROMPT
    assert 0 <= req.seed <= service.MAX_SEED and req.turbo is False and req.resolution == "480p"
    assert req.steps is None  # the mode's official default is resolved by the pipeline
    req = service.build_request({"image": "a", "audio": "b", "audio_2": "c", "box_1": "0,0,10,10",
                                 "box_2": "0,10,10,20", "quality": 10, "seed": 4294967295, "max_duration": 2,
                                 "steps": 4.0, "width": 64, "height": 64, "turbo": True, "negative_prompt": None})
    assert req.bboxes == [[0, 0, 10, 10], [0, 10, 10, 20]] and req.crf == 10 and req.seed == 4294967295
    assert req.max_duration == 2 and req.steps == 4 and isinstance(req.steps, int) and req.turbo is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"box_1": "10,10,50,50", "box_2": "10,60,50,120"}, "box_1/box_2 are only used with two speakers"),
        ({"audio_2": "c", "box_1": "1,2,30,40"}, "give both box_1 and box_2"),
        ({"audio_2": "c", "box_1": "a,b,c,d", "box_2": "1,2,3,4"}, "box_1 must be 'top,left,bottom,right'"),
        ({"width": 64}, "width and height must be given together"),
        ({"width": 72, "height": 64}, "multiple of 16"),
        ({"quality": 0}, "quality must be between 1 and 10, got 0"),
        ({"steps": 0}, "steps must be between 1 and 100, got 0"),
        ({"steps": 1000}, "steps must be between 1 and 100"),
        ({"max_duration": 601.0}, "max_duration must be at most 600 s"),
        ({"max_duration": 0.01}, "max_duration must be at least 0.04 s"),
        ({"resolution": "1080p"}, "resolution must be '480p' or '720p', got '1080p'"),
        ({"audio_mode": "mix"}, "audio_mode must be 'para' or 'add'"),
        ({"seed": -1}, "seed must be between 0 and 4294967295, got -1"),
        ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
        ({"shift": 0.0}, "shift must be between 0.1 and 50"),
        ({"color_correction": 2}, "color_correction must be between 0 and 1"),
        ({"width": "wide", "height": 64}, "width must be an integer, got 'wide'"),
        ({"steps": 2.5}, "steps must be an integer, got 2.5"),
        ({"steps": True}, "steps must be an integer"),
        ({"text_guidance": "high"}, "text_guidance must be a number"),
        ({"text_guidance": float("nan")}, "text_guidance must be a finite number"),
        ({"turbo": "yes"}, "turbo must be true or false"),
        ({"prompt": 5}, "prompt must be a string"),
        ({"quality": None}, "quality must not be null"),
        ({"audio": None}, "give audio (a speech file) or text (the words to speak)"),
        ({"image": ""}, "image is required"),
        ({"image": 3}, "image must be a file"),
        ({"imgae": "x"}, "unknown input(s) 'imgae'"),
    ],
)
def test_invalid_inputs_name_the_input(overrides, message):
    with pytest.raises(InputError) as err:
        service.build_request({"image": "a", "audio": "b", **overrides})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_build_request_needs_an_object():
    with pytest.raises(InputError, match="must be an object of named inputs"):
        service.build_request(["image", "audio"])  # type: ignore[arg-type]


def test_progress_tracker_metrics_snapshots_and_stop():
    from infinitetalk.errors import GenerationCancelled
    from infinitetalk.pipeline import ProgressEvent

    metrics, snaps, stop = [], [], [False]
    tracker = service.ProgressTracker(lambda k, v: metrics.append((k, v)), snaps.append, lambda: stop[0])
    tracker(ProgressEvent(0, 2, 1, 2, 0, 100))
    tracker(ProgressEvent(0, 2, 2, 2, 0, 100))
    tracker(ProgressEvent(0, 2, 2, 2, 81, 100))  # chunk 0 encoded
    assert metrics == [("denoising_steps", 1), ("denoising_steps", 2), ("chunks_done", 1),
                       ("video_seconds_done", 3.24)]
    assert snaps[-1]["chunk_finished"] and snaps[-1]["chunks_done"] == 1 and snaps[-1]["num_chunks"] == 2
    assert snaps[-1]["video_seconds_total"] == 4.0 and not snaps[0]["chunk_finished"]
    stop[0] = True
    with pytest.raises(GenerationCancelled):
        tracker(ProgressEvent(1, 2, 1, 2, 81, 100))


class _Unloaded:
    """A pipeline that must not be asked to generate (the job should fail on its input probe first)."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("generate called for a bad input file")


@pytest.mark.parametrize("which, content, message", [
    ("image", b"", "the image input is empty (0 bytes)"),
    ("image", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "the image input is not a readable image"),
    ("audio", b"", "the audio input is empty (0 bytes)"),
    ("audio", b"plain text, not speech\n" * 40, "cannot read the audio input as a media file"),
    ("audio_2", b"", "the audio_2 input is empty (0 bytes)"),
])
def test_run_job_probes_the_files_before_generating(portrait, make_speech, tmp_path, which, content, message):
    """run_job checks every fetched file (probe_request) first: a bad one fails with its input's name
    (not the temporary file's), the pipeline is not called and the run's folder is removed."""
    files = {"image": portrait, "audio": make_speech(1.0, "service_a"), "audio_2": None}
    if which == "audio_2":
        files["audio_2"] = make_speech(1.0, "service_b")
    bad = tmp_path / f"tmpq7x2file{'.png' if which == 'image' else '.wav'}"  # a name like cog's
    bad.write_bytes(content)
    files[which] = bad
    pipe, workdir = _Unloaded(), tmp_path / "run"
    inputs = {name: str(path) for name, path in files.items() if path is not None}
    with pytest.raises(InputError) as err:
        service.run_job(pipe, inputs, workdir, log=lambda message: None)
    assert message in str(err.value) and "tmpq7x2file" not in str(err.value), str(err.value)
    assert pipe.calls == 0 and not workdir.exists()
