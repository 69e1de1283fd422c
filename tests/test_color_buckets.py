"""Colour matching, bucket choice, resize + crop and speaker masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infinitetalk.buckets import (
    ASPECT_RATIO_480,
    ASPECT_RATIO_720,
    center_crop_offsets,
    choose_bucket,
    default_speaker_masks,
    masks_to_latent,
    resize_and_centercrop,
    resize_and_centercrop_tensor,
    speaker_masks,
)
from infinitetalk.color import match_and_blend_colors, match_colors_frames
from infinitetalk.errors import InputError

GOLDEN = Path(__file__).resolve().parent / "golden"


# ----------------------------------------------------------------------------- colour
@pytest.mark.skipif(not (GOLDEN / "color_case.npz").exists(), reason="golden missing")
def test_color_matches_golden():
    z = np.load(GOLDEN / "color_case.npz")
    src, ref = torch.from_numpy(z["source_chunk"]), torch.from_numpy(z["reference_image"])
    for s, key in ((1.0, "output_strength_1_0"), (0.5, "output_strength_0_5")):
        out = match_and_blend_colors(src, ref, s)
        assert out.dtype == src.dtype and out.shape == src.shape
        assert np.abs(out.numpy() - z[key]).max() < 1e-4
    assert match_and_blend_colors(src, ref, 0.0) is src


def test_color_flat_channel_and_strength_validation():
    src = torch.zeros(1, 3, 2, 8, 8)  # flat grey: std 0 -> reference mean
    ref = torch.rand(1, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = match_and_blend_colors(src, ref, 1.0)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, :, 0], out[:, :, 1])
    with pytest.raises(ValueError):
        match_and_blend_colors(src, ref, 1.5)


def test_numpy_variant_agrees_with_tensor_path():
    rng = np.random.default_rng(0)
    frames = rng.random((2, 8, 12, 3)).astype(np.float32)
    ref = (rng.random((8, 12, 3)) * 0.5).astype(np.float32)
    np_out = match_colors_frames(frames, ref, 0.7)
    t_src = torch.from_numpy(frames * 2 - 1).permute(3, 0, 1, 2)[None]
    t_ref = torch.from_numpy(ref * 2 - 1).permute(2, 0, 1)[None, :, None]
    t_out = match_and_blend_colors(t_src, t_ref, 0.7)[0].permute(1, 2, 3, 0).numpy()
    assert np.abs((t_out + 1) / 2 - np_out).max() < 1e-5
    u8 = match_colors_frames((frames * 255).astype(np.uint8), (ref * 255).astype(np.uint8), 1.0)
    assert u8.dtype == np.uint8 and u8.shape == frames.shape


# ----------------------------------------------------------------------------- buckets
@pytest.mark.skipif(not (GOLDEN / "buckets.json").exists(), reason="golden missing")
def test_bucket_choice_matches_golden():
    data = json.loads((GOLDEN / "buckets.json").read_text())
    for size, cases in data["buckets"].items():
        for c in cases.values():
            assert list(choose_bucket(c["input_H"], c["input_W"], size)) == c["bucket_HW"]
    for name, table in (("ASPECT_RATIO_627", ASPECT_RATIO_480), ("ASPECT_RATIO_960", ASPECT_RATIO_720)):
        assert {k: list(v) for k, v in table.items()} == data[name]
        assert list(table) == list(data[name])  # order matters for ties


def test_bucket_ties_go_to_table_order_and_aliases():
    # ratio 0.94 is equidistant (up to float error) between '0.88' and '1.00' only in theory;
    # check the stable order directly on an exact midpoint of two keys.
    assert choose_bucket(1, 1, "480p") == (640, 640)
    assert choose_bucket(1080, 1920, "720") == choose_bucket(1080, 1920, "infinitetalk-720")
    with pytest.raises(InputError):
        choose_bucket(100, 100, "1080p")


@pytest.mark.skipif(not (GOLDEN / "buckets_case.npz").exists(), reason="golden missing")
def test_resize_crop_matches_golden():
    z = np.load(GOLDEN / "buckets_case.npz")
    for png, key in (("bucket_input.png", "input1_resized_cropped_uint8"),
                     ("bucket_input2.png", "input2_resized_cropped_uint8")):
        ref = z[key]
        with Image.open(GOLDEN / png) as im:
            out = resize_and_centercrop(im, tuple(ref.shape[-2:]))
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out.transpose(2, 0, 1)[None, :, None], ref)
    for a, b in (("mask_input_3x200x300", "mask_resized_cropped"), ("mask2_input_3x311x257", "mask2_resized_cropped")):
        out = resize_and_centercrop_tensor(torch.from_numpy(z[a]), tuple(z[b].shape[-2:]))
        np.testing.assert_array_equal(out.numpy(), z[b])


def test_crop_offsets_round_half_even():
    assert center_crop_offsets(449, 896, (448, 896)) == (0, 0)  # round(0.5) == 0
    assert center_crop_offsets(704, 582, (704, 576)) == (0, 3)


# ----------------------------------------------------------------------------- masks
def test_default_masks_geometry():
    m = default_speaker_masks(100, 200)
    assert m.shape == (3, 100, 200) and m.dtype == torch.float32
    p1, p2, bg = m
    assert p1[5:95, 5:95].all() and p1[:5].sum() == 0 and p1[:, 95:].sum() == 0
    assert p2[5:95, 105:195].all() and p2[:, :105].sum() == 0
    assert torch.equal(bg, ((p1 + p2) == 0).float())


def test_bbox_masks_and_validation():
    m = speaker_masks(100, 200, 2, bboxes=[[10, 20, 50, 60], [30, 120, 90, 190]])
    assert m[0, 10:50, 20:60].all() and m[0].sum() == 40 * 40
    assert m[1, 30:90, 120:190].all() and m[1].sum() == 60 * 70
    assert m[2].sum() == 100 * 200 - 40 * 40 - 60 * 70
    assert torch.equal(speaker_masks(10, 20, 1), torch.ones(3, 10, 20))
    with pytest.raises(InputError):
        speaker_masks(100, 200, 2, bboxes=[[50, 20, 10, 60], [30, 120, 90, 190]])
    with pytest.raises(InputError):
        speaker_masks(100, 200, 2, bboxes=[[10, 20, 50]])


def test_masks_to_latent():
    masks = default_speaker_masks(720, 1280)
    bucket = choose_bucket(720, 1280, "480p")
    lat = masks_to_latent(masks, bucket, (bucket[0] // 8, bucket[1] // 8))
    assert lat.shape == (3, 56, 112)
    assert set(lat.unique().tolist()) <= {0.0, 1.0}
    assert lat[0, :, :50].sum() > 0 and lat[0, :, 60:].sum() == 0
    assert lat[1, :, :56].sum() == 0
    one = masks_to_latent(torch.ones(3, 7, 9), (64, 64), (1, 1))
    assert one.shape == (3, 1, 1)
