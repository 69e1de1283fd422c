"""Transformer and audio-projection parity cases (golden README section 1).

Reads ``tiny_dit_config.json`` (official constructor kwargs), ``tiny_dit.safetensors`` (official
key naming) and ``tiny_dit_cases.safetensors``; builds our model in fp32 on the CPU from the same
weights and compares the output and every stored intermediate.  Cases are discovered from the
``<case>.output`` keys, so folders with other configs, frame counts or sizes work too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from parity_common import CaseResult, compare

REL_TOL = 1e-4


def _load_model(golden: Path, feature_dim: int):
    from safetensors.torch import load_file

    from infinitetalk.models import InfiniteTalkTransformer3DModel
    from infinitetalk.weights import config_from_official, load_official_state_dict

    official = json.loads((golden / "tiny_dit_config.json").read_text())
    config = config_from_official(official)
    config["audio_feature_dim"] = feature_dim
    model = InfiniteTalkTransformer3DModel(**config).eval().requires_grad_(False)
    load_official_state_dict(model, load_file(str(golden / "tiny_dit.safetensors")))
    return model.float()


def _case_audio(name: str, cases: dict[str, torch.Tensor]) -> torch.Tensor:
    """Audio of one case, ``[P, F, W, 12, 768]``."""
    if f"{name}.audio" in cases:
        return cases[f"{name}.audio"]
    persons = sorted(k for k in cases if k.startswith(f"{name}.audio_person"))
    if not persons:
        raise KeyError(f"no audio for case {name}")
    first = cases.get(f"{name}.audio_person1")
    if first is None:  # README: case B = cat(case A audio, caseB.audio_person2)
        single = sorted(k for k in cases if k.endswith(".audio") and k.count(".") == 1)
        first = cases[single[0]]
    rest = [cases[k] for k in persons if not k.endswith("audio_person1")]
    return torch.cat([first, *rest], dim=0)


class _Recorder:
    def __init__(self, model):
        self.model = model
        self.out: dict[str, torch.Tensor] = {}
        self.attn1_in: dict[int, tuple] = {}
        self.handles = []

    def _hook(self, name):
        def fn(_module, _inputs, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output

        return fn

    def __enter__(self):
        m = self.model
        ce = m.condition_embedder
        pairs = [
            (m.patch_embedding, "shared.patch_embedding_out"),
            (ce.time_embedder, "shared.time_embedding_out"),
            (ce.time_proj, "shared.time_projection_out"),
            (ce.text_embedder, "shared.text_embedding_out"),
            (ce.image_embedder, "shared.img_emb_out"),
            (m.audio_proj, "audio_proj_out"),
            (m.proj_out, "head_out"),
        ]
        for i, block in enumerate(m.blocks):
            pairs += [
                (block.attn1, f"block{i}_self_attn_out"),
                (block.attn2, f"block{i}_cross_attn_out"),
                (block.audio_attn, f"block{i}_audio_cross_attn_out"),
                (block, f"block{i}_out"),
            ]

            def pre(_module, args, i=i):
                self.attn1_in[i] = (args[0], args[3])

            self.handles.append(block.attn1.register_forward_pre_hook(pre))
        for module, name in pairs:
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def run_dit_cases(golden: Path) -> list[CaseResult]:
    from safetensors.torch import load_file

    needed = ["tiny_dit_config.json", "tiny_dit.safetensors", "tiny_dit_cases.safetensors"]
    if not all((golden / n).exists() for n in needed):
        return []
    cases = load_file(str(golden / "tiny_dit_cases.safetensors"))
    names = sorted(k[: -len(".output")] for k in cases if k.endswith(".output"))
    results: list[CaseResult] = []
    model = None
    x, y = cases["inputs.x"], cases["inputs.y"]
    latents = torch.cat([x, y], dim=0)[None]  # [1, 36, N_t, h, w]
    context = cases["inputs.context0"][None]
    clip = cases["inputs.clip_fea"]
    t = cases["inputs.t"].reshape(1)
    shared_checked = False
    for name in names:
        audio = _case_audio(name, cases)  # [P, F, W, 12, 768]
        if model is None:
            model = _load_model(golden, int(torch.tensor(audio.shape[3:]).prod()))
        masks = cases.get(f"{name}.ref_target_masks")
        with torch.no_grad(), _Recorder(model) as rec:
            out = model(latents, t, context, clip, audio[None], ref_target_masks=masks, return_dict=False)[0]
        results.append(compare(f"dit.{name}.output", out, cases[f"{name}.output"], rel_tol=REL_TOL))
        results += _recorded_cases(name, cases, rec.out, shared=not shared_checked)
        shared_checked = True
        if masks is not None:
            results += _speaker_map_cases(name, cases, model, rec.attn1_in, latents.shape[2:], masks)
    if "audio_window_index.first" in cases:
        results.extend(_window_index_cases(cases, model.config.vae_scale if model else 4))
    return results


def _recorded_cases(name: str, cases: dict, recorded: dict, shared: bool) -> list[CaseResult]:
    """The intermediate tensors captured in one case's forward against the golden ones (the
    ``shared.*`` tensors, equal in every case, only once)."""
    results = []
    for key, ref in sorted(cases.items()):
        if shared and key.startswith("shared.") and key in recorded:
            results.append(compare(f"dit.{key}", recorded[key], ref, rel_tol=REL_TOL))
        short = key[len(name) + 1 :]
        if key.startswith(name + ".") and short in recorded:
            # audio_proj_out is [P, N_t, K, O]: per person, before concatenation
            results.append(compare(f"dit.{key}", recorded[short], ref, rel_tol=REL_TOL))
    return results


def _speaker_map_cases(name: str, cases: dict, model, attn1_in: dict, grid, masks) -> list[CaseResult]:
    """Two speakers: reference attention map and L-RoPE positions from the captured self-attention inputs."""
    from infinitetalk.models.transformer_infinitetalk import (
        audio_rope_positions,
        label_rope_positions,
        reference_attention_map,
    )

    n_t, n_h, n_w = grid[0], grid[1] // 2, grid[2] // 2
    token_masks = model.token_masks(masks, n_h, n_w)
    results = []
    for i in range(len(model.blocks)):
        key = f"{name}.block{i}_x_ref_attn_map"
        if key not in cases or i not in attn1_in:
            continue
        hidden, rope = attn1_in[i]
        ref_map = reference_attention_map(model.blocks[i].attn1, hidden, rope, token_masks, n_h * n_w)
        results.append(compare(f"dit.{key}", ref_map[0], cases[key], rel_tol=REL_TOL))
        pos_key = f"{name}.block{i}_lrope_pos_visual"
        if pos_key in cases:
            results.append(compare(f"dit.{pos_key}", label_rope_positions(ref_map)[0], cases[pos_key], rel_tol=REL_TOL))
        apos_key = f"{name}.block{i}_lrope_pos_audio"
        if apos_key in cases:
            ours = audio_rope_positions(cases[apos_key].numel() // n_t).repeat(n_t)
            results.append(compare(f"dit.{apos_key}", ours, cases[apos_key], rel_tol=REL_TOL))
    return results


def _window_index_cases(cases, vae_scale) -> list[CaseResult]:
    """Our windowing applied to an index-encoded tensor reproduces the official slot map."""
    from infinitetalk.models.transformer_infinitetalk import window_audio

    ref_first = cases["audio_window_index.first"]  # [1, W, 2]
    ref_latter = cases["audio_window_index.latter"]  # [N_t-1, slots, 2]
    window = ref_first.shape[1]
    frames = 1 + vae_scale * ref_latter.shape[0]
    f_idx = torch.arange(frames).view(frames, 1).expand(frames, window)
    w_idx = torch.arange(window).view(1, window).expand(frames, window)
    enc = torch.stack([f_idx, w_idx], dim=-1)[None].float()  # [1, F, W, 2]
    first, latter = window_audio(enc, vae_scale)
    return [
        compare("dit.audio_window_index.first", first[0].round(), ref_first.float(), abs_tol=0.5),
        compare("dit.audio_window_index.latter", latter[0].round(), ref_latter.float(), abs_tol=0.5),
    ]
