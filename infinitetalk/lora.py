"""Turbo mode: the lightx2v step/CFG-distilled LoRA, applied through diffusers' PEFT integration.

The file (``weights/lightx2v/*.safetensors``) is in the lightx2v / Kijai format: official Wan
module names under ``diffusion_model.``, and per tensor one of

* ``<m>.lora_down.weight`` / ``<m>.lora_up.weight`` (or ``lora_A`` / ``lora_B``): low-rank factors
  of a linear layer: ``W += up @ down``;
* ``<m>.diff_b``: a bias delta (``b += diff_b``);
* ``<m>.diff``: a full weight delta (norms, ``patch_embedding``, ``head.head``...);
* ``<p>.diff_m``: a delta of the AdaLN table ``<p>.modulation`` (``blocks.N``, ``head``);
* ``<m>.alpha``: ignored.

As in the official InfiniteTalk ``WanLoraWrapper`` every delta is added at scale 1 with no
alpha/rank normalisation (``W + up @ down``), so the PEFT adapter is created with
``lora_alpha == r`` for every module and its scaling is checked to be exactly 1. The official
wrapper skips ``diff_m`` (its suffix test only knows ``diff`` and ``diff_b``), and so do we by
default, so turbo output stays the official one; lightx2v, which writes these files, documents
``diff_m`` as the modulation delta: ``modulation=True`` applies it.

Loading is strict: every key of the file is applied, or :meth:`TurboLoRA.load` raises a
``ValueError`` naming the keys that were not (unknown kinds, modules or parameters the model
lacks, wrong shapes) and leaves the model untouched.

Low-rank factors (and the bias deltas of those layers) become a PEFT LoRA adapter named
``"turbo"`` (``transformer.load_lora_adapter``). The other deltas target parameters PEFT cannot
adapt (norm weights, the modulation tables, a Conv3d, the output head): they are added to the
weights when fusing, and otherwise kept as an exact and a turbo copy of each of those (small)
parameters, written into the parameter when the mode switches.

**Merged switching** (``merge_from``, the servers' default on one unquantised GPU model): turbo
merges the adapter into the weights (``fuse_lora``), so a turbo forward costs what the plain model
does (the unmerged adapter adds 4% per forward at 480p, BENCHMARKS.md section 10); exact unmerges
and then reads the adapted weights again from the model's own files, so exact mode gets the loaded
weights bit for bit (subtracting the delta again would leave bf16 rounding in them). Switching to
exact costs that read (the adapted layers are most of the model); switching to turbo, one merge.

Load it **before** memory modes and ``torch.compile``: the adapter layers are then part of the
compiled graph and of the offloaded groups. Switching modes costs one recompile the first time
each mode runs; after that both graphs are cached. The adapter's own ``lora_A`` / ``lora_B`` are
``nn.Linear`` children of the adapted layers (whose weights move to ``<layer>.base_layer``): a
quantization filter over ``blocks.*`` linears should skip ``.lora_`` names.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ADAPTER_NAME = "turbo"

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_FACTOR_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_A.weight", "down"),
    (".lora_up.weight", "up"), (".lora_B.weight", "up"),
)  # fmt: skip
#: Full-delta suffix -> the official parameter it changes (``diff_b`` is tested before ``diff``).
_DELTA_SUFFIXES = ((".diff_b", ".bias"), (".diff_m", ".modulation"), (".diff", ".weight"))


@dataclass
class _LowRank:
    """Factors of one linear layer in the file (official module name) and their keys."""

    keys: dict[str, str] = field(default_factory=dict)  # slot ("down", "up", "bias") -> file key
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Plan:
    """The file resolved against the model: what goes where (our names)."""

    low_rank: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> down/up/bias
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> full delta
    applied: dict[str, str] = field(default_factory=dict)  # file key -> our target
    ignored: dict[str, str] = field(default_factory=dict)  # file key -> why
    problems: dict[str, list[str]] = field(default_factory=dict)  # reason -> file keys

    def refuse(self, reason: str, *keys: str) -> None:
        self.problems.setdefault(reason, []).extend(keys)


class TurboLoRA:
    """The turbo LoRA on one transformer: fused into its weights, or a switchable adapter.

    Use :meth:`load`; then :meth:`set_enabled` per request (adapter) or nothing (fused).
    """

    def __init__(self, transformer, path: Path, plan: _Plan, fused: bool, merge_from=None):
        self._transformer = transformer
        self.path = path
        self.fused = fused
        self._merge_from = merge_from if plan.low_rank and not fused else None
        self._merged = False
        self.last_switch_seconds = 0.0
        self.applied = dict(plan.applied)
        self.ignored = dict(plan.ignored)
        self.lora_modules = tuple(sorted(plan.low_rank))
        self.delta_parameters = tuple(sorted(plan.deltas))
        self._enabled = fused
        # (parameter, exact value, turbo value) of the parameters with a full delta (adapter mode)
        self._swaps: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ loading
    @classmethod
    @torch.no_grad()
    def load(cls, transformer, path: str | Path, *, fuse: bool = False, merge_from=None,
             modulation: bool = False) -> TurboLoRA:
        """Apply the LoRA file at ``path`` to ``transformer`` (before memory modes and compile).

        ``fuse=True``: the deltas are merged into the weights and the adapter layers removed (a
        turbo-only model, no run-time cost). ``fuse=False``: a switchable adapter, disabled
        (exact) until :meth:`set_enabled`. ``diff_m`` keys are ignored like in the official
        InfiniteTalk wrapper unless ``modulation=True``. ``merge_from`` (switchable only): a callable
        ``names -> (name, tensor) pairs`` giving the loaded values of the named parameters (model names,
        before PEFT), e.g. ``weights.read_transformer_tensors``: turbo then runs merged (see the module
        docstring). Raises ``ValueError`` naming every key that cannot be applied; the model is then
        unchanged.
        """
        from safetensors.torch import load_file

        path = Path(path)
        _check_load_order(transformer)
        plan = _resolve(transformer, _parse(load_file(str(path)), modulation))
        if plan.problems:
            raise ValueError(f"turbo LoRA {path.name} does not fit the model; keys not applied: " + "; ".join(
                f"{reason} ({len(keys)}): {_abbrev(sorted(keys))}" for reason, keys in plan.problems.items()))
        turbo = cls(transformer, path, plan, fuse, merge_from)
        params = dict(transformer.named_parameters())  # before PEFT renames adapted weights to base_layer.*
        if plan.low_rank:
            _load_adapter(transformer, plan.low_rank)
        if fuse:
            for name, delta in plan.deltas.items():
                params[name].add_(delta.to(params[name].device, params[name].dtype))
            if plan.low_rank:
                transformer.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER_NAME])
                transformer.unload_lora()
                if _lora_layers(transformer):
                    raise RuntimeError("adapter layers left after fusing the turbo LoRA")
        else:
            for name, delta in plan.deltas.items():
                exact = params[name].detach().clone()
                turbo._swaps.append((params[name], exact, exact.clone().add_(delta.to(exact.device, exact.dtype))))
            turbo.set_enabled(False)
        logger.info("turbo LoRA %s %s: %d low-rank layers, %d full deltas, %d keys ignored", path.name,
                    turbo.strategy, len(plan.low_rank), len(plan.deltas), len(plan.ignored))
        return turbo

    @property
    def strategy(self) -> str:
        """``fused`` (turbo only), ``merge`` (switchable, turbo merged into the weights) or ``adapter``."""
        return "fused" if self.fused else "merge" if self._merge_from is not None else "adapter"

    @property
    def merged(self) -> bool:
        """Whether the turbo weights are in the model's weights (fused, or merged for turbo)."""
        return self.fused or self._merged

    # ------------------------------------------------------------------ switching
    @property
    def enabled(self) -> bool:
        return self._enabled

    @torch.no_grad()
    def set_enabled(self, enabled: bool) -> None:
        """Turbo (``True``) or exact (``False``) for the next forwards. A fused LoRA is always on."""
        enabled = bool(enabled)
        if self.fused:
            if not enabled:
                raise RuntimeError("the turbo LoRA is fused into the weights: exact mode is not available")
            return
        t0, self.last_switch_seconds = time.perf_counter(), 0.0
        if self._merge_from is not None:
            self._switch_merged(enabled)
        elif self.lora_modules:
            if enabled:
                self._transformer.enable_lora()
            else:
                self._transformer.disable_lora()
        for _, layer in _lora_layers(self._transformer):  # PEFT marks enabled adapters trainable
            layer.requires_grad_(False)
        if self._swaps:
            _check_offload_in_memory(self._transformer)
        for param, exact, turbo in self._swaps:
            # In place: with group offloading the parameter holds the CPU copy it is onloaded from.
            param.copy_(turbo if enabled else exact)
        if enabled != self._enabled and self._merge_from is not None:
            self.last_switch_seconds = time.perf_counter() - t0
            logger.info("turbo LoRA %s in %.1fs", "merged" if enabled else "unmerged (weights read again)",
                        self.last_switch_seconds)
        self._enabled = enabled

    def _switch_merged(self, enabled: bool) -> None:
        """Merge for turbo; for exact, unmerge and read the adapted weights again (exact bits)."""
        transformer = self._transformer
        if enabled and not self._merged:
            transformer.enable_lora()
            transformer.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER_NAME])
            self._merged = True
        elif not enabled:
            if self._merged:
                transformer.unfuse_lora()
                self._merged = False  # before the read: a failed read must not leave "merged" claimed
                self._read_base_weights()
            transformer.disable_lora()

    def _read_base_weights(self) -> None:
        params = dict(self._transformer.named_parameters())
        targets = {}
        for module in self.lora_modules:
            for kind in ("weight", "bias"):
                if f"{module}.base_layer.{kind}" in params:
                    targets[f"{module}.{kind}"] = params[f"{module}.base_layer.{kind}"]
        done = set()
        for name, tensor in self._merge_from(set(targets)):
            targets[name].copy_(tensor)
            done.add(name)
        if done != set(targets):
            raise RuntimeError(f"turbo LoRA: {len(set(targets) - done)} adapted weights were not found in the "
                               f"model's files, e.g. {sorted(set(targets) - done)[:3]}")


# ---------------------------------------------------------------------------- file -> plan


def _parse(raw: dict[str, torch.Tensor], modulation: bool) -> tuple[dict[str, _LowRank], dict, _Plan]:
    """Group the file's keys: low-rank factors per official module, full deltas per official parameter."""
    plan = _Plan()
    low_rank: dict[str, _LowRank] = {}
    deltas: dict[str, tuple[str, torch.Tensor]] = {}  # official parameter -> (file key, delta)
    for key in raw:
        name = _strip_prefix(key)
        slot = next(((name[: -len(s)], kind) for s, kind in _FACTOR_SUFFIXES if name.endswith(s)), None)
        if slot is not None:
            entry = low_rank.setdefault(slot[0], _LowRank())
            if slot[1] in entry.keys:
                plan.refuse("the same factor twice", key)
            entry.keys[slot[1]] = key
            entry.tensors[slot[1]] = raw[key]
        elif name.endswith(".alpha"):
            if raw[key].numel() != 1:
                plan.refuse("an alpha that is not a scalar", key)
            plan.ignored[key] = "alpha (scale 1 without alpha/rank normalisation, as the official wrapper)"
        elif name.endswith(".diff_m") and not modulation:
            plan.ignored[key] = "diff_m (modulation=False: skipped like the official wrapper)"
        else:
            target = next((name[: -len(s)] + p for s, p in _DELTA_SUFFIXES if name.endswith(s)), None)
            if target is None:
                plan.refuse("unknown kind of key", key)
            elif target in deltas:
                plan.refuse("the same delta twice", key)
            else:
                deltas[target] = (key, raw[key])
    # A bias delta of a layer with low-rank factors is the adapter's bias (PEFT lora_bias).
    for module, entry in low_rank.items():
        bias = deltas.pop(module + ".bias", None)
        if bias is not None:
            entry.keys["bias"], entry.tensors["bias"] = bias
    return low_rank, deltas, plan


def _resolve(transformer, parsed) -> _Plan:
    """Map official names to the model's and check every target exists with the file's shapes."""
    low_rank, deltas, plan = parsed
    params = dict(transformer.named_parameters())
    for module, entry in low_rank.items():
        _resolve_low_rank(transformer, module, entry, plan)
    for official, (key, tensor) in deltas.items():
        name = _our_name(official)
        if name is None or name not in params:
            plan.refuse("parameters the model does not have", key)
        elif tuple(tensor.shape) != tuple(params[name].shape):
            plan.refuse(f"wrong shapes ({name} is {tuple(params[name].shape)})", key)
        else:
            plan.deltas[name] = tensor
            plan.applied[key] = name
    return plan


def _resolve_low_rank(transformer, module: str, entry: _LowRank, plan: _Plan) -> None:
    keys = list(entry.keys.values())
    if "down" not in entry.tensors or "up" not in entry.tensors:
        plan.refuse("a lora_down without its lora_up (or the reverse)", *keys)
        return
    name = _our_name(module + ".weight")
    name = None if name is None else name.removesuffix(".weight")
    try:
        layer = transformer.get_submodule(name) if name else None
    except AttributeError:
        layer = None
    if not isinstance(layer, torch.nn.Linear):
        plan.refuse("low-rank factors for a layer the model lacks or that is not linear", *keys)
        return
    down, up, bias = entry.tensors["down"], entry.tensors["up"], entry.tensors.get("bias")
    fits = (down.ndim == 2 and up.ndim == 2 and down.shape[0] == up.shape[1]
            and down.shape[1] == layer.in_features and up.shape[0] == layer.out_features)
    if bias is not None:
        fits = fits and layer.bias is not None and tuple(bias.shape) == (layer.out_features,)
    if not fits:
        plan.refuse(f"wrong shapes ({name} is {layer.out_features}x{layer.in_features})", *keys)
        return
    plan.low_rank[name] = dict(entry.tensors)
    plan.applied.update({key: name for key in keys})


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _our_name(official: str) -> str | None:
    """Official Wan / InfiniteTalk parameter name -> the model's, with the loader's own converter."""
    from .weights import WeightsError, convert_official_state_dict_partial

    try:
        (name,) = convert_official_state_dict_partial({official: torch.empty(0)})
    except (WeightsError, ValueError):
        return None
    return name


def _abbrev(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------- PEFT


def _load_adapter(transformer, low_rank: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inject the ``turbo`` adapter (scale exactly 1 on every layer) and check every tensor landed."""
    ranks = {name: t["down"].shape[0] for name, t in low_rank.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {"^" + re.escape(name): r for name, r in ranks.items() if r != rank}
    with_bias = any("bias" in t for t in low_rank.values())
    state = {}
    for name, t in low_rank.items():
        state[f"{name}.lora_A.weight"] = t["down"]
        state[f"{name}.lora_B.weight"] = t["up"]
        if with_bias:  # PEFT gives every adapted layer a bias then: zero where the file has none
            state[f"{name}.lora_B.bias"] = t["bias"] if "bias" in t else t["up"].new_zeros(t["up"].shape[0])
    config = {
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": "(?:" + "|".join(re.escape(name) for name in sorted(ranks)) + ")",
        "lora_bias": with_bias, "lora_dropout": 0.0, "inference_mode": True,
    }
    transformer.load_lora_adapter(state, prefix=None, adapter_name=ADAPTER_NAME, metadata=config)
    try:
        _check_adapter(transformer, low_rank)
    except Exception:
        transformer.delete_adapters(ADAPTER_NAME)
        raise


def _check_adapter(transformer, low_rank: dict[str, dict[str, torch.Tensor]]) -> None:
    layers = dict(_lora_layers(transformer))
    if set(layers) != set(low_rank):
        raise RuntimeError(f"PEFT adapted {sorted(set(layers) ^ set(low_rank))[:5]} against the plan")
    for name, tensors in low_rank.items():
        layer = layers[name]
        if layer.scaling[ADAPTER_NAME] != 1.0:
            raise RuntimeError(f"LoRA scaling of {name} is {layer.scaling[ADAPTER_NAME]}, not 1")
        loaded = {"down": layer.lora_A[ADAPTER_NAME].weight, "up": layer.lora_B[ADAPTER_NAME].weight,
                  "bias": layer.lora_B[ADAPTER_NAME].bias}
        for slot, value in tensors.items():
            if not torch.equal(loaded[slot], value.to(loaded[slot].device, loaded[slot].dtype)):
                raise RuntimeError(f"LoRA {slot} of {name} did not load")


def _lora_layers(transformer) -> list[tuple[str, torch.nn.Module]]:
    """The PEFT layers carrying the turbo adapter (duck-typed: no import of peft here)."""
    return [(name, m) for name, m in transformer.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and ADAPTER_NAME in m.lora_A]


# ---------------------------------------------------------------------------- model state


def _group_offload_group(module):
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("group_offloading") if registry is not None else None
    return getattr(hook, "group", None)


def _check_load_order(transformer) -> None:
    for name, module in transformer.named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            raise ValueError(f"load the turbo LoRA before torch.compile ({name or 'the model'} is compiled)")
        if _group_offload_group(module) is not None:
            raise ValueError("load the turbo LoRA before enabling group offloading")
    if _lora_layers(transformer):
        raise ValueError("the turbo LoRA is already loaded on this transformer")


def _check_offload_in_memory(transformer) -> None:
    """Group offloading to disk reloads weights from its own files: a mode switch would not reach them."""
    for module in transformer.modules():
        group = _group_offload_group(module)
        if group is not None and getattr(group, "offload_to_disk_path", None) is not None:
            raise RuntimeError("switching the turbo LoRA is not supported with group offloading to disk")
