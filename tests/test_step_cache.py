"""Step cache: per-branch state (correct for 2- and 3-forward guidance), exact when off."""

from __future__ import annotations

import torch

from infinitetalk.step_cache import StepCache
from infinitetalk.weights import load_transformer


def test_decisions_are_per_branch_and_warm_up_first():
    cache = StepCache(threshold=10.0, warmup_steps=2)
    e0 = torch.ones(1, 6, 8)
    decisions = []
    for _step in range(4):
        for branch in ("cond", "drop_audio"):  # the 2-forward order
            skip = cache.should_skip(branch, e0)
            if not skip:
                cache.store(branch, torch.full((1,), float(len(branch))))
            decisions.append((branch, skip))
    # each branch computes its own first 2 calls, then skips (no change in e0): never out of phase
    assert decisions == [("cond", False), ("drop_audio", False)] * 2 + [("cond", True), ("drop_audio", True)] * 2
    assert cache.residual("cond").item() == 4.0 and cache.residual("drop_audio").item() == 10.0
    assert (cache.computed, cache.skipped) == (4, 4)


def test_threshold_zero_never_skips_and_a_big_change_recomputes():
    cache = StepCache(threshold=0.0, warmup_steps=0)
    for i in range(3):
        assert not cache.should_skip("cond", torch.full((1, 6, 8), 1.0 + i))
        cache.store("cond", torch.zeros(1))
    cache = StepCache(threshold=0.5, warmup_steps=1)
    assert not cache.should_skip("uncond", torch.ones(4))
    cache.store("uncond", torch.zeros(1))
    assert not cache.should_skip("uncond", torch.full((4,), 3.0))  # rel-L1 2.0 -> polynomial far above 0.5


def test_model_reuses_the_same_branch_residual(tiny_weights):
    model = load_transformer(tiny_weights / "Wan2.1-I2V-14B-480P-Diffusers" / "transformer",
                             tiny_weights / "InfiniteTalk" / "single" / "infinitetalk.safetensors", dtype=torch.float32)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)
    t = torch.tensor([600.0])
    texts = {"cond": torch.randn(1, 5, cfg.text_dim, generator=g), "drop_audio": torch.randn(1, 5, cfg.text_dim, generator=g)}
    clip = torch.randn(1, 257, cfg.image_dim, generator=g)
    audio = torch.randn(1, 1, 5, cfg.audio_window, cfg.audio_feature_dim, generator=g)
    audios = {"cond": audio, "drop_audio": torch.zeros_like(audio)}

    def call(branch, cache=None):
        with torch.no_grad():
            return model(lat, t, texts[branch], clip, audios[branch], return_dict=False, step_cache=cache,
                         cache_branch=branch)[0]

    exact = {b: call(b) for b in texts}
    assert (exact["cond"] - exact["drop_audio"]).abs().max() > 1e-3
    cache = StepCache(threshold=10.0, warmup_steps=1)
    first = {b: call(b, cache) for b in texts}  # computed, residuals stored
    second = {b: call(b, cache) for b in texts}  # same e0: skipped, each with its own residual
    assert cache.skipped == 2 and cache.computed == 2
    for b in texts:
        assert torch.equal(first[b], exact[b])
        assert torch.allclose(second[b], exact[b], atol=1e-5), b


def test_pipeline_with_step_cache(tiny_weights, portrait, make_speech, tmp_path):
    from decoding import ffprobe_streams

    from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu")
    speech = make_speech(1.0, "cache")
    base = dict(image=portrait, audio=speech, width=64, height=64, steps=8, seed=3, text_guidance=1.0)
    result = pipe.generate(GenerationRequest(**base, step_cache=1.0), tmp_path / "c.mp4", show_progress=False)
    info = ffprobe_streams(result.path)
    assert info["video"]["nb_frames"] == 25 and info["audio"]["codec"] == "aac"
    assert result.timings["step_cache_skipped"] and result.timings["step_cache_skipped"][0] >= 0
