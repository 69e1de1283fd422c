"""Conditioning that the DiT consumes: UMT5 text states, CLIP image states, VAE latents.

These are thin functions over transformers / diffusers components so the pipeline can compute
each thing once per video (text, CLIP and the first-frame condition for a still image) instead
of once per chunk.
"""

from __future__ import annotations

import html
import re

import ftfy
import numpy as np
import torch
import torch.nn.functional as F

# OpenAI CLIP normalisation, used when the image processor config does not say otherwise.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clean_prompt(text: str) -> str:
    """The official UMT5 text cleaning (``clean='whitespace'``): ``ftfy.fix_text`` (mojibake, curly
    quotes, fullwidth letters, control characters), HTML unescaped twice, whitespace collapsed."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, text: str, max_length: int = 512, device=None) -> tuple[torch.Tensor, bool]:
    """UMT5 hidden states of one prompt, ``[1, n, C]`` for its ``n`` real tokens (no padding).

    The transformer zero-pads to ``max_length``. Returns the states and whether the prompt was
    truncated to ``max_length`` tokens.
    """
    device = device or text_encoder.device
    full = tokenizer(clean_prompt(text), add_special_tokens=True, truncation=False)["input_ids"]
    truncated = len(full) > max_length
    batch = tokenizer(
        [clean_prompt(text)], padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    states = text_encoder(ids, attention_mask=mask).last_hidden_state
    length = int(mask.sum())
    return states[:, :length], truncated


def clip_pixels(frame: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """The official CLIP preprocessing of a frame in [-1, 1] ``[3, H, W]``: squash-resize (bicubic)
    to ``size`` x ``size`` without cropping, map to [0, 1], normalise.  Returns ``[1, 3, size, size]``."""
    x = F.interpolate(frame[None].float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@torch.no_grad()
def encode_image_clip(image_encoder, frame: torch.Tensor, size: int = 224, mean=CLIP_MEAN,
                      std=CLIP_STD) -> torch.Tensor:
    """CLIP vision penultimate hidden states of a [-1, 1] frame ``[3, H, W]`` -> ``[1, 257, C]``."""
    pixels = clip_pixels(frame, size, mean, std).to(image_encoder.device, image_encoder.dtype)
    out = image_encoder(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2]


def _latent_stats(vae, device, dtype):
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def vae_encode(vae, video: torch.Tensor) -> torch.Tensor:
    """Normalised latents (distribution mode) of a [-1, 1] clip ``[1, 3, F, H, W]`` -> ``[1, 16, T, h, w]``."""
    video = video.to(vae.device, vae.dtype)
    mu = vae.encode(video).latent_dist.mode()
    mean, std = _latent_stats(vae, mu.device, mu.dtype)
    return ((mu - mean) / std).float()


def vae_channels_last(vae) -> int:
    """Run the VAE's 3-D convolutions in channels-last (NDHWC) layout; returns how many.

    cuDNN computes these convolutions in NDHWC: with the default NCDHW tensors every one of them
    converts its input and output (and some cuDNN 9 releases pick slow kernels for NCDHW). The
    Conv3d weights are converted once and each convolution's inputs (the frame and its causal
    cache) are brought to the weights' layout, so the decoder stays channels-last between them.
    Results are the same up to floating-point summation order (tests/test_pipeline.py); the
    speed is measured in BENCHMARKS.md (``scripts/benchmark.py vae``). For CUDA devices."""
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        conv.register_forward_pre_hook(_inputs_channels_last)
    return len(convs)


def _inputs_channels_last(module, args):
    return tuple(a.contiguous(memory_format=torch.channels_last_3d) if isinstance(a, torch.Tensor) and a.dim() == 5
                 else a for a in args)


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode normalised latents ``[1, 16, T, h, w]`` -> frames in [-1, 1] ``[1, 3, F, H, W]`` (float32)."""
    latents = latents.to(vae.device, vae.dtype)
    mean, std = _latent_stats(vae, latents.device, latents.dtype)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    return video.float().clamp(-1, 1)


@torch.no_grad()
def first_frame_condition(vae, frame: torch.Tensor, num_frames: int = 81, temporal_stride: int = 4) -> torch.Tensor:
    """The I2V condition ``y``: 4 mask channels + VAE latents of [frame, zeros...], ``[1, 20, T, h, w]``.

    Only pixel frame 0 is marked known (the official InfiniteTalk puts only the reference frame
    there, never the context frames).
    """
    _, height, width = frame.shape
    clip = torch.zeros(1, 3, num_frames, height, width, dtype=frame.dtype, device=frame.device)
    clip[:, :, 0] = frame
    latents = vae_encode(vae, clip)  # [1, 16, T, h, w]
    _, _, t_lat, h, w = latents.shape
    mask = torch.zeros(1, num_frames, h, w, device=latents.device)
    mask[:, 0] = 1
    # Frame 0 counts for a whole latent frame: repeat it temporal_stride times, then group by 4.
    mask = torch.cat([mask[:, :1].repeat(1, temporal_stride, 1, 1), mask[:, 1:]], dim=1)
    mask = mask.view(1, t_lat, temporal_stride, h, w).transpose(1, 2)  # [1, 4, T, h, w]
    return torch.cat([mask, latents], dim=1)


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[-1, 1] frames ``[3, F, H, W]`` -> uint8 ``[F, H, W, 3]`` (numpy)."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()
