#!/usr/bin/env python
"""Write a complete, tiny, random weights folder in the real on-disk layout.

Usage::

    python scripts/make_tiny_weights.py DIR [--seed N] [--with-base-overrides] [--with-turbo-lora]

The folder mirrors what a production install downloads, with the same file
names, folder names, config field names and state-dict key names, but with
tiny random models (a few MB in total, written in a few seconds, no network)::

    DIR/Wan2.1-I2V-14B-480P-Diffusers/   diffusers layout (model_index.json, transformer/ sharded,
                                          vae/, text_encoder/, tokenizer/, image_encoder/,
                                          image_processor/, scheduler/)
    DIR/InfiniteTalk/single/infinitetalk.safetensors   official audio keys (fp32)
    DIR/InfiniteTalk/multi/infinitetalk.safetensors    same keys, other values
    DIR/chinese-wav2vec2-base/                         HF Wav2Vec2Model, legacy weight_g/weight_v names
    DIR/lightx2v/<TURBO_FILE>                          only with --with-turbo-lora: the turbo LoRA, every key
                                                       kind of the real file (see :func:`turbo_lora_shapes`)
    DIR/Kokoro-82M/                                    text to speech (unless --no-tts): config.json (the real
                                                       phoneme vocabulary, a smaller ALBERT), kokoro-v1_0.pth
                                                       (the five state dicts KModel loads, fp16), voices/*.pt
    DIR/en_core_web_sm/                                a tiny spaCy pipeline (tok2vec + tagger, random), the
                                                       on-disk layout of spaCy's English model

The text-to-speech part is the largest (about 120 MB): Kokoro's decoder has fixed widths of 512 and
1024 channels that a config cannot shrink. The test suite's shared folder leaves it out (``--no-tts``)
and makes it once for the text-input tests.

All sizes live in :data:`TINY` (a frozen :class:`TinySpec`) so tests can import
them. Weights are random but sane: linear/conv weights N(0, 1/fan_in), biases
N(0, 0.1^2), norm weights N(1, 0.1^2), so outputs are not trivial (the default
init zeroes some output layers) yet a few sampling steps stay finite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infinitetalk import speech  # noqa: E402  (the voice list and folder names of the text input)

WAN_DIR = "Wan2.1-I2V-14B-480P-Diffusers"
INFINITETALK_DIR = "InfiniteTalk"
WAV2VEC_DIR = "chinese-wav2vec2-base"
INFINITETALK_FILE = "infinitetalk.safetensors"

#: The turbo LoRA's folder and file name (the same as ``infinitetalk.download.TURBO_DIR`` / ``TURBO_FILE``).
TURBO_DIR = "lightx2v"
TURBO_FILE = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"
#: Rank of the tiny turbo LoRA (the real files: 32, 64 or 128).
TURBO_RANK = 4

#: Official Wan key that ``--with-base-overrides`` adds to the *single* file.
BASE_OVERRIDE_KEY = "blocks.0.self_attn.q.weight"

#: OpenAI CLIP normalisation (also used by open-clip ViT-H/14 in Wan).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Wan2.1 VAE latent statistics (same as diffusers' AutoencoderKLWan defaults / the Hub config).
WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

#: model_index.json exactly as the Wan-AI/Wan2.1-I2V-14B-480P-Diffusers repo ships it.
MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "_diffusers_version": "0.33.0.dev0",
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}

# Pieces of the tiny Unigram vocabulary (after <pad>, </s>, <unk>, "▁").
_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()/&%+=*#@_")
_WORDS = (
    "the a an is are was of and to in on with at his her he she they it this that for by "
    "man woman person people talking talks speaking speaks singing sings looks camera face "
    "mouth eyes head hair smiling smile young old background light bright dark room studio "
    "video high quality realistic natural expression movement moving slowly while sitting "
    "standing wearing shirt white black red blue green low worst blurry static still frame "
    "subtitles overall gray bad poorly drawn hands fingers deformed extra"
).split()
_SUFFIXES = ("ing", "ed", "er", "es", "s", "ly", "tion", "al", "en", "or", "th", "st", "ch", "sh", "ou", "ea")


@dataclass(frozen=True)
class TinySpec:
    """Every size used by the generator (importable by tests)."""

    # WanTransformer3DModel
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    in_channels: int = 36
    out_channels: int = 16
    freq_dim: int = 256
    ffn_dim: int = 128
    num_layers: int = 2
    rope_max_seq_len: int = 1024
    eps: float = 1e-6
    transformer_max_shard_size: str = "200KB"
    # UMT5 text encoder
    t5_d_model: int = 32
    t5_d_kv: int = 16
    t5_d_ff: int = 64
    t5_layers: int = 2
    t5_heads: int = 2
    text_max_length: int = 512
    # CLIP vision tower
    clip_hidden: int = 32
    clip_intermediate: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    clip_image_size: int = 224
    clip_patch_size: int = 14
    clip_projection_dim: int = 32
    # VAE
    vae_base_dim: int = 8
    vae_z_dim: int = 16
    # wav2vec2
    w2v_hidden: int = 32
    w2v_layers: int = 2
    w2v_heads: int = 2
    w2v_intermediate: int = 64
    w2v_conv_dim: tuple[int, ...] = (32,) * 7
    w2v_conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    w2v_conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    w2v_pos_conv_kernel: int = 128
    w2v_pos_conv_groups: int = 16
    # InfiniteTalk audio modules
    audio_window: int = 5
    vae_scale: int = 4
    audio_intermediate_dim: int = 16
    audio_output_dim: int = 16
    audio_context_tokens: int = 32
    # limits checked by tests
    max_total_bytes: int = 8_000_000

    @property
    def inner_dim(self) -> int:
        """Transformer width D."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_clip_tokens(self) -> int:
        """CLS + patches (257 for 224/14)."""
        return (self.clip_image_size // self.clip_patch_size) ** 2 + 1


TINY = TinySpec()


def tokenizer_vocab() -> list[tuple[str, float]]:
    """T5-style Unigram vocab: <pad>=0, </s>=1, <unk>=2, then pieces with log-prob scores."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for word in _WORDS:
        add("▁" + word, -4.0 - 0.01 * len(pieces))
    for suffix in _SUFFIXES:
        add(suffix, -6.0)
    for ch in _CHARS:
        add("▁" + ch, -8.0)
    for ch in _CHARS:
        add(ch, -9.0)
    return pieces


def vocab_size() -> int:
    """Number of tokenizer pieces = UMT5 vocab_size."""
    return len(tokenizer_vocab())


# --------------------------------------------------------------------------- randomisation


def _randomise_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter in place with seeded values.

    Linear/conv weights N(0, 1/fan_in); embeddings N(0, 1); biases N(0, 0.1^2);
    1-D weights (norms) N(1, 0.1^2); AdaLN ``scale_shift_table`` N(0, 1/D);
    other 1-D tensors (e.g. CLIP class embedding) N(0, 0.1^2).
    """
    with torch.no_grad():
        for mod in module.modules():
            is_embedding = isinstance(mod, torch.nn.Embedding)
            for name, param in mod.named_parameters(recurse=False):
                shape = param.shape
                if is_embedding:
                    new = torch.randn(shape, generator=gen)
                elif name == "scale_shift_table":
                    new = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
                elif param.ndim >= 2:
                    new = torch.randn(shape, generator=gen) * shape[1:].numel() ** -0.5
                elif name == "bias":
                    new = torch.randn(shape, generator=gen) * 0.1
                elif name == "weight":
                    new = 1.0 + 0.1 * torch.randn(shape, generator=gen)
                else:
                    new = torch.randn(shape, generator=gen) * 0.1
                param.copy_(new.to(param.dtype))


# --------------------------------------------------------------------------- components


def write_transformer(root: Path, spec: TinySpec, gen: torch.Generator) -> dict:
    """diffusers WanTransformer3DModel, sharded into >= 2 safetensors files."""
    from diffusers import WanTransformer3DModel

    config = dict(
        patch_size=list(spec.patch_size),
        num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        text_dim=spec.t5_d_model,
        freq_dim=spec.freq_dim,
        ffn_dim=spec.ffn_dim,
        num_layers=spec.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=spec.eps,
        image_dim=spec.clip_hidden,
        added_kv_proj_dim=spec.inner_dim,
        rope_max_seq_len=spec.rope_max_seq_len,
    )
    model = WanTransformer3DModel(**config)
    _randomise_(model, gen)
    model.save_pretrained(root / "transformer", max_shard_size=spec.transformer_max_shard_size, safe_serialization=True)
    return config


def write_vae(root: Path, spec: TinySpec, gen: torch.Generator) -> None:
    """diffusers AutoencoderKLWan with a tiny base_dim and the real latent statistics."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim,
        z_dim=spec.vae_z_dim,
        num_res_blocks=1,  # the per-conv overhead dominates on a CPU; one residual block per stage halves it
        latents_mean=list(WAN_LATENTS_MEAN),
        latents_std=list(WAN_LATENTS_STD),
    )
    _randomise_vae_(vae, gen)
    vae.save_pretrained(root / "vae", safe_serialization=True)


def _randomise_vae_(vae: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded conv init (kaiming-like, fan_in scaled) keeping RMS-norm gammas at 1 +- 0.1."""
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if param.ndim >= 2:
                fan_in = param.shape[1:].numel()
                param.copy_(torch.randn(param.shape, generator=gen) * fan_in**-0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
            else:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))


def write_tokenizer(root: Path) -> int:
    """T5 (Unigram + Metaspace) tokenizer built offline; returns its vocab size."""
    from transformers import T5Tokenizer

    tok = T5Tokenizer(vocab=tokenizer_vocab(), extra_ids=0, model_max_length=TINY.text_max_length)
    tok.save_pretrained(root / "tokenizer")
    return len(tok)


def write_text_encoder(root: Path, spec: TinySpec, vocab: int, gen: torch.Generator) -> None:
    """transformers UMT5EncoderModel; config.json says tie_word_embeddings false like google/umt5-xxl."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab,
        d_model=spec.t5_d_model,
        d_kv=spec.t5_d_kv,
        d_ff=spec.t5_d_ff,
        num_layers=spec.t5_layers,
        num_heads=spec.t5_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        scalable_attention=True,
        tie_word_embeddings=False,
    )
    model = UMT5EncoderModel(cfg)
    _randomise_(model, gen)
    out = root / "text_encoder"
    model.save_pretrained(out, safe_serialization=True)
    _patch_json(out / "config.json", {"tie_word_embeddings": False, "architectures": ["UMT5EncoderModel"]})


def write_image_encoder(root: Path, spec: TinySpec, gen: torch.Generator) -> None:
    """transformers CLIPVisionModelWithProjection (257 tokens at 224 px / patch 14)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=spec.clip_hidden,
        intermediate_size=spec.clip_intermediate,
        num_hidden_layers=spec.clip_layers,
        num_attention_heads=spec.clip_heads,
        image_size=spec.clip_image_size,
        patch_size=spec.clip_patch_size,
        projection_dim=spec.clip_projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPVisionModelWithProjection(cfg)
    _randomise_(model, gen)
    model.save_pretrained(root / "image_encoder", safe_serialization=True)


def write_image_processor(root: Path, spec: TinySpec) -> None:
    """CLIPImageProcessor json as the Hub repo has it (written directly: no torchvision needed)."""
    cfg = {
        "crop_size": {"height": spec.clip_image_size, "width": spec.clip_image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": spec.clip_image_size},
    }
    _write_json(root / "image_processor" / "preprocessor_config.json", cfg)


def write_scheduler(root: Path) -> None:
    """UniPCMultistepScheduler as the diffusers converter builds it for Wan I2V."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    sched.save_pretrained(root / "scheduler")


def write_wav2vec2(root: Path, spec: TinySpec, gen: torch.Generator) -> None:
    """Tiny Wav2Vec2Model with the positional conv weight norm under legacy weight_g / weight_v names."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        vocab_size=32,
        hidden_size=spec.w2v_hidden,
        num_hidden_layers=spec.w2v_layers,
        num_attention_heads=spec.w2v_heads,
        intermediate_size=spec.w2v_intermediate,
        conv_dim=list(spec.w2v_conv_dim),
        conv_stride=list(spec.w2v_conv_stride),
        conv_kernel=list(spec.w2v_conv_kernel),
        conv_bias=False,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=spec.w2v_pos_conv_kernel,
        num_conv_pos_embedding_groups=spec.w2v_pos_conv_groups,
        hidden_act="gelu",
        feat_extract_activation="gelu",
        layer_norm_eps=1e-5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        architectures=["Wav2Vec2Model"],
    )
    model = Wav2Vec2Model(cfg)
    _randomise_(model, gen)
    state = _legacy_weight_norm_names(model.state_dict(), gen)
    out = root / WAV2VEC_DIR
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False, return_attention_mask=False
    ).save_pretrained(out)


def _legacy_weight_norm_names(state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Rename parametrizations.weight.original0/1 -> weight_g/weight_v; g = ||v|| * (1 + 0.1 N)."""
    out: dict[str, torch.Tensor] = {}
    prefix = "encoder.pos_conv_embed.conv."
    for key, value in state.items():
        if key == prefix + "parametrizations.weight.original0":
            continue
        if key == prefix + "parametrizations.weight.original1":
            v = value.clone()
            norm = v.norm(dim=(0, 1), keepdim=True)  # weight_norm(dim=2): g has shape [1, 1, K]
            out[prefix + "weight_v"] = v.contiguous()
            out[prefix + "weight_g"] = (norm * (1 + 0.1 * torch.randn(norm.shape, generator=gen))).contiguous()
            continue
        out[key] = value.detach().clone().contiguous()
    if prefix + "weight_v" not in out:
        raise RuntimeError("wav2vec2 positional conv has no weight-norm parametrization; transformers changed?")
    return out


def infinitetalk_shapes(spec: TinySpec = TINY) -> dict[str, tuple[int, ...]]:
    """Official InfiniteTalk audio-module keys and shapes for the tiny sizes (10 + 8 * num_layers)."""
    d, i, o, k = spec.inner_dim, spec.audio_intermediate_dim, spec.audio_output_dim, spec.audio_context_tokens
    nl_nc = spec.w2v_layers * spec.w2v_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "audio_proj.proj1.weight": (i, spec.audio_window * nl_nc),
        "audio_proj.proj1.bias": (i,),
        "audio_proj.proj1_vf.weight": (i, (spec.audio_window + spec.vae_scale - 1) * nl_nc),  # seq_len_vf = 8
        "audio_proj.proj1_vf.bias": (i,),
        "audio_proj.proj2.weight": (i, i),
        "audio_proj.proj2.bias": (i,),
        "audio_proj.proj3.weight": (k * o, i),
        "audio_proj.proj3.bias": (k * o,),
        "audio_proj.norm.weight": (o,),
        "audio_proj.norm.bias": (o,),
    }
    for b in range(spec.num_layers):
        p = f"blocks.{b}."
        shapes[p + "audio_cross_attn.q_linear.weight"] = (d, d)
        shapes[p + "audio_cross_attn.q_linear.bias"] = (d,)
        shapes[p + "audio_cross_attn.kv_linear.weight"] = (2 * d, o)
        shapes[p + "audio_cross_attn.kv_linear.bias"] = (2 * d,)
        shapes[p + "audio_cross_attn.proj.weight"] = (d, d)
        shapes[p + "audio_cross_attn.proj.bias"] = (d,)
        shapes[p + "norm_x.weight"] = (d,)
        shapes[p + "norm_x.bias"] = (d,)
    return shapes


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random value for an official audio key, on the generator's device (the served benchmark draws
    the full-size ones on the GPU)."""
    noise = torch.randn(shape, generator=gen, device=gen.device)
    if key.endswith(".bias"):
        return noise * 0.1
    if len(shape) == 1:  # LayerNorm weights
        return 1.0 + 0.1 * noise
    return noise * shape[1] ** -0.5


def write_infinitetalk(root: Path, spec: TinySpec, gen: torch.Generator, with_base_overrides: bool) -> None:
    """single/ and multi/ infinitetalk.safetensors (fp32, official names, metadata format=pt)."""
    for variant in ("single", "multi"):
        tensors = {k: _random_tensor(k, s, gen).contiguous() for k, s in infinitetalk_shapes(spec).items()}
        if variant == "single" and with_base_overrides:
            d = spec.inner_dim
            tensors[BASE_OVERRIDE_KEY] = torch.randn((d, d), generator=gen) * d**-0.5
        out = root / INFINITETALK_DIR / variant
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / INFINITETALK_FILE), metadata={"format": "pt"})


# --------------------------------------------------------------------------- turbo LoRA
#
# Key set of the lightx2v step/CFG-distill LoRAs for Wan2.1-I2V-14B-480P (e.g. Kijai/WanVideo_comfy
# Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors). No listing of the file
# itself was available offline; the set follows from how lightx2v extracts these files from the
# distilled model (ModelTC/LightX2V tools/extract/lora_extractor.py, and its docs' table of key
# kinds): every parameter of the official Wan2.1-I2V model that changed is written under
# ``diffusion_model.`` + its official name as
#   * ``lora_down.weight`` / ``lora_up.weight`` for 2-D weights of at least 1M elements (every
#     attention / FFN linear of every block, text/time embeddings, time projection, img_emb.proj.1/3),
#   * ``.diff`` for the other weights (norm_q / norm_k / norm_k_img, norm3, img_emb.proj.0/4,
#     patch_embedding [5120, 36, 1, 2, 2], and head.head: 64 x 5120 < 1M),
#   * ``.diff_b`` for every bias, ``.diff_m`` for ``blocks.N.modulation`` and ``head.modulation``,
#   * no ``.alpha``.
# Public reports on the released files agree: ``blocks.N.diff_m`` (kijai/ComfyUI-WanVideoWrapper
# issue 807, the rank-64 I2V file), ``cross_attn.norm_k_img.diff`` (deepbeepmeep/Wan2GP issue 524, the
# rank-32 I2V file), ``k_img`` / ``v_img`` factors with ``diff_b`` (huggingface/diffusers PR 12040,
# the rank-128 file), ``patch_embedding.diff`` [5120, 36, 1, 2, 2] and a full ``head.head`` delta.
# The T2V rank-32 file that download.py fetches was made from the T2V model: it would lack the image
# branch (k_img, v_img, norm_k_img, img_emb); the tiny file carries the I2V superset.


def turbo_lora_shapes(spec: TinySpec = TINY, rank: int = TURBO_RANK) -> dict[str, tuple[int, ...]]:
    """Every key of the turbo LoRA (official names, ``diffusion_model.`` prefix) and its tiny shape."""
    d, f, img = spec.inner_dim, spec.ffn_dim, spec.clip_hidden
    linears: dict[str, tuple[int, int]] = {  # official module -> (out, in)
        "text_embedding.0": (d, spec.t5_d_model), "text_embedding.2": (d, d),
        "time_embedding.0": (d, spec.freq_dim), "time_embedding.2": (d, d),
        "time_projection.1": (6 * d, d), "img_emb.proj.1": (img, img), "img_emb.proj.3": (d, img),
    }  # fmt: skip
    patch = 1
    for p in spec.patch_size:
        patch *= p
    full: dict[str, tuple[int, ...]] = {  # official parameter -> shape
        "patch_embedding.weight": (d, spec.in_channels, *spec.patch_size), "patch_embedding.bias": (d,),
        "head.head.weight": (spec.out_channels * patch, d), "head.head.bias": (spec.out_channels * patch,),
        "head.modulation": (1, 2, d), "img_emb.proj.0.weight": (img,), "img_emb.proj.0.bias": (img,),
        "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,),
    }  # fmt: skip
    for b in range(spec.num_layers):
        p = f"blocks.{b}."
        for attn in ("self_attn", "cross_attn"):
            linears.update({f"{p}{attn}.{x}": (d, d) for x in "qkvo"})
            full.update({f"{p}{attn}.norm_q.weight": (d,), f"{p}{attn}.norm_k.weight": (d,)})
        linears.update({p + "cross_attn.k_img": (d, d), p + "cross_attn.v_img": (d, d)})
        linears.update({p + "ffn.0": (f, d), p + "ffn.2": (d, f)})
        full.update(
            {
                p + "cross_attn.norm_k_img.weight": (d,),
                p + "norm3.weight": (d,),
                p + "norm3.bias": (d,),
                p + "modulation": (1, 6, d),
            }
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (out, inp) in linears.items():
        shapes[f"diffusion_model.{module}.lora_down.weight"] = (rank, inp)
        shapes[f"diffusion_model.{module}.lora_up.weight"] = (out, rank)
        shapes[f"diffusion_model.{module}.diff_b"] = (out,)
    suffix = {"weight": "diff", "bias": "diff_b", "modulation": "diff_m"}
    for name, shape in full.items():
        stem, _, leaf = name.rpartition(".")
        shapes[f"diffusion_model.{stem}.{suffix[leaf]}"] = shape
    return shapes


def write_turbo_lora(root: Path, spec: TinySpec = TINY, seed: int = 0, rank: int = TURBO_RANK) -> Path:
    """``root/lightx2v/<TURBO_FILE>``: bf16 like the real file; small deltas keep the model finite."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in turbo_lora_shapes(spec, rank).items():
        scale = 0.3 if key.endswith((".lora_down.weight", ".lora_up.weight")) else 0.02
        tensors[key] = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16).contiguous()
    out = root / TURBO_DIR / TURBO_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- text to speech

#: Kokoro-82M v1.0's phoneme vocabulary (config.json ``vocab``: symbol -> token id, 114 symbols of 178 ids).
KOKORO_SYMBOLS = (';:,.!?—…"()\u201c\u201d \u0303ʣʥʦʨᵝ\uab67AIOQSTWYᵊabcdefhijklmnopqrstuvwxyz'
                  'ɑɐɒæβɔɕçɖðʤəɚɛɜɟɡɥɨɪʝɯɰŋɳɲɴøɸθœɹɾɻʁɽʂʃʈʧʊʋʌɣɤχʎʒʔˈˌːʰʲ↓→↗↘ᵻ')
KOKORO_IDS = (*range(1, 7), 9, 10, 11, 12, 13, 14, 15, 16, *range(17, 26), 31, 33, 35, 36, 39, 41, 42,
              *range(43, 49), *range(50, 73), 75, 76, 77, 78, 80, 81, 82, 83, 85, 86, 87, 90, 92, 99, 101, 102,
              103, 110, 111, 112, 113, 114, 115, 116, 118, 119, 120, 123, 125, 126, 128, 129, 130, 131, 132, 133,
              135, 136, 138, 139, 140, 142, 143, 147, 148, 156, 157, 158, 162, 164, 169, 171, 172, 173, 177)
#: Frames per phoneme the tiny duration predictor aims at (Kokoro: 40 frames a second), so that random
#: weights speak at a human rate (about 16 phonemes a second) rather than Kokoro's untrained ~25 frames each.
TINY_FRAMES_PER_PHONEME = 2.5


def kokoro_config() -> dict:
    """Kokoro-82M's config.json with a one-layer, 32-wide ALBERT, one LSTM/CNN layer and one resblock per
    upsampling (the real: 768-wide 12-layer ALBERT, 3 layers, 3 resblocks); every other width is fixed by
    the kokoro code (hidden_dim 512, style_dim 128) and kept."""
    assert len(KOKORO_SYMBOLS) == len(KOKORO_IDS)
    return {
        "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                     "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
                     "upsample_initial_channel": 512},
        "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50, "multispeaker": True,
        "n_layer": 1, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
        "plbert": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                   "max_position_embeddings": 512, "num_hidden_layers": 1, "dropout": 0.1},
        "vocab": dict(zip(KOKORO_SYMBOLS, KOKORO_IDS)),
    }


def write_kokoro(root: Path, gen: torch.Generator) -> None:
    """``root/Kokoro-82M``: config.json, kokoro-v1_0.pth ({bert, bert_encoder, predictor, text_encoder,
    decoder} state dicts, as ``kokoro.KModel`` loads them) and one [510, 1, 256] style pack per voice."""
    import warnings

    from kokoro import KModel

    folder = root / speech.KOKORO_DIR
    (folder / "voices").mkdir(parents=True, exist_ok=True)
    _write_json(folder / speech.KOKORO_CONFIG, kokoro_config())
    empty = folder / "empty.pth"
    torch.save({}, empty)  # KModel builds its modules from the config, then loads this (nothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kokoro's weight_norm deprecation and single-layer LSTM dropout
        model = KModel(repo_id="hexgrad/Kokoro-82M", config=str(folder / speech.KOKORO_CONFIG), model=str(empty))
    empty.unlink()
    _randomise_(model, gen)
    with torch.no_grad():  # short, human-rate durations: sigmoid(bias) * max_dur bins ~ frames per phoneme
        proj = model.predictor.duration_proj.linear_layer
        proj.weight.mul_(0.01)
        proj.bias.fill_(float(torch.logit(torch.tensor(TINY_FRAMES_PER_PHONEME / 50))))
    parts = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
    torch.save({k: {n: t.half() if t.is_floating_point() else t for n, t in getattr(model, k).state_dict().items()}
                for k in parts}, folder / speech.KOKORO_FILE)
    for voice in speech.VOICES:
        torch.save(torch.randn((510, 1, 256), generator=gen) * 0.3, folder / "voices" / f"{voice}.pt")


def write_spacy_tagger(root: Path, seed: int) -> None:
    """``root/en_core_web_sm``: a blank English spaCy pipeline with a small tok2vec and an untrained
    tagger over Penn Treebank tags (the two components misaki's English G2P enables), saved with
    ``to_disk`` as spaCy's packaged models are."""
    import spacy

    spacy.util.fix_random_seed(seed)
    nlp = spacy.blank("en")
    nlp.add_pipe("tok2vec", config={"model": {
        "@architectures": "spacy.HashEmbedCNN.v2", "width": 16, "depth": 1, "embed_size": 100, "window_size": 1,
        "maxout_pieces": 2, "subword_features": True, "pretrained_vectors": None}})
    tagger = nlp.add_pipe("tagger", config={"model": {
        "@architectures": "spacy.Tagger.v2",
        "tok2vec": {"@architectures": "spacy.Tok2VecListener.v1", "width": 16, "upstream": "tok2vec"}}})
    for tag in ("NN", "NNS", "NNP", "VB", "VBD", "VBZ", "VBP", "VBN", "VBG", "JJ", "RB", "DT", "IN", "PRP", "CC",
                "CD", ".", ",", "UH"):
        tagger.add_label(tag)
    nlp.initialize()
    nlp.meta.update(name="core_web_sm", version="3.8.0")
    nlp.to_disk(root / speech.SPACY_DIR)


def write_tts(root: Path, seed: int = 0) -> None:
    """Both text-to-speech folders, from their own generator (the other files do not depend on them)."""
    write_kokoro(root, torch.Generator().manual_seed(seed + 1))
    write_spacy_tagger(root, seed)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _patch_json(path: Path, updates: dict) -> None:
    obj = json.loads(path.read_text())
    obj.update(updates)
    _write_json(path, obj)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_tiny_weights(
    out_dir: Path,
    seed: int = 0,
    with_base_overrides: bool = False,
    spec: TinySpec = TINY,
    with_turbo_lora: bool = False,
    with_tts: bool = True,
) -> Path:
    """Write the whole tiny weights tree into ``out_dir``; return ``out_dir``.

    The turbo LoRA is opt-in: a pipeline loaded from a folder that has one attaches it. The text to
    speech folders are written unless ``with_tts`` is False.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module constructors draw from the global RNG before we overwrite
    wan = out_dir / WAN_DIR
    _write_json(wan / "model_index.json", MODEL_INDEX)
    write_transformer(wan, spec, gen)
    write_vae(wan, spec, gen)
    vocab = write_tokenizer(wan)
    write_text_encoder(wan, spec, vocab, gen)
    write_image_encoder(wan, spec, gen)
    write_image_processor(wan, spec)
    write_scheduler(wan)
    write_infinitetalk(out_dir, spec, gen, with_base_overrides)
    write_wav2vec2(out_dir, spec, gen)
    if with_turbo_lora:  # its own generator: the other files stay the same with or without it
        write_turbo_lora(out_dir, spec, seed)
    if with_tts:
        write_tts(out_dir, seed)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="destination folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--with-base-overrides",
        action="store_true",
        help=f"also put the official base key {BASE_OVERRIDE_KEY!r} into single/{INFINITETALK_FILE}",
    )
    parser.add_argument(
        "--with-turbo-lora",
        action="store_true",
        help=f"also write the turbo LoRA {TURBO_DIR}/{TURBO_FILE} (every key kind of the real file)",
    )
    parser.add_argument(
        "--no-tts",
        action="store_true",
        help=f"leave out the text-to-speech folders {speech.KOKORO_DIR}/ and {speech.SPACY_DIR}/ (about 120 MB)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    out = make_tiny_weights(
        args.out_dir, seed=args.seed, with_base_overrides=args.with_base_overrides,
        with_turbo_lora=args.with_turbo_lora, with_tts=not args.no_tts,
    )
    subs = [WAN_DIR, INFINITETALK_DIR, WAV2VEC_DIR] + [TURBO_DIR] * args.with_turbo_lora
    for sub in subs + ([] if args.no_tts else [speech.KOKORO_DIR, speech.SPACY_DIR]):
        print(f"{out / sub}: {_folder_bytes(out / sub) / 1e6:.2f} MB")
    print(f"total {_folder_bytes(out) / 1e6:.2f} MB in {time.monotonic() - start:.1f} s (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
