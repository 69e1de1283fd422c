"""Resolution buckets, resize + centre crop, and the per-speaker masks.

* Bucket choice: ratio = H/W of the source; the bucket is the first table key after a
  stable sort by ``|float(key) - ratio|`` (ties go to table order). Values are ``(H, W)``.
* ``resize_and_centercrop``: scale = max(th/h, tw/w); resize to ``(ceil(scale*h),
  ceil(scale*w))`` (PIL bilinear for images, nearest interpolation for tensors/masks), then
  crop with top = ``int(round((H - th) / 2))`` and left likewise.
* Speaker masks (SPEC §1.4 / §2.3): class masks (person1, person2, background) at source
  resolution; bbox = ``[top, left, bottom, right]`` in source pixels; default = left/right
  halves with a 5 % margin; background = pixels outside every person mask. For one speaker
  all three masks are ones.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError

__all__ = [
    "ASPECT_RATIO_480",
    "ASPECT_RATIO_720",
    "BUCKET_TABLES",
    "choose_bucket",
    "resize_and_centercrop",
    "resize_and_centercrop_tensor",
    "center_crop_offsets",
    "default_speaker_masks",
    "speaker_masks",
    "masks_to_latent",
]

#: 480p buckets (official ``ASPECT_RATIO_627``): key = H/W ratio string, value = (H, W).
ASPECT_RATIO_480: Mapping[str, tuple[int, int]] = {
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768),
    "0.82": (576, 704), "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512),
    "1.86": (832, 448), "2.00": (896, 448), "2.50": (960, 384), "2.83": (1088, 384),
    "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}

#: 720p buckets (official ``ASPECT_RATIO_960``).
ASPECT_RATIO_720: Mapping[str, tuple[int, int]] = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
    "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
    "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
    "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
    "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}

BUCKET_TABLES: Mapping[str, Mapping[str, tuple[int, int]]] = {
    "480p": ASPECT_RATIO_480,
    "720p": ASPECT_RATIO_720,
}

_ALIASES = {"480": "480p", "infinitetalk-480": "480p", "720": "720p", "infinitetalk-720": "720p"}


def _table(resolution: str) -> Mapping[str, tuple[int, int]]:
    key = _ALIASES.get(resolution, resolution)
    if key not in BUCKET_TABLES:
        raise InputError(f"unknown resolution {resolution!r}; expected one of {sorted(BUCKET_TABLES)}")
    return BUCKET_TABLES[key]


def choose_bucket(height: int, width: int, resolution: str = "480p") -> tuple[int, int]:
    """Bucket ``(H, W)`` for a source of ``height`` x ``width`` pixels."""
    if height <= 0 or width <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    table = _table(resolution)
    ratio = height / width
    key = sorted(table.keys(), key=lambda k: abs(float(k) - ratio))[0]
    return tuple(table[key])  # type: ignore[return-value]


def _scaled_size(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    th, tw = target
    scale = max(th / h, tw / w)
    return math.ceil(scale * h), math.ceil(scale * w)


def center_crop_offsets(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a centre crop of ``target`` from ``h`` x ``w`` (torchvision rounding)."""
    th, tw = target
    return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))


def resize_and_centercrop(image: Image.Image, target: tuple[int, int]) -> np.ndarray:
    """Resize a PIL image (bilinear, ceil sizes) and centre-crop it.

    Returns uint8 ``[th, tw, 3]`` (RGB).
    """
    image = image.convert("RGB") if image.mode != "RGB" else image
    fh, fw = _scaled_size(image.height, image.width, target)
    arr = np.asarray(image.resize((fw, fh), resample=Image.BILINEAR))
    top, left = center_crop_offsets(fh, fw, target)
    th, tw = target
    return np.ascontiguousarray(arr[top : top + th, left : left + tw])


def resize_and_centercrop_tensor(t: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """Tensor path (masks): nearest interpolation of ``[C, H, W]`` then centre crop -> ``[C, th, tw]``."""
    if t.dim() != 3:
        raise ValueError(f"expected [C, H, W], got {tuple(t.shape)}")
    fh, fw = _scaled_size(t.shape[1], t.shape[2], target)
    resized = F.interpolate(t[None], size=(fh, fw), mode="nearest")[0]
    top, left = center_crop_offsets(fh, fw, target)
    th, tw = target
    return resized[:, top : top + th, left : left + tw].contiguous()


# --------------------------------------------------------------------------- masks
BBox = Sequence[Union[int, float]]


def default_speaker_masks(height: int, width: int, face_scale: float = 0.05) -> torch.Tensor:
    """Two-speaker default masks: left / right halves with a margin, plus background.

    Returns float32 ``[3, H, W]`` (person1, person2, background).
    """
    r0, r1 = int(height * face_scale), int(height * (1 - face_scale))
    half = width // 2
    l0, l1 = int(half * face_scale), int(half * (1 - face_scale))
    q0, q1 = int(half * face_scale + half), int(half * (1 - face_scale) + half)
    m1 = torch.zeros(height, width)
    m2 = torch.zeros(height, width)
    m1[r0:r1, l0:l1] = 1
    m2[r0:r1, q0:q1] = 1
    return _with_background([m1, m2])


def _with_background(persons: Sequence[torch.Tensor]) -> torch.Tensor:
    covered = torch.stack(list(persons)).sum(0)
    background = (covered <= 0).float()
    return torch.stack([*persons, background]).float()


def _bbox_mask(bbox: BBox, height: int, width: int, name: str) -> torch.Tensor:
    if len(bbox) != 4:
        raise InputError(f"bbox of {name} must be [top, left, bottom, right], got {list(bbox)}")
    top, left, bottom, right = (int(v) for v in bbox)
    top, bottom = max(0, top), min(height, bottom)
    left, right = max(0, left), min(width, right)
    if bottom <= top or right <= left:
        raise InputError(
            f"bbox of {name} {list(bbox)} is empty inside the {width}x{height} image "
            "(format [top, left, bottom, right] in source pixels)"
        )
    m = torch.zeros(height, width)
    m[top:bottom, left:right] = 1
    return m


def speaker_masks(
    height: int,
    width: int,
    num_speakers: int,
    bboxes: Optional[Sequence[BBox]] = None,
    face_scale: float = 0.05,
) -> torch.Tensor:
    """Class masks at source resolution, float32 ``[3, H, W]`` (person1, person2, background).

    One speaker: three all-ones masks (the official single-person input). Two speakers:
    ``bboxes`` (one ``[top, left, bottom, right]`` per speaker) or the default halves.
    """
    if num_speakers == 1:
        return torch.ones(3, height, width)
    if num_speakers != 2:
        raise InputError(f"1 or 2 speakers are supported, got {num_speakers}")
    if bboxes is None:
        return default_speaker_masks(height, width, face_scale)
    if len(bboxes) != 2:
        raise InputError(f"expected one bbox per speaker (2), got {len(bboxes)}")
    persons = [_bbox_mask(b, height, width, f"person{i + 1}") for i, b in enumerate(bboxes)]
    return _with_background(persons)


def masks_to_latent(masks: torch.Tensor, bucket: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Source-resolution masks ``[3, H, W]`` -> binary float32 ``[3, lat_h, lat_w]``.

    Resize + centre crop to the bucket (tensor path), nearest-resize to the latent grid, ``> 0``.
    """
    m = resize_and_centercrop_tensor(masks.float(), bucket)
    m = F.interpolate(m[None], size=tuple(latent_hw), mode="nearest")[0]
    return (m > 0).float()
