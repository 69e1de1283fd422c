"""Step/CFG-distilled LoRA (lightx2v) for the turbo mode.

Key conversion is diffusers' own (``_convert_non_diffusers_wan_lora_to_diffusers``: the
``diffusion_model.*`` / ``lora_down``/``lora_up`` / ``diff_b`` format of lightx2v and Kijai files).
As in the official ``WanLoraWrapper`` the delta is ``scale * up @ down`` with no alpha/rank
normalisation, so ``.alpha`` entries are dropped before conversion.

Two ways to apply it:

* :func:`fuse_lora` adds the deltas into the weights (zero run-time cost): for a server that only
  ever runs turbo.
* :class:`LoRAAdapter` keeps the low-rank factors beside the weights and adds ``x A^T B^T`` to the
  output of each adapted linear layer while enabled, so one loaded model serves exact and turbo
  requests with no weight drift and no second copy (rank 32 costs about 1.25% more FLOPs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class LoRADelta:
    module: str
    down: torch.Tensor | None  # [r, in]
    up: torch.Tensor | None  # [out, r]
    bias: torch.Tensor | None  # [out]


def read_lora(path: str | Path) -> list[LoRADelta]:
    """Read a Wan LoRA file (original / lightx2v / Kijai naming) into per-module deltas."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
    from safetensors.torch import load_file

    raw = load_file(str(path))
    if not any(k.startswith("diffusion_model.") for k in raw):
        raw = {f"diffusion_model.{k}": v for k, v in raw.items()}
    raw = {k: v for k, v in raw.items() if not k.endswith(".alpha")}
    converted = _convert_non_diffusers_wan_lora_to_diffusers(raw)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in converted.items():
        key = key.removeprefix("transformer.")
        for suffix, slot in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "bias")):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[slot] = value
                break
        else:
            raise ValueError(f"unexpected LoRA key after conversion: {key}")
    return [LoRADelta(m, d.get("down"), d.get("up"), d.get("bias")) for m, d in sorted(modules.items())]


def _resolve(transformer, deltas: list[LoRADelta]) -> list[tuple[torch.nn.Linear, LoRADelta]]:
    pairs, missing = [], []
    for delta in deltas:
        try:
            module = transformer.get_submodule(delta.module)
        except AttributeError:
            missing.append(delta.module)
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"LoRA targets {delta.module}, which is not a linear layer")
        if delta.down is not None and (delta.down.shape[1] != module.in_features or delta.up.shape[0] != module.out_features):
            raise ValueError(f"LoRA shapes for {delta.module} do not fit {tuple(module.weight.shape)}")
        pairs.append((module, delta))
    if missing:
        raise ValueError(f"LoRA targets modules the model does not have: {missing[:5]}")
    return pairs


@torch.no_grad()
def fuse_lora(transformer, path: str | Path, scale: float = 1.0) -> int:
    """Add ``scale * up @ down`` (and bias deltas) into the weights, computed in fp32."""
    pairs = _resolve(transformer, read_lora(path))
    for module, delta in pairs:
        w = module.weight
        if delta.down is not None:
            update = delta.up.to(w.device, torch.float32) @ delta.down.to(w.device, torch.float32)
            w.copy_((w.float() + scale * update).to(w.dtype))
        if delta.bias is not None and module.bias is not None:
            module.bias.copy_((module.bias.float() + scale * delta.bias.to(module.bias.device).float()).to(module.bias.dtype))
    logger.info("fused LoRA %s into %d layers (scale %g)", Path(path).name, len(pairs), scale)
    return len(pairs)


class LoRAAdapter:
    """Switchable low-rank adapters on the transformer's linear layers (see module docstring)."""

    def __init__(self, transformer, path: str | Path, scale: float = 1.0):
        self.scale = scale
        self.enabled = False
        self.handles = []
        for module, delta in _resolve(transformer, read_lora(path)):
            dev, dt = module.weight.device, module.weight.dtype
            down = delta.down.to(dev, dt) if delta.down is not None else None
            up = delta.up.to(dev, dt) if delta.up is not None else None
            bias = delta.bias.to(dev, dt) if delta.bias is not None else None
            self.handles.append(module.register_forward_hook(self._hook(down, up, bias)))
        logger.info("LoRA %s attached to %d layers", Path(path).name, len(self.handles))

    def _hook(self, down, up, bias):
        def hook(_module, inputs, output):
            if not self.enabled:
                return output
            extra = 0
            if down is not None:
                extra = F.linear(F.linear(inputs[0], down), up)
            if bias is not None:
                extra = extra + bias
            return output + self.scale * extra

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
