"""Text input (issue 16): the script rules, the Kokoro synthesiser on tiny weights in the real layout, and
whole text requests through the pipeline and the CLI.

The synthesiser runs the real ``kokoro`` (KModel, KPipeline) and ``misaki`` (English lexicons + the tiny
spaCy tagger; espeak-ng through espeakng-loader for the other languages) code: nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decoding import decode_frames, ffprobe_streams
from infinitetalk import speech
from infinitetalk.errors import InputError
from infinitetalk.request import GenerationRequest, build_request

ROOT = Path(__file__).resolve().parents[1]
FPS = 25


# --------------------------------------------------------------------------- the script rules (no model)


def test_plain_text_is_one_turn_of_speaker_one():
    assert speech.parse_script("  Hello there.\nHow are you?  ") == [speech.Turn(1, "Hello there.\nHow are you?")]


def test_dialogue_turns_in_order_with_the_official_tags():
    turns = speech.parse_script("(s1) Hi, Anna!\n(s2) Hello. (S1)How are you? ( s2 ) Fine.")
    assert turns == [speech.Turn(1, "Hi, Anna!"), speech.Turn(2, "Hello."), speech.Turn(1, "How are you?"),
                     speech.Turn(2, "Fine.")]
    assert speech.speakers_of(turns) == 2
    assert speech.speakers_of(speech.parse_script("(s1) Only me. (s1) Still me.")) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("", "text is empty"),
    (" \n\t ", "text is empty"),
    ("Hello\x00world", "control character U+0000 at position 5"),
    ("Bell\x07", "control character U+0007"),
    ("Esc\x1b[31m", "control character U+001B"),
    ("a" * (speech.MAX_TEXT_CHARS + 1), f"the maximum is {speech.MAX_TEXT_CHARS}"),
    ("Intro first. (s1) Hi (s2) Hello", "does not start with a speaker tag"),
    ("(s1) Hi (s3) Hello", "a dialogue has two speakers, (s1) and (s2)"),
    ("(s1) Hi (s2)   (s1) again", "turn 2 ((s2)) has no words"),
    ("(s1)", "turn 1 ((s1)) has no words"),
    ("bad \ud800 surrogate", "unpaired surrogate"),
    (42, "text must be a string"),
])
def test_bad_text_gets_a_clear_error(text, message):
    with pytest.raises(InputError, match=None) as err:
        speech.parse_script(text)
    assert message in str(err.value), str(err.value)


def test_text_of_the_maximum_length_with_line_breaks_and_tabs_is_accepted():
    text = ("Hello,\tworld.\r\n" * 1000)[:speech.MAX_TEXT_CHARS]
    assert speech.parse_script(text)[0].speaker == 1


@pytest.mark.parametrize(("text", "voices", "message"), [
    ("Привет, как дела?", ("af_heart", "am_michael"), "text has Cyrillic letters ('Приветкакдел'), which voice "
                                                      "'af_heart' (American English) cannot speak"),
    ("(s1) Hello (s2) 你好", ("af_heart", "bm_george"), "turn 2 has Cjk letters ('你好'), which voice 'bm_george' "
                                                      "(British English)"),
    ("नमस्ते", ("ef_dora", "am_michael"), "which voice 'ef_dora' (Spanish) cannot speak"),
])
def test_text_in_a_language_the_voice_does_not_speak_says_so(text, voices, message):
    with pytest.raises(InputError) as err:
        speech.script_turns(text, voices)
    assert message in str(err.value)
    assert "American English, British English, Spanish, French, Hindi, Italian, Brazilian Portuguese" in str(err.value)


@pytest.mark.parametrize(("text", "voice"), [("¿Qué tal? Muy bien, señor.", "ef_dora"),
                                             ("Ça va très bien.", "ff_siwis"), ("नमस्ते दुनिया, hello", "hf_alpha"),
                                             ("Olá, tudo bem?", "pf_dora")])
def test_text_in_the_voices_language_is_accepted(text, voice):
    assert speech.script_turns(text, (voice, "am_michael")) == [speech.Turn(1, text)]


def test_voice_and_speed_rules_are_the_rule_tables():
    with pytest.raises(InputError, match="voice must be one of af_heart, af_alloy, .*; got 'zf_xiaoxiao'"):
        GenerationRequest(image="f.png", text="Hi", voice="zf_xiaoxiao").validate()
    with pytest.raises(InputError, match="voice_2 must be one of af_heart, "):
        GenerationRequest(image="f.png", text="Hi", voice_2="nobody").validate()
    for bad, message in ((0.49, "must be between 0.5 and 2, got 0.49"), (2.01, "must be between 0.5 and 2, got 2.01"),
                         (True, "must be a number, got True"), ("1", "must be a number, got '1'")):
        with pytest.raises(InputError, match=f"speech_speed {message}"):
            GenerationRequest(image="f.png", text="Hi", speech_speed=bad).validate()


# --------------------------------------------------------------------------- the one rule table


def _inputs(**extra):
    return {"image": "face.png", **extra}


def test_rule_table_audio_or_text_exactly_one():
    with pytest.raises(InputError, match=r"give audio \(a speech file\) or text \(the words to speak\)"):
        build_request(_inputs())
    with pytest.raises(InputError, match="give audio or text, not both"):
        build_request(_inputs(audio="a.wav", text="Hello"))
    with pytest.raises(InputError, match="audio_2 cannot be used with text"):
        build_request(_inputs(audio_2="b.wav", text="Hello"))
    with pytest.raises(InputError, match="voice must be one of"):
        build_request(_inputs(text="Hello", voice="nobody"))
    with pytest.raises(InputError, match="speech_speed must be between 0.5 and 2"):
        build_request(_inputs(text="Hello", speech_speed=3))
    # An empty optional string is a missing input (Cog's playground sends ""): blank text with no audio says so.
    with pytest.raises(InputError, match=r"give audio \(a speech file\) or text"):
        build_request(_inputs(text="  \n "))
    assert build_request(_inputs(audio="a.wav", text="")).text is None
    req = build_request(_inputs(text="Hello there", voice="bf_emma", speech_speed=1.5))
    assert (req.text, req.voice, req.voice_2, req.speech_speed, req.audio, req.speakers) == (
        "Hello there", "bf_emma", speech.DEFAULT_VOICE_2, 1.5, None, 1)


def test_rule_table_boxes_follow_the_dialogue():
    with pytest.raises(InputError, match=r"only used with two speakers: give audio_2 too \(or \(s2\) turns in text\)"):
        build_request(_inputs(text="Just me.", box_1="0,0,10,10", box_2="0,10,10,20"))
    req = build_request(_inputs(text="(s1) Hi (s2) Hello", box_1="0,0,10,10", box_2="0,10,10,20"))
    assert req.speakers == 2 and req.bboxes == [[0, 0, 10, 10], [0, 10, 10, 20]]


def test_library_request_validates_the_text_too():
    with pytest.raises(InputError, match="give audio or text, not both"):
        GenerationRequest(image="f.png", audio="a.wav", text="Hi").validate()
    with pytest.raises(InputError, match="Cyrillic"):
        GenerationRequest(image="f.png", text="Привет").validate()
    GenerationRequest(image="f.png", text="(s1) Hi (s2) Hello").validate()


# --------------------------------------------------------------------------- the synthesiser (tiny weights)


@pytest.fixture(scope="module")
def synth(tiny_weights_tts):
    return speech.Speech.from_pretrained(tiny_weights_tts)


def test_voice_packs_stay_cpu_float_tensors(synth):
    """kokoro 0.9.4's KPipeline.load_voice accepts a pack only as a torch.FloatTensor (CPU float32): a pack
    moved to a GPU would be taken for a voice name and fail, so the packs stay on the CPU whatever the device."""
    import torch

    assert all(isinstance(p, torch.FloatTensor) for p in synth.voices.values())
    assert synth._pipeline("a").load_voice(synth.voices["af_heart"]) is synth.voices["af_heart"]


def test_same_seed_same_samples_other_seed_other_samples(synth):
    turns = speech.parse_script("Hello world. This is a test.")
    a = synth.synthesize(turns, ("af_heart", "am_michael"), 1.0, seed=11)
    b = synth.synthesize(turns, ("af_heart", "am_michael"), 1.0, seed=11)
    c = synth.synthesize(turns, ("af_heart", "am_michael"), 1.0, seed=12)
    assert len(a) == 1 and a[0].dtype == np.float32 and np.isfinite(a[0]).all()
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])  # Kokoro's vocoder draws noise: the seed is what fixes it
    assert 0 < np.abs(a[0]).max() <= speech.PEAK + 1e-6  # random weights are loud: scaled down, not clipped


def test_dialogue_tracks_alternate_each_silent_during_the_others_turns(synth):
    voices = ("af_heart", "bm_george")
    first = speech.parse_script("(s1) Good morning, how are you today?")
    both = speech.parse_script("(s1) Good morning, how are you today? (s2) Very well, thank you. (s1) Great.")
    one = synth.synthesize(first, voices, 1.0, seed=5)[0]
    s1, s2 = synth.synthesize(both, voices, 1.0, seed=5)
    n = len(one)  # the first turn is drawn first: the same samples as alone, up to the common peak gain
    assert len(s1) == len(s2) > n
    assert np.allclose(s1[:n] / np.abs(s1[:n]).max(), one / np.abs(one).max(), atol=1e-5)
    assert not s2[:n].any(), "speaker 2 speaks during speaker 1's turn"
    mid = s2[n:].nonzero()[0]
    assert len(mid) > 0
    end2 = n + mid[-1] + 1  # speaker 2's turn, then speaker 1 again
    assert not s1[n:end2].any() and s1[end2:].any() and not s2[end2:].any()


def test_speed_changes_the_length(synth):
    turns = speech.parse_script("The quick brown fox jumps over the lazy dog.")
    normal = synth.synthesize(turns, ("am_michael", "af_heart"), 1.0, seed=1)[0]
    fast = synth.synthesize(turns, ("am_michael", "af_heart"), 2.0, seed=1)[0]
    assert len(fast) < 0.75 * len(normal)


@pytest.mark.parametrize(("text", "voice"), [("¿Qué tal? Muy bien.", "ef_dora"), ("Bonjour à tous.", "ff_siwis"),
                                             ("नमस्ते दुनिया", "hf_alpha"), ("Ciao a tutti.", "im_nicola"),
                                             ("Olá, tudo bem?", "pm_alex"), ("Hello, mate.", "bm_lewis")])
def test_every_language_speaks_offline(synth, text, voice):
    (track,) = synth.synthesize(speech.script_turns(text, (voice, "am_michael")), (voice, "am_michael"))
    assert len(track) > 0.2 * speech.TTS_SAMPLE_RATE and np.abs(track).max() > 0


def test_nothing_speakable_is_refused(synth):
    # (An emoji is spoken by its name through espeak-ng: "slightly smiling face"; bare punctuation is not.)
    with pytest.raises(InputError, match=r"turn 2 \('\.\.\. - \.\.\.'\) has nothing that voice 'bm_george' "
                                         r"\(British English\) can speak"):
        synth.synthesize(speech.parse_script("(s1) Hi! (s2) ... - ..."), ("af_heart", "bm_george"))


# --------------------------------------------------------------------------- whole requests


@pytest.fixture(scope="module")
def pipe(tiny_weights_tts):
    from infinitetalk.pipeline import InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.from_pretrained(tiny_weights_tts, device="cpu")
    assert pipe.speech is not None and "tts" in pipe.load_timings
    return pipe


def _decoded_audio(path: Path) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le", "pipe:1"],
                          capture_output=True, check=True).stdout


def _text_request(portrait, text, seed=3, **extra):
    return GenerationRequest(image=portrait, text=text, width=64, height=64, steps=1, seed=seed, **extra)


@pytest.mark.slow
def test_same_seed_and_text_give_identical_frames_and_audio(pipe, portrait, tmp_path):
    runs = [pipe.generate(_text_request(portrait, "Hello, this is a test.", seed=s), tmp_path / f"{i}.mp4",
                          show_progress=False) for i, s in enumerate((3, 3, 4))]
    a, b, c = (Path(r.path) for r in runs)
    assert decode_frames(a) == decode_frames(b) and _decoded_audio(a) == _decoded_audio(b)
    assert _decoded_audio(a) != _decoded_audio(c)  # the seed also draws the speech


@pytest.mark.slow
def test_dialogue_request_animates_two_speakers_for_the_speech_length(pipe, portrait, tmp_path, caplog):
    text = "(s1) Hi there, how are you? (s2) Fine, thanks. And you?"
    req = _text_request(portrait, text, voice="af_bella", voice_2="am_adam", speech_speed=1.2)
    tracks = pipe.speech.synthesize(req.turns(), (req.voice, req.voice_2), 1.2, seed=req.seed)
    seconds = len(tracks[0]) / speech.TTS_SAMPLE_RATE
    caplog.set_level("INFO", logger="infinitetalk")
    result = pipe.generate(req, tmp_path / "dialogue.mp4", show_progress=False)
    assert "InfiniteTalk 'multi' weights active" in caplog.text
    info = ffprobe_streams(result.path)
    assert info["audio"] is not None and info["audio"]["sample_rate"] == speech.TTS_SAMPLE_RATE
    assert abs(info["video"]["nb_frames"] / FPS - seconds) <= 1 / FPS, (info, seconds)
    assert abs(info["audio"]["duration"] - seconds) <= 1 / FPS


def test_a_pipeline_without_the_tts_weights_refuses_text_clearly(tiny_weights, portrait, tmp_path):
    from infinitetalk.pipeline import InfiniteTalkPipeline

    bare = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu")
    assert bare.speech is None
    with pytest.raises(InputError, match=r"text input is not available here: the text-to-speech weights "
                                         r"\(Kokoro-82M/, en_core_web_sm/\) are not installed; give audio instead"):
        bare.generate(_text_request(portrait, "Hello"), tmp_path / "x.mp4", show_progress=False)
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_cli_text_one_speaker_and_dialogue(tiny_weights_tts, portrait, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    script = tmp_path / "dialogue.txt"
    script.write_text("(s1) Good morning!\n(s2) Good morning to you.\n", encoding="utf-8")
    for name, extra in (("one", ["--text", "Hello from the command line.", "--voice", "bf_emma"]),
                        ("two", ["--text-file", str(script), "--voice", "af_sky", "--voice2", "bm_daniel",
                                 "--bbox", "0,0,512,256", "--bbox", "0,256,512,512"])):
        out = tmp_path / f"{name}.mp4"
        proc = subprocess.run(
            [sys.executable, "-m", "infinitetalk", "--image", str(portrait), *extra, "--out", str(out),
             "--weights", str(tiny_weights_tts), "--width", "64", "--height", "64", "--steps", "1", "--seed", "9",
             "--device", "cpu", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        info = ffprobe_streams(out)
        assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
        assert abs(info["audio"]["duration"] - info["video"]["nb_frames"] / FPS) <= 1 / FPS
        assert ("'multi' weights active" in proc.stderr) == (name == "two")


def test_cli_refuses_text_and_audio_together_and_bad_text_before_loading(tmp_path, capsys):
    from infinitetalk import cli

    with pytest.raises(SystemExit):
        cli.main(["--image", "p.png", "--audio", "a.wav", "--text", "Hi", "--out", str(tmp_path / "o.mp4")])
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["--image", "p.png", "--text", "Привет", "--out", str(tmp_path / "o.mp4")]) == 2
    assert "Cyrillic letters" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00broken")
    assert cli.main(["--image", "p.png", "--text-file", str(bad), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "--text-file cannot be read as UTF-8 text" in capsys.readouterr().err


def test_missing_tts_packages_disable_only_text_unless_required(tiny_weights_tts, monkeypatch, caplog):
    """Weights present but kokoro/misaki/spacy not importable: a server (auto) starts without text input and
    says why; a pipeline asked for text to speech (the CLI's --text) fails."""
    from infinitetalk.pipeline import InfiniteTalkPipeline

    def no_kokoro(*_a, **_k):
        raise ModuleNotFoundError("No module named 'kokoro'")

    monkeypatch.setattr(speech.Speech, "from_pretrained", no_kokoro)
    caplog.set_level("WARNING", logger="infinitetalk")
    assert InfiniteTalkPipeline.from_pretrained(tiny_weights_tts, device="cpu").speech is None
    assert "text input disabled: No module named 'kokoro'" in caplog.text
    with pytest.raises(ModuleNotFoundError):
        InfiniteTalkPipeline.from_pretrained(tiny_weights_tts, device="cpu", text_to_speech=True)
    assert InfiniteTalkPipeline.from_pretrained(tiny_weights_tts, device="cpu", text_to_speech=False).speech is None
