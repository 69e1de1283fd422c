"""scripts/make_tiny_weights.py writes a complete tiny weights folder in the real layout."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_tiny_weights.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_weights", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mtw = _load_script()
TINY = mtw.TINY


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, str]:
    out = tmp_path_factory.mktemp("tiny") / "weights"
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--seed", "3", "--with-base-overrides"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return out, time.monotonic() - start, res.stdout


def _wan(root: Path) -> Path:
    return root / mtw.WAN_DIR


EXPECTED_FILES = [
    "Wan2.1-I2V-14B-480P-Diffusers/model_index.json",
    "Wan2.1-I2V-14B-480P-Diffusers/transformer/config.json",
    "Wan2.1-I2V-14B-480P-Diffusers/transformer/diffusion_pytorch_model.safetensors.index.json",
    "Wan2.1-I2V-14B-480P-Diffusers/vae/config.json",
    "Wan2.1-I2V-14B-480P-Diffusers/vae/diffusion_pytorch_model.safetensors",
    "Wan2.1-I2V-14B-480P-Diffusers/text_encoder/config.json",
    "Wan2.1-I2V-14B-480P-Diffusers/text_encoder/model.safetensors",
    "Wan2.1-I2V-14B-480P-Diffusers/tokenizer/tokenizer_config.json",
    "Wan2.1-I2V-14B-480P-Diffusers/image_encoder/config.json",
    "Wan2.1-I2V-14B-480P-Diffusers/image_encoder/model.safetensors",
    "Wan2.1-I2V-14B-480P-Diffusers/image_processor/preprocessor_config.json",
    "Wan2.1-I2V-14B-480P-Diffusers/scheduler/scheduler_config.json",
    "InfiniteTalk/single/infinitetalk.safetensors",
    "InfiniteTalk/multi/infinitetalk.safetensors",
    "chinese-wav2vec2-base/config.json",
    "chinese-wav2vec2-base/preprocessor_config.json",
    "chinese-wav2vec2-base/model.safetensors",
]


def test_layout_size_and_runtime(weights: tuple[Path, float, str]) -> None:
    root, seconds, stdout = weights
    for rel in EXPECTED_FILES:
        assert (root / rel).is_file(), rel
    tts = (root / mtw.speech.KOKORO_DIR, root / mtw.speech.SPACY_DIR)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_relative_to(tts[0]))
    assert total < TINY.max_total_bytes, total
    # Text to speech (by default): Kokoro's fixed 512/1024-channel decoder in fp16 and 41 voices, < 160 MB.
    assert sum(p.stat().st_size for p in tts[0].rglob("*") if p.is_file()) < 160e6
    assert seconds < 60, seconds  # typically ~10 s including interpreter and library imports
    assert "total" in stdout and "MB" in stdout
    index = json.loads((root / mtw.WAN_DIR / "model_index.json").read_text())
    assert index == mtw.MODEL_INDEX


def test_transformer_sharded_and_loads(weights: tuple[Path, float, str]) -> None:
    from diffusers import WanTransformer3DModel

    tdir = _wan(weights[0]) / "transformer"
    shards = sorted(tdir.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((tdir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    model = WanTransformer3DModel.from_pretrained(tdir)
    cfg = model.config
    assert list(cfg.patch_size) == [1, 2, 2] and cfg.num_attention_heads == 2 and cfg.attention_head_dim == 32
    assert (cfg.in_channels, cfg.out_channels, cfg.text_dim, cfg.ffn_dim, cfg.num_layers) == (36, 16, 32, 128, 2)
    assert (cfg.image_dim, cfg.added_kv_proj_dim, cfg.qk_norm) == (32, 64, "rms_norm_across_heads")
    # non-trivial init: the output projection is not zero, and a forward pass is finite and non-constant
    assert model.proj_out.weight.abs().sum() > 0
    with torch.no_grad():
        out = model(
            torch.randn(1, 36, 2, 8, 8),
            torch.tensor([500]),
            torch.randn(1, 16, TINY.t5_d_model),
            encoder_hidden_states_image=torch.randn(1, TINY.num_clip_tokens, TINY.clip_hidden),
        ).sample
    assert out.shape == (1, 16, 2, 8, 8) and torch.isfinite(out).all() and out.std() > 0.1


def test_text_encoder_and_tokenizer(weights: tuple[Path, float, str]) -> None:
    from transformers import AutoTokenizer, UMT5EncoderModel

    wan = _wan(weights[0])
    tok = AutoTokenizer.from_pretrained(wan / "tokenizer")
    assert "T5Tokenizer" in type(tok).__name__
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    prompt = "A woman is talking to the camera, high quality."
    enc = tok([prompt], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (1, 512)
    n = int(enc.attention_mask.sum())
    assert enc.input_ids[0, n - 1] == tok.eos_token_id and (enc.input_ids[0, n:] == 0).all()
    assert tok.unk_token_id not in enc.input_ids[0, :n].tolist()
    assert tok.decode(enc.input_ids[0], skip_special_tokens=True) == prompt
    te = UMT5EncoderModel.from_pretrained(wan / "text_encoder")
    assert te.config.vocab_size == len(tok) == mtw.vocab_size()
    assert te.config.d_model == TINY.t5_d_model and te.config.num_layers == 2 and te.config.num_heads == 2
    # embeddings really loaded (transformers 5.x once left encoder.embed_tokens zero for Wan repos)
    with safe_open(str(wan / "text_encoder" / "model.safetensors"), "pt") as f:
        shared = f.get_tensor("shared.weight")
    assert torch.equal(te.get_input_embeddings().weight, shared)
    assert torch.equal(te.encoder.embed_tokens.weight, shared)
    with torch.no_grad():
        hidden = te(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    assert hidden.shape == (1, 512, TINY.t5_d_model) and torch.isfinite(hidden).all()


def test_clip_and_processor_config(weights: tuple[Path, float, str]) -> None:
    from transformers import CLIPVisionModelWithProjection

    wan = _wan(weights[0])
    clip = CLIPVisionModelWithProjection.from_pretrained(wan / "image_encoder")
    with torch.no_grad():
        out = clip(pixel_values=torch.randn(1, 3, 224, 224), output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 257, TINY.clip_hidden)
    assert out.image_embeds.shape == (1, TINY.clip_projection_dim)
    proc = json.loads((wan / "image_processor" / "preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": 224, "width": 224} and proc["size"] == {"shortest_edge": 224}
    assert proc["image_mean"] == list(mtw.CLIP_MEAN) and proc["image_std"] == list(mtw.CLIP_STD)


def test_vae_and_scheduler(weights: tuple[Path, float, str]) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    wan = _wan(weights[0])
    vae = AutoencoderKLWan.from_pretrained(wan / "vae")
    assert vae.config.z_dim == 16 and list(vae.config.latents_mean) == list(mtw.WAN_LATENTS_MEAN)
    assert list(vae.config.latents_std) == list(mtw.WAN_LATENTS_STD)
    with torch.no_grad():
        lat = vae.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1).latent_dist.mode()
        assert lat.shape == (1, 16, 2, 4, 4)
        dec = vae.decode(lat).sample
    assert dec.shape == (1, 3, 5, 32, 32) and torch.isfinite(dec).all()
    sched = UniPCMultistepScheduler.from_pretrained(wan / "scheduler")
    assert sched.config.flow_shift == 3.0 and sched.config.use_flow_sigmas
    assert sched.config.prediction_type == "flow_prediction"


def test_vae_channels_last_same_frames(weights: tuple[Path, float, str]) -> None:
    """The served VAE layout (channels-last 3-D convolutions, conditioning.vae_channels_last): every
    Conv3d sees NDHWC inputs, and encode/decode give the frames of the default layout."""
    from diffusers import AutoencoderKLWan

    from infinitetalk.conditioning import vae_channels_last, vae_decode, vae_encode

    wan = _wan(weights[0])
    plain = AutoencoderKLWan.from_pretrained(wan / "vae").eval()
    fast = AutoencoderKLWan.from_pretrained(wan / "vae").eval()
    convs = vae_channels_last(fast)
    assert convs == sum(isinstance(m, torch.nn.Conv3d) for m in fast.modules()) > 10
    seen = []
    for m in fast.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.register_forward_hook(lambda mod, args, out: seen.append(
                args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    torch.manual_seed(0)
    clip = torch.rand(1, 3, 9, 48, 32) * 2 - 1
    lat_plain, lat_fast = vae_encode(plain, clip), vae_encode(fast, clip)
    assert seen and all(seen)
    torch.testing.assert_close(lat_fast, lat_plain, rtol=1e-4, atol=1e-4)
    dec_plain, dec_fast = vae_decode(plain, lat_plain), vae_decode(fast, lat_plain)
    assert dec_fast.shape == (1, 3, 9, 48, 32)
    torch.testing.assert_close(dec_fast.contiguous(), dec_plain, rtol=1e-4, atol=1e-4)
    assert not torch.equal(dec_plain, vae_decode(plain, lat_plain + 0.5))  # the comparison can fail


def test_wav2vec2_legacy_weight_norm_names(weights: tuple[Path, float, str]) -> None:
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    wdir = weights[0] / mtw.WAV2VEC_DIR
    with safe_open(str(wdir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        g = f.get_tensor("encoder.pos_conv_embed.conv.weight_g")
        v = f.get_tensor("encoder.pos_conv_embed.conv.weight_v")
    assert not any("parametrizations" in k for k in keys)
    assert g.shape == (1, 1, TINY.w2v_pos_conv_kernel)
    assert v.shape == (TINY.w2v_hidden, TINY.w2v_hidden // TINY.w2v_pos_conv_groups, TINY.w2v_pos_conv_kernel)
    model = Wav2Vec2Model.from_pretrained(wdir)
    conv = model.encoder.pos_conv_embed.conv
    assert torch.equal(conv.parametrizations.weight.original0, g)
    assert torch.equal(conv.parametrizations.weight.original1, v)
    fe = Wav2Vec2FeatureExtractor.from_pretrained(wdir)
    assert fe.do_normalize is False and fe.sampling_rate == 16000
    with torch.no_grad():
        out = model(torch.randn(1, 16000), output_hidden_states=True)
    assert len(out.hidden_states) == TINY.w2v_layers + 1
    assert out.last_hidden_state.shape == (1, 49, TINY.w2v_hidden)


def test_infinitetalk_files(weights: tuple[Path, float, str]) -> None:
    root = weights[0]
    expected = mtw.infinitetalk_shapes()
    d, nl_nc = TINY.inner_dim, TINY.w2v_layers * TINY.w2v_hidden
    assert len(expected) == 10 + 8 * TINY.num_layers
    assert expected["audio_proj.proj1.weight"] == (16, 5 * nl_nc)
    assert expected["audio_proj.proj1_vf.weight"] == (16, 8 * nl_nc)
    assert expected["audio_proj.proj3.weight"] == (32 * 16, 16)
    assert expected["blocks.1.audio_cross_attn.kv_linear.weight"] == (2 * d, 16)
    tensors = {}
    for variant in ("single", "multi"):
        with safe_open(str(root / "InfiniteTalk" / variant / "infinitetalk.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors[variant] = {k: f.get_tensor(k) for k in f.keys()}
    single, multi = tensors["single"], tensors["multi"]
    assert set(multi) == set(expected)
    assert set(single) == set(expected) | {mtw.BASE_OVERRIDE_KEY}
    assert single[mtw.BASE_OVERRIDE_KEY].shape == (d, d)
    for key, shape in expected.items():
        assert tuple(single[key].shape) == shape and single[key].dtype == torch.float32, key
        assert tuple(multi[key].shape) == shape, key
    assert not torch.equal(single["audio_proj.proj1.weight"], multi["audio_proj.proj1.weight"])


def test_text_to_speech_files_load_strictly_in_kokoro_and_spacy(weights: tuple[Path, float, str]) -> None:
    """Kokoro-82M/ holds what kokoro.KModel loads, every key of every part (strict), with the real
    vocabulary's symbols; every voice is a [510, 1, 256] pack; en_core_web_sm/ is a spaCy pipeline
    with the two components misaki's English G2P enables."""
    import spacy
    from kokoro import KModel

    root = weights[0]
    folder = root / mtw.speech.KOKORO_DIR
    config = json.loads((folder / "config.json").read_text())
    assert config["n_token"] == 178 and config["style_dim"] == 128 and config["hidden_dim"] == 512
    assert len(config["vocab"]) == 114 and config["vocab"]["ˈ"] == 156 and config["vocab"]["ɡ"] == 92
    assert "g" not in config["vocab"]  # Kokoro spells /g/ with U+0261, like the real file
    parts = torch.load(folder / "kokoro-v1_0.pth", map_location="cpu", weights_only=True)
    assert sorted(parts) == ["bert", "bert_encoder", "decoder", "predictor", "text_encoder"]
    empty = root.parent / "empty.pth"  # KModel's own loader falls back to strict=False: load strictly here
    torch.save({}, empty)
    model = KModel(repo_id="hexgrad/Kokoro-82M", config=str(folder / "config.json"), model=str(empty))
    for name, state in parts.items():
        getattr(model, name).load_state_dict(state, strict=True)
    voices = sorted(p.stem for p in (folder / "voices").glob("*.pt"))
    assert voices == sorted(mtw.speech.VOICES)
    pack = torch.load(folder / "voices" / "af_heart.pt", weights_only=True)
    assert pack.shape == (510, 1, 256) and pack.dtype == torch.float32
    nlp = spacy.load(root / mtw.speech.SPACY_DIR, enable=["tok2vec", "tagger"])
    assert nlp.pipe_names == ["tok2vec", "tagger"]
    assert all(t.tag_ for t in nlp("I read the book."))
    assert mtw.speech.tts_paths(root) == (folder, root / mtw.speech.SPACY_DIR)


def test_deterministic_and_without_overrides(tmp_path: Path) -> None:
    a = mtw.make_tiny_weights(tmp_path / "a", seed=5, with_tts=False)
    b = mtw.make_tiny_weights(tmp_path / "b", seed=5, with_tts=False)
    with safe_open(str(a / "InfiniteTalk/single/infinitetalk.safetensors"), "pt") as f:
        assert mtw.BASE_OVERRIDE_KEY not in f.keys()
    for rel in ("InfiniteTalk/single/infinitetalk.safetensors", "chinese-wav2vec2-base/model.safetensors"):
        with safe_open(str(a / rel), "pt") as fa, safe_open(str(b / rel), "pt") as fb:
            for k in fa.keys():
                assert np.array_equal(fa.get_tensor(k).numpy(), fb.get_tensor(k).numpy()), (rel, k)
