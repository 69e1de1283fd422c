"""Chunk-level benchmark: the real pipeline loop with full-size random components on the GPU.

Used by ``scripts/benchmark.py chunk``.  Builds the 14B transformer, the Wan VAE, UMT5-XXL, CLIP
ViT-H/14 and wav2vec2-base with random weights (a tiny tokenizer: tokenisation does not change
the cost) and runs :meth:`InfiniteTalkPipeline.generate` on a real portrait with 2 chunks of
synthetic speech, so every step of the chunk loop is timed: audio windows, context-latent VAE
encode, sampling, VAE decode, colour correction, uint8 conversion and the ffmpeg encoder.

Exact mode (40 steps x 3 forwards) does not fit one command, so it is measured at a few steps
and extrapolated linearly: chunk(40) = chunk(s) + (40 - s) * step, with the per-step time taken
from the same run.  Turbo (4 steps x 2 forwards, the distilled LoRA fused into the weights costs
nothing at run time) is measured as is.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import (
    BUCKETS,
    FULL_CONFIG,
    NEW_FRAMES_PER_CHUNK,
    VIDEO_FPS,
    build_random_model,
    env_record,
    forward_flops,
    write_random_turbo_lora,
)

HERE = Path(__file__).resolve().parent
MODES = {
    # name: (steps measured, steps reported, text guidance, audio guidance, shift)
    "exact": (3, 40, 5.0, 4.0, None),
    "turbo": (4, 4, 1.0, 2.0, 2.0),
    # turbo without audio guidance: text and audio scales of 1 need one forward per step
    "turbo-1nfe": (4, 4, 1.0, 1.0, 2.0),
}


def _random_components(device, dtype, vae_dtype, tiny_dir: Path):
    from diffusers import AutoencoderKLWan
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    from infinitetalk.audio import Wav2Vec2FeatureEncoder

    prev = torch.get_default_dtype()
    with torch.device(device):
        vae = AutoencoderKLWan().to(vae_dtype).eval()
        torch.set_default_dtype(dtype)
        try:
            t5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                             num_heads=64, feed_forward_proj="gated-gelu")).eval()
            clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")).eval()
        finally:
            torch.set_default_dtype(prev)
        w2v = Wav2Vec2Model(Wav2Vec2Config()).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "Wan2.1-I2V-14B-480P-Diffusers" / "tokenizer")
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False)
    audio = Wav2Vec2FeatureEncoder(w2v, fe, device=device)
    return vae, t5, tokenizer, clip, audio


def _speech_like(seconds: float, sr: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    return (0.1 * envelope * rng.standard_normal(t.shape)).astype(np.float32)


class _NullWriter:
    """Stands in for the ffmpeg encoder when the GPU box has no ffmpeg binary (or frames are compared)."""

    collected: list | None = None  # a list: frames are kept for error measurements

    def __init__(self, path, width, height, **_):
        self.path = Path(path)
        self.frames_written = 0

    def write(self, frames):
        self.frames_written += len(frames)
        if _NullWriter.collected is not None:
            _NullWriter.collected.append(np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames))

    def close(self):
        return self.path

    def abort(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Bench:
    """Full-size random pipeline on the GPU (tiny components with BENCH_SMOKE=1 on the CPU), a real
    portrait and synthetic speech of a settable length; the encoder can keep the frames."""

    def __init__(self, args, *, compile_now: bool):
        from PIL import Image

        from infinitetalk import audio as audio_lib
        from infinitetalk import media

        self.env = env_record()
        self.smoke = os.environ.get("BENCH_SMOKE") == "1"  # CPU dry run of the whole flow with tiny components
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        subprocess.run([sys.executable, str(HERE / "make_tiny_weights.py"), str(self.tmp / "tiny")], check=True,
                       stdout=subprocess.DEVNULL)
        self.has_ffmpeg = shutil.which("ffmpeg") is not None
        self.keep_frames = bool(getattr(args, "keep_frames", False))
        if not self.has_ffmpeg or self.keep_frames:
            # The encoder runs in its own process in production; noted in the record.
            media.VideoWriter = _NullWriter
        self.vae_dtype = torch.bfloat16 if getattr(args, "vae_bf16", False) else torch.float32
        self.fuse_turbo = bool(getattr(args, "fuse_turbo", False))
        self.pipe = self._tiny_pipeline() if self.smoke else self._random_pipeline(args, compile_now)
        self.lora = "fused" if self.fuse_turbo else "adapter"  # the turbo LoRA is loaded as the servers load it
        self.context = self.pipe.parallel  # under torchrun: the transformer split over the GPUs
        self.num_gpus = 1 if self.context is None else self.context.world_size
        self.main = self.context is None or self.context.is_main
        self.device = self.pipe.device
        try:
            from skimage import data

            portrait = data.astronaut()
        except Exception:  # noqa: BLE001
            portrait = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
        self.image = self.tmp / "portrait.png"
        Image.fromarray(portrait).save(self.image)
        self.seconds = (81 + 72) / VIDEO_FPS  # exactly 2 chunks
        audio_lib.load_speech = lambda path, *a, **k: _speech_like(self.seconds)  # no decoder libs needed
        self.speech = self.tmp / "speech.wav"  # a real file: the soundtrack is decoded from it (soundfile)
        media.write_wav(self.speech, _speech_like(self.seconds), 16000)

    def _tiny_pipeline(self):
        """The tiny weights on the CPU, loaded as the servers load (this rank's share under torchrun)."""
        from infinitetalk.build import build_pipeline
        from infinitetalk.settings import Settings
        from make_tiny_weights import write_turbo_lora

        write_turbo_lora(self.tmp / "tiny")
        settings = Settings(weights=self.tmp / "tiny", memory_mode="none", compile=False, num_gpus=1,
                            fuse_turbo=self.fuse_turbo)
        return build_pipeline(settings, device="cpu")

    def _random_pipeline(self, args, compile_now: bool):
        """Full-size random components on the GPU, given to the pipeline directly (build_pipeline
        loads from a weights folder, and 38 GB of random weights are not written to disk for it)."""
        from infinitetalk import distributed
        from infinitetalk.lora import TurboLoRA
        from infinitetalk.pipeline import InfiniteTalkPipeline, compile_transformer

        context = distributed.init_from_env()  # first: it picks this rank's GPU
        device = torch.device("cuda") if context is None else context.device
        transformer = build_random_model(FULL_CONFIG, num_layers=args.layers)
        # The turbo LoRA (random, the real file's key set and rank) as from_pretrained loads it: before compile.
        lora = write_random_turbo_lora(self.tmp / "turbo.safetensors", num_layers=args.layers)
        turbo = TurboLoRA.load(transformer, lora, fuse=self.fuse_turbo)
        if compile_now:
            compile_transformer(transformer)
        vae, t5, tok, clip, audio = _random_components(device, torch.bfloat16, self.vae_dtype, self.tmp / "tiny")
        pipe = InfiniteTalkPipeline(transformer, vae, t5, tok, clip, audio, device=device, dtype=torch.bfloat16,
                                    turbo=turbo)
        if context is not None:
            pipe.enable_sequence_parallel(context)
        return pipe

    def run(self, req, name: str):
        """Generate; returns (result, wall seconds, frames uint8 [N, H, W, 3] or None)."""
        _NullWriter.collected = []
        if not self.smoke:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = self.pipe.generate(req, self.tmp / f"{name}.mp4", show_progress=False)
        wall = time.perf_counter() - t0
        frames = np.concatenate(_NullWriter.collected) if _NullWriter.collected else None
        _NullWriter.collected = []
        return result, wall, frames

    def peak_gb(self) -> float:
        return 0.0 if self.smoke else round(torch.cuda.max_memory_allocated() / 1e9, 2)

    def cleanup(self):
        gc.collect()
        if not self.smoke:
            torch.cuda.empty_cache()

    def close(self):
        from infinitetalk.build import close_pipeline

        shutil.rmtree(self.tmp, ignore_errors=True)
        close_pipeline(self.pipe)


def _chunk_record(b: _Bench, mode: str, res: str, h: int, w: int, result, wall: float, steps: int,
                  steps_reported: int, tg: float, ag: float, **extra) -> dict:
    tm = result.timings
    chunk = tm["chunk_seconds"][-1]  # a steady-state chunk (k >= 1) when there are two
    sampling = tm["sampling_per_chunk"][-1]
    per_step = sampling / steps
    overhead = chunk - sampling
    chunk_reported = overhead + per_step * steps_reported
    nfe = 3 if tg != 1.0 else (2 if ag != 1.0 else 1)
    fl = forward_flops(FULL_CONFIG, h, w)
    rec = dict(
        b.env, mode=mode, num_gpus=b.num_gpus, resolution=res, width=w, height=h, speakers=1, steps=steps_reported,
        forwards_per_step=nfe, steps_measured=steps, vae_dtype=str(b.vae_dtype).replace("torch.", ""),
        ffmpeg_encoder=b.has_ffmpeg and not b.keep_frames,
        seconds_per_forward=round(per_step / nfe, 3), seconds_per_step=round(per_step, 3),
        chunk_overhead_seconds=round(overhead, 3), seconds_per_chunk=round(chunk_reported, 2),
        gpu_seconds_per_video_second=round(chunk_reported * b.num_gpus / (NEW_FRAMES_PER_CHUNK / VIDEO_FPS), 2),
        wall_seconds_per_video_second=round(chunk_reported / (NEW_FRAMES_PER_CHUNK / VIDEO_FPS), 2),
        floor_seconds_per_forward=round(fl["floor_seconds"], 3),
        conditioning_seconds=round(tm.get("conditioning", 0.0), 2), measured_wall_seconds=round(wall, 1),
        peak_memory_gb=b.peak_gb(),
    )
    rec.update(extra)
    return rec


def bench_chunk(args) -> list[dict]:
    from infinitetalk.pipeline import GenerationRequest

    b = _Bench(args, compile_now=bool(getattr(args, "compile", False)))
    records = []
    for res in args.resolutions:
        h, w = (64, 64) if b.smoke else BUCKETS[res]
        for mode in args.modes:
            if mode == "exact" and b.fuse_turbo:
                print("skipping exact: the turbo LoRA is fused (a turbo-only pipeline)", flush=True)
                continue
            steps, steps_reported, tg, ag, shift = MODES[mode]
            req = GenerationRequest(image=b.image, audio=b.speech, width=w, height=h, steps=steps, text_guidance=tg,
                                    audio_guidance=ag, shift=shift, seed=0, turbo=mode != "exact")
            result, wall, _ = b.run(req, f"{mode}-{res}")
            rec = _chunk_record(b, mode, res, h, w, result, wall, steps, steps_reported, tg, ag,
                                compiled=bool(getattr(args, "compile", False)),
                                lora=b.lora if mode != "exact" else "adapter-disabled")
            if b.main:
                print(rec, flush=True)
            records.append(rec)
            b.cleanup()
    if not b.smoke and b.context is None:
        records += _vae_precision(b.pipe.vae, b.device, args.resolutions)
    b.close()
    return records if b.main else []


def _errors(frames: np.ndarray, ref: np.ndarray) -> dict:
    """Error of decoded uint8 frames against the reference frames of the exact bf16 path."""
    a, r = frames.astype(np.float64), ref.astype(np.float64)
    mse = float(np.mean((a - r) ** 2))
    return dict(rel_l2_vs_exact_bf16=round(float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-12)), 5),
                psnr_db_vs_exact_bf16=round(float(10 * np.log10(255.0**2 / mse)), 2) if mse > 0 else None,
                max_abs_vs_exact_bf16=int(np.abs(a - r).max()))


@torch.no_grad()
def _calibrate_cache_indicator(pipe, target_rel_l1: float) -> None:
    """Random weights make the timestep modulation ``temb`` change by ~70% between steps (a trained
    model's changes are a few percent), so the TeaCache rule would never skip.  For the benchmark the
    rule sees ``temb + c`` (``StepCacheConfig.indicator_offset``, passed by the pipeline from
    ``pipe.step_cache_options`` into every request's config), the constant ``c`` chosen so that the mean
    step-to-step relative L1 is ``target_rel_l1``; the skip/compute mechanism itself is the production one."""
    from infinitetalk.sampler import get_timesteps

    if not hasattr(pipe, "step_cache_options"):
        raise RuntimeError("this pipeline has no step_cache_options: the calibration would be ignored")
    transformer = pipe.transformer
    cfg = transformer.config
    dev = next(transformer.parameters()).device
    dt = transformer.condition_embedder.time_proj.weight.dtype
    txt = torch.zeros(1, 1, cfg.text_dim, device=dev, dtype=dt)
    img = torch.zeros(1, 1, cfg.image_dim, device=dev, dtype=dt)
    temb = [transformer.condition_embedder(t.reshape(1).to(dev), txt, img)[1].float()
            for t in get_timesteps(40, 7.0)[:-1]]
    change = torch.stack([(a - b).abs().mean() for a, b in zip(temb[1:], temb[:-1])]).mean().item()
    pipe.step_cache_options = {"indicator_offset": change / target_rel_l1}


def bench_approx(args) -> list[dict]:
    """Approximations against the exact bf16 path on the same inputs and seed.

    ``cache``: exact mode (40 steps x 3 forwards) with the step cache at each threshold, one chunk at
    ``--size``, against the same run without the cache.  ``fp8``: turbo (2 forwards per step) and
    turbo with audio guidance 1 (1 forward) in bf16 eager, then the same after the fp8 memory mode
    (torchao FP8 compute) and regional compile; the second chunk is the steady-state time.
    Errors compare the decoded uint8 frames.
    """
    from infinitetalk.pipeline import GenerationRequest, apply_memory_mode, compile_transformer

    args.keep_frames = True
    b = _Bench(args, compile_now=False)
    records = []
    if "cache" in args.approx:
        w, h = (64, 64) if b.smoke else args.size
        b.seconds = 81 / VIDEO_FPS  # one chunk
        _calibrate_cache_indicator(b.pipe, args.cache_rel_l1)
        ref = base_sampling = None
        for thr in [0.0] + [t for t in args.cache_thresholds if t > 0]:
            req = GenerationRequest(image=b.image, audio=b.speech, width=w, height=h, steps=40, text_guidance=5.0,
                                    audio_guidance=4.0, shift=7.0, seed=0, step_cache=thr)
            result, wall, frames = b.run(req, f"cache-{thr}")
            sampling = result.timings["sampling_per_chunk"][-1]
            skipped = result.timings.get("step_cache_skipped", [0])[-1]
            if ref is None:
                ref, base_sampling = frames, sampling
            rec = _chunk_record(b, "exact-step-cache", f"{w}x{h}", h, w, result, wall, 40, 40, 5.0, 4.0,
                                step_cache_threshold=thr, indicator_rel_l1=args.cache_rel_l1, forwards_total=120,
                                forwards_skipped=int(skipped),
                                sampling_seconds=round(sampling, 2),
                                sampling_speedup=round(base_sampling / sampling, 3), **_errors(frames, ref))
            print(rec, flush=True)
            records.append(rec)
            b.cleanup()
    if "fp8" in args.approx:
        b.seconds = (81 + 72) / VIDEO_FPS
        h, w = (64, 64) if b.smoke else BUCKETS["480p"]
        refs = {}
        for variant in ("bf16-eager", "fp8-compile"):
            if variant == "fp8-compile":
                apply_memory_mode(b.pipe.transformer, "fp8", b.device, b.pipe.dtype)
                if not b.smoke:
                    compile_transformer(b.pipe.transformer)
                b.cleanup()
            for mode in ("turbo", "turbo-1nfe"):
                steps, steps_reported, tg, ag, shift = MODES[mode]
                req = GenerationRequest(image=b.image, audio=b.speech, width=w, height=h, steps=steps,
                                        text_guidance=tg, audio_guidance=ag, shift=shift, seed=0, turbo=True)
                result, wall, frames = b.run(req, f"{mode}-{variant}")
                refs.setdefault(mode, frames)
                rec = _chunk_record(b, mode, "480p", h, w, result, wall, steps, steps_reported, tg, ag,
                                    variant=variant, **_errors(frames, refs[mode]))
                print(rec, flush=True)
                records.append(rec)
                b.cleanup()
    b.close()
    return records


@torch.no_grad()
def _vae_precision(vae, device, resolutions) -> list[dict]:
    """Decode the same latents with the VAE in fp32 and bf16: time and relative error."""
    from infinitetalk.conditioning import vae_decode

    out = []
    for res in resolutions:
        h, w = BUCKETS[res]
        z = torch.randn(1, 16, 21, h // 8, w // 8, device=device, generator=torch.Generator(device).manual_seed(1))
        results = {}
        for dt in (torch.float32, torch.bfloat16):
            vae.to(dt)
            vae_decode(vae, z[:, :, :2])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            video = vae_decode(vae, z)
            torch.cuda.synchronize()
            results[dt] = (time.perf_counter() - t0, video)
        ref = results[torch.float32][1]
        err = ((results[torch.bfloat16][1] - ref).norm() / ref.norm()).item()
        max_abs = (results[torch.bfloat16][1] - ref).abs().max().item()
        rec = dict(mode="vae-decode", resolution=res, fp32_seconds=round(results[torch.float32][0], 3),
                   bf16_seconds=round(results[torch.bfloat16][0], 3), bf16_rel_l2=round(err, 5),
                   bf16_max_abs=round(max_abs, 4), note="random weights; 81 frames")
        print(rec, flush=True)
        out.append(rec)
        vae.to(torch.float32)
    return out
