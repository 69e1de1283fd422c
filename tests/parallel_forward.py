"""One rank of the sequence-parallel forward check (run by tests/test_parallel.py under torchrun).

Builds the same tiny fp32 transformer as the single-process reference (same seed), splits the
tokens over the ranks with :func:`infinitetalk.distributed.enable_sequence_parallel` and saves the
gathered outputs for one and two speakers, plus a step-cache reuse call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinitetalk import distributed  # noqa: E402
from infinitetalk.models import InfiniteTalkTransformer3DModel  # noqa: E402
from infinitetalk.step_cache import StepCacheConfig, step_cache_stats  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=36, out_channels=16,
              text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, image_dim=24, added_kv_proj_dim=64,
              rope_max_seq_len=64, text_len=16, audio_window=5, audio_feature_dim=4 * 8,
              audio_intermediate_dim=32, audio_output_dim=16, audio_context_tokens=4, vae_scale=4)
# 5 latent frames of 4x6 tokens: 120 tokens; 60 per rank on 2 ranks (the boundary falls inside
# frame 2), 30 per rank on 4 ranks (inside frames 1, 2 and 3).
LAT_T, LAT_H, LAT_W = 5, 8, 12


def build():
    torch.manual_seed(0)
    model = InfiniteTalkTransformer3DModel(**CONFIG).eval()
    for p in model.parameters():  # random weights far from the zero-initialised defaults
        p.data.normal_(0, 0.2)
    return model


def inputs(speakers: int):
    g = torch.Generator().manual_seed(1)
    frames = 1 + 4 * (LAT_T - 1)
    lat = torch.randn(1, 36, LAT_T, LAT_H, LAT_W, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    clip = torch.randn(1, 257, 24, generator=g)
    audio = torch.randn(1, speakers, frames, 5, 4, 8, generator=g)
    masks = None
    if speakers == 2:
        masks = torch.zeros(3, LAT_H, LAT_W)
        masks[0, :, : LAT_W // 2] = 1
        masks[1, :, LAT_W // 2 :] = 1
        masks[2, : LAT_H // 4] = 1
    return lat, text, clip, audio, masks


@torch.no_grad()
def run(model) -> dict[str, torch.Tensor]:
    out = {}
    for speakers in (1, 2):
        lat, text, clip, audio, masks = inputs(speakers)
        out[f"speakers{speakers}"] = model(lat, torch.tensor([700.0]), text, clip, audio, ref_target_masks=masks,
                                           return_dict=False)[0]
    # Step cache: the second call at a nearby timestep reuses the first call's block residual.
    lat, text, clip, audio, _ = inputs(1)
    model.enable_cache(StepCacheConfig(threshold=1e9, warmup_steps=1))
    with model.cache_context("cond"):
        for t in (700.0, 699.0):
            res = model(lat, torch.tensor([t]), text, clip, audio, return_dict=False)[0]
    out["cached"] = res
    out["skipped"] = torch.tensor(step_cache_stats(model)[1])
    model.disable_cache()
    return out


def main(out_path: str) -> None:
    context = distributed.init_from_env()
    model = build()
    if context is not None:
        distributed.enable_sequence_parallel(model, context)
    result = run(model)
    if context is None or context.is_main:
        torch.save(result, out_path)
    if context is not None:
        # Every rank leaves together: a rank destroying its gloo group while another is still inside
        # the last collective aborted once ("terminate called without an active exception") on a
        # loaded 2-core machine.
        torch.distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
