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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmark import BUCKETS, FULL_CONFIG, NEW_FRAMES_PER_CHUNK, VIDEO_FPS, _env, build_random_model, forward_flops  # noqa: E402

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
    """Stands in for the ffmpeg encoder when the GPU box has no ffmpeg binary."""

    def __init__(self, path, width, height, **_):
        self.path = Path(path)
        self.frames_written = 0

    def write(self, frames):
        self.frames_written += len(frames)

    def close(self):
        return self.path

    def abort(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bench_chunk(args) -> list[dict]:
    from PIL import Image

    from infinitetalk import audio as audio_lib
    from infinitetalk import media
    from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline, compile_transformer

    import os

    env = _env()
    smoke = os.environ.get("BENCH_SMOKE") == "1"  # CPU dry run of the whole flow with tiny components
    device = torch.device("cpu" if smoke else "cuda")
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    subprocess.run([sys.executable, str(HERE / "make_tiny_weights.py"), str(tmp / "tiny")], check=True,
                   stdout=subprocess.DEVNULL)
    has_ffmpeg = shutil.which("ffmpeg") is not None
    if not has_ffmpeg:
        media.VideoWriter = _NullWriter  # encoder runs in its own process in production; noted in the record
    vae_dtype = torch.bfloat16 if getattr(args, "vae_bf16", False) else torch.float32
    if smoke:
        pipe = InfiniteTalkPipeline.from_pretrained(tmp / "tiny", device="cpu")
    else:
        transformer = build_random_model(FULL_CONFIG, num_layers=args.layers)
        if getattr(args, "compile", False):
            compile_transformer(transformer)
        vae, t5, tok, clip, audio = _random_components(device, torch.bfloat16, vae_dtype, tmp / "tiny")
        pipe = InfiniteTalkPipeline(transformer, vae, t5, tok, clip, audio, device=device, dtype=torch.bfloat16)
    vae = pipe.vae
    pipe.turbo_loaded = True
    try:
        from skimage import data

        portrait = data.astronaut()
    except Exception:  # noqa: BLE001
        portrait = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    image = tmp / "portrait.png"
    Image.fromarray(portrait).save(image)
    records = []
    seconds = (81 + 72) / VIDEO_FPS  # exactly 2 chunks
    audio_lib.load_speech = lambda path, *a, **k: _speech_like(seconds)  # noqa: E731 (no decoder libs needed)
    speech = tmp / "speech.wav"
    speech.write_bytes(b"")
    for res in args.resolutions:
        h, w = (64, 64) if smoke else BUCKETS[res]
        for mode in args.modes:
            steps, steps_reported, tg, ag, shift = MODES[mode]
            req = GenerationRequest(image=image, audio=speech, width=w, height=h, steps=steps, text_guidance=tg,
                                    audio_guidance=ag, shift=shift, seed=0, turbo=mode == "turbo")
            if not smoke:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = pipe.generate(req, tmp / f"{mode}-{res}.mp4", show_progress=False)
            wall = time.perf_counter() - t0
            tm = result.timings
            chunk = tm["chunk_seconds"][-1]  # a steady-state chunk (k >= 1)
            sampling = tm["sampling_per_chunk"][-1]
            per_step = sampling / steps
            overhead = chunk - sampling
            chunk_reported = overhead + per_step * steps_reported
            nfe = 3 if tg != 1.0 else (2 if ag != 1.0 else 1)
            fl = forward_flops(FULL_CONFIG, h, w)
            rec = dict(
                env, mode=mode, resolution=res, width=w, height=h, speakers=1, steps=steps_reported,
                forwards_per_step=nfe, steps_measured=steps, vae_dtype=str(vae_dtype).replace("torch.", ""),
                compiled=bool(getattr(args, "compile", False)), ffmpeg_encoder=has_ffmpeg,
                seconds_per_forward=round(per_step / nfe, 3), seconds_per_step=round(per_step, 3),
                chunk_overhead_seconds=round(overhead, 3), seconds_per_chunk=round(chunk_reported, 2),
                gpu_seconds_per_video_second=round(chunk_reported / (NEW_FRAMES_PER_CHUNK / VIDEO_FPS), 2),
                floor_seconds_per_forward=round(fl["floor_seconds"], 3),
                conditioning_seconds=round(tm.get("conditioning", 0.0), 2), measured_wall_seconds=round(wall, 1),
                peak_memory_gb=0.0 if smoke else round(torch.cuda.max_memory_allocated() / 1e9, 2),
            )
            print(rec, flush=True)
            records.append(rec)
            gc.collect()
            if not smoke:
                torch.cuda.empty_cache()
    if not smoke:
        records += _vae_precision(vae, device, args.resolutions)
    shutil.rmtree(tmp, ignore_errors=True)
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
