"""Flow-matching Euler sampler, classifier-free guidance and APG for InfiniteTalk.

Small pure functions in the k-diffusion style. Latents are ``[C, T, h, w]`` (no batch
axis), as in the official loop where the DiT returns ``model(...)[0]``.

Semantics follow the official ``generate_infinitetalk`` loop (see golden README §6/§7):

* timesteps: ``linspace(1000, 1, steps)`` in float32, ``0`` appended, then shifted with
  ``t' = shift*t / (1 + (shift-1)*t)`` on ``t/1000`` in float32, times 1000;
* Euler update: ``x = x + (-pred) * (t_i - t_{i+1}) / 1000``;
* the first ``n_m`` latent frames are replaced by the clean motion latents before every
  model call and after every update;
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


def _inject(x: torch.Tensor, motion: torch.Tensor) -> None:
    x[:, : motion.shape[1]] = motion


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    motion_latents: torch.Tensor,
    callback: Optional[StepCallback] = None,
    generator: Optional[torch.Generator] = None,
    burn_motion_noise: bool = False,
) -> torch.Tensor:
    """Euler flow-matching loop of one chunk.

    Args:
        denoise: ``denoise(x [C,T,h,w], t [1]) -> guided prediction [C,T,h,w]``.
        x: initial noise ``[C, T, h, w]`` (not modified; a copy is used).
        timesteps: ``[steps + 1]`` from :func:`get_timesteps`.
        motion_latents: clean context latents ``[C, n_m, h, w]``; written into the first
            ``n_m`` frames before every model call and after every update.
        callback: ``callback(step_index, num_steps, x)`` after each step; an exception it
            raises propagates (cancellation).
        generator: RNG used for the discarded motion-noise draws (None: global RNG).
        burn_motion_noise: draw (and discard) ``randn(motion_latents.shape)`` once before the
            steps and once after each step, reproducing the official RNG consumption of
            chunks >= 1.

    Returns:
        The final latent ``x0`` ``[C, T, h, w]``.
    """
    motion = motion_latents.to(dtype=x.dtype, device=x.device)
    latent = x.clone()
    num_steps = int(timesteps.shape[0]) - 1

    def burn() -> None:
        if burn_motion_noise:
            torch.randn(motion.shape, generator=generator, dtype=motion.dtype,
                        device=generator.device if generator is not None else motion.device)

    burn()
    _inject(latent, motion)  # before the first model call; later calls follow the post-update overwrite
    for i in range(num_steps):
        t = timesteps[i : i + 1].to(latent.device)
        pred = denoise(latent, t)
        dt = (timesteps[i] - timesteps[i + 1]).reshape(1) / _NUM_TRAIN_TIMESTEPS
        latent = latent + (-pred) * dt.to(latent.device)
        burn()
        _inject(latent, motion)
        if callback is not None:
            callback(i, num_steps, latent)
    return latent
