"""Step cache: skip the transformer blocks on steps whose conditioning barely changed (TeaCache rule).

A stateful diffusers hook (:class:`StepCacheHook`) on the model's block stack
(:class:`~infinitetalk.models.transformer_infinitetalk.InfiniteTalkBlocks`).  For each guidance
branch separately (``cond``, ``drop_text``, ``uncond``, ``drop_audio``), the relative L1 change of
the timestep modulation ``temb`` given to the blocks since that branch's previous call is rescaled by
the official polynomial and accumulated; while the sum stays under the threshold the blocks are
skipped and the branch's last block residual (output minus input of the block stack) is added
instead.  The first ``warmup_steps`` calls of every branch are always computed.

The branch is the name of the diffusers cache context the caller opens around each model call
(``with transformer.cache_context("cond"): ...``); the hook's state lives in a diffusers
:class:`~diffusers.hooks.hooks.StateManager` keyed by that name.  Keying the state by branch name (not
by a call counter modulo 3, as the official code does) keeps it correct for the 2-forward guidance
too, where the official cache mixes the branches.  The state is reset for every chunk
(:func:`reset_step_cache`).  Off by default: it is an approximation.

The block stack is not compiled (regional compile compiles each block), so the hook's Python
decision and its ``.item()`` never break a compiled graph.  Under sequence parallelism every rank
sees the same ``temb`` and so takes the same decision, which the blocks' collectives require.

Use (the pipeline, once per request; ``extra`` are further :class:`StepCacheConfig` fields, empty in
production)::

    transformer.enable_cache(StepCacheConfig(threshold, resolution, **extra))
    try:
        for chunk in chunks:
            reset_step_cache(transformer)
            ...  # every model call inside `with transformer.cache_context(branch):`
            computed, skipped = step_cache_stats(transformer)
    finally:
        transformer.disable_cache()
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

__all__ = ["COEFFICIENTS", "StepCacheConfig", "StepCacheHook", "apply_step_cache", "remove_step_cache",
           "reset_step_cache", "step_cache_stats"]

STEP_CACHE_HOOK = "infinitetalk_step_cache"

# Official TeaCache coefficients for the InfiniteTalk/MultiTalk DiT (highest degree first).
COEFFICIENTS = {
    "480p": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "720p": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}


@dataclass(frozen=True)
class StepCacheConfig:
    """Settings of the step cache, for ``transformer.enable_cache``.

    Args:
        threshold: the accumulated rescaled change under which the blocks are skipped; ``0`` never
            skips (0.2-0.5 trade quality for speed).
        resolution: ``"480p"`` or ``"720p"``: which official polynomial rescales the change.
        warmup_steps: the first calls of every branch that are always computed.
        indicator_offset: a constant added to ``temb`` before its relative change is measured (both
            the current and the remembered value), so the rule sees ``|a - b| / |b + c|``.  ``0`` in
            production.  It exists for benchmarks with random weights: their modulation changes by
            ~70% from step to step where a trained model's changes by a few percent, so the rule would
            never skip; an offset brings the change to a trained model's size while the skip/compute
            mechanism stays the production one.
    """

    threshold: float
    resolution: str = "480p"
    warmup_steps: int = 5
    indicator_offset: float = 0.0

    def __post_init__(self):
        if self.resolution not in COEFFICIENTS:
            raise ValueError(f"step cache resolution must be one of {sorted(COEFFICIENTS)}, got {self.resolution!r}")
        if self.threshold < 0 or self.warmup_steps < 0:
            raise ValueError(f"step cache threshold and warmup_steps must be >= 0 ({self.threshold}, "
                             f"{self.warmup_steps})")


class _BranchState(BaseState):
    """What the rule remembers for one guidance branch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.accumulated = 0.0
        self.previous_indicator: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None


class StepCacheHook(ModelHook):
    """The TeaCache rule around the block stack's forward (see the module docstring).

    ``computed`` and ``skipped`` count the block-stack calls of all branches since the last reset.
    """

    _is_stateful = True

    def __init__(self, config: StepCacheConfig) -> None:
        super().__init__()
        self.config = config
        self.state_manager = StateManager(_BranchState)
        self._poly = np.poly1d(COEFFICIENTS[config.resolution])
        self._signature: inspect.Signature | None = None
        self.computed = 0
        self.skipped = 0

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        # Read ``hidden_states`` and ``temb`` by name, however the stack is called.
        self._signature = inspect.signature(module.forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        arguments = self._signature.bind(*args, **kwargs).arguments
        hidden_states, temb = arguments["hidden_states"], arguments["temb"]
        state = self.state_manager.get_state()  # this branch's; raises outside a cache_context
        if self._should_skip(state, temb, hidden_states):
            self.skipped += 1
            return hidden_states + state.residual
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.residual = (output - hidden_states).detach()
        self.computed += 1
        return output

    @torch.compiler.disable
    def _should_skip(self, state: _BranchState, temb: torch.Tensor, hidden_states: torch.Tensor) -> bool:
        """Decide for this call of the current branch; updates the branch's indicator state."""
        config = self.config
        indicator = temb.detach().float() + config.indicator_offset  # a new tensor: safe to keep
        previous = state.previous_indicator
        ready = (
            config.threshold > 0
            and state.calls >= config.warmup_steps
            and previous is not None
            and previous.shape == indicator.shape
            and state.residual is not None
            and state.residual.shape == hidden_states.shape
        )
        skip = False
        if ready:
            rel = ((indicator - previous).abs().mean() / previous.abs().mean().clamp(min=1e-12)).item()
            state.accumulated += float(self._poly(rel))
            skip = state.accumulated < config.threshold
        if not skip:
            state.accumulated = 0.0
        state.previous_indicator = indicator
        state.calls += 1
        return skip

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        self.computed = 0
        self.skipped = 0
        return module


def apply_step_cache(blocks: torch.nn.Module, config: StepCacheConfig) -> StepCacheHook:
    """Register the step cache on ``blocks``, a module called as ``blocks(hidden_states, ..., temb=..., ...)``.

    Callers normally use ``transformer.enable_cache(config)``, which also records the config.
    """
    hook = StepCacheHook(config)
    HookRegistry.check_if_exists_or_initialize(blocks).register_hook(hook, STEP_CACHE_HOOK)
    return hook


def remove_step_cache(module: torch.nn.Module) -> None:
    """Remove the step cache from ``module`` or any module under it."""
    HookRegistry.check_if_exists_or_initialize(module).remove_hook(STEP_CACHE_HOOK, recurse=True)


def _find_hook(module: torch.nn.Module) -> tuple[torch.nn.Module | None, StepCacheHook | None]:
    """The module carrying the step cache under ``module`` (itself included), and its hook."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = None if registry is None else registry.get_hook(STEP_CACHE_HOOK)
        if hook is not None:
            return sub, hook
    return None, None


def reset_step_cache(transformer: torch.nn.Module) -> None:
    """Forget every branch's state and zero the counters (a new cache, e.g. for the next chunk).

    Only the step cache is reset (other stateful hooks are left alone); nothing happens when it is not enabled.
    """
    blocks, hook = _find_hook(transformer)
    if hook is not None:
        hook.reset_state(blocks)


def step_cache_stats(transformer: torch.nn.Module) -> tuple[int, int] | None:
    """``(computed, skipped)`` block-stack calls since the last reset, or ``None`` when the cache is off."""
    _, hook = _find_hook(transformer)
    return None if hook is None else (hook.computed, hook.skipped)
