"""Loading the transformer: official naming, the real on-disk layout, strict errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitetalk.models import InfiniteTalkTransformer3DModel
from infinitetalk.weights import (
    WeightsError,
    config_from_official,
    convert_official_base_keys,
    is_official_audio_key,
    load_official_state_dict,
    load_transformer,
    save_prepared,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
pytestmark = pytest.mark.skipif(not (GOLDEN / "tiny_dit.safetensors").exists(), reason="golden data absent")


@pytest.fixture(scope="module")
def official():
    return load_file(str(GOLDEN / "tiny_dit.safetensors"))


@pytest.fixture(scope="module")
def config():
    return config_from_official(json.loads((GOLDEN / "tiny_dit_config.json").read_text()))


@pytest.fixture(scope="module")
def inputs():
    cases = load_file(str(GOLDEN / "tiny_dit_cases.safetensors"))
    latents = torch.cat([cases["inputs.x"], cases["inputs.y"]])[None]
    return (latents, cases["inputs.t"], cases["inputs.context0"][None], cases["inputs.clip_fea"],
            cases["caseA.audio"][None])


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def _official_model(config, official):
    model = InfiniteTalkTransformer3DModel(**config).eval()
    load_official_state_dict(model, official)
    return model


def _write_real_layout(tmp: Path, config: dict, official: dict) -> tuple[Path, Path]:
    """Split an official state dict into a diffusers transformer folder + an InfiniteTalk file."""
    base = convert_official_base_keys({k: v for k, v in official.items() if not is_official_audio_key(k)})
    tdir = tmp / "transformer"
    tdir.mkdir()
    keys = sorted(base)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: base[k].contiguous() for k in ks}, str(tdir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    index = {"metadata": {}, "weight_map": weight_map}
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    wan_keys = ["patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
                "added_kv_proj_dim", "rope_max_seq_len"]
    wan_config = {"_class_name": "WanTransformer3DModel", **{k: config[k] for k in wan_keys}}
    wan_config["patch_size"] = list(wan_config["patch_size"])
    (tdir / "config.json").write_text(json.dumps(wan_config))
    it_file = tmp / "infinitetalk.safetensors"
    save_file({k: v.contiguous() for k, v in official.items() if is_official_audio_key(k)}, str(it_file))
    return tdir, it_file


def test_real_layout_matches_official_state_dict(tmp_path, config, official, inputs):
    ref = _run(_official_model(config, official), inputs)
    tdir, it_file = _write_real_layout(tmp_path, config, official)
    model = load_transformer(tdir, it_file, dtype=torch.float32,
                             extra_config={"audio_feature_dim": config["audio_feature_dim"]})
    out = _run(model, inputs)
    assert ((out - ref).norm() / ref.norm()) < 1e-6  # same weights; only kernel scheduling may differ
    # The audio config was inferred from the InfiniteTalk file's shapes.
    assert model.config.audio_intermediate_dim == config["audio_intermediate_dim"]
    assert model.config.audio_output_dim == config["audio_output_dim"]


def test_base_override_in_infinitetalk_file_wins(tmp_path, config, official, inputs):
    tdir, it_file = _write_real_layout(tmp_path, config, official)
    sd = load_file(str(it_file))
    sd["blocks.0.self_attn.q.weight"] = official["blocks.0.self_attn.q.weight"] * 2
    save_file(sd, str(it_file))
    model = load_transformer(tdir, it_file, dtype=torch.float32)
    assert torch.equal(model.blocks[0].attn1.to_q.weight, official["blocks.0.self_attn.q.weight"] * 2)


def test_prepared_roundtrip_bf16(tmp_path, config, official, inputs):
    model = _official_model(config, official)
    ref = _run(model, inputs)
    save_prepared(model, tmp_path / "prepared", dtype=torch.bfloat16, max_shard_gb=0.005)
    assert len(list((tmp_path / "prepared").glob("*.safetensors"))) >= 2
    loaded = load_transformer(tmp_path / "prepared", None, dtype=None).float()
    out = _run(loaded, inputs)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05  # bf16 storage: close, not identical


@pytest.mark.parametrize("mutation,needle", [
    ("missing", "missing keys"),
    ("unexpected", "unexpected keys"),
    ("shape", "wrong shapes"),
])
def test_strict_errors_name_the_key(tmp_path, config, official, mutation, needle):
    bad = dict(official)
    if mutation == "missing":
        del bad["blocks.1.audio_cross_attn.kv_linear.bias"]
        key = "blocks.1.audio_attn.to_kv.bias"
    elif mutation == "unexpected":
        bad["blocks.0.audio_cross_attn.extra.weight"] = torch.zeros(1)
        key = "audio_cross_attn.extra"
    else:
        bad["blocks.0.norm_x.weight"] = torch.zeros(3)
        key = "blocks.0.norm_audio.weight"
    with pytest.raises(WeightsError) as err:
        _official_model(config, bad) if mutation == "shape" else load_official_state_dict(
            InfiniteTalkTransformer3DModel(**config), bad)
    assert needle in str(err.value) or "unknown InfiniteTalk audio key" in str(err.value)
    assert key in str(err.value)

    # The same through the streaming loader of the real layout.
    tdir, it_file = _write_real_layout(tmp_path, config, bad if mutation != "unexpected" else official)
    if mutation == "unexpected":
        sd = load_file(str(it_file))
        sd["blocks.0.ffn.9.weight"] = torch.zeros(2)  # an unknown base key in official naming
        save_file(sd, str(it_file))
        key = "blocks.0.ffn.9.weight"
    with pytest.raises(WeightsError) as err:
        load_transformer(tdir, it_file, dtype=torch.float32)
    assert key in str(err.value)


def test_missing_infinitetalk_file_is_clear(tmp_path, config, official):
    tdir, _ = _write_real_layout(tmp_path, config, official)
    with pytest.raises(WeightsError, match="InfiniteTalk file"):
        load_transformer(tdir, None)
