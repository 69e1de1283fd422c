"""Colour correction of decoded chunks towards the first reference frame.

Per frame (golden README §4): map to [0, 1], convert to CIE Lab (scikit-image), match each
L/a/b channel's mean and population std to the reference, convert back, clip to [0, 1],
blend ``(1 - s) * src + s * corrected`` and map back.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage import color as skcolor

__all__ = ["match_and_blend_colors", "match_colors_frames"]


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")


def _lab_stats(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of an ``[H, W, 3]`` Lab image."""
    means = np.array([lab[:, :, j].mean() for j in range(3)])
    stds = np.array([lab[:, :, j].std() for j in range(3)])
    return means, stds


def _correct_frame(frame01: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray, strength: float) -> np.ndarray:
    """Colour-match one ``[H, W, 3]`` frame in [0, 1] and blend it with the original."""
    lab = skcolor.rgb2lab(frame01)
    out = lab.copy()
    for j in range(3):
        channel = lab[:, :, j]
        mean_src, std_src = channel.mean(), channel.std()
        if std_src == 0:
            out[:, :, j] = ref_mean[j]
        else:
            out[:, :, j] = (channel - mean_src) * (ref_std[j] / std_src) + ref_mean[j]
    corrected = np.clip(skcolor.lab2rgb(out), 0.0, 1.0)
    return (1 - strength) * frame01 + strength * corrected


def match_and_blend_colors(source: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Match the colours of a decoded chunk to a reference frame.

    Args:
        source: ``[1, 3, F, H, W]`` in [-1, 1].
        reference: ``[1, 3, 1, H', W']`` in [-1, 1].
        strength: 0 (returns ``source`` itself) to 1 (full correction).

    Returns:
        ``[1, 3, F, H, W]`` with the dtype and device of ``source``.
    """
    _check_strength(strength)
    if strength == 0.0:
        return source
    if source.shape[0] != 1 or reference.shape[0] != 1:
        raise ValueError("match_and_blend_colors expects a batch of one")
    src = source[0].permute(1, 2, 3, 0).detach().cpu().numpy()  # F H W C
    ref = reference[0, :, 0].permute(1, 2, 0).detach().cpu().numpy()  # H W C
    src01 = np.clip((src + 1.0) / 2.0, 0.0, 1.0)
    ref01 = np.clip((ref + 1.0) / 2.0, 0.0, 1.0)
    ref_mean, ref_std = _lab_stats(skcolor.rgb2lab(ref01))
    frames = [_correct_frame(src01[i], ref_mean, ref_std, strength) for i in range(src01.shape[0])]
    out = np.stack(frames, axis=0) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(out)).permute(3, 0, 1, 2).unsqueeze(0).contiguous().to(
        device=source.device, dtype=source.dtype
    )


def match_colors_frames(frames: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """Numpy variant on ``[F, H, W, 3]`` frames and an ``[H', W', 3]`` reference.

    uint8 inputs are treated as [0, 255], float inputs as [0, 1]; the result has the input's
    dtype (uint8 results are rounded).
    """
    _check_strength(strength)
    if strength == 0.0:
        return frames

    def to01(a: np.ndarray) -> np.ndarray:
        if a.dtype == np.uint8:
            return a.astype(np.float64) / 255.0
        return np.clip(a.astype(np.float64), 0.0, 1.0)

    ref_mean, ref_std = _lab_stats(skcolor.rgb2lab(to01(reference)))
    src01 = to01(frames)
    out = np.stack([_correct_frame(f, ref_mean, ref_std, strength) for f in src01], axis=0)
    if frames.dtype == np.uint8:
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return out.astype(frames.dtype)
