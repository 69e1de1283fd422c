"""One forward of a tiny transformer on fixed random inputs (tests/ is on sys.path for test modules)."""

from __future__ import annotations

import torch


def forward_inputs(model, seed: int = 0):
    """Latents, timestep, text, CLIP and audio inputs of one small forward of ``model``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    lat = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(1, 7, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g)
    audio = torch.randn(1, 1, 5, cfg.audio_window, cfg.audio_feature_dim, generator=g)
    return lat, torch.tensor([700.0]), text, clip, audio


def run_forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]
