"""Flow-matching Euler sampler, classifier-free guidance and APG for InfiniteTalk.

Small pure functions in the k-diffusion style. Latents are ``[C, T, h, w]`` (no batch
axis), as in the official loop where the DiT returns ``model(...)[0]``.

Semantics follow the official ``generate_infinitetalk`` loop (see golden README §6/§7):

* timesteps: ``linspace(1000, 1, steps)`` in float32, ``0`` appended, then shifted with
  ``t' = shift*t / (1 + (shift-1)*t)`` on ``t/1000`` in float32, times 1000;
* Euler update: ``x = x + (-pred) * (t_i - t_{i+1}) / 1000``;
* the first ``n_m`` latent frames are replaced by the clean motion latents before the first
  model call and after every update (:class:`ContextLatents`, a wrapper around the model: the
  integrator :func:`sample_euler` itself is generic);
* guidance: 3 NFE (text + audio CFG) unless the text scale is 1 (then 2 NFE, audio only),
  optionally with APG (momentum buffer, norm clipping, projection orthogonal to the
  conditional prediction in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np
import torch

__all__ = [
    "BRANCHES_3NFE",
    "BRANCHES_2NFE",
    "MomentumBuffer",
    "APGState",
    "get_timesteps",
    "shift_timesteps",
    "uses_text_guidance",
    "guidance_branches",
    "adaptive_projected_guidance",
    "combine_guidance",
    "make_guided_denoiser",
    "sample_euler",
    "ContextLatents",
]

#: Branch names in the order the official loop evaluates them.
BRANCHES_3NFE: tuple[str, ...] = ("cond", "drop_text", "uncond")
BRANCHES_2NFE: tuple[str, ...] = ("cond", "drop_audio")

_NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------- timesteps
def shift_timesteps(t: torch.Tensor, shift: float, num_train_timesteps: int = _NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Apply the flow-matching time shift to timesteps given in ``[0, num_train_timesteps]``.

    Computed with the dtype of ``t`` (float32 in the official loop), in the same operation order.
    """
    u = t / num_train_timesteps
    u = shift * u / (1 + (shift - 1) * u)
    return u * num_train_timesteps


def get_timesteps(steps: int, shift: float, num_train_timesteps: int = _NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Sampling timesteps, float32 ``[steps + 1]``; the last value is 0.

    The model is evaluated at the first ``steps`` values.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = np.linspace(num_train_timesteps, 1, steps, dtype=np.float32)
    t = torch.from_numpy(np.concatenate([base, np.zeros(1, dtype=np.float32)]))
    return shift_timesteps(t, float(shift), num_train_timesteps)


# --------------------------------------------------------------------------- guidance
def uses_text_guidance(text_scale: float) -> bool:
    """True for the 3-NFE mode; a text scale of (close to) 1 selects the 2-NFE audio-only mode."""
    return not math.isclose(text_scale, 1.0)


def guidance_branches(text_scale: float) -> tuple[str, ...]:
    """The branch names to evaluate for one step, in the official order."""
    return BRANCHES_3NFE if uses_text_guidance(text_scale) else BRANCHES_2NFE


@dataclass
class MomentumBuffer:
    """Running average ``r <- v + momentum * r`` used by APG (starts at 0)."""

    momentum: float = -0.75
    running_average: Optional[torch.Tensor] = None

    def update(self, value: torch.Tensor) -> torch.Tensor:
        if self.running_average is None:
            self.running_average = value + self.momentum * 0
        else:
            self.running_average = value + self.momentum * self.running_average
        return self.running_average


@dataclass
class APGState:
    """Adaptive projected guidance settings plus the two momentum buffers of one chunk.

    Create a fresh one (or call :meth:`reset`) for every chunk: the official code creates
    new buffers per chunk.
    """

    momentum: float = -0.75
    norm_threshold: float = 55.0
    eta: float = 0.0
    text: MomentumBuffer = field(init=False)
    audio: MomentumBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.text = MomentumBuffer(self.momentum)
        self.audio = MomentumBuffer(self.momentum)


def _project(v0: torch.Tensor, v1: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``v0`` into parts parallel / orthogonal to ``v1`` over the last ``ndim`` axes, in float64."""
    dims = list(range(-1, -ndim - 1, -1))
    dtype = v0.dtype
    a, b = v0.double(), v1.double()
    b = torch.nn.functional.normalize(b, dim=dims)
    parallel = (a * b).sum(dim=dims, keepdim=True) * b
    orthogonal = a - parallel
    return parallel.to(dtype), orthogonal.to(dtype)


def adaptive_projected_guidance(
    diff: torch.Tensor,
    pred_cond: torch.Tensor,
    buffer: Optional[MomentumBuffer] = None,
    *,
    eta: float = 0.0,
    norm_threshold: float = 55.0,
) -> torch.Tensor:
    """APG update direction for a guidance difference ``diff`` (arXiv 2410.02416).

    ``diff``/``pred_cond``: ``[C, T, h, w]`` (norms are over these last 4 axes).
    The buffer is updated in place.
    """
    if buffer is not None:
        diff = buffer.update(diff)
    if norm_threshold > 0:
        dims = [-1, -2, -3, -4]
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    parallel, orthogonal = _project(diff, pred_cond)
    return orthogonal + eta * parallel


def combine_guidance(
    preds: Mapping[str, torch.Tensor],
    text_scale: float,
    audio_scale: float,
    apg: Optional[APGState] = None,
) -> torch.Tensor:
    """Combine branch predictions into the guided prediction.

    ``preds`` holds ``cond``, ``drop_text``, ``uncond`` (3 NFE) or ``cond``, ``drop_audio``
    (2 NFE, when ``text_scale`` is close to 1). With ``apg`` the APG form is used and its
    buffers are updated.
    """
    cond = preds["cond"]
    if uses_text_guidance(text_scale):
        drop_text, uncond = preds["drop_text"], preds["uncond"]
        if apg is None:
            return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)
        g_text = adaptive_projected_guidance(
            cond - drop_text, cond, apg.text, eta=apg.eta, norm_threshold=apg.norm_threshold
        )
        g_audio = adaptive_projected_guidance(
            drop_text - uncond, cond, apg.audio, eta=apg.eta, norm_threshold=apg.norm_threshold
        )
        return cond + (text_scale - 1) * g_text + (audio_scale - 1) * g_audio
    drop_audio = preds["drop_audio"]
    if apg is None:
        return drop_audio + audio_scale * (cond - drop_audio)
    g_audio = adaptive_projected_guidance(
        cond - drop_audio, cond, apg.audio, eta=apg.eta, norm_threshold=apg.norm_threshold
    )
    return cond + (audio_scale - 1) * g_audio


BranchModel = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_guided_denoiser(
    model: BranchModel,
    text_scale: float,
    audio_scale: float,
    apg: Optional[APGState] = None,
) -> Denoiser:
    """Build ``denoise(x, t) -> guided prediction`` from ``model(x, t, branch) -> prediction``.

    ``branch`` is one of ``cond``, ``drop_text``, ``uncond``, ``drop_audio``; the branches are
    requested in the official order (3 or 2 per step, chosen from ``text_scale``).
    Pass a fresh ``apg`` state per chunk.
    """
    branches = guidance_branches(text_scale)
    if apg is None and not uses_text_guidance(text_scale) and math.isclose(audio_scale, 1.0):
        # drop_audio + 1 * (cond - drop_audio) == cond: the unguided forward would be wasted.
        def denoise_cond_only(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, "cond")

        return denoise_cond_only

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        preds = {name: model(x, t, name) for name in branches}
        return combine_guidance(preds, text_scale, audio_scale, apg)

    return denoise


# --------------------------------------------------------------------------- Euler loop
StepCallback = Callable[[int, int, torch.Tensor], None]
PostStep = Callable[[torch.Tensor], torch.Tensor]


def sample_euler(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    callback: Optional[StepCallback] = None,
    post_step: Optional[PostStep] = None,
) -> torch.Tensor:
    """Generic Euler flow-matching integrator: ``x <- x - model(x, t_i) * (t_i - t_{i+1}) / 1000``.

    Args:
        model: ``model(x, t [1]) -> prediction`` shaped like ``x`` (velocity, flow matching).
        x: the starting latent (not modified; the loop works on its own copy).
        timesteps: ``[steps + 1]`` from :func:`get_timesteps`, ending at 0.
        callback: ``callback(step_index, num_steps, x)`` after each step; an exception it raises
            propagates (that is how a run is cancelled).
        post_step: ``post_step(x) -> x`` right after each update, before the callback (a model
            wrapper's hook, e.g. re-imposing known latents; see :class:`ContextLatents`).

    Returns:
        The final latent.
    """
    x = x.clone()
    num_steps = int(timesteps.shape[0]) - 1
    # On the latent's device once: a host-to-device copy inside the loop waits for the GPU every step,
    # which leaves it idle while the next model call is launched. Same float32 arithmetic either side.
    timesteps = timesteps.to(x.device)
    for i in range(num_steps):
        pred = model(x, timesteps[i : i + 1])
        dt = (timesteps[i] - timesteps[i + 1]).reshape(1) / _NUM_TRAIN_TIMESTEPS
        x = x + (-pred) * dt
        if post_step is not None:
            x = post_step(x)
        if callback is not None:
            callback(i, num_steps, x)
    return x


class ContextLatents:
    """InfiniteTalk's clean context latents around a denoiser (the model-specific part of a chunk's loop).

    The first ``n_m`` latent frames of every chunk are known (the reference frame for chunk 0, the
    VAE latents of the previous chunk's last 9 frames later): they are written into the latent
    before the first model call and after every update (:meth:`start`, :meth:`post_step`), so
    the model always sees them clean and the decoded chunk starts with them.

    ``replay_noise`` reproduces the official loop's random-number use in chunks >= 1: it draws
    (and discards) noise of the context's shape from ``generator`` once before the steps and once
    after each step, so later chunks get the official noise for the same seed.
    """

    def __init__(self, denoise: Denoiser, motion_latents: torch.Tensor,
                 generator: Optional[torch.Generator] = None, replay_noise: bool = False) -> None:
        self.denoise = denoise
        self.motion = motion_latents
        self.generator = generator
        self.replay_noise = replay_noise

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t)

    def _replay(self) -> None:
        if self.replay_noise:
            gen = self.generator
            torch.randn(self.motion.shape, generator=gen, dtype=self.motion.dtype,
                        device=gen.device if gen is not None else self.motion.device)

    def post_step(self, x: torch.Tensor) -> torch.Tensor:
        self._replay()
        x[:, : self.motion.shape[1]] = self.motion
        return x

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The latent the integrator starts from: ``noise`` with the context written in (a copy)."""
        self.motion = self.motion.to(noise.device, noise.dtype)
        return self.post_step(noise.clone())

    def sample(self, noise: torch.Tensor, timesteps: torch.Tensor,
               callback: Optional[StepCallback] = None) -> torch.Tensor:
        """One chunk: :func:`sample_euler` from :meth:`start` with :meth:`post_step`."""
        return sample_euler(self, self.start(noise), timesteps, callback=callback, post_step=self.post_step)
