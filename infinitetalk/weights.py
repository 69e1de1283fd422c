"""Loading InfiniteTalk transformer weights, strictly, without materialising the model twice.

Three sources are supported:

(a) a state dict in the **official** key naming (Wan base keys + ``audio_proj.*``,
    ``blocks.N.audio_cross_attn.*``, ``blocks.N.norm_x.*``): :func:`convert_official_state_dict`.
(b) the **real layout**: the diffusers-format ``transformer/`` folder of
    ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` plus ``InfiniteTalk/{single,multi}/infinitetalk.safetensors``
    (official naming; audio keys and possibly base-key overrides) applied on top:
    :func:`load_transformer`.
(c) a **prepared** folder written by :func:`save_prepared` (our naming, bf16 shards + config), the
    fast cold-start format: also :func:`load_transformer`.

Every loader is strict: a missing key, an unexpected key or a wrong shape raises
:class:`WeightsError` naming the offending keys.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TRANSFORMER_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TRANSFORMER_WEIGHTS_SINGLE = "diffusion_pytorch_model.safetensors"
PREPARED_MARKER = "infinitetalk_prepared.json"

# Official audio key -> our key (regex on the part after "blocks.N.").
_AUDIO_BLOCK_RULES = [
    (re.compile(r"^blocks\.(\d+)\.audio_cross_attn\.q_linear\.(weight|bias)$"), r"blocks.\1.audio_attn.to_q.\2"),
    (re.compile(r"^blocks\.(\d+)\.audio_cross_attn\.kv_linear\.(weight|bias)$"), r"blocks.\1.audio_attn.to_kv.\2"),
    (re.compile(r"^blocks\.(\d+)\.audio_cross_attn\.proj\.(weight|bias)$"), r"blocks.\1.audio_attn.to_out.0.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm_x\.(weight|bias)$"), r"blocks.\1.norm_audio.\2"),
]
_AUDIO_PROJ = re.compile(r"^audio_proj\.(proj1|proj1_vf|proj2|proj3|norm)\.(weight|bias)$")


class WeightsError(RuntimeError):
    """A checkpoint does not match the model: names the offending keys."""


def _strip_prefix(key: str) -> str:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_official_audio_key(key: str) -> bool:
    key = _strip_prefix(key)
    return key.startswith("audio_proj.") or ".audio_cross_attn." in key or ".norm_x." in key


def convert_official_audio_key(key: str) -> str:
    """Map one official audio key to our naming; raises WeightsError for an unknown audio key."""
    key = _strip_prefix(key)
    if _AUDIO_PROJ.match(key):
        return key
    for pattern, repl in _AUDIO_BLOCK_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    raise WeightsError(f"unknown InfiniteTalk audio key: {key}")


def convert_official_base_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan base keys -> diffusers keys, with diffusers' own converter.

    The converter renames in place via ``str.replace`` rules; audio keys must not be passed to
    it (its ``cross_attn`` rule would rewrite ``audio_cross_attn``).
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if not state_dict:
        return {}
    bad = [k for k in state_dict if is_official_audio_key(k)]
    if bad:
        raise WeightsError(f"audio keys passed to the base converter: {bad[:5]}")
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def convert_official_state_dict_partial(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an InfiniteTalk file (audio keys + optional base overrides) key by key."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_official_audio_key(key):
            out[convert_official_audio_key(key)] = value
        else:
            out.update(convert_wan_transformer_to_diffusers({_strip_prefix(key): value}))
    return out


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole official-naming state dict (base + audio) -> our naming."""
    audio = {convert_official_audio_key(k): v for k, v in state_dict.items() if is_official_audio_key(k)}
    base = convert_official_base_keys(
        {_strip_prefix(k): v for k, v in state_dict.items() if not is_official_audio_key(k)})
    overlap = set(audio) & set(base)
    if overlap:
        raise WeightsError(f"keys produced twice by the conversion: {sorted(overlap)[:5]}")
    return {**base, **audio}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def config_from_official(official: dict) -> dict:
    """Official ``WanModel`` constructor kwargs (e.g. golden ``tiny_dit_config.json``) -> our config."""
    dim, heads = official["dim"], official["num_heads"]
    window = official.get("audio_window", 5)
    return dict(
        patch_size=tuple(official.get("patch_size", (1, 2, 2))),
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=official.get("in_dim", 36),
        out_channels=official.get("out_dim", 16),
        text_dim=official.get("text_dim", 4096),
        freq_dim=official.get("freq_dim", 256),
        ffn_dim=official["ffn_dim"],
        num_layers=official["num_layers"],
        cross_attn_norm=official.get("cross_attn_norm", True),
        qk_norm="rms_norm_across_heads" if official.get("qk_norm", True) else None,
        eps=official.get("eps", 1e-6),
        image_dim=1280,  # official MLPProj(1280, dim) is not configurable
        added_kv_proj_dim=dim,
        rope_max_seq_len=1024,
        text_len=official.get("text_len", 512),
        audio_window=window,
        audio_feature_dim=12 * 768,  # official AudioProjModel blocks=12, channels=768
        audio_intermediate_dim=official.get("intermediate_dim", 512),
        audio_output_dim=official.get("output_dim", 768),
        audio_context_tokens=official.get("context_tokens", 32),
        vae_scale=official.get("vae_scale", 4),
        norm_input_audio=official.get("norm_input_visual", True),
        norm_output_audio=official.get("norm_output_audio", True),
    )


def audio_config_from_shapes(shapes: dict[str, tuple[int, ...]], window: int = 5, vae_scale: int = 4) -> dict:
    """Infer the audio-module config from the shapes of an official InfiniteTalk file."""

    def need(key):
        if key not in shapes:
            raise WeightsError(f"InfiniteTalk file lacks required key {key}")
        return shapes[key]

    inter, in1 = need("audio_proj.proj1.weight")
    _, in_vf = need("audio_proj.proj1_vf.weight")
    (out_dim,) = need("audio_proj.norm.weight") if "audio_proj.norm.weight" in shapes else (None,)
    proj3_out, _ = need("audio_proj.proj3.weight")
    kv_out, kv_in = need("blocks.0.audio_cross_attn.kv_linear.weight")
    out_dim = out_dim or kv_in
    if in1 % window or in_vf % (window + vae_scale - 1) or in1 // window != in_vf // (window + vae_scale - 1):
        raise WeightsError(f"audio_proj input widths {in1}/{in_vf} do not fit window {window}, vae_scale {vae_scale}")
    if proj3_out % out_dim:
        raise WeightsError(f"audio_proj.proj3 has {proj3_out} outputs, not a multiple of {out_dim}")
    return dict(
        audio_window=window,
        vae_scale=vae_scale,
        audio_feature_dim=in1 // window,
        audio_intermediate_dim=inter,
        audio_output_dim=out_dim,
        audio_context_tokens=proj3_out // out_dim,
        norm_output_audio="audio_proj.norm.weight" in shapes,
    )


# --------------------------------------------------------------------------------------------
# Strict streaming loader
# --------------------------------------------------------------------------------------------


class _StrictLoader:
    """Assigns tensors into a model built with empty (meta) parameters, one tensor at a time."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None):
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []
        self.bad_shape: list[str] = []

    def _target_dtype(self, key: str, tensor: torch.Tensor) -> torch.dtype:
        if self.dtype is None or not tensor.is_floating_point():
            return tensor.dtype
        if any(part in self.keep_fp32 for part in key.split(".")):
            return torch.float32
        return self.dtype

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.expected:
            self.unexpected.append(key)
            return
        if tuple(tensor.shape) != self.expected[key]:
            self.bad_shape.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {self.expected[key]}")
            return
        module_name, _, name = key.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        value = tensor.to(device=self.device, dtype=self._target_dtype(key, tensor))
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[name] = value
        self.loaded.add(key)

    def finish(self, source: str) -> None:
        _check_match(source, sorted(set(self.expected) - self.loaded), sorted(self.unexpected), self.bad_shape)
        # Non-persistent buffers (RoPE tables) were built on the CPU at construction.
        self.model.to(self.device)


def _check_match(source: str, missing: list[str], unexpected: list[str], bad_shape: list[str]) -> None:
    """Raise :class:`WeightsError` naming every missing, unexpected and wrong-shape key (abbreviated)."""
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shapes ({len(bad_shape)}): {_abbrev(bad_shape)}")
    if problems:
        raise WeightsError(f"{source} does not match the model: " + "; ".join(problems))


def _abbrev(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _iter_safetensors(path: Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _transformer_shards(folder: Path) -> list[Path]:
    index = folder / TRANSFORMER_WEIGHTS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        return [folder / f for f in files]
    single = folder / TRANSFORMER_WEIGHTS_SINGLE
    if single.exists():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no safetensors weights in {folder}")
    return files


def build_empty_model(config: dict):
    """Build the model with parameters on the meta device (buffers real, on the CPU)."""
    from accelerate import init_empty_weights

    from .models import InfiniteTalkTransformer3DModel

    with init_empty_weights(include_buffers=False):
        model = InfiniteTalkTransformer3DModel(**config)
    return model.eval().requires_grad_(False)


def load_transformer(
    transformer_dir: str | Path,
    infinitetalk_file: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    extra_config: dict | None = None,
):
    """Load the InfiniteTalk transformer.

    Args:
        transformer_dir: a diffusers Wan ``transformer/`` folder (real layout: needs
            ``infinitetalk_file``) or a prepared folder from :func:`save_prepared`.
        infinitetalk_file: ``InfiniteTalk/{single,multi}/infinitetalk.safetensors`` in official
            naming: audio keys plus optional base-key overrides, applied after the base.
        device: where parameters end up; tensors are read shard by shard straight to it.
        dtype: parameter dtype (``None`` keeps the checkpoint's); fp32 modules stay fp32.
    """
    transformer_dir = Path(transformer_dir)
    config_path = transformer_dir / "config.json"
    if not config_path.exists():
        raise WeightsError(f"no config.json in {transformer_dir}")
    raw = json.loads(config_path.read_text())
    prepared = (transformer_dir / PREPARED_MARKER).exists()
    config = _config_for(raw, infinitetalk_file, prepared, extra_config)
    model = build_empty_model(config)
    loader = _StrictLoader(model, device, dtype)
    read_device = str(loader.device) if loader.device.type == "cuda" else "cpu"
    for shard in _transformer_shards(transformer_dir):
        logger.info("loading %s", shard.name)
        for key, tensor in _iter_safetensors(shard, read_device):
            loader.put(key, tensor)
    source = str(transformer_dir)
    if infinitetalk_file is not None:
        _apply_official_file(loader, Path(infinitetalk_file), read_device)
        source += f" + {infinitetalk_file}"
    loader.finish(source)
    return model


def read_transformer_tensors(transformer_dir: str | Path, infinitetalk_file: str | Path | None, names: set[str],
                             *, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors :func:`load_transformer` put into the parameters ``names`` (model names), read again
    from the same files in the same order (an InfiniteTalk file's base overrides come last and win).
    Only those tensors are read. The turbo LoRA's exact mode uses it to get the adapted weights back
    bit for bit after a merge."""
    from safetensors import safe_open

    device = str(device)
    for shard in _transformer_shards(Path(transformer_dir)):
        with safe_open(str(shard), framework="pt", device=device) as f:
            for key in f.keys():
                if key in names:
                    yield key, f.get_tensor(key)
    if infinitetalk_file is not None:
        with safe_open(str(infinitetalk_file), framework="pt", device=device) as f:
            for key in f.keys():
                if is_official_audio_key(key) or not names & set(
                        convert_official_state_dict_partial({key: torch.empty(0)})):
                    continue
                for new_key, value in convert_official_state_dict_partial({key: f.get_tensor(key)}).items():
                    if new_key in names:
                        yield new_key, value


def _config_for(raw: dict, infinitetalk_file, prepared: bool, extra: dict | None) -> dict:
    from .models import InfiniteTalkTransformer3DModel

    accepted = set(InfiniteTalkTransformer3DModel._get_init_keys(InfiniteTalkTransformer3DModel))
    config = {k: v for k, v in raw.items() if k in accepted}
    if not prepared:
        if infinitetalk_file is None:
            raise WeightsError("a diffusers Wan transformer folder needs the InfiniteTalk file with the audio weights")
        config.update(audio_config_from_shapes(_safetensors_shapes(Path(infinitetalk_file))))
    if extra:
        config.update(extra)
    return config


def _apply_official_file(loader: _StrictLoader, path: Path, read_device: str) -> None:
    """Audio keys mapped by hand; base overrides through diffusers' converter, tensor by tensor."""
    for key, tensor in _iter_safetensors(path, read_device):
        for new_key, value in convert_official_state_dict_partial({key: tensor}).items():
            loader.put(new_key, value)


def load_official_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strictly load an official-naming state dict into an already built model."""
    converted = convert_official_state_dict(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    bad = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(converted) & set(expected))
        if converted[k].shape != expected[k].shape
    ]
    _check_match("state dict", missing, unexpected, bad)
    model.load_state_dict(converted, strict=True)


def save_prepared(model, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, max_shard_gb: float = 5.0) -> Path:
    """Write the merged transformer (base + audio) in our naming as compact shards + config.

    Loading it needs no key conversion and no second file: the fast cold-start format.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        keep = tuple(model._keep_in_fp32_modules or ())
        for name, param in model.named_parameters():
            if param.is_floating_point() and not any(p in keep for p in name.split(".")):
                param.data = param.data.to(dtype)
    model.save_pretrained(out_dir, max_shard_size=f"{int(max_shard_gb * 1000)}MB", safe_serialization=True)
    (out_dir / PREPARED_MARKER).write_text(json.dumps({"format": "infinitetalk-prepared", "version": 1}))
    return out_dir
