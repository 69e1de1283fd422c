"""Hostile inputs, failures and clean-up through the Cog predictor (called directly, tiny weights, 64x64, 1 step).

Every file of the corpus (``tests/hostile.py``, generated here) either makes a correct video (H.264 +
AAC, 25 fps, 64x64, as long as the decoded audio within one frame) or fails with its one-line
InputError that names the input (``the image input ...``), never cog's temporary file name. After
each case the temporary folder is as before (the predictor keeps the last output's folder until
the next run: removed here explicitly) and no ffmpeg child is left. Also: two-speaker boxes
outside the image, the V2V duration limit, long prompts truncated with a log line, and a GPU
out-of-memory error that is clear, frees the run's tensors and lets the next prediction succeed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import pytest

cog = pytest.importorskip("cog")
if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not installed", allow_module_level=True)

import torch  # noqa: E402

from decoding import ffprobe_streams, final_output  # noqa: E402  (tests/ is on sys.path for test modules)
from hostile import make_corpus  # noqa: E402  (tests/ is on sys.path for test modules)
from infinitetalk import audio as audio_lib  # noqa: E402
from infinitetalk import inputs  # noqa: E402
from infinitetalk.errors import InputError  # noqa: E402
from infinitetalk.pipeline import GenerationError  # noqa: E402
from leaks import ffmpeg_children  # noqa: E402
from test_predict import args, one_torch_thread, predictor, private_tmp  # noqa: E402,F401

FPS = 25
SPEECH_S = 1.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, portrait, make_speech) -> dict[str, Path]:
    files = make_corpus(tmp_path_factory.mktemp("hostile"), portrait, make_speech(SPEECH_S, "hostile_speech"))
    files["portrait.png"] = portrait
    files["speech.wav"] = make_speech(SPEECH_S, "hostile_speech")
    return files


def _listing() -> set[str]:
    tmp = Path(tempfile.gettempdir())
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


def _tiny(**overrides) -> dict:
    return args(**{"steps": 1, **overrides})


def check_video(out: Path, audio_path: Path, max_duration: float | None = None) -> None:
    """H.264 + AAC, 25 fps, 64x64, as long as the decoded audio (or max_duration) within one frame."""
    seconds = len(audio_lib.decode_audio(audio_path)) / audio_lib.SAMPLE_RATE
    if max_duration is not None:
        seconds = min(seconds, max_duration)
    info = ffprobe_streams(out)
    v, a = info["video"], info["audio"]
    assert v["codec"] == "h264" and a is not None and a["codec"] == "aac", info
    assert (v["width"], v["height"]) == (64, 64) and v["fps"] == pytest.approx(FPS), info
    assert abs(info["format_duration"] - seconds) <= 1.0 / FPS + 1e-3, (info, seconds)
    assert abs(v["nb_frames"] - seconds * FPS) <= 1, (info, seconds)


def run_case(predictor, image: Path, audio: Path, expect: str | None, **overrides):
    """One prediction: a checked video (expect None) or an InputError containing ``expect``; then no leftovers."""
    predictor._cleanup_previous()
    before = _listing()
    kw = _tiny(image=cog.Path(image), audio=cog.Path(audio), **overrides)
    if expect is None:
        out = Path(final_output(predictor.run(**kw)))
        check_video(out, audio, overrides.get("max_duration"))
        assert {p.split("/")[0] for p in _listing() - before} == {out.parent.name}  # only the kept output folder
        predictor._cleanup_previous()
    else:
        with pytest.raises(InputError) as err:
            final_output(predictor.run(**kw))
        msg = str(err.value)
        assert expect in msg, msg
        assert "\n" not in msg and "Traceback" not in msg, msg
        for path in (image, audio, overrides.get("audio_2")):
            if path is not None:
                assert Path(path).name not in msg and str(Path(path).parent) not in msg, msg
    assert _listing() == before
    assert not ffmpeg_children()


# (image file, audio file, expected message or None for a correct video). Files that should work are
# paired (an odd image with an odd audio) so each generation checks two of them.
SPEECH = "speech.wav"
PORTRAIT = "portrait.png"
CASES = [
    ("zero.png", SPEECH, "the image input is empty (0 bytes)"),
    ("truncated.png", SPEECH, "the image input is truncated or corrupt"),
    ("truncated.jpg", SPEECH, "the image input is truncated or corrupt"),
    ("truncated.mp4", SPEECH, "the image input is not a readable image, video or audio file"),
    ("no_frames.mp4", SPEECH, "the image input has no decodable frames"),
    ("text.png", SPEECH, "the image input is not a readable image, video or audio file"),
    ("bomb_30000x30000.png", SPEECH, "the image input is too large: 900000000 pixels; the maximum is 67108864"),
    ("tiny_48x32.png", SPEECH, "the image input is too small: 48x32; the minimum side is 64 pixels"),
    ("video_48x32.mp4", SPEECH, "the image input is a video of 48x32; the minimum side is 64 pixels"),
    ("audio_only.mp4", SPEECH, "the image input has no picture"),
    (PORTRAIT, "zero.wav", "the audio input is empty"),
    (PORTRAIT, "truncated.mp4", "cannot read the audio input as a media file"),
    (PORTRAIT, "no_frames.mp4", "the audio input contains no samples"),
    (PORTRAIT, "text.wav", "cannot read the audio input as a media file"),
    (PORTRAIT, "nan_float.wav", "the audio input contains NaN or infinite samples"),
    (PORTRAIT, "inf_float.wav", "the audio input contains NaN or infinite samples"),
    (PORTRAIT, "tiny_20ms.wav", "the audio input is 20 ms long; the minimum is one video frame (40 ms)"),
    (PORTRAIT, "video_no_audio.mp4", "the audio input has no audio stream"),
    # The video's first frame is decoded (an ffmpeg process) before the audio fails: none may stay running.
    ("video_no_audio.mp4", "nan_float.wav", "the audio input contains NaN or infinite samples"),
    ("cmyk.jpg", "8ch_96k.wav", None),
    ("gray16.png", "silent.wav", None),
    ("exif_rotated.jpg", "short_0.2s.wav", None),
    ("animated.gif", "truncated.mp3", None),  # the mp3's frames before the cut decode: a shorter video
    ("video_no_audio.mp4", "audio_only.mp4", None),  # V2V from a silent video, speech from an audio-only MP4
]


@pytest.mark.parametrize(("image", "audio", "expect"), CASES, ids=[f"{i}+{a}" for i, a, _ in CASES])
def test_hostile_file(predictor, corpus, image, audio, expect):
    run_case(predictor, corpus[image], corpus[audio], expect)


def test_second_speaker_errors_name_audio_2(predictor, corpus):
    run_case(predictor, corpus["portrait.png"], corpus["speech.wav"], "the audio_2 input contains NaN",
             audio_2=cog.Path(corpus["nan_float.wav"]))
    run_case(predictor, corpus["portrait.png"], corpus["speech.wav"], "the audio_2 input is empty",
             audio_2=cog.Path(corpus["zero.wav"]))


def test_boxes_must_lie_inside_the_image(predictor, corpus):
    # The portrait is 512x512: a box reaching row 600 is outside.
    run_case(predictor, corpus["portrait.png"], corpus["speech.wav"],
             "box_2 '0,300,600,500' is not inside the 512x512 image",
             audio_2=cog.Path(corpus["speech.wav"]), box_1="0,0,100,100", box_2="0,300,600,500")
    run_case(predictor, corpus["portrait.png"], corpus["speech.wav"], "box_1 '0,0,100,513' is not inside",
             audio_2=cog.Path(corpus["speech.wav"]), box_1="0,0,100,513", box_2="0,300,100,500")


def test_video_longer_than_the_limit_fails_fast(predictor, corpus, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_VIDEO_SECONDS", 0.5)  # the 1 s test video stands in for a > 1 h one
    run_case(predictor, corpus["video_no_audio.mp4"], corpus["speech.wav"],
             "the image input is a video of 1.0 s; the maximum is 0.5 s")


def test_long_prompt_is_truncated_with_a_log_line_and_long_audio_cut(predictor, corpus, caplog):
    caplog.set_level(logging.WARNING, logger="infinitetalk")
    run_case(predictor, corpus["portrait.png"], corpus["speech.wav"], None, max_duration=0.6,
             prompt="A person talks about the weather, the city and the sea. " * 80)
    assert any("prompt longer than 512 tokens was truncated" in r.getMessage() for r in caplog.records)


def test_input_names_replace_temp_file_names():
    n = inputs.name_inputs
    assert n("image 'tmpab12file.png' is too large", {"image": "/tmp/x/tmpab12file.png"}) == (
        "the image input is too large")
    paths = {"image": "/tmp/tmpab12file.png", "audio": "/tmp/tmpcd34file.wav", "audio_2": "/tmp/tmpef56file.wav"}
    assert n("cannot read tmpef56file.wav as a media file", paths) == "cannot read the audio_2 input as a media file"
    assert n("audio file tmpcd34file.wav is empty", paths) == "the audio input is empty"
    assert n("steps must be between 1 and 100, got 0", paths) == "steps must be between 1 and 100, got 0"
    # A file called like a word of the message: only its quoted form is replaced.
    assert n("image 'image' is empty", {"image": "/tmp/image"}) == "the image input is empty"


def test_out_of_memory_is_clear_frees_the_run_and_the_next_prediction_works(predictor, corpus, monkeypatch):
    transformer = predictor.pipe.transformer
    original = transformer.forward
    seen: list[weakref.ref] = []

    def oom_once(hidden_states, *a, **kw):
        if not seen:
            seen.append(weakref.ref(hidden_states))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(hidden_states, *a, **kw)

    monkeypatch.setattr(transformer, "forward", oom_once)
    predictor._cleanup_previous()
    before = _listing()
    with pytest.raises(GenerationError) as err:
        final_output(predictor.run(**_tiny(image=cog.Path(corpus["portrait.png"]),
                                           audio=cog.Path(corpus["speech.wav"]))))
    msg = str(err.value)
    assert "out of GPU memory" in msg and "480p" in msg and "memory mode" in msg, msg
    assert "\n" not in msg and "Traceback" not in msg
    # The failed run's tensors are gone although the error (and its cause's traceback) is still held here.
    assert seen and seen[0]() is None
    assert _listing() == before and not ffmpeg_children()  # the encoder was started and has been killed
    run_case(predictor, corpus["portrait.png"], corpus["speech.wav"], None)
