"""Turbo LoRA: lightx2v-format file -> diffusers conversion -> fused or switchable adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infinitetalk.errors import InputError
from infinitetalk.lora import LoRAAdapter, fuse_lora, read_lora
from infinitetalk.weights import load_transformer


def write_lightx2v_lora(path: Path, transformer, rank: int = 4, seed: int = 0) -> dict:
    """A LoRA in the lightx2v / Kijai key format for every attention and FFN linear of every block."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, block in enumerate(transformer.blocks):
        targets = {f"self_attn.{o}": getattr(block.attn1, n) for o, n in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"))}
        targets["self_attn.o"] = block.attn1.to_out[0]
        targets.update({f"cross_attn.{o}": getattr(block.attn2, n) for o, n in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"))})
        targets["cross_attn.o"] = block.attn2.to_out[0]
        targets["ffn.0"] = block.ffn.net[0].proj
        targets["ffn.2"] = block.ffn.net[2]
        for name, lin in targets.items():
            sd[f"diffusion_model.blocks.{i}.{name}.lora_down.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
            sd[f"diffusion_model.blocks.{i}.{name}.lora_up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
            sd[f"diffusion_model.blocks.{i}.{name}.alpha"] = torch.tensor(float(rank * 8))  # ignored, as official
        sd[f"diffusion_model.blocks.{i}.self_attn.q.diff_b"] = torch.randn(block.attn1.to_q.out_features, generator=g) * 0.1
    save_file(sd, str(path))
    return sd


@pytest.fixture()
def transformer(tiny_weights):
    base = tiny_weights / "Wan2.1-I2V-14B-480P-Diffusers" / "transformer"
    return load_transformer(base, tiny_weights / "InfiniteTalk" / "single" / "infinitetalk.safetensors", dtype=torch.float32)


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    lat = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(1, 7, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g)
    audio = torch.randn(1, 1, 5, cfg.audio_window, cfg.audio_feature_dim, generator=g)
    return lat, torch.tensor([700.0]), text, clip, audio


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def test_conversion_covers_every_target_and_ignores_alpha(tmp_path, transformer):
    sd = write_lightx2v_lora(tmp_path / "lora.safetensors", transformer)
    deltas = {d.module: d for d in read_lora(tmp_path / "lora.safetensors")}
    assert len(deltas) == 10 * len(transformer.blocks)
    q0 = deltas["blocks.0.attn1.to_q"]
    # no alpha/rank rescaling: up @ down is the official delta
    ref = sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] @ sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    assert torch.allclose(q0.up @ q0.down, ref, atol=1e-6)
    assert torch.equal(q0.bias, sd["diffusion_model.blocks.0.self_attn.q.diff_b"])
    assert "blocks.1.ffn.net.2" in deltas and "blocks.0.attn2.to_out.0" in deltas


def test_fuse_adds_delta(tmp_path, transformer):
    sd = write_lightx2v_lora(tmp_path / "lora.safetensors", transformer)
    w0 = transformer.blocks[1].ffn.net[0].proj.weight.clone()
    b0 = transformer.blocks[0].attn1.to_q.bias.clone()
    fuse_lora(transformer, tmp_path / "lora.safetensors", scale=0.5)
    delta = sd["diffusion_model.blocks.1.ffn.0.lora_up.weight"] @ sd["diffusion_model.blocks.1.ffn.0.lora_down.weight"]
    assert torch.allclose(transformer.blocks[1].ffn.net[0].proj.weight, w0 + 0.5 * delta, atol=1e-6)
    assert torch.allclose(transformer.blocks[0].attn1.to_q.bias, b0 + 0.5 * sd["diffusion_model.blocks.0.self_attn.q.diff_b"])


def test_adapter_switches_between_exact_and_fused(tmp_path, tiny_weights, transformer):
    write_lightx2v_lora(tmp_path / "lora.safetensors", transformer)
    inputs = _inputs(transformer)
    base_out = _run(transformer, inputs)
    adapter = LoRAAdapter(transformer, tmp_path / "lora.safetensors")
    assert torch.equal(_run(transformer, inputs), base_out)  # attached but disabled: exact
    adapter.enabled = True
    turbo_out = _run(transformer, inputs)
    assert (turbo_out - base_out).abs().max() > 1e-3
    adapter.enabled = False
    assert torch.equal(_run(transformer, inputs), base_out)  # no drift after switching back
    fused = load_transformer(tiny_weights / "Wan2.1-I2V-14B-480P-Diffusers" / "transformer",
                             tiny_weights / "InfiniteTalk" / "single" / "infinitetalk.safetensors", dtype=torch.float32)
    fuse_lora(fused, tmp_path / "lora.safetensors")
    ref = _run(fused, inputs)
    assert ((turbo_out - ref).norm() / ref.norm()) < 1e-5


def test_lora_for_other_model_is_rejected(tmp_path, transformer):
    save_file({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, 64),
               "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(64, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="blocks.7"):
        fuse_lora(transformer, tmp_path / "bad.safetensors")


def test_pipeline_turbo_mode(tmp_path, tiny_weights, portrait, make_speech):
    from decoding import ffprobe_streams

    from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline

    speech = make_speech(2.0, "turbo")
    plain = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu")
    req = GenerationRequest(image=portrait, audio=speech, width=64, height=64, seed=5, turbo=True, steps=2)
    with pytest.raises(InputError, match="LoRA"):
        plain.generate(req, tmp_path / "x.mp4", show_progress=False)
    lora = tmp_path / "lora.safetensors"
    write_lightx2v_lora(lora, plain.transformer)
    pipe = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu", turbo_lora=lora)
    assert req.resolved().text_guidance == 1.0 and req.resolved().shift == 2.0
    result = pipe.generate(req, tmp_path / "turbo.mp4", show_progress=False)
    info = ffprobe_streams(result.path)
    assert info["video"]["codec"] == "h264" and abs(info["video"]["duration"] - 2.0) <= 0.04 + 1e-6
    assert pipe.lora_adapter is not None and pipe.lora_adapter.enabled
    exact = pipe.generate(GenerationRequest(image=portrait, audio=speech, width=64, height=64, seed=5, steps=2),
                          tmp_path / "exact.mp4", show_progress=False)
    assert not pipe.lora_adapter.enabled and exact.num_frames == result.num_frames
