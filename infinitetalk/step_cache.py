"""Step cache: skip the transformer blocks on steps whose conditioning barely changed (TeaCache rule).

For each guidance branch separately (``cond``, ``drop_text``, ``uncond``, ``drop_audio``), the
relative L1 change of the timestep modulation ``e0`` since that branch's previous call is rescaled
by the official polynomial and accumulated; while the sum stays under the threshold the blocks are
skipped and the branch's last block residual (output minus input of the block stack) is added
instead.  The first ``warmup_steps`` calls of every branch are always computed.

Keying the state by branch name (not by a call counter modulo 3, as the official code does) keeps it
correct for the 2-forward guidance too, where the official cache mixes the branches.  A new cache is
made for every chunk.  Off by default: it is an approximation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Official TeaCache coefficients for the InfiniteTalk/MultiTalk DiT (highest degree first).
COEFFICIENTS = {
    "480p": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "720p": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}


@dataclass
class _BranchState:
    calls: int = 0
    accumulated: float = 0.0
    previous_e0: torch.Tensor | None = None
    residual: torch.Tensor | None = None


@dataclass
class StepCache:
    threshold: float
    resolution: str = "480p"
    warmup_steps: int = 5
    states: dict[str, _BranchState] = field(default_factory=dict)
    computed: int = 0
    skipped: int = 0

    def __post_init__(self):
        self._poly = np.poly1d(COEFFICIENTS.get(self.resolution, COEFFICIENTS["480p"]))

    def should_skip(self, branch: str, e0: torch.Tensor) -> bool:
        """Decide for this call of ``branch``; updates the branch's indicator state."""
        state = self.states.setdefault(branch, _BranchState())
        skip = False
        if state.calls >= self.warmup_steps and state.residual is not None and state.previous_e0 is not None:
            prev = state.previous_e0
            rel = ((e0 - prev).abs().mean() / prev.abs().mean().clamp(min=1e-12)).item()
            state.accumulated += float(self._poly(rel))
            skip = state.accumulated < self.threshold
        if not skip:
            state.accumulated = 0.0
        state.previous_e0 = e0.detach().clone()
        state.calls += 1
        if skip:
            self.skipped += 1
        else:
            self.computed += 1
        return skip

    def residual(self, branch: str) -> torch.Tensor:
        return self.states[branch].residual

    def store(self, branch: str, residual: torch.Tensor) -> None:
        self.states[branch].residual = residual.detach()
