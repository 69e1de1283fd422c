"""Cog predictor for InfiniteTalk: a portrait (or a video to dub) + speech -> lip-synced MP4.

A thin adapter: every model and algorithm lives in the ``infinitetalk`` package, and everything a
service does around it (input validation and mapping, seed, progress metrics, the per-run folder
and its clean-up) in ``infinitetalk/service.py``, shared with the RunPod worker. This file declares
the Cog inputs, keeps the last output's folder until the next prediction (Cog uploads the file after
run() returns) and, when a bucket is configured, also uploads the MP4 and logs its URL.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

from cog import BaseRunner, Input, Path

from infinitetalk import service
from infinitetalk.errors import InputError
from infinitetalk.pipeline import GenerationError
from infinitetalk.service import MAX_SEED, MAX_VIDEO_SECONDS, parse_box, quality_to_crf  # noqa: F401  (public names)

# `cog build` reads the inputs with a static parser: it resolves only literals and module-level
# literal assignments, and silently drops anything else (an imported default would make the input
# required; a computed ge/le would vanish). So every Input() below uses literals; tests check
# that they match infinitetalk.service.INPUTS (the rules every front end validates with).
#: = infinitetalk.pipeline.DEFAULT_PROMPT (a literal here for the static schema parser).
DEFAULT_PROMPT = "A person is talking naturally, looking at the camera."
#: = infinitetalk.speech.VOICES (a literal here for the static schema parser): the choices of voice and voice_2.
VOICES = ["af_heart", "af_alloy", "af_aoede", "af_bella", "af_jessica", "af_kore", "af_nicole", "af_nova",
          "af_river", "af_sarah", "af_sky", "am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam", "am_michael",
          "am_onyx", "am_puck", "am_santa", "bf_alice", "bf_emma", "bf_isabella", "bf_lily", "bm_daniel",
          "bm_fable", "bm_george", "bm_lewis", "ef_dora", "em_alex", "em_santa", "ff_siwis", "hf_alpha", "hf_beta",
          "hm_omega", "hm_psi", "if_sara", "im_nicola", "pf_dora", "pm_alex", "pm_santa"]


# cog 0.23 (coglet) turns an exception raised by run() (a generator: the output is a list of files) into
# the prediction's error string as "Prediction failed: Generator iteration error: <type name>: <message>":
# both prefixes are coglet's (the Display of its PredictionError, its generator driver) and the type name
# is the exception class's __qualname__ (PyO3's Display of a PyErr). Only the type name is ours: a user's
# mistake reads "... invalid input: width and height must be given together" rather than
# "... InputError: ...". The classes stay InputError / GenerationError.
class InvalidInput(InputError):
    """An input the prediction refuses; shown by cog as ``invalid input: <message>``."""


class CannotGenerate(GenerationError):
    """A failure that is not the input's (e.g. out of GPU memory); shown by cog as ``cannot generate: <message>``."""


InvalidInput.__qualname__ = "invalid input"
CannotGenerate.__qualname__ = "cannot generate"


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load every model once (GPU when present, else CPU); fetch the weights first if absent.

        Every ``INFINITETALK_*`` setting is read and checked first (``infinitetalk/settings.py``): a
        bad or unknown one fails here with one line naming it, before any weight is read or fetched.
        With ``INFINITETALK_OUTPUT_BUCKET`` set, outputs are also uploaded to that S3-compatible
        bucket (``infinitetalk/storage.py``), which is checked here too, before the models load.
        """
        from infinitetalk.settings import Settings
        from infinitetalk.storage import open_storage

        settings = Settings.from_env()
        service.configure_logging()
        self.storage = open_storage(settings.storage, check=True)
        self.pipe = service.load_pipeline(settings, log=print)
        self._last_workdir: Optional[Path] = None

    def run(
        self,
        image: Path = Input(
            description="Reference: a portrait image (PNG, JPEG, WebP, ...) or a video to dub (MP4, MOV, WebM, ...). "
            "A video is followed frame by frame; an image is animated. Limits: at most 67108864 pixels "
            "(8192x8192) and at least 64 pixels a side; animated images use their first frame; a video at most "
            "3600 s.",
            accept="image/*,video/*",
        ),
        audio: Optional[Path] = Input(
            default=None,
            description="Speech of speaker 1 (WAV, MP3, M4A, FLAC, OGG, or a video with sound); or give text instead. "
            "The video is as long as the audio (see max_duration; at most 600 s). Any sample rate and channel "
            "count, silence included; at least 40 ms; NaN/infinite samples are rejected.",
            accept="audio/*,video/*",
        ),
        audio_2: Optional[Path] = Input(
            default=None,
            description="Optional speech of speaker 2: makes a two-person conversation with the multi-speaker weights. "
            "Same formats and limits as audio.",
            accept="audio/*,video/*",
        ),
        text: Optional[str] = Input(
            default=None,
            description="Words to speak instead of audio (Kokoro-82M text to speech; the speech is also the "
            "soundtrack). A dialogue of two speakers tags each turn: '(s1) Hello! (s2) Hi, how are you?'; each "
            "turn is spoken in its speaker's voice while the other is silent. At most 5000 characters; the "
            "language is the voice's.",
        ),
        voice: str = Input(
            default="af_heart",
            choices=VOICES,
            description="Voice of text (of speaker 1 in a dialogue). The first letter is the language: a American "
            "English, b British English, e Spanish, f French, h Hindi, i Italian, p Brazilian Portuguese; the second "
            "f/m female/male.",
        ),
        voice_2: str = Input(
            default="am_michael",
            choices=VOICES,
            description="Voice of speaker 2 in a text dialogue ((s2) turns); same list as voice.",
        ),
        speech_speed: float = Input(
            default=1.0, ge=0.5, le=2.0,
            description="Speaking rate of text: 1 is natural, 0.5 half as fast, 2 twice as fast.",
        ),
        audio_mode: str = Input(
            default="para",
            choices=["para", "add"],
            description="Two speakers only: 'para' plays both tracks at the same time; "
            "'add' plays speaker 1, then speaker 2.",
        ),
        box_1: Optional[str] = Input(
            default=None,
            description="Two speakers only: region of speaker 1 as 'top,left,bottom,right' in pixels of the image "
            "(e.g. '40,10,300,250'), inside the image. Give box_1 and box_2 together; empty: left and right halves.",
        ),
        box_2: Optional[str] = Input(
            default=None,
            description="Two speakers only: region of speaker 2 as 'top,left,bottom,right' in pixels of the image, "
            "inside the image.",
        ),
        prompt: str = Input(default=DEFAULT_PROMPT, description="What the video shows (scene, person, motion). "
                         "Longer than 512 tokens: truncated (noted in the logs)."),
        negative_prompt: Optional[str] = Input(
            default=None,
            description="What to avoid. Empty: the official Wan negative prompt.",
        ),
        resolution: str = Input(
            default="480p",
            choices=["480p", "720p"],
            description="Output size class; the exact size is the bucket nearest the image's aspect ratio "
            "(480p: about 640x640 pixels in area, 720p: about 960x960).",
        ),
        width: Optional[int] = Input(
            default=None, ge=64, le=2048,
            description="Explicit output width (multiple of 16); overrides the resolution bucket. Give with height.",
        ),
        height: Optional[int] = Input(
            default=None, ge=64, le=2048,
            description="Explicit output height (multiple of 16); overrides the resolution bucket. Give with width.",
        ),
        max_duration: Optional[float] = Input(
            default=None, ge=0.04, le=600.0,
            description="Longest video in seconds; empty: the whole audio (at most 600 s).",
        ),
        turbo: bool = Input(
            default=False,
            description="Turbo: the lightx2v step/CFG-distilled LoRA, 4 steps x 2 forwards instead of 40 x 3 "
            "(13x faster per chunk as served at 480p, slightly less motion detail). Sets the defaults of steps, "
            "guidance and shift.",
        ),
        fast: bool = Input(
            default=False,
            description="Fast: FP8 matrix products and 8-bit self-attention (SageAttention 2) on Hopper GPUs, with "
            "turbo or exact; about 1.4x faster per forward at 480p, approximate (3.6% output difference on random "
            "weights). Refused where the GPU cannot run it. The first fast request compiles its graphs.",
        ),
        steps: Optional[int] = Input(
            default=None, ge=1, le=100,
            description="Denoising steps per 81-frame chunk; empty: 40 (turbo: 4).",
        ),
        text_guidance: Optional[float] = Input(
            default=None, ge=0.0, le=20.0,
            description="Prompt guidance scale; empty: 5 (turbo: 1). At 1 each step needs 2 forwards instead of 3.",
        ),
        audio_guidance: Optional[float] = Input(
            default=None, ge=0.0, le=20.0,
            description="Audio guidance scale (lip-sync strength); empty: 4 (turbo: 2).",
        ),
        shift: Optional[float] = Input(
            default=None, ge=0.1, le=50.0,
            description="Noise schedule shift; empty: 7 at 480p, 11 at 720p (turbo: 2).",
        ),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295,
            description="Random seed for a reproducible result; empty: random (the seed used is in the logs).",
        ),
        color_correction: float = Input(
            default=1.0, ge=0.0, le=1.0,
            description="How strongly each chunk's colours are matched to the reference (0: off).",
        ),
        apg: bool = Input(default=False, description="Adaptive projected guidance: fewer artefacts at high guidance."),
        step_cache: float = Input(
            default=0.0, ge=0.0, le=1.0,
            description="Step cache threshold (TeaCache rule, per guidance branch): skip the transformer on steps "
            "whose conditioning barely changed. 0 = off (exact); 0.2-0.5 is faster and approximate. "
            "Useful with 40 steps, little with turbo's 4.",
        ),
        quality: int = Input(
            default=8, ge=1, le=10,
            description="Output video quality 1-10, higher is better and bigger: H.264 CRF = 40 - 3 x quality "
            "(8: CRF 16, 10: CRF 10).",
        ),
        preview: bool = Input(
            default=False,
            description="Also output a playable MP4 of the video so far after every chunk (about every 3 s of "
            "video), while the rest is generated. The output is a list of files either way: its last item is "
            "the complete video (the only item without preview).",
        ),
    ) -> Iterator[Path]:
        """Generate one lip-synced MP4: the output's last file (before it, with preview, the video so far)."""
        inputs = {name: value for name, value in locals().items() if name in service.INPUTS}
        self._cleanup_previous()
        # Registered before generating, so a cancel that lands after generate() returns still gets it removed.
        self._last_workdir = workdir = service.new_workdir()
        if preview:
            job = yield from self._run_with_previews(inputs, workdir)
        else:
            job = self._run_job(inputs, workdir, on_metric=lambda k, v: self.record_metric(k, v))
        if self.storage is not None:
            # Cog's output type stays a file (Replicate uploads it); the bucket URL goes to the logs and metrics.
            upload = self.storage.upload(job.path)  # key: <prefix><random id>/<sha256[:16]>.mp4
            self.record_metric("output_url", upload.url)
            print(f"output_url: {upload.url}", flush=True)
        yield Path(job.path)

    def _run_job(self, inputs, workdir, **kwargs):
        try:
            return service.run_job(self.pipe, inputs, workdir, **kwargs)
        except InputError as exc:
            raise InvalidInput(str(exc)) from None
        except GenerationError as exc:
            raise CannotGenerate(str(exc)) from exc

    def _run_with_previews(self, inputs, workdir):
        """Generate on a thread and yield each preview as it is written (cog uploads it meanwhile); metrics
        are recorded here, on the prediction's thread. Returns the job. A cancel (or any exception thrown
        into this generator) stops the generation at its next step and waits for it to clean up."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                job = self._run_job(inputs, workdir, should_stop=stop.is_set,
                                    on_metric=lambda k, v: events.put(("metric", (k, v))),
                                    on_preview=lambda path, seconds: events.put(("preview", path)))
                events.put(("done", job))
            except BaseException as exc:  # noqa: BLE001 (re-raised on the prediction's thread)
                events.put(("error", exc))

        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = events.get()
                if kind == "metric":
                    self.record_metric(*value)
                elif kind == "preview":
                    yield Path(value)
                elif kind == "error":
                    raise value
                else:
                    return value
        finally:
            stop.set()
            thread.join()

    def _cleanup_previous(self) -> None:
        """Remove the previous prediction's folder: its MP4 has been uploaded by now."""
        service.remove_workdir(getattr(self, "_last_workdir", None))
        self._last_workdir = None
