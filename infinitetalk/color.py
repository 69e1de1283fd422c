"""Colour correction of decoded chunks towards the first reference frame.

Per frame (golden README section 4): map to [0, 1], convert to CIE Lab, match each L/a/b
channel's mean and population std to the reference, convert back, clip to [0, 1], blend
``(1 - s) * src + s * corrected`` and map back.

The Lab conversion reproduces scikit-image's ``rgb2lab`` / ``lab2rgb`` (sRGB, D65, 2 degree
observer, negative Z clipped) in torch, so it runs on the GPU where the frames already are:
81 frames at 640x640 take milliseconds instead of seconds on the CPU.  In float64 it matches
scikit-image to ~1e-12; the pipeline uses float32 on the GPU (about 1e-5).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["lab_to_rgb", "match_and_blend_colors", "match_colors_frames", "rgb_to_lab"]

_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65 = (0.95047, 1.0, 1.08883)


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")


def _matrix(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64).to(x.device, x.dtype)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ``[..., 3]`` -> CIE Lab ``[..., 3]`` (scikit-image semantics)."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _matrix(rgb).T
    xyz = xyz / torch.tensor(_D65, dtype=rgb.dtype, device=rgb.device)
    f = torch.where(xyz > 0.008856, torch.sign(xyz) * xyz.abs() ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab ``[..., 3]`` -> sRGB clipped to [0, 1] (negative Z clipped like scikit-image)."""
    L, a, b = lab.unbind(-1)
    fy = (L + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp(min=0)
    f = torch.stack([fx, fy, fz], dim=-1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * torch.tensor(_D65, dtype=lab.dtype, device=lab.device)
    lin = xyz @ torch.linalg.inv(_matrix(lab)).T
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


def _match(frames01: torch.Tensor, ref01: torch.Tensor, strength: float) -> torch.Tensor:
    """``frames01`` ``[F, H, W, 3]``, ``ref01`` ``[H', W', 3]`` in [0, 1] -> corrected, blended."""
    ref_lab = rgb_to_lab(ref01).reshape(-1, 3)
    ref_mean, ref_std = ref_lab.mean(0), ref_lab.std(0, unbiased=False)
    lab = rgb_to_lab(frames01)
    flat = lab.reshape(lab.shape[0], -1, 3)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True)
    scaled = (flat - mean) * (ref_std / std.clamp(min=1e-30)) + ref_mean
    matched = torch.where(std == 0, ref_mean.expand_as(flat), scaled)
    corrected = lab_to_rgb(matched.reshape(lab.shape))
    return (1 - strength) * frames01 + strength * corrected


def match_and_blend_colors(source: torch.Tensor, reference: torch.Tensor, strength: float,
                           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Match the colours of a decoded chunk to a reference frame.

    Args:
        source: ``[1, 3, F, H, W]`` in [-1, 1].
        reference: ``[1, 3, 1, H', W']`` in [-1, 1].
        strength: 0 (returns ``source`` itself) to 1 (full correction).
        compute_dtype: float64 by default on the CPU (exact), float32 on the GPU.

    Returns:
        ``[1, 3, F, H, W]`` with the dtype and device of ``source``.
    """
    _check_strength(strength)
    if strength == 0.0:
        return source
    if source.shape[0] != 1 or reference.shape[0] != 1:
        raise ValueError("match_and_blend_colors expects a batch of one")
    if compute_dtype is None:
        compute_dtype = torch.float64 if source.device.type == "cpu" else torch.float32
    src = ((source[0].permute(1, 2, 3, 0).to(compute_dtype) + 1.0) / 2.0).clamp(0, 1)  # F H W C
    ref = ((reference[0, :, 0].permute(1, 2, 0).to(compute_dtype).to(source.device) + 1.0) / 2.0).clamp(0, 1)
    out = _match(src, ref, strength) * 2.0 - 1.0
    return out.permute(3, 0, 1, 2).unsqueeze(0).contiguous().to(source.dtype)


def match_colors_frames(frames: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """Numpy variant on ``[F, H, W, 3]`` frames and an ``[H', W', 3]`` reference.

    uint8 inputs are treated as [0, 255], float inputs as [0, 1]; the result has the input's
    dtype (uint8 results are rounded).
    """
    _check_strength(strength)
    if strength == 0.0:
        return frames

    def to01(a: np.ndarray) -> torch.Tensor:
        a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else np.clip(a.astype(np.float64), 0.0, 1.0)
        return torch.from_numpy(a)

    out = _match(to01(frames), to01(reference), strength).numpy()
    if frames.dtype == np.uint8:
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return out.astype(frames.dtype)
