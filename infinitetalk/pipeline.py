"""The InfiniteTalk generation pipeline: image or video + speech -> lip-synced MP4 of any length.

The algorithm is the official one (``SPEC.md`` section 4): 81-frame chunks at 25 fps, each
later chunk conditioned on the last 9 decoded (colour-corrected) frames of the previous one
through 3 clean context latents; Euler flow matching with the shifted schedule; 3-NFE text +
audio CFG (or 2-NFE audio CFG when the text scale is 1); optional APG. What differs on purpose:
frames stream into one ffmpeg encoder chunk by chunk, from the video writer's own thread, so the
next chunk samples while the last one is encoded (its bounded queue keeps memory from growing
with length); there is no length cap unless asked, short audio works, V2V follows the source at
any fps, and text, CLIP and the first-frame condition are computed once per video where they do
not change.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import audio as audio_lib
from . import fast as fast_lib
from . import inputs
from . import speech as speech_lib
from .buckets import choose_bucket, masks_to_latent, resize_and_centercrop, speaker_masks
from .chunking import ChunkPlan, plan_chunks
from .color import match_and_blend_colors
from .compilation import compile_transformer
from .conditioning import (
    CLIP_MEAN,
    CLIP_STD,
    encode_image_clip,
    encode_prompt,
    first_frame_condition,
    frames_to_uint8,
    vae_channels_last,
    vae_decode,
    vae_encode,
)
from .distributed import check_token_split, enable_sequence_parallel, stop_together
from .errors import GenerationCancelled, InputError
from .lora import TurboLoRA
from .preview import HLSOutput, HLSWriter
from .request import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, GenerationRequest, choose_seed
from .sampler import APGState, ContextLatents, get_timesteps, make_guided_denoiser
from .speech import Speech
from .step_cache import StepCacheConfig, reset_step_cache, step_cache_stats

logger = logging.getLogger(__name__)

FPS = 25
FRAME_NUM = 81
MOTION_FRAMES = 9
LATENT_FRAMES = (FRAME_NUM - 1) // 4 + 1


# ----------------------------------------------------------------------------------------------
# Result / progress
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    path: Path
    seed: int
    num_frames: int
    fps: int
    width: int
    height: int
    num_chunks: int
    duration: float
    audio_duration: float
    timings: dict = field(default_factory=dict)


@dataclass
class ProgressEvent:
    """Reported after every denoising step; raise from the callback to cancel."""

    chunk: int
    num_chunks: int
    step: int
    num_steps: int
    frames_done: int
    total_frames: int


ProgressCallback = Callable[[ProgressEvent], None]


class GenerationError(RuntimeError):
    """A failure that is not the user's input (e.g. out of GPU memory); message is user-facing."""


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------


@dataclass
class WeightPaths:
    root: Path
    base: Path  # the Wan2.1-I2V-14B-480P-Diffusers folder
    single: Path | None
    multi: Path | None
    wav2vec: Path
    prepared: Path | None  # our prepared transformer folder (optional, faster start)
    turbo_lora: Path | None = None  # lightx2v step/CFG-distilled LoRA (optional)

    @classmethod
    def discover(cls, root: str | Path) -> WeightPaths:
        from .download import INFINITETALK_DIR, INFINITETALK_FILES, PREPARED_DIR, TURBO_DIR, WAN_DIR, WAV2VEC_DIR

        root = Path(root)
        base = root / WAN_DIR
        single, multi = (root / INFINITETALK_DIR / f for f in INFINITETALK_FILES)
        wav2vec = root / WAV2VEC_DIR
        prepared = root / PREPARED_DIR
        needed = (base / "vae", base / "text_encoder", base / "tokenizer", base / "image_encoder", wav2vec)
        missing = [str(p) for p in needed if not p.exists()]
        if not (base / "transformer").exists() and not prepared.exists():
            missing.append(str(base / "transformer"))
        if not single.exists() and not prepared.exists():
            missing.append(str(single))
        if missing:
            raise FileNotFoundError(
                "weights folder is incomplete; missing: " + ", ".join(missing)
                + " (run scripts/download_weights.py, see weights/README.md)")
        loras = sorted((root / TURBO_DIR).glob("*.safetensors")) if (root / TURBO_DIR).is_dir() else []
        return cls(root, base, single if single.exists() else None, multi if multi.exists() else None, wav2vec,
                   prepared if prepared.exists() else None, loras[0] if loras else None)


class InfiniteTalkPipeline:
    """Holds every model once; :meth:`generate` runs one request."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, image_encoder, audio_encoder, *,
                 device: torch.device, dtype: torch.dtype, clip_size: int = 224, clip_mean=CLIP_MEAN,
                 clip_std=CLIP_STD, multi_weights: Path | None = None, turbo: TurboLoRA | None = None,
                 speech: Speech | None = None):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.audio_encoder = audio_encoder
        self.device = device
        self.dtype = dtype
        self.clip_size, self.clip_mean, self.clip_std = clip_size, clip_mean, clip_std
        self.multi_weights = multi_weights
        self._vae_bf16 = None  # fast requests' decoder (``_decoder``)
        self._active_audio_set = "single"
        self._audio_sets: dict[str, dict[str, torch.Tensor]] = {}
        self._prompt_cache: dict[str, tuple[torch.Tensor, bool]] = {}
        self.turbo = turbo  # the distilled LoRA (switchable adapter, or fused into the weights)
        self.speech = speech  # text to speech (speech.py); None: text requests are refused
        self.fast: fast_lib.FastPreset | None = None  # the fast option; None: fast requests are refused, because:
        self.fast_unavailable: str | None = "it needs the compiled model on an NVIDIA Hopper GPU"
        self.parallel = None  # a ParallelContext once the sequence is split over several GPUs
        self.tmp_dir: str | None = None  # where generate() makes its temporary folder (None: the system's)
        self.step_cache_options: dict = {}  # extra StepCacheConfig fields (the benchmark's calibration)
        self.compiled = False  # the transformer's blocks are torch.compile'd (infinitetalk.compilation)

    @property
    def turbo_loaded(self) -> bool:
        """Turbo requests can be served (the LoRA is loaded)."""
        return self.turbo is not None

    @property
    def turbo_only(self) -> bool:
        """Only turbo requests can be served (the LoRA is fused into the weights)."""
        return self.turbo is not None and self.turbo.fused

    def enable_sequence_parallel(self, context) -> None:
        """Split the transformer's tokens over the ranks of ``context`` (:mod:`infinitetalk.parallel`);
        every rank then runs :meth:`generate` with the same request, rank 0 writes the video. Called
        again with a new group's context (the workers were restarted), the split moves to that group."""
        enable_sequence_parallel(self.transformer, context)
        self.parallel = context
        if self.fast is not None:
            self.fast.off()
        self.fast, self.fast_unavailable = None, fast_lib.SEVERAL_GPUS

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                        attention_backend: str | None = None, compile: bool = False,
                        turbo_lora: str | Path | None = None, fuse_turbo: bool = False,
                        memory_mode: str = "none", text_to_speech: bool | None = None) -> InfiniteTalkPipeline:
        """Load every component from a weights folder in the layout of ``weights/README.md``.

        ``text_to_speech``: load Kokoro for text requests; None (default) where its folders are complete,
        True requires them, False leaves it out."""
        import diffusers  # noqa: F401 - imported before the text-to-speech thread below starts, which imports
        import transformers  # noqa: F401 - transformers too (Kokoro's ALBERT): one thread initialises them

        paths = WeightPaths.discover(weights_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae_dtype = vae_dtype or torch.float32
        timings = {}
        with _MODEL_LOADING:
            pipe = cls._load_models(paths, device, dtype, vae_dtype, attention_backend, compile, turbo_lora,
                                    fuse_turbo, memory_mode, timings)
        pipe.load_timings = timings
        logger.info("loaded InfiniteTalk on %s (%s): %s", device, dtype,
                    ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        if text_to_speech or (text_to_speech is None and speech_lib.tts_paths(weights_dir) is not None):
            # A server's setup goes on to its warm-up (GPU work) while a thread loads Kokoro, spaCy and misaki
            # (seconds of CPU work); the first use of ``speech`` waits for it. Required (the CLI's --text): now.
            pool = ThreadPoolExecutor(1, thread_name_prefix="tts-load")
            pipe._speech_loading = pool.submit(_load_speech, weights_dir, device, bool(text_to_speech))
            pool.shutdown(wait=False)  # the thread ends with its one task
            if text_to_speech:
                pipe.speech  # noqa: B018 - waits, and raises what the load raised
        return pipe

    @property
    def speech(self) -> Speech | None:
        """Text to speech (speech.py); None: text requests are refused. Loaded on a thread after the
        models: this waits for that load once and records its seconds in ``load_timings["tts"]``."""
        if self._speech_loading is not None:
            loading, self._speech_loading = self._speech_loading, None
            self._speech, self.load_timings["tts"] = loading.result()
        return self._speech

    @speech.setter
    def speech(self, value: Speech | None) -> None:
        self._speech, self._speech_loading = value, None

    @classmethod
    def _load_models(cls, paths: WeightPaths, device, dtype, vae_dtype, attention_backend, compile, turbo_lora,
                     fuse_turbo, memory_mode, timings) -> InfiniteTalkPipeline:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, CLIPVisionModelWithProjection, UMT5EncoderModel

        from .weights import load_transformer, read_transformer_tensors

        t0 = time.perf_counter()
        sources = (paths.prepared, None) if paths.prepared is not None else (paths.base / "transformer", paths.single)
        transformer = load_transformer(*sources, device=device, dtype=dtype)
        timings["transformer"] = time.perf_counter() - t0
        if attention_backend:
            transformer.set_attention_backend(attention_backend)
        lora_path = Path(turbo_lora) if turbo_lora else paths.turbo_lora
        # Before memory modes and compile: the adapter layers are then quantised/offloaded/compiled with
        # the model (a hook added after compile would be ignored by the compiled graph). Fused: a
        # turbo-only server, the deltas are in the weights and cost nothing at run time.
        # Unquantised and resident (memory mode none), a switchable LoRA runs turbo merged into the weights
        # and reads the adapted weights again from their files for exact (infinitetalk/lora.py).
        merge_from = partial(read_transformer_tensors, *sources, device=str(device)) if memory_mode == "none" else None
        turbo = (TurboLoRA.load(transformer, lora_path, fuse=fuse_turbo, merge_from=merge_from)
                 if lora_path is not None else None)
        apply_memory_mode(transformer, memory_mode, device, dtype)
        compiled = compile and compile_transformer(transformer)
        no_fast = fast_lib.unavailable(device, compiled=bool(compiled), memory_mode=memory_mode, parallel=False)
        t0 = time.perf_counter()
        vae = AutoencoderKLWan.from_pretrained(paths.base / "vae", torch_dtype=vae_dtype).to(device).eval()
        if device.type == "cuda":
            vae_channels_last(vae)
        # In offload mode UMT5-XXL (11 GB) runs on the CPU: prompts are encoded once and cached.
        text_device = torch.device("cpu") if memory_mode == "offload" else device
        text_encoder = UMT5EncoderModel.from_pretrained(
            paths.base / "text_encoder", dtype=dtype if text_device.type == "cuda" else torch.float32
        ).to(text_device).eval()
        tokenizer = AutoTokenizer.from_pretrained(paths.base / "tokenizer")
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(paths.base / "image_encoder", dtype=dtype)
        image_encoder = image_encoder.to(device).eval()
        timings["encoders"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        audio_encoder = audio_lib.Wav2Vec2FeatureEncoder.from_pretrained(paths.wav2vec, device=device)
        timings["wav2vec2"] = time.perf_counter() - t0
        size, mean, std = _clip_preprocessing(paths.base / "image_processor" / "preprocessor_config.json")
        pipe = cls(transformer, vae, text_encoder, tokenizer, image_encoder, audio_encoder, device=device,
                   dtype=dtype, clip_size=size, clip_mean=mean, clip_std=std, multi_weights=paths.multi, turbo=turbo)
        pipe.compiled = bool(compiled)
        pipe.fast = fast_lib.FastPreset(transformer) if no_fast is None else None
        pipe.fast_unavailable = no_fast
        return pipe

    # ------------------------------------------------------------------ speaker checkpoints
    def _use_audio_set(self, name: str) -> None:
        """Swap the transformer's InfiniteTalk weights between the ``single`` and ``multi`` files.

        Both files share the Wan base; only their own keys (audio modules and any base overrides)
        are swapped, in place.
        """
        if name == self._active_audio_set:
            return
        if name == "multi" and self.multi_weights is None:
            raise InputError("two speakers need the InfiniteTalk 'multi' checkpoint, which is not installed")
        from safetensors.torch import load_file

        from .weights import convert_official_state_dict_partial

        if "multi" not in self._audio_sets:
            multi = convert_official_state_dict_partial(load_file(str(self.multi_weights)))
            self._check_turbo_overlap(multi)
            params = _parameters(self.transformer)
            self._audio_sets["single"] = {k: params[k].detach().to("cpu", copy=True) for k in multi}
            self._audio_sets["multi"] = multi
        params = _parameters(self.transformer)
        with torch.no_grad():
            for key, value in self._audio_sets[name].items():
                params[key].copy_(value.to(params[key].dtype))
        self._active_audio_set = name
        logger.info("InfiniteTalk '%s' weights active", name)

    def _check_turbo_overlap(self, keys) -> None:
        """The speaker checkpoints may only swap weights the turbo LoRA leaves alone: a swap would drop
        (fused) or desynchronise (adapter) the LoRA's delta of that weight."""
        if self.turbo is None:
            return
        changed = set(self.turbo.delta_parameters) | {f"{m}.{p}" for m in self.turbo.lora_modules
                                                      for p in ("weight", "bias")}
        overlap = sorted(changed & set(keys))
        if overlap:
            raise GenerationError(f"the 'multi' checkpoint overrides {len(overlap)} weight(s) the turbo LoRA "
                                  f"changes ({', '.join(overlap[:3])}); two speakers cannot be served with it")

    # ------------------------------------------------------------------ conditioning
    def _prompt_states(self, text: str) -> torch.Tensor:
        if text not in self._prompt_cache:
            if len(self._prompt_cache) > 16:
                self._prompt_cache.clear()
            states, truncated = encode_prompt(self.tokenizer, self.text_encoder, text,
                                              self.transformer.config.text_len, self.text_encoder.device)
            self._prompt_cache[text] = (states.to(self.device), truncated)
        states, truncated = self._prompt_cache[text]
        if truncated:
            logger.warning("prompt longer than %d tokens was truncated", self.transformer.config.text_len)
        return states.to(self.dtype)

    def _clip(self, frame: torch.Tensor) -> torch.Tensor:
        return encode_image_clip(self.image_encoder, frame.to(self.device), self.clip_size, self.clip_mean,
                                 self.clip_std).to(self.dtype)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, request: GenerationRequest, output_path: str | Path,
                 callback: ProgressCallback | None = None, show_progress: bool = True,
                 hls: HLSOutput | None = None) -> GenerationResult:
        """Run one request and write the MP4 to ``output_path``.

        ``hls``: also write a live HLS folder that grows by one segment per chunk (``preview.HLSOutput``;
        its ``on_segment`` hears of each); the MP4 is the same with or without it."""
        request = request.resolved()
        request.validate()
        try:
            with tempfile.TemporaryDirectory(prefix="infinitetalk-", dir=self.tmp_dir) as tmp:
                return self._generate(request, Path(output_path), Path(tmp), callback, show_progress, hls)
        except torch.OutOfMemoryError as exc:
            # The traceback's frames hold every tensor of the failed run: clear them so the memory goes
            # back to the allocator now, not whenever the caller (cog, a test) lets go of the exception.
            traceback.clear_frames(exc.__traceback__)
            self._release_memory()
            raise GenerationError(
                "out of GPU memory at this size; try resolution 480p, a smaller width/height or a memory mode"
            ) from exc
        finally:
            self._release_memory()

    def _release_memory(self) -> None:
        # Only the GPU needs this (tensors in reference cycles keep allocator blocks); on the CPU a full
        # collection costs 0.3-0.4 s per prediction for nothing.
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _generate(self, req: GenerationRequest, out_path: Path, tmp: Path, callback, show_progress,
                  hls: HLSOutput | None = None) -> GenerationResult:
        """Prepare the video once, then for every chunk: its inputs, the denoising loop, decode, write."""
        t_start = time.perf_counter()
        self._select_mode(req)
        job = self._prepare(req, tmp)
        progress = _Progress(self, callback, job, show_progress)
        motion_frames = None  # the previous chunk's last 9 frames (colour corrected), [1, 3, 9, H, W]
        try:
            with self._open_writer(out_path, job, hls) as writer, self._step_cache(req) as cache:
                for k in range(job.plan.num_chunks):
                    progress.chunk_started(k)
                    chunk = self._chunk_inputs(job, k, motion_frames)
                    cache.reset()
                    x0 = self._denoise(job, chunk, k, progress.on_step)
                    progress.sampled()
                    video = self._decode(job, x0)
                    # A copy, so the whole chunk (up to 0.9 GB at 960x960) is freed before the next one.
                    motion_frames = video[:, :, -MOTION_FRAMES:].clone()
                    self._emit(writer, job, k, video)
                    del chunk, x0, video
                    progress.chunk_done(cache)
                writer.close()
        finally:
            progress.close()
            job.close()
        return job.result(out_path, time.perf_counter() - t_start)

    # ------------------------------------------------------------------ stage 1: the video, once
    def _select_mode(self, req: GenerationRequest) -> None:
        """The weights for this request: exact or turbo (the distilled LoRA), one or two speakers (the
        InfiniteTalk checkpoint), bf16 or fast. The first two write the bf16 weights, so fast is off
        while they change; its FP8 copies are made again from the weights so changed."""
        if req.turbo and not self.turbo_loaded:
            raise InputError("turbo mode needs the distilled LoRA, which is not installed on this server")
        if not req.turbo and self.turbo_only:
            raise InputError("this server runs turbo mode only (the LoRA is fused into the weights)")
        if req.fast and self.fast is None:
            raise InputError(f"fast is not available on this server: {self.fast_unavailable}")
        audio_set = "single" if req.speakers == 1 else "multi"
        lora_switch = self.turbo is not None and not self.turbo.fused and self.turbo.enabled != req.turbo
        if self.fast is not None and (lora_switch or audio_set != self._active_audio_set):
            self.fast.off()
        if self.turbo is not None and not self.turbo.fused:
            self.turbo.set_enabled(req.turbo)
        self._use_audio_set(audio_set)
        if self.fast is not None:
            merged = self.turbo.merged if self.turbo is not None else None
            self.fast.set(req.fast, weights_state=(merged, audio_set))

    def _prepare(self, req: GenerationRequest, tmp: Path) -> _Job:
        """Everything fixed for the whole video: reference and size, audio features and the chunk
        plan, the seed, the speaker weights and masks, the text/CLIP/first-frame conditioning and the
        soundtrack. Input files are read (and refused) here, before any denoising."""
        timings: dict = {}
        seed = choose_seed(req.seed)
        if self.parallel is not None:
            seed = self.parallel.broadcast(seed)  # every rank draws the same noise (and speaks the same text)
        t0 = time.perf_counter()
        req = self._synthesize(req, seed, tmp)
        timings["speech"] = time.perf_counter() - t0
        _info, reader, first = inputs.load_reference(req.image, "image")  # limits and messages: inputs.py
        try:
            inputs.check_boxes(req.bboxes, *first.size)
            height, width = self._output_size(req, first.size)
            t0 = time.perf_counter()
            embeddings, audio_seconds, switch = self._audio_features(req)
            timings["audio"] = time.perf_counter() - t0
            plan = _plan(req, embeddings[-1].shape[0])
            ref_masks = self._speakers(req, first.size, (height, width))
            t0 = time.perf_counter()
            reference = _to_model_frame(first, (height, width))  # [3, H, W] in [-1, 1]
            clip, y = self._condition(reference)
            prompt = self._prompt_states(req.prompt)
            negative = self._prompt_states(req.negative_prompt if req.negative_prompt is not None
                                           else DEFAULT_NEGATIVE_PROMPT)
            timings["conditioning"] = time.perf_counter() - t0
            # The speech as given (rate, channels, level), timed as the model's 16 kHz track; on disk, not in the job.
            t0 = time.perf_counter()
            soundtrack = audio_lib.write_soundtrack(tmp / "soundtrack.wav", plan.final_frame_count / FPS, req.audio,
                                                    req.audio_2, req.audio_mode, switch)
            timings["soundtrack"] = time.perf_counter() - t0
        except BaseException:
            if reader is not None:
                reader.close()
            raise
        logger.info("generating %d frames (%.2f s) at %dx%d in %d chunk(s), seed %d", plan.final_frame_count,
                    plan.final_frame_count / FPS, width, height, plan.num_chunks, seed)
        return _Job(req, width, height, plan, seed, torch.Generator("cpu").manual_seed(seed),
                    get_timesteps(int(req.steps), req.shift), embeddings, torch.arange(embeddings[0].shape[0]),
                    reference, reader, clip, y, prompt, negative, ref_masks, soundtrack, audio_seconds,
                    timings=timings)

    def _synthesize(self, req: GenerationRequest, seed: int, tmp: Path) -> GenerationRequest:
        """A text request as an audio request: each speaker's synthesised track, written to ``tmp``,
        becomes its speech file (two alternating tracks, mixed as ``para``); the same seed speaks alike."""
        if req.text is None:
            return req
        if self.speech is None:
            raise InputError("text input is not available here: the text-to-speech weights "
                             f"({speech_lib.KOKORO_DIR}/, {speech_lib.SPACY_DIR}/) are not installed; give audio "
                             "instead, or fetch them with scripts/download_weights.py (weights/README.md)")
        tracks = self.speech.write_tracks(req.turns(), (req.voice, req.voice_2), req.speech_speed, seed, tmp)
        return replace(req, text=None, audio=tracks[0], audio_2=tracks[1] if len(tracks) > 1 else None,
                       audio_mode="para")

    def _output_size(self, req: GenerationRequest, source_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)``: the explicit size, or the official bucket of the source's aspect ratio."""
        src_w, src_h = source_size
        height, width = (int(req.height), int(req.width)) if req.width is not None else \
            choose_bucket(src_h, src_w, req.resolution)
        if self.parallel is not None:
            check_token_split(height, width, LATENT_FRAMES, self.parallel.world_size)
        return height, width

    def _audio_features(self, req: GenerationRequest) -> tuple[list[torch.Tensor], float, float | None]:
        """wav2vec2 features per speaker (``[T, layers, hidden]``, CPU float32), the seconds of the 16 kHz
        track they come from and, for ``add``, where speaker 2 starts in it (the soundtrack's switch point)."""
        wav1 = inputs.load_audio(req.audio, "audio")
        if req.speakers == 1:
            return [self.audio_encoder.encode(wav1)], len(wav1) / audio_lib.SAMPLE_RATE, None
        wav2 = inputs.load_audio(req.audio_2, "audio_2")
        w1, w2, mixed = audio_lib.combine_speakers(wav1, wav2, req.audio_mode)
        switch = len(wav1) / audio_lib.SAMPLE_RATE if req.audio_mode == "add" else None
        features = [self.audio_encoder.encode(w1), self.audio_encoder.encode(w2)]
        return features, len(mixed) / audio_lib.SAMPLE_RATE, switch

    def _speakers(self, req: GenerationRequest, source_size: tuple[int, int], size: tuple[int, int]):
        """For two speakers their masks at latent resolution (their checkpoint: ``_select_mode``)."""
        if req.speakers == 1:
            return None
        masks = speaker_masks(source_size[1], source_size[0], 2, req.bboxes)
        return masks_to_latent(masks, size, (size[0] // 8, size[1] // 8)).to(self.device)

    def _condition(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP states and the VAE first-frame condition of a reference frame ``[3, H, W]``."""
        y = first_frame_condition(self.vae, frame.to(self.device), FRAME_NUM).to(self.dtype)
        return self._clip(frame), y

    # ------------------------------------------------------------------ stage 2: one chunk's inputs
    def _chunk_inputs(self, job: _Job, k: int, motion_frames: torch.Tensor | None) -> _ChunkInputs:
        """What chunk ``k`` is conditioned on: the reference (V2V: the source frame at the chunk's
        time), the clean context latents (the reference for chunk 0, the previous chunk's last 9
        frames later), the audio windows of its 81 frames and its noise.

        The CPU work (noise, audio windows) and their copies come first: a copy to the GPU waits for
        the GPU's queue, so made after the context's encode was queued it would leave the GPU idle
        while the rest of the chunk is launched."""
        start = job.plan.starts[k]
        # The audio is end-padded (a mirrored tail) as the plan says; only the index grows, not the features.
        job.audio_index = audio_lib.pad_audio_end(job.audio_index, job.plan.pad_before[k])
        windows = torch.stack([audio_lib.gather_windows(e, start, FRAME_NUM, index=job.audio_index)
                               for e in job.embeddings])  # [P, 81, 5, layers, hidden]
        noise = torch.randn(16, LATENT_FRAMES, job.height // 8, job.width // 8, generator=job.generator)
        audio, noise = windows[None].to(self.device, self.dtype), noise.to(self.device)
        frame, clip, y = job.reference, job.clip, job.y
        if job.reader is not None and k > 0:
            frame = _to_model_frame(job.reader.frame_at(start / FPS), (job.height, job.width))
            clip, y = self._condition(frame)
        context = frame[None, :, None] if k == 0 else motion_frames
        motion = vae_encode(self.vae, context.to(self.device))[0].float()
        return _ChunkInputs(clip, y, motion, audio, noise)

    # ------------------------------------------------------------------ stage 3: denoise
    def _denoise(self, job: _Job, chunk: _ChunkInputs, k: int, on_step) -> torch.Tensor:
        """The chunk's Euler loop: guidance (CFG or APG) over the model's branches, the context
        latents kept clean and, after chunk 0, the official random-number replay."""
        req = job.req
        guided = make_guided_denoiser(self._branch_model(job, chunk), req.text_guidance, req.audio_guidance,
                                      APGState() if req.apg else None)
        denoiser = ContextLatents(guided, chunk.motion, job.generator, replay_noise=k > 0)
        return denoiser.sample(chunk.noise, job.timesteps, callback=on_step)

    def _branch_model(self, job: _Job, chunk: _ChunkInputs):
        """``model(x, t, branch)``: the DiT on one guidance branch's conditions, in the branch's
        cache context (so a step cache keeps one state per branch)."""
        zero_audio = torch.zeros_like(chunk.audio[:, -1:])
        texts = {"cond": job.prompt, "drop_text": job.negative, "uncond": job.negative, "drop_audio": job.prompt}
        audios = {"cond": chunk.audio, "drop_text": chunk.audio, "uncond": zero_audio, "drop_audio": zero_audio}

        def model(x: torch.Tensor, t: torch.Tensor, branch: str) -> torch.Tensor:
            latent_in = torch.cat([x.to(self.dtype)[None], chunk.y], dim=1)
            audio = audios[branch]
            masks = job.ref_masks if audio.shape[1] == 2 else None
            with self.transformer.cache_context(branch):
                out = self.transformer(latent_in, t.to(self.device).float(), texts[branch], chunk.clip, audio,
                                       ref_target_masks=masks, return_dict=False)[0]
            return out[0].float()

        return model

    # ------------------------------------------------------------------ stage 4: decode and write
    def _decode(self, job: _Job, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> frames ``[1, 3, 81, H, W]`` in [-1, 1] on the device, colour matched to the reference."""
        video = vae_decode(self._decoder(job.req.fast), x0[None])
        if job.req.color_correction > 0:
            reference = job.reference[None, :, None].float().to(video.device)
            video = match_and_blend_colors(video, reference, job.req.color_correction)
        return video

    def _decoder(self, fast: bool):
        """The VAE that decodes a chunk: this pipeline's (fp32 by default), or for fast requests a bf16
        copy of it, made on the first one (0.25 GB; its error is in the fast records, BENCHMARKS.md)."""
        if not fast or self.vae.dtype == torch.bfloat16:
            return self.vae
        if self._vae_bf16 is None:
            self._vae_bf16 = copy.deepcopy(self.vae).to(torch.bfloat16)
        return self._vae_bf16

    def _emit(self, writer, job: _Job, k: int, video: torch.Tensor) -> None:
        """Hand the chunk's new frames (chunk 0 whole, later chunks without their context frames), cut
        at the video's length, to the encoder. Only rank 0 encodes.

        The frames are copied to the CPU as uint8 here, on the main thread: that copy waits for the
        decode anyway, and the fresh array it gives is owned by the writer's queue alone (nothing on
        the GPU that the next chunk overwrites is referenced). The writer's thread then pipes them to
        ffmpeg while the next chunk samples; ``write`` blocks only when the writer's queue is full
        (``media.WRITER_QUEUE_BYTES``). ``timings["write_per_chunk"]``: seconds this took per chunk.
        """
        new = video[0] if k == 0 else video[0, :, job.plan.motion_frames_per_chunk[k]:]
        keep = min(new.shape[1], job.total_frames - job.frames_done)
        if keep <= 0:
            return
        if self.parallel is None or self.parallel.is_main:
            t0 = time.perf_counter()
            writer.write(frames_to_uint8(new[:, :keep]))
            job.timings.setdefault("write_per_chunk", []).append(time.perf_counter() - t0)
        job.frames_done += keep

    def _open_writer(self, out_path: Path, job: _Job, hls: HLSOutput | None = None):
        from . import media

        if self.parallel is not None and not self.parallel.is_main:
            return _NoVideo(out_path)
        writer = media.VideoWriter(out_path, job.width, job.height, fps=FPS, crf=int(job.req.crf),
                                   audio_path=job.soundtrack, duration=job.total_frames / FPS)
        if hls is None:
            return writer
        live = HLSWriter(hls.folder, job.width, job.height, fps=FPS, crf=int(job.req.crf), audio_path=job.soundtrack,
                         max_segment_frames=FRAME_NUM, on_segment=hls.on_segment)
        return _WithLive(writer, live)

    @contextlib.contextmanager
    def _step_cache(self, req: GenerationRequest):
        """The step cache (a diffusers hook on the block stack) for this request, when it asks for one."""
        if req.step_cache <= 0:
            yield _StepCacheRun(None)
            return
        config = StepCacheConfig(req.step_cache, req.resolution, **self.step_cache_options)
        self.transformer.enable_cache(config)
        try:
            yield _StepCacheRun(self.transformer)
        finally:
            self.transformer.disable_cache()


# ----------------------------------------------------------------------------------------------
# One video's state
# ----------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One video, prepared once by :meth:`InfiniteTalkPipeline._prepare`; the chunk loop reads it."""

    req: GenerationRequest
    width: int
    height: int
    plan: ChunkPlan
    seed: int
    generator: torch.Generator  # the noise of every chunk (CPU, as the official code)
    timesteps: torch.Tensor
    embeddings: list[torch.Tensor]  # wav2vec2 features per speaker, [T, layers, hidden] float32 on the CPU
    audio_index: torch.Tensor  # feature frame of each (end-padded) audio frame
    reference: torch.Tensor  # the conditioning frame, [3, H, W] in [-1, 1]
    reader: object | None  # V2V: the source video (a frame per chunk)
    clip: torch.Tensor
    y: torch.Tensor
    prompt: torch.Tensor
    negative: torch.Tensor
    ref_masks: torch.Tensor | None  # two speakers: class masks at latent resolution
    soundtrack: Path  # the output's audio file (audio.write_soundtrack); the samples are not kept
    audio_seconds: float
    frames_done: int = 0
    timings: dict = field(default_factory=dict)

    @property
    def total_frames(self) -> int:
        return self.plan.final_frame_count

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def result(self, path: Path, seconds: float) -> GenerationResult:
        self.timings["total"] = seconds
        return GenerationResult(path, self.seed, self.frames_done, FPS, self.width, self.height, self.plan.num_chunks,
                                self.frames_done / FPS, self.audio_seconds, self.timings)


@dataclass
class _ChunkInputs:
    """What one chunk is conditioned on (:meth:`InfiniteTalkPipeline._chunk_inputs`)."""

    clip: torch.Tensor
    y: torch.Tensor
    motion: torch.Tensor  # clean context latents [16, n_m, h, w]
    audio: torch.Tensor  # audio windows [1, P, 81, 5, layers, hidden] on the device
    noise: torch.Tensor  # [16, 21, h, w] on the device (drawn on the CPU from the job's generator)


class _StepCacheRun:
    """The step cache of one request, per chunk: a fresh cache and, after the chunk, what it skipped."""

    def __init__(self, transformer) -> None:
        self.transformer = transformer

    def reset(self) -> None:
        if self.transformer is not None:
            reset_step_cache(self.transformer)

    @property
    def skipped(self) -> int | None:
        stats = None if self.transformer is None else step_cache_stats(self.transformer)
        return None if stats is None else stats[1]


class _Progress:
    """Progress of one video: what is shown, the caller's callback (raise there to cancel), per-chunk
    timings and, with several GPUs, the ranks' agreement to stop at the same step.

    Every denoising step is reported, then the last step again once the chunk is written. Shown
    (``show``): on a terminal, tqdm bars; anywhere else (Cog, RunPod, a log file) bars would fill the
    logs with carriage returns and cursor codes, so plain INFO lines of the ``infinitetalk.pipeline``
    logger instead, one per step (``chunk 1/3, step 2/4``) and one per chunk (``chunk 1/3 done:
    3.24 s of 9.00 s video in 41.2 s``).
    """

    def __init__(self, pipe: InfiniteTalkPipeline, callback: ProgressCallback | None, job: _Job, show: bool):
        self.pipe, self.callback, self.job = pipe, callback, job
        self.bars = show and _on_terminal()
        self.lines = show and not self.bars
        self.num_steps = len(job.timesteps) - 1
        self.chunks = tqdm(total=job.plan.num_chunks, desc="chunks", unit="chunk", disable=not self.bars)
        self.steps = None
        self.k = 0
        self.t_chunk = 0.0
        self.clock = _DeviceClock(pipe.device)
        self.mark_start = self.mark_sampled = None
        self.t_loop = time.perf_counter()

    def chunk_started(self, k: int) -> None:
        self.k = k
        self.steps = tqdm(total=self.num_steps, desc=f"chunk {k + 1}/{self.job.plan.num_chunks}", unit="step",
                          leave=False, disable=not self.bars)
        self.t_chunk = time.perf_counter()
        self.mark_start = self.clock.mark()

    def on_step(self, i: int, _num_steps: int, _x) -> None:
        self.steps.update(1)
        if self.lines:
            logger.info("chunk %d/%d, step %d/%d", self.k + 1, self.job.plan.num_chunks, i + 1, self.num_steps)
        self.report(i + 1)

    def sampled(self) -> None:
        self.steps.close()
        self.mark_sampled = self.clock.mark()  # no wait for the GPU: the decode is queued right behind

    def chunk_done(self, cache) -> None:
        self.chunks.update(1)
        timings = self.job.timings
        if cache.skipped is not None:
            timings.setdefault("step_cache_skipped", []).append(cache.skipped)
        t_done = _sync_time(self.pipe.device)
        timings.setdefault("sampling_per_chunk", []).append(self.clock.seconds(self.mark_start, self.mark_sampled))
        timings.setdefault("chunk_seconds", []).append(t_done - self.t_chunk)
        if self.lines:
            logger.info("chunk %d/%d done: %.2f s of %.2f s video in %.1f s", self.k + 1, self.job.plan.num_chunks,
                        self.job.frames_done / FPS, self.job.total_frames / FPS, t_done - self.t_chunk)
        self.report(self.num_steps)

    def report(self, step: int) -> None:
        event = ProgressEvent(self.k, self.job.plan.num_chunks, step, self.num_steps, self.job.frames_done,
                              self.job.total_frames)
        error = None
        if self.callback is not None:
            try:
                self.callback(event)
            except BaseException as exc:  # noqa: BLE001 (re-raised by stop_together, after the ranks agree)
                error = exc
        stop_together(self.pipe.parallel, error)

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()
        self.chunks.close()
        self.job.timings["chunks"] = time.perf_counter() - self.t_loop


def _on_terminal() -> bool:
    """Whether tqdm's bars can be drawn: its stream (stderr) is an interactive terminal, or tqdm.auto
    chose its notebook widgets."""
    if any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__):
        return True
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):  # a replaced or closed stream
        return False


def _plan(req: GenerationRequest, num_audio_frames: int) -> ChunkPlan:
    """The chunk plan of the audio's frames, cut at ``max_duration`` when that is shorter."""
    max_frames = None if req.max_duration is None else max(1, int(round(req.max_duration * FPS)))
    if max_frames is not None and max_frames >= num_audio_frames:
        max_frames = None
    return plan_chunks(num_audio_frames, max_frames=max_frames, frame_num=FRAME_NUM, motion_frames=MOTION_FRAMES)


MEMORY_MODES = ("none", "fp8", "offload")


def apply_memory_mode(transformer, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Memory modes for smaller cards (benchmarked in BENCHMARKS.md section 4).

    ``fp8``: on CUDA with torchao, FP8 compute (:func:`quantize_fp8`, per-row scaled e4m3 weights,
    fp8 GEMMs): 21.9 GB peak and 2.63 s per compiled 480p forward, 4% output error; elsewhere
    diffusers layerwise casting (unscaled e4m3 storage, bf16 compute): weights 19.4 GB, same
    speed, 8% error.  ``offload``: weights stay in pinned CPU memory and each block is copied to
    the GPU on a side stream while the previous one computes (diffusers group offloading): exact,
    a few GB of VRAM.
    """
    if mode == "none":
        return
    if mode == "fp8":
        if device.type == "cuda":
            try:
                logger.info("fp8 compute on %d linear layers", quantize_fp8(transformer))
                return
            except RuntimeError as exc:
                logger.warning("%s; falling back to fp8 weight storage", exc)
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    elif mode == "offload":
        if device.type != "cuda":
            return
        transformer.to("cpu")
        transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                         offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    else:
        raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}")


def quantize_fp8(transformer) -> int:
    """FP8 compute for the blocks' linear layers (torchao; :func:`infinitetalk.fast.fp8_layer` says which):
    e4m3 weights with per-row scales and dynamically quantised activations, so the GEMMs run on Hopper's
    FP8 tensor cores.  Embeddings, the audio modules and the output head stay bf16.  Returns the number of
    layers converted."""
    config = fast_lib.fp8_config()
    from torchao.quantization import quantize_

    count = 0

    def blocks_linear(module, fqn: str) -> bool:
        nonlocal count
        ok = fast_lib.fp8_layer(module, fqn)
        count += ok
        return ok

    quantize_(transformer, config, filter_fn=blocks_linear)
    return count


class _WithLive:
    """The final MP4's writer and the live HLS writer, fed the same chunks: the MP4 is closed first (a
    failure of the previews never fails the video, see ``preview.HLSWriter``); any exception aborts
    both, which removes their partial files."""

    def __init__(self, video, live: HLSWriter):
        self.video, self.live = video, live
        self.path = video.path

    def write(self, frames) -> None:
        self.video.write(frames)
        self.live.write(frames)

    def close(self) -> Path:
        try:
            path = self.video.close()
        except BaseException:
            self.live.abort()
            raise
        self.live.close()
        return path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.video.abort()
            self.live.abort()
        return False


class _NoVideo:
    """The encoder of ranks other than 0 under sequence parallelism: rank 0 writes the video."""

    def __init__(self, path, *_, **__):
        self.path = Path(path)

    def write(self, frames) -> None:
        pass

    def close(self) -> Path:
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their plain name: where the turbo adapter wraps a layer (PEFT moves its weight
    to ``<layer>.base_layer.weight``) the plain name maps to the wrapped weight too."""
    params = dict(module.named_parameters())
    for name in list(params):
        if ".base_layer." in name:
            params.setdefault(name.replace(".base_layer.", "."), params[name])
    return params


class _DeviceClock:
    """Marks on the device's own timeline, read after a synchronisation: CUDA events on a GPU (recording
    one does not wait for the GPU, so the queue never runs dry for a timing), the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None

    def mark(self):
        if self.device is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start, end) -> float:
        """Seconds from ``start`` to ``end`` (both marks); on a GPU only once ``end`` has completed."""
        return start.elapsed_time(end) / 1000.0 if self.device is not None else end - start


#: Held while models are built: transformers' and diffusers' loaders build modules on the meta device
#: through process-wide patches, which would also catch a module another thread builds meanwhile (the
#: text-to-speech load), so the two never overlap.
_MODEL_LOADING = threading.Lock()


def _load_speech(weights_dir, device: torch.device, required: bool) -> tuple[Speech | None, float]:
    """Kokoro and its English pipeline (run on a loader thread), and the seconds it took. Without the
    kokoro/misaki/spaCy packages only text requests are refused, unless text was ``required``."""
    t0 = time.perf_counter()
    try:
        with _MODEL_LOADING:
            speech = Speech.from_pretrained(weights_dir, device=device)
    except ImportError as exc:
        if required:
            raise
        logger.warning("text input disabled: %s (install requirements.txt)", exc)
        speech = None
    return speech, time.perf_counter() - t0


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _to_model_frame(image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> bucket-resized, centre-cropped frame in [-1, 1], ``[3, H, W]`` float32."""
    arr = np.array(resize_and_centercrop(image, size), dtype=np.uint8, copy=True)  # [H, W, 3]
    t = torch.from_numpy(arr).permute(2, 0, 1).float()
    return (t / 255.0 - 0.5) * 2.0


def _clip_preprocessing(path: Path):
    if not path.exists():
        return 224, CLIP_MEAN, CLIP_STD
    cfg = json.loads(path.read_text())
    size = cfg.get("crop_size") or cfg.get("size") or 224
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    return int(size), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_PROMPT",
    "GenerationCancelled",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "InfiniteTalkPipeline",
    "ProgressEvent",
    "WeightPaths",
    "apply_memory_mode",
    "compile_transformer",
]
