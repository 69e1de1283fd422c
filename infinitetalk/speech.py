"""Text input: speech synthesised per speaker with Kokoro-82M, as the official generation script does.

A script is plain text for one speaker, or a dialogue whose turns are tagged ``(s1) ...`` and
``(s2) ...`` (the official format). Each turn is spoken by its speaker's voice while the other
speaker's track stays silent for as long, so the two tracks alternate and the two-person model
animates both (the official ``process_tts_multi``). The tracks are written as 24 kHz WAV files and
take the place of the ``audio`` / ``audio_2`` files: the pipeline resamples them to 16 kHz for the
audio encoder and mixes them into the output's soundtrack like any speech it is given.

Two halves:

* :func:`parse_script` and :func:`check_language` (pure Python, no torch): what the text must be,
  beyond the rule table's (``infinitetalk/request.py``: its type, the voices' list, the speed's range),
  checked before anything heavy happens;
* :class:`Speech`: the synthesiser (the ``kokoro`` package's ``KModel`` and ``KPipeline``; the
  ``misaki`` grapheme-to-phoneme converters) loaded once with the pipeline from
  ``weights/Kokoro-82M`` and ``weights/en_core_web_sm`` (see ``weights/README.md``).

Languages: Kokoro's voice names start with their language's letter. English (``a``, ``b``) uses
misaki's English G2P (its lexicons and a spaCy tagger, with espeak-ng for unknown words); Spanish,
French, Hindi, Italian and Brazilian Portuguese use espeak-ng through misaki (the ``espeakng-loader``
package brings the library and its data). Japanese and Mandarin voices need ``misaki[ja]`` (plus
a dictionary download) and ``misaki[zh]``, which the image does not install: they are not offered.
"""

from __future__ import annotations

import json
import logging
import re
import time
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

logger = logging.getLogger(__name__)

#: Folders in the weights folder (``weights/README.md``).
KOKORO_DIR = "Kokoro-82M"
SPACY_DIR = "en_core_web_sm"
KOKORO_CONFIG = "config.json"
KOKORO_FILE = "kokoro-v1_0.pth"
#: Kokoro's output rate.
TTS_SAMPLE_RATE = 24000
#: Longest accepted text, in characters (about 5-6 minutes of speech at speed 1).
MAX_TEXT_CHARS = 5000
SPEED_RANGE = (0.5, 2.0)
#: Highest sample value written; louder synthesis (rare with the real weights) is scaled down, not clipped.
PEAK = 0.99

#: Language letter -> (name, espeak-ng language or None for misaki's English G2P).
LANGUAGES: dict[str, tuple[str, str | None]] = {
    "a": ("American English", None),
    "b": ("British English", None),
    "e": ("Spanish", "es"),
    "f": ("French", "fr-fr"),
    "h": ("Hindi", "hi"),
    "i": ("Italian", "it"),
    "p": ("Brazilian Portuguese", "pt-br"),
}
#: Letters each language's text may be written in (Unicode script names, as the first word of a
#: character's name); other letters are refused as a language the voice does not speak.
_SCRIPTS = {code: ("LATIN",) for code in LANGUAGES} | {"h": ("DEVANAGARI", "LATIN")}

#: Kokoro-82M v1.0's voices in the languages above (the first letter is the language, the second
#: f/m female/male). Japanese (j*) and Mandarin (z*) voices are left out: see the module docstring.
VOICES: tuple[str, ...] = (
    "af_heart", "af_alloy", "af_aoede", "af_bella", "af_jessica", "af_kore", "af_nicole", "af_nova",
    "af_river", "af_sarah", "af_sky",
    "am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam", "am_michael", "am_onyx", "am_puck", "am_santa",
    "bf_alice", "bf_emma", "bf_isabella", "bf_lily", "bm_daniel", "bm_fable", "bm_george", "bm_lewis",
    "ef_dora", "em_alex", "em_santa",
    "ff_siwis",
    "hf_alpha", "hf_beta", "hm_omega", "hm_psi",
    "if_sara", "im_nicola",
    "pf_dora", "pm_alex", "pm_santa",
)
#: Defaults: Kokoro's best-graded female and male American voices (its VOICES.md grades af_heart A,
#: am_michael C+; the official two-person example uses am_adam, graded F+).
DEFAULT_VOICE = "af_heart"
DEFAULT_VOICE_2 = "am_michael"

_TAG = re.compile(r"\(\s*[sS]\s*(\d+)\s*\)")
_ALLOWED_CONTROLS = "\n\r\t"


@dataclass(frozen=True)
class Turn:
    """One stretch of speech: ``speaker`` 1 or 2 and what they say."""

    speaker: int
    text: str


def language_of(voice: str) -> str:
    """``af_heart`` -> ``American English``."""
    return LANGUAGES[voice[0]][0]


def _check_characters(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("text is not valid Unicode (it has an unpaired surrogate code point)") from None
    for i, ch in enumerate(text):
        if unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS:
            raise InputError(f"text has a control character U+{ord(ch):04X} at position {i}; "
                             "only letters, punctuation, spaces, tabs and line breaks are allowed")


def parse_script(text: object) -> list[Turn]:
    """The turns of ``text``: one turn of speaker 1 for plain text; for a dialogue (any ``(s1)`` /
    ``(s2)`` tag) one turn per tag, in order. Raises :class:`InputError` for text that is not a string,
    empty or only whitespace, longer than :data:`MAX_TEXT_CHARS`, with control characters, with words
    before the first tag, with a tag other than s1/s2, or with an empty turn."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {text!r}")
    _check_characters(text)
    stripped = text.strip()
    if not stripped:
        raise InputError("text is empty: give the words to speak (or an audio file instead)")
    if len(stripped) > MAX_TEXT_CHARS:
        raise InputError(f"text is {len(stripped)} characters long; the maximum is {MAX_TEXT_CHARS}")
    tags = list(_TAG.finditer(stripped))
    if not tags:
        return [Turn(1, stripped)]
    if stripped[:tags[0].start()].strip():
        raise InputError("text is a dialogue but does not start with a speaker tag: begin every turn with "
                         f"(s1) or (s2), got {stripped[:40]!r}")
    turns = []
    for n, tag in enumerate(tags):
        speaker = int(tag.group(1))
        if speaker not in (1, 2):
            raise InputError(f"text has the tag {tag.group(0)!r}; a dialogue has two speakers, (s1) and (s2)")
        end = tags[n + 1].start() if n + 1 < len(tags) else len(stripped)
        words = stripped[tag.end():end].strip()
        if not words:
            raise InputError(f"text: turn {n + 1} ({tag.group(0)}) has no words")
        turns.append(Turn(speaker, words))
    return turns


def speakers_of(turns: Sequence[Turn]) -> int:
    """2 when speaker 2 has a turn, else 1."""
    return 2 if any(t.speaker == 2 for t in turns) else 1


def _script_of(ch: str) -> str:
    return unicodedata.name(ch, "UNKNOWN").split(" ")[0]


def check_language(turns: Sequence[Turn], voices: Sequence[str]) -> None:
    """Every letter of each turn is written in a script its speaker's voice speaks (``voices[0]`` for
    speaker 1, ``voices[1]`` for speaker 2): Cyrillic text for an English voice, say, is refused with
    the languages there are."""
    for n, turn in enumerate(turns, start=1):
        voice = voices[turn.speaker - 1]
        allowed = _SCRIPTS[voice[0]]
        foreign = [ch for ch in turn.text if ch.isalpha() and _script_of(ch) not in allowed]
        if foreign:
            script = _script_of(foreign[0]).title()
            where = f"turn {n}" if len(turns) > 1 else "text"
            raise InputError(
                f"{where} has {script} letters ({''.join(foreign[:12])!r}), which voice {voice!r} "
                f"({language_of(voice)}) cannot speak; the voices speak "
                + ", ".join(name for name, _ in LANGUAGES.values()))


def script_turns(text: object, voices: Sequence[str]) -> list[Turn]:
    """The turns of ``text`` (:func:`parse_script`), each in a script its voice speaks (:func:`check_language`);
    ``voices`` (speaker 1's, speaker 2's) are names of :data:`VOICES`, as the rule table checks them."""
    turns = parse_script(text)
    check_language(turns, voices)
    return turns


# ----------------------------------------------------------------------------------------------
# The synthesiser
# ----------------------------------------------------------------------------------------------


#: The files of the Kokoro folder (relative paths), as the download fetches them.
KOKORO_FILES = (KOKORO_CONFIG, KOKORO_FILE, *(f"voices/{v}.pt" for v in VOICES))
#: The spaCy components :class:`Speech` loads: required whatever config.cfg lists.
SPACY_NEEDED = ("tok2vec", "tagger")


def missing_kokoro_files(folder: Path) -> list[str]:
    """The :data:`KOKORO_FILES` that ``folder`` lacks."""
    return [f for f in KOKORO_FILES if not (folder / f).is_file()]


def spacy_pipeline(config: Path) -> list[str]:
    """The component names of ``pipeline = [...]`` in the ``[nlp]`` section of a spaCy ``config.cfg``
    (one JSON list on one line, as spaCy writes it); [] where the line cannot be read."""
    try:
        lines = config.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    section = ""
    for line in map(str.strip, lines):
        if line.startswith("["):
            section = line
        elif section == "[nlp]" and line.partition("=")[0].strip() == "pipeline":
            try:
                names = json.loads(line.partition("=")[2])
            except ValueError:
                return []
            return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    return []


def spacy_complete(folder: Path) -> bool:
    """config.cfg, meta.json and a folder for every component config.cfg's pipeline names (and for
    :data:`SPACY_NEEDED`, also where that line cannot be read)."""
    if not ((folder / "config.cfg").is_file() and (folder / "meta.json").is_file()):
        return False
    return all((folder / c).is_dir() for c in {*SPACY_NEEDED, *spacy_pipeline(folder / "config.cfg")})


def tts_paths(weights_dir: str | Path) -> tuple[Path, Path] | None:
    """``(Kokoro folder, spaCy folder)`` in a weights folder, or None where either is incomplete: the
    same rule as the download's (:func:`infinitetalk.download.plan_weights` fetches what this lacks)."""
    kokoro, nlp = Path(weights_dir) / KOKORO_DIR, Path(weights_dir) / SPACY_DIR
    return (kokoro, nlp) if not missing_kokoro_files(kokoro) and spacy_complete(nlp) else None


class Speech:
    """Kokoro-82M with its voices and one grapheme-to-phoneme converter per language, loaded once.

    :meth:`synthesize` turns the turns of a script into one 24 kHz track per speaker; the noise of
    Kokoro's vocoder is drawn from ``seed``, so one seed and one text give the same samples.
    """

    def __init__(self, model, voices: dict, nlp, device):
        self.model = model
        self.voices = voices  # name -> style pack [510, 1, 256], float32 on the CPU
        self.nlp = nlp
        self.device = device
        self._pipelines: dict[str, object] = {}

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, device="cpu") -> Speech:
        """Load from ``weights_dir/Kokoro-82M`` and ``weights_dir/en_core_web_sm``."""
        import spacy
        import torch
        from kokoro import KModel

        paths = tts_paths(weights_dir)
        if paths is None:
            raise FileNotFoundError(f"the text-to-speech weights ({KOKORO_DIR}/, {SPACY_DIR}/) are not complete "
                                    f"in {weights_dir}")
        kokoro, nlp_dir = paths
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kokoro's weight_norm deprecation and one-layer LSTM dropout notes
            model = KModel(repo_id="hexgrad/Kokoro-82M", config=str(kokoro / KOKORO_CONFIG),
                           model=str(kokoro / KOKORO_FILE)).to(device).eval()
        # On the CPU: KPipeline.load_voice takes a pack as given only when it is a torch.FloatTensor (a CPU
        # float tensor; a CUDA one is taken for a voice name and fails), and moves it to the model's device.
        voices = {v: torch.load(kokoro / "voices" / f"{v}.pt", map_location="cpu", weights_only=True).float()
                  for v in VOICES}
        nlp = spacy.load(nlp_dir, enable=["tok2vec", "tagger"])
        speech = cls(model, voices, nlp, torch.device(device))
        for lang in LANGUAGES:  # every G2P now (English reads its lexicons, 0.3 s), not in a request
            speech._pipeline(lang)
        return speech

    def _pipeline(self, lang: str):
        """Kokoro's ``KPipeline`` for one language letter, sharing the one model."""
        if lang not in self._pipelines:
            self._pipelines[lang] = _make_pipeline(lang, self.model, self.nlp)
        return self._pipelines[lang]

    def _speak(self, turn_number: int, text: str, voice: str, speed: float):
        import torch

        pipe = self._pipeline(voice[0])
        pieces = [r.audio for r in pipe(text, voice=self.voices[voice], speed=speed, split_pattern=r"\n+")
                  if r.audio is not None]
        if not pieces:
            raise InputError(f"turn {turn_number} ({text[:40]!r}) has nothing that voice {voice!r} "
                             f"({language_of(voice)}) can speak")
        return torch.cat([p.reshape(-1).float().cpu() for p in pieces])

    def synthesize(self, turns: Sequence[Turn], voices: Sequence[str], speed: float = 1.0,
                   seed: int = 0) -> list:
        """One float32 numpy track at :data:`TTS_SAMPLE_RATE` per speaker (one, or two of equal length
        where speaker 2 has a turn): each turn in its speaker's voice, the other track silent meanwhile."""
        import numpy as np
        import torch

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(int(seed))
            spoken = [(t.speaker, self._speak(n, t.text, voices[t.speaker - 1], speed).numpy())
                      for n, t in enumerate(turns, start=1)]
        count = speakers_of(turns)
        tracks = [np.concatenate([wav if who == speaker else np.zeros_like(wav) for who, wav in spoken])
                  for speaker in range(1, count + 1)]
        peak = max(float(np.abs(t).max()) for t in tracks)
        gain = PEAK / peak if peak > PEAK else 1.0  # one gain for both tracks: their balance is kept
        return [(t * gain).astype(np.float32) for t in tracks]

    def write_tracks(self, turns: Sequence[Turn], voices: Sequence[str], speed: float, seed: int,
                     folder: str | Path) -> list[Path]:
        """:meth:`synthesize`, written as ``speech_1.wav`` (and ``speech_2.wav``) in ``folder``."""
        import soundfile as sf

        t0 = time.perf_counter()
        tracks = self.synthesize(turns, voices, speed, seed)
        logger.info("speech: %d turn(s), %d characters, %.2f s of audio synthesised in %.2f s", len(turns),
                    sum(len(t.text) for t in turns), len(tracks[0]) / TTS_SAMPLE_RATE, time.perf_counter() - t0)
        paths = []
        for i, track in enumerate(tracks, start=1):
            path = Path(folder) / f"speech_{i}.wav"
            sf.write(path, track, TTS_SAMPLE_RATE, subtype="FLOAT")
            paths.append(path)
        return paths


def _make_pipeline(lang: str, model, nlp):
    """A ``kokoro.KPipeline`` for ``lang`` around ``model``, with its G2P built here: the English one
    from the spaCy pipeline of the weights folder (misaki's own constructor would download
    ``en_core_web_sm`` as a package), the others with espeak-ng. Pinned to kokoro/misaki 0.9.4:
    ``tests/test_speech.py`` runs the real classes on tiny weights."""
    from kokoro import KPipeline
    from misaki import en, espeak

    class _EnglishG2P(en.G2P):
        def __init__(self, british: bool):  # en.G2P.__init__ without its spacy.load by package name
            self.version, self.british, self.nlp = None, british, nlp
            self.lexicon = en.Lexicon(british)
            self.fallback = espeak.EspeakFallback(british=british)
            self.unk = ""

    class _Pipeline(KPipeline):
        def __init__(self):  # KPipeline.__init__ without loading a model or a G2P of its own
            self.repo_id, self.lang_code, self.model, self.voices = "hexgrad/Kokoro-82M", lang, model, {}
            espeak_language = LANGUAGES[lang][1]
            self.g2p = _EnglishG2P(lang == "b") if espeak_language is None else espeak.EspeakG2P(
                language=espeak_language)

    return _Pipeline()


__all__ = ["DEFAULT_VOICE", "DEFAULT_VOICE_2", "KOKORO_DIR", "LANGUAGES", "MAX_TEXT_CHARS", "SPACY_DIR",
           "SPEED_RANGE", "TTS_SAMPLE_RATE", "VOICES", "KOKORO_FILES", "SPACY_NEEDED", "Speech", "Turn",
           "check_language", "language_of", "missing_kokoro_files", "parse_script", "script_turns", "spacy_complete",
           "spacy_pipeline", "speakers_of", "tts_paths"]
