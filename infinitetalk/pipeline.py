"""The InfiniteTalk generation pipeline: image or video + speech -> lip-synced MP4 of any length.

The algorithm is the official one (``SPEC.md`` section 4): 81-frame chunks at 25 fps, each
later chunk conditioned on the last 9 decoded (colour-corrected) frames of the previous one
through 3 clean context latents; Euler flow matching with the shifted schedule; 3-NFE text +
audio CFG (or 2-NFE audio CFG when the text scale is 1); optional APG. What differs on purpose:
frames stream into one ffmpeg encoder chunk by chunk (memory does not grow with length), there
is no length cap unless asked, short audio works, V2V follows the source at any fps, and text,
CLIP and the first-frame condition are computed once per video where they do not change.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import secrets
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import audio as audio_lib
from . import inputs
from .buckets import choose_bucket, masks_to_latent, resize_and_centercrop, speaker_masks
from .chunking import plan_chunks
from .color import match_and_blend_colors
from .conditioning import (
    CLIP_MEAN,
    CLIP_STD,
    encode_image_clip,
    encode_prompt,
    first_frame_condition,
    frames_to_uint8,
    vae_decode,
    vae_encode,
)
from .distributed import check_token_split, enable_sequence_parallel, stop_together
from .errors import GenerationCancelled, InputError
from .sampler import APGState, get_timesteps, make_guided_denoiser, sample_euler
from .step_cache import StepCache

logger = logging.getLogger(__name__)

FPS = 25
FRAME_NUM = 81
MOTION_FRAMES = 9
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
DEFAULT_PROMPT = "A person is talking naturally, looking at the camera."
MAX_SIDE = 2048  # explicit width/height limit
MIN_SIDE = 64


# ----------------------------------------------------------------------------------------------
# Request / result
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """Everything one generation needs.  Paths are local files; validated by :meth:`validate`."""

    image: str | Path  # image or video (V2V dubbing)
    audio: str | Path
    audio_2: str | Path | None = None
    audio_mode: str = "para"  # para: simultaneous; add: speaker 1 then speaker 2
    bboxes: Sequence[Sequence[float]] | None = None  # [[top, left, bottom, right], [..]] in source pixels
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str | None = None  # None -> the official default
    resolution: str = "480p"
    width: int | None = None
    height: int | None = None
    max_duration: float | None = None  # seconds; None -> whole audio
    steps: int | None = None  # None -> 40 (exact) / 4 (turbo)
    text_guidance: float | None = None  # None -> 5 (exact) / 1 (turbo: 2 forwards per step)
    audio_guidance: float | None = None  # None -> 4 (exact) / 2 (turbo)
    shift: float | None = None  # None -> 7 (480p) / 11 (720p) exact, 2 turbo
    seed: int | None = None
    color_correction: float = 1.0
    apg: bool = False
    crf: int = 18
    turbo: bool = False  # distilled LoRA mode: needs a pipeline loaded with the LoRA
    step_cache: float = 0.0  # TeaCache-rule threshold (0 = off; 0.2-0.5 trade quality for speed)

    def resolved(self) -> GenerationRequest:
        """A copy with the mode's defaults filled in (official values for exact and LoRA modes)."""
        from dataclasses import replace

        if self.turbo:
            defaults = dict(steps=4, text_guidance=1.0, audio_guidance=2.0, shift=2.0)
        else:
            defaults = dict(steps=40, text_guidance=5.0, audio_guidance=4.0,
                            shift=7.0 if self.resolution == "480p" else 11.0)
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self) -> None:
        req = self.resolved()  # validate the effective values

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise InputError(msg)

        need(req.audio_mode in ("para", "add"), f"audio_mode must be 'para' or 'add', got {req.audio_mode!r}")
        need(req.resolution in ("480p", "720p"), f"resolution must be '480p' or '720p', got {req.resolution!r}")
        need((req.width is None) == (req.height is None), "width and height must be given together")
        if req.width is not None:
            for name, v in (("width", req.width), ("height", req.height)):
                need(MIN_SIDE <= int(v) <= MAX_SIDE and int(v) % 16 == 0,
                     f"{name} must be a multiple of 16 between {MIN_SIDE} and {MAX_SIDE}, got {v}")
        need(1 <= int(req.steps) <= 100, f"steps must be between 1 and 100, got {req.steps}")
        for name, v, lo, hi in (("text_guidance", req.text_guidance, 0.0, 20.0),
                                ("audio_guidance", req.audio_guidance, 0.0, 20.0),
                                ("color_correction", req.color_correction, 0.0, 1.0),
                                ("step_cache", req.step_cache, 0.0, 5.0)):
            need(math.isfinite(v) and lo <= v <= hi, f"{name} must be between {lo:g} and {hi:g}, got {v}")
        if req.shift is not None:
            need(math.isfinite(req.shift) and 0.1 <= req.shift <= 50, f"shift must be between 0.1 and 50, got {req.shift}")
        if req.max_duration is not None:
            need(math.isfinite(req.max_duration) and req.max_duration >= 0.04,
                 f"max_duration must be at least 0.04 s (one frame), got {req.max_duration}")
        need(0 <= int(req.crf) <= 51, f"crf must be between 0 and 51, got {req.crf}")
        if req.seed is not None:
            need(0 <= int(req.seed) < 2**63, f"seed must be between 0 and 2^63-1, got {req.seed}")
        if req.bboxes is not None:
            need(req.audio_2 is not None, "boxes are only used with two speakers (audio_2)")
            need(len(req.bboxes) == 2 and all(len(b) == 4 for b in req.bboxes),
                 "boxes must be two [top, left, bottom, right] boxes, one per speaker")


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
        missing = [str(p) for p in (base / "vae", base / "text_encoder", base / "tokenizer", base / "image_encoder", wav2vec)
                   if not p.exists()]
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
                 clip_std=CLIP_STD, multi_weights: Path | None = None):
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
        self._active_audio_set = "single"
        self._audio_sets: dict[str, dict[str, torch.Tensor]] = {}
        self._prompt_cache: dict[str, tuple[torch.Tensor, bool]] = {}
        self.turbo_loaded = False
        self.turbo_only = False
        self.lora_adapter = None
        self.parallel = None  # a ParallelContext once the sequence is split over several GPUs

    def enable_sequence_parallel(self, context) -> None:
        """Split the transformer's tokens over the ranks of ``context`` (:mod:`infinitetalk.parallel`);
        every rank then runs :meth:`generate` with the same request, rank 0 writes the video."""
        enable_sequence_parallel(self.transformer, context.world_size)
        self.parallel = context

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                        attention_backend: str | None = None, compile: bool = False,
                        turbo_lora: str | Path | None = None, fuse_turbo: bool = False,
                        memory_mode: str = "none") -> InfiniteTalkPipeline:
        """Load every component from a weights folder in the layout of ``weights/README.md``."""
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, CLIPVisionModelWithProjection, UMT5EncoderModel

        from .weights import load_transformer

        paths = WeightPaths.discover(weights_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae_dtype = vae_dtype or torch.float32
        timings = {}
        t0 = time.perf_counter()
        if paths.prepared is not None:
            transformer = load_transformer(paths.prepared, None, device=device, dtype=dtype)
        else:
            transformer = load_transformer(paths.base / "transformer", paths.single, device=device, dtype=dtype)
        timings["transformer"] = time.perf_counter() - t0
        if attention_backend:
            transformer.set_attention_backend(attention_backend)
        lora_path = Path(turbo_lora) if turbo_lora else paths.turbo_lora
        adapter = None
        if lora_path is not None:
            from .lora import LoRAAdapter, fuse_lora

            if fuse_turbo:  # a turbo-only server: deltas added into the weights, no run-time cost
                fuse_lora(transformer, lora_path)
            else:
                adapter = LoRAAdapter(transformer, lora_path)
        apply_memory_mode(transformer, memory_mode, device, dtype)
        if compile:
            compile_transformer(transformer)
        t0 = time.perf_counter()
        vae = AutoencoderKLWan.from_pretrained(paths.base / "vae", torch_dtype=vae_dtype).to(device).eval()
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
                   dtype=dtype, clip_size=size, clip_mean=mean, clip_std=std, multi_weights=paths.multi)
        pipe.load_timings = timings
        pipe.lora_adapter = adapter
        pipe.turbo_loaded = lora_path is not None
        pipe.turbo_only = bool(lora_path is not None and fuse_turbo)
        logger.info("loaded InfiniteTalk on %s (%s): %s", device, dtype,
                    ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
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
            params = dict(self.transformer.named_parameters())
            self._audio_sets["single"] = {k: params[k].detach().to("cpu", copy=True) for k in multi}
            self._audio_sets["multi"] = multi
        params = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for key, value in self._audio_sets[name].items():
                params[key].copy_(value.to(params[key].dtype))
        self._active_audio_set = name
        logger.info("InfiniteTalk '%s' weights active", name)

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
                 callback: ProgressCallback | None = None, show_progress: bool = True) -> GenerationResult:
        """Run one request and write the MP4 to ``output_path``."""
        request = request.resolved()
        request.validate()
        try:
            with tempfile.TemporaryDirectory(prefix="infinitetalk-") as tmp:
                return self._generate(request, Path(output_path), Path(tmp), callback, show_progress)
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

    def _generate(self, req: GenerationRequest, out_path: Path, tmp: Path, callback, show_progress) -> GenerationResult:
        from . import media

        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        if req.turbo and not self.turbo_loaded:
            raise InputError("turbo mode needs the distilled LoRA, which is not installed on this server")
        if not req.turbo and self.turbo_only:
            raise InputError("this server runs turbo mode only (the LoRA is fused into the weights)")
        if self.lora_adapter is not None:
            self.lora_adapter.enabled = bool(req.turbo)

        # 1. Reference: image, or video for dubbing.
        info, reader, first = inputs.load_reference(req.image, "image")  # limits and messages: inputs.py
        src_w, src_h = first.size
        inputs.check_boxes(req.bboxes, src_w, src_h)

        # 2. Size: the official bucket of the source aspect ratio, or the explicit size.
        if req.width is not None:
            height, width = int(req.height), int(req.width)
        else:
            height, width = choose_bucket(src_h, src_w, req.resolution)
        if self.parallel is not None:
            check_token_split(height, width, (FRAME_NUM - 1) // 4 + 1, self.parallel.world_size)
        shift = req.shift

        # 3. Audio: decode, loudness-normalise, combine speakers, wav2vec2 features.
        t0 = time.perf_counter()
        speakers = 2 if req.audio_2 is not None else 1
        wav1 = inputs.load_audio(req.audio, "audio")
        if speakers == 2:
            wav2 = inputs.load_audio(req.audio_2, "audio_2")
            w1, w2, mixed = audio_lib.combine_speakers(wav1, wav2, req.audio_mode)
            embeddings = [self.audio_encoder.encode(w1), self.audio_encoder.encode(w2)]
        else:
            mixed = wav1
            embeddings = [self.audio_encoder.encode(wav1)]
        timings["audio"] = time.perf_counter() - t0
        num_audio_frames = embeddings[-1].shape[0]
        max_frames = None
        if req.max_duration is not None:
            max_frames = max(1, int(round(req.max_duration * FPS)))
        plan = plan_chunks(num_audio_frames, max_frames=max_frames if max_frames and max_frames < num_audio_frames else None,
                           frame_num=FRAME_NUM, motion_frames=MOTION_FRAMES)
        total_frames = plan.final_frame_count
        seed = int(req.seed) if req.seed is not None else secrets.randbelow(2**31)
        if self.parallel is not None:
            seed = self.parallel.broadcast(seed)  # every rank draws the same noise
        logger.info("generating %d frames (%.2f s) at %dx%d in %d chunk(s), seed %d", total_frames,
                    total_frames / FPS, width, height, plan.num_chunks, seed)

        # 4. Speaker masks (two speakers) at latent resolution.
        lat_h, lat_w = height // 8, width // 8
        ref_masks = None
        if speakers == 2:
            self._use_audio_set("multi")
            masks = speaker_masks(src_h, src_w, 2, req.bboxes)
            ref_masks = masks_to_latent(masks, (height, width), (lat_h, lat_w)).to(self.device)
        else:
            self._use_audio_set("single")

        # 5. Once-per-video conditioning.
        t0 = time.perf_counter()
        cond_frame = _to_model_frame(first, (height, width))  # [3, H, W] in [-1, 1]
        prompt = self._prompt_states(req.prompt)
        negative = self._prompt_states(req.negative_prompt if req.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT)
        clip_states = self._clip(cond_frame)
        y = first_frame_condition(self.vae, cond_frame.to(self.device), FRAME_NUM).to(self.dtype)
        timings["conditioning"] = time.perf_counter() - t0
        color_ref = cond_frame[None, :, None].float()  # [1, 3, 1, H, W]

        audio_path = tmp / "audio.wav"
        media.write_wav(audio_path, mixed[: int(round(total_frames / FPS * audio_lib.SAMPLE_RATE))], audio_lib.SAMPLE_RATE)
        generator = torch.Generator("cpu").manual_seed(seed)
        timesteps = get_timesteps(int(req.steps), shift)
        zero_audio = None

        frames_done = 0
        chunk_bar = tqdm(total=plan.num_chunks, desc="chunks", unit="chunk", disable=not show_progress)
        motion_frames = None  # [-1, 1] [1, 3, 9, H, W] of the previous chunk (colour corrected)
        embs = list(embeddings)
        t_loop = time.perf_counter()
        try:
            main = self.parallel is None or self.parallel.is_main  # other ranks compute, rank 0 writes
            writer_cls = media.VideoWriter if main else _NoVideo
            with writer_cls(out_path, width, height, fps=FPS, crf=int(req.crf), audio_path=audio_path,
                            duration=total_frames / FPS) as writer:
                for k, start in enumerate(plan.starts):
                    if plan.pad_before[k]:
                        embs = [audio_lib.pad_audio_end(e, plan.pad_before[k]) for e in embs]
                    # Reference frame of this chunk (V2V: the source frame at this chunk's time).
                    if reader is not None and k > 0:
                        frame_k = _to_model_frame(reader.frame_at(start / FPS), (height, width))
                        clip_k = self._clip(frame_k)
                        y_k = first_frame_condition(self.vae, frame_k.to(self.device), FRAME_NUM).to(self.dtype)
                    else:
                        frame_k, clip_k, y_k = cond_frame, clip_states, y
                    # Context latents: the reference frame for chunk 0, the last 9 frames later.
                    if k == 0:
                        motion = vae_encode(self.vae, frame_k[None, :, None].to(self.device))[0]
                    else:
                        motion = vae_encode(self.vae, motion_frames)[0]
                    windows = torch.stack([audio_lib.gather_windows(e, start, FRAME_NUM) for e in embs])  # [P, 81, 5, L, C]
                    audio_in = windows[None].to(self.device, self.dtype)
                    if zero_audio is None:
                        zero_audio = torch.zeros_like(audio_in[:, -1:])
                    noise = torch.randn(16, (FRAME_NUM - 1) // 4 + 1, lat_h, lat_w, generator=generator)

                    cache = StepCache(req.step_cache, req.resolution) if req.step_cache > 0 else None
                    branch = self._branch_fn(y_k, clip_k, prompt, negative, audio_in, zero_audio, ref_masks, cache)
                    apg = APGState() if req.apg else None
                    denoise = make_guided_denoiser(branch, req.text_guidance, req.audio_guidance, apg)
                    step_bar = tqdm(total=len(timesteps) - 1, desc=f"chunk {k + 1}/{plan.num_chunks}", unit="step",
                                    leave=False, disable=not show_progress)

                    def on_step(i, n, _x, k=k, step_bar=step_bar):
                        step_bar.update(1)
                        self._report(callback, ProgressEvent(k, plan.num_chunks, i + 1, n, frames_done, total_frames))

                    t_chunk = time.perf_counter()
                    try:
                        x0 = sample_euler(denoise, noise.to(self.device), timesteps, motion_latents=motion.float(),
                                          callback=on_step, generator=generator, burn_motion_noise=k > 0)
                    finally:
                        step_bar.close()
                    t_sampled = _sync_time(self.device)
                    video = vae_decode(self.vae, x0[None])  # [1, 3, 81, H, W] in [-1, 1], on the device
                    if req.color_correction > 0:
                        video = match_and_blend_colors(video, color_ref.to(video.device), req.color_correction)
                    motion_frames = video[:, :, -MOTION_FRAMES:]
                    new = video[0] if k == 0 else video[0, :, plan.motion_frames_per_chunk[k]:]
                    keep = min(new.shape[1], total_frames - frames_done)
                    if keep > 0:
                        if main:
                            writer.write(frames_to_uint8(new[:, :keep]))
                        frames_done += keep
                    chunk_bar.update(1)
                    if cache is not None:
                        timings.setdefault("step_cache_skipped", []).append(cache.skipped)
                    t_done = _sync_time(self.device)
                    timings.setdefault("sampling_per_chunk", []).append(t_sampled - t_chunk)
                    timings.setdefault("chunk_seconds", []).append(t_done - t_chunk)
                    del video, new, x0
                    self._report(callback, ProgressEvent(k, plan.num_chunks, len(timesteps) - 1, len(timesteps) - 1,
                                                         frames_done, total_frames))
                writer.close()
        finally:
            chunk_bar.close()
            if reader is not None:
                reader.close()
        timings["chunks"] = time.perf_counter() - t_loop
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(out_path, seed, frames_done, FPS, width, height, plan.num_chunks,
                                frames_done / FPS, len(mixed) / audio_lib.SAMPLE_RATE, timings)

    def _report(self, callback: ProgressCallback | None, event: ProgressEvent) -> None:
        """Progress to the caller; its exception (a cancellation) stops the run.  With several GPUs
        the ranks agree at every step, so all stop at the same one."""
        error = None
        if callback is not None:
            try:
                callback(event)
            except BaseException as exc:  # noqa: BLE001 (re-raised by stop_together, after the ranks agree)
                error = exc
        stop_together(self.parallel, error)

    def _branch_fn(self, y, clip_states, prompt, negative, audio_in, zero_audio, ref_masks, cache=None):
        """``model(x, t, branch)`` for the guidance helper: runs the DiT on one condition set."""
        texts = {"cond": prompt, "drop_text": negative, "uncond": negative, "drop_audio": prompt}
        audios = {"cond": audio_in, "drop_text": audio_in, "uncond": zero_audio, "drop_audio": zero_audio}

        def model(x: torch.Tensor, t: torch.Tensor, branch: str) -> torch.Tensor:
            latent_in = torch.cat([x.to(self.dtype)[None], y], dim=1)
            aud = audios[branch]
            out = self.transformer(latent_in, t.to(self.device).float(), texts[branch], clip_states, aud,
                                   ref_target_masks=ref_masks if aud.shape[1] == 2 else None, return_dict=False,
                                   step_cache=cache, cache_branch=branch)[0]
            return out[0].float()

        return model


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
    """FP8 compute for the blocks' linear layers (torchao): e4m3 weights with per-row scales and
    dynamically quantised activations, so the GEMMs run on Hopper's FP8 tensor cores.  Embeddings,
    the audio modules and the output head stay bf16.  Returns the number of layers converted."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:  # optional GPU dependency
        raise RuntimeError("fp8 compute needs torchao (pip install torchao)") from exc
    count = 0

    def blocks_linear(module, fqn: str) -> bool:
        nonlocal count
        # The audio attention stays bf16: its weights are swapped in place between the single and
        # multi checkpoints, which a quantised tensor cannot take.
        ok = isinstance(module, torch.nn.Linear) and fqn.startswith("blocks.") and ".audio_attn." not in fqn \
            and module.in_features % 16 == 0 and module.out_features % 16 == 0
        count += ok
        return ok

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=blocks_linear)
    return count


def compile_transformer(transformer) -> bool:
    """Regional ``torch.compile`` of the repeated blocks (compiled once, reused by all 40)."""
    try:
        transformer.compile_repeated_blocks(dynamic=False)
        return True
    except Exception as exc:  # compile is an optimisation: never fail the server for it
        logger.warning("torch.compile unavailable, running eager: %s", exc)
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
