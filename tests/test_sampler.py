"""Timesteps, CFG/APG and the Euler loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitetalk.errors import GenerationCancelled
from infinitetalk.sampler import (
    APGState,
    ContextLatents,
    adaptive_projected_guidance,
    combine_guidance,
    get_timesteps,
    guidance_branches,
    make_guided_denoiser,
    sample_euler,
)

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_timesteps_shape_ends_and_monotone():
    t = get_timesteps(40, 7.0)
    assert t.dtype == torch.float32 and t.shape == (41,)
    assert t[0].item() == 1000.0 and t[-1].item() == 0.0
    assert bool((t[:-1] > t[1:]).all())
    # The last model call sits at shift(1/1000)*1000, not near 0.
    assert abs(t[-2].item() - 7 * 0.001 / (1 + 6 * 0.001) * 1000) < 1e-3


@pytest.mark.skipif(not (GOLDEN / "schedule_and_windows.json").exists(), reason="golden missing")
def test_timesteps_match_golden_exactly():
    data = json.loads((GOLDEN / "schedule_and_windows.json").read_text())["timesteps"]
    for key, e in data.items():
        steps = int(e["num_model_timesteps"])
        shift = float(key.split("shift")[1])
        ours = get_timesteps(steps, shift).numpy()
        np.testing.assert_array_equal(ours, np.asarray(e["timesteps_float32"], dtype=np.float32))


def test_branch_selection():
    assert guidance_branches(5.0) == ("cond", "drop_text", "uncond")
    assert guidance_branches(1.0) == ("cond", "drop_audio")
    assert guidance_branches(1.0 + 1e-12) == ("cond", "drop_audio")


def _preds(seed: int = 0, shape=(4, 5, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k in ("cond", "drop_text", "uncond", "drop_audio")}


def test_guidance_scales_are_gains_on_the_branch_differences():
    """Raising a scale by one adds exactly that guidance's difference; scales of 1 give the
    conditional prediction; an audio scale of 0 (with text 1) gives the audio-free prediction."""
    p = _preds()
    step_text = combine_guidance(p, 6.0, 4.0) - combine_guidance(p, 5.0, 4.0)
    step_audio = combine_guidance(p, 5.0, 5.0) - combine_guidance(p, 5.0, 4.0)
    assert torch.allclose(step_text, p["cond"] - p["drop_text"], atol=1e-5)
    assert torch.allclose(step_audio, p["drop_text"] - p["uncond"], atol=1e-5)
    assert torch.allclose(combine_guidance(p, 1.0, 3.0) - combine_guidance(p, 1.0, 2.0),
                          p["cond"] - p["drop_audio"], atol=1e-5)
    assert torch.allclose(combine_guidance(p, 1.0, 1.0), p["cond"])
    assert torch.allclose(combine_guidance(p, 1.0, 0.0), p["drop_audio"])
    same = {k: p["cond"] for k in p}  # no difference between branches: nothing to guide
    assert torch.allclose(combine_guidance(same, 5.0, 4.0), p["cond"], atol=1e-5)


def test_apg_orthogonal_clipped_and_stateful():
    p = _preds(1)
    diff = (p["cond"] - p["drop_text"]) * 100  # norm far above the threshold
    state = APGState()
    out = adaptive_projected_guidance(diff, p["cond"], state.text, norm_threshold=55)
    assert abs(float((out.double() * p["cond"].double()).sum())) < 1e-3  # orthogonal to cond
    assert out.norm().item() <= 55 + 1e-3
    assert torch.equal(state.text.running_average, diff)
    adaptive_projected_guidance(diff, p["cond"], state.text)
    assert torch.allclose(state.text.running_average, diff * 0.25)  # diff + (-0.75) * diff
    state.reset()
    assert state.text.running_average is None and state.audio.running_average is None


@pytest.mark.skipif(not (GOLDEN / "cfg_case.npz").exists(), reason="golden missing")
def test_apg_matches_golden_two_steps():
    z = np.load(GOLDEN / "cfg_case.npz")
    state = APGState()
    for s in (0, 1):
        p = {k: torch.from_numpy(z[f"step{s}.noise_pred_{k}"]) for k in ("cond", "drop_text", "uncond")}
        out = combine_guidance(p, 5.0, 4.0, state)
        np.testing.assert_allclose(out.numpy(), z[f"step{s}.apg3.noise_pred"], atol=1e-5)
        np.testing.assert_allclose(state.text.running_average.numpy(), z[f"step{s}.apg3.text_running_average"],
                                   atol=1e-5)


def _toy_model(calls):
    def model(x, t, branch):
        calls.append((branch, float(t)))
        scale = {"cond": 1.0, "drop_text": 0.9, "uncond": 0.5, "drop_audio": 0.7}[branch]
        return x * scale
    return model


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (4, 2.0), (40, 7.0), (9, 11.0)])
def test_euler_recovers_the_clean_latent_from_the_exact_velocity(steps, shift):
    """Flow matching moves along straight lines: with the exact velocity ``noise - x0`` the Euler
    integrator lands on ``x0`` for any schedule (the property the sampler exists for)."""
    g = torch.Generator().manual_seed(steps)
    x0, noise = torch.randn(4, 5, 3, 3, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    calls = []

    def velocity(x, t):
        calls.append(float(t))
        return noise - x0

    out = sample_euler(velocity, noise, get_timesteps(steps, shift))
    assert torch.allclose(out, x0, atol=1e-5) and len(calls) == steps
    assert calls[0] == 1000.0 and all(a > b for a, b in zip(calls, calls[1:]))


def test_context_latents_stay_clean_and_the_rest_is_plain_euler():
    """The wrapper shows the model the clean context at every call and returns it in the result;
    the other frames follow the generic integrator exactly (the model acts frame by frame here)."""
    ts = get_timesteps(3, 5.0)
    x = torch.randn(4, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    motion = torch.full((4, 2, 2, 2), 7.0)
    seen, progress = [], []

    def denoise(lat, t):
        seen.append(lat.clone())
        return lat * 0.1 + t / 1000

    wrapped = ContextLatents(denoise, motion)
    x0 = wrapped.sample(x, ts, callback=lambda i, n, lat: progress.append((i, n)))
    assert progress == [(0, 3), (1, 3), (2, 3)] and len(seen) == 3
    assert all(torch.equal(s[:, :2], motion) for s in seen)
    assert torch.equal(x0[:, :2], motion)
    assert not torch.equal(x[:, :2], motion)  # the caller's noise is untouched
    plain = sample_euler(denoise, x, ts)
    assert torch.equal(x0[:, 2:], plain[:, 2:])


def test_denoiser_nfe_and_order():
    calls = []
    den = make_guided_denoiser(_toy_model(calls), 5.0, 4.0)
    den(torch.ones(1, 1, 1, 1), torch.tensor([500.0]))
    assert [c[0] for c in calls] == ["cond", "drop_text", "uncond"]
    calls.clear()
    den = make_guided_denoiser(_toy_model(calls), 1.0, 2.0, APGState())
    den(torch.ones(1, 2, 1, 1), torch.tensor([500.0]))
    assert [c[0] for c in calls] == ["cond", "drop_audio"]


def test_replayed_noise_matches_the_official_rng_use():
    """Chunks >= 1 of the official loop draw the context's noise once before the steps and once
    after each step; the next chunk's noise then comes from the same generator state."""
    ts = get_timesteps(2, 7.0)
    x = torch.zeros(2, 4, 1, 1)
    motion = torch.zeros(2, 3, 1, 1)
    g1 = torch.Generator().manual_seed(5)
    ContextLatents(lambda lat, t: lat, motion, g1, replay_noise=True).sample(x, ts)
    g2 = torch.Generator().manual_seed(5)
    for _ in range(1 + 2):
        torch.randn(motion.shape, generator=g2)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))
    g3 = torch.Generator().manual_seed(5)
    ContextLatents(lambda lat, t: lat, motion, g3, replay_noise=False).sample(x, ts)
    assert torch.equal(torch.randn(3, generator=g3), torch.randn(3, generator=torch.Generator().manual_seed(5)))


def test_callback_exception_cancels():
    ts = get_timesteps(4, 5.0)
    steps, calls = [], []

    def cb(i, n, lat):
        steps.append(i)
        if i == 1:
            raise GenerationCancelled("stop")

    def model(lat, t):
        calls.append(t)
        return lat

    with pytest.raises(GenerationCancelled):
        sample_euler(model, torch.zeros(1, 2, 1, 1), ts, callback=cb)
    assert steps == [0, 1] and len(calls) == 2  # no model call after the cancelling step


def test_unit_guidance_runs_one_forward_per_step():
    """Text and audio scales of 1 (no APG) need only the conditional branch: the result is exact."""
    calls = []

    def model(x, t, branch):
        calls.append(branch)
        return x * (2.0 if branch == "cond" else -3.0)

    x = torch.randn(2, 3)
    out = make_guided_denoiser(model, 1.0, 1.0)(x, torch.tensor([500.0]))
    assert calls == ["cond"] and torch.equal(out, x * 2.0)
    calls.clear()
    out = make_guided_denoiser(model, 1.0, 2.0)(x, torch.tensor([500.0]))
    assert calls == ["cond", "drop_audio"] and torch.allclose(out, -3 * x + 2 * (2 * x + 3 * x))
