# InfiniteTalk diffusion transformer on diffusers' Wan2.1 building blocks.
#
# The model is Wan2.1-I2V-14B plus, in every block, an audio cross-attention placed after the
# text/image cross-attention and before the FFN, driven by 32 audio tokens per latent frame
# produced by `AudioProjModel` from wav2vec2 hidden states.  Everything that is plain Wan
# (patch embedding, RoPE, time/text/image embedding, attention modules and processors, FFN,
# norms, output head) is reused from `diffusers.models.transformers.transformer_wan`.
#
# Shapes used in comments:
#   B  batch, P persons (speakers), F pixel frames of a chunk (1 + 4k), N_t latent frames,
#   S = N_h * N_w tokens per latent frame, L = N_t * S video tokens, D inner dim,
#   K audio context tokens per latent frame and person, O audio token width.

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks import HookRegistry
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
)

from ..step_cache import StepCacheConfig, apply_step_cache, remove_step_cache

__all__ = [
    "AudioProjModel",
    "InfiniteTalkAudioAttention",
    "InfiniteTalkAudioAttnProcessor",
    "InfiniteTalkBlocks",
    "InfiniteTalkTransformer3DModel",
    "InfiniteTalkTransformerBlock",
    "SequenceShard",
    "apply_rope_1d",
    "label_rope_positions",
    "reference_attention_map",
    "window_audio",
]


# --------------------------------------------------------------------------------------------
# Audio projection
# --------------------------------------------------------------------------------------------


def window_audio(audio: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-pixel-frame audio windows into the two inputs of :class:`AudioProjModel`.

    Args:
        audio: ``[N, F, W, *feat]`` with ``F = 1 + vae_scale * (N_t - 1)`` pixel frames and a
            window of ``W`` wav2vec2 frames centred on each pixel frame.

    Returns:
        ``first``: ``[N, 1, W, *feat]``, the full window of pixel frame 0 (latent frame 0).
        ``latter``: ``[N, N_t - 1, W + vae_scale - 1, *feat]``: for each group of
        ``vae_scale`` pixel frames (one latent frame), the first frame's window up to its
        centre, the centre vector of each middle frame and the last frame's window from its
        centre on, in time order.
    """
    num_frames, window = audio.shape[1], audio.shape[2]
    if (num_frames - 1) % vae_scale != 0:
        raise ValueError(f"audio has {num_frames} frames; expected 1 + {vae_scale}*k")
    mid = window // 2
    first = audio[:, :1]
    groups = audio[:, 1:].unflatten(1, (-1, vae_scale))  # [N, N_t-1, vae_scale, W, *feat]
    latter = torch.cat(
        [
            groups[:, :, 0, : mid + 1],  # first frame of the group: left half + centre
            groups[:, :, 1:-1, mid],  # middle frames: centre only
            groups[:, :, -1, mid:],  # last frame: centre + right half
        ],
        dim=2,
    )
    return first, latter


class AudioProjModel(nn.Module):
    """Projects windows of wav2vec2 features to ``context_tokens`` audio tokens per latent frame.

    ``feature_dim`` is the flattened width of one wav2vec2 frame (layers x hidden: 12 x 768 for
    chinese-wav2vec2-base).
    """

    def __init__(
        self,
        window: int = 5,
        vae_scale: int = 4,
        feature_dim: int = 12 * 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
        norm_output: bool = True,
    ):
        super().__init__()
        self.window = window
        self.vae_scale = vae_scale
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.proj1 = nn.Linear(window * feature_dim, intermediate_dim)
        self.proj1_vf = nn.Linear((window + vae_scale - 1) * feature_dim, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        # nn.LayerNorm defaults (eps 1e-5), always evaluated in fp32 as in the official model.
        self.norm = FP32LayerNorm(output_dim, eps=1e-5) if norm_output else nn.Identity()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio``: ``[N, F, W, *feat]`` per-pixel-frame windows -> ``[N, N_t, K, O]``."""
        first, latter = window_audio(audio, self.vae_scale)
        first = F.relu(self.proj1(first.flatten(2)))  # [N, 1, I]
        latter = F.relu(self.proj1_vf(latter.flatten(2)))  # [N, N_t-1, I]
        hidden = F.relu(self.proj2(torch.cat([first, latter], dim=1)))  # [N, N_t, I]
        tokens = self.proj3(hidden).unflatten(-1, (self.context_tokens, self.output_dim))
        return self.norm(tokens)


# --------------------------------------------------------------------------------------------
# Sequence parallel: this rank's slice of the video tokens
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceShard:
    """The contiguous slice ``[start, start + length)`` of the ``L = N_t * S`` video tokens held by
    this rank when diffusers' context parallelism splits the sequence evenly over ``group``.

    Shard boundaries need not fall on latent-frame boundaries: the per-frame audio attention pads
    its slice out to whole frames, and the two-speaker reference map takes the reference-frame keys
    from the rank that holds them.
    """

    start: int
    length: int
    tokens_per_frame: int
    group: Any  # torch.distributed ProcessGroup

    @property
    def frames(self) -> tuple[int, int]:
        """The latent frames ``[first, end)`` this slice touches."""
        s = self.tokens_per_frame
        return self.start // s, (self.start + self.length - 1) // s + 1

    def to_frames(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, length, ...]`` -> ``[B, n_frames * S, ...]``, zero padded at both ends."""
        first, end = self.frames
        lead = self.start - first * self.tokens_per_frame
        if lead == 0 and self.length == (end - first) * self.tokens_per_frame:
            return x
        out = x.new_zeros(x.shape[0], (end - first) * self.tokens_per_frame, *x.shape[2:])
        out[:, lead : lead + self.length] = x
        return out

    def from_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_frames`."""
        lead = self.start - self.frames[0] * self.tokens_per_frame
        return x[:, lead : lead + self.length]


# --------------------------------------------------------------------------------------------
# Two-speaker helpers: reference attention map and label RoPE
# --------------------------------------------------------------------------------------------


def _apply_rope_3d(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's 3D RoPE (interleaved pairs) on ``x`` ``[B, L, H, D]`` with tables ``[1, L, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@torch.no_grad()
def reference_attention_map(
    attn: WanAttention,
    hidden_states: torch.Tensor,
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
    masks: torch.Tensor,
    tokens_per_frame: int,
    head_chunk: int = 4,
    shard: SequenceShard | None = None,
) -> torch.Tensor:
    """Mean attention of every video token to each class region of the reference frame.

    Uses the self-attention's own post-norm, post-RoPE queries (all tokens) and keys (first
    latent frame only, the reference-frame slot), softmax over those keys, then for each class
    mask the attention mass on the masked keys divided by the mask area, averaged over heads.
    As in the official code, heads are averaged in two halves, so an odd last head is ignored.

    Args:
        attn: the block's self-attention module (its projections, norms and head count).
        hidden_states: ``[B, L, D]`` the modulated input of the self-attention.
        rotary_emb: Wan RoPE tables ``([1, L, 1, Dh], [1, L, 1, Dh])``.
        masks: ``[C, S]`` class masks on the token grid (person1, person2, background).
        shard: with sequence parallelism, this rank's slice (``hidden_states`` and ``rotary_emb``
            hold only its tokens); the reference-frame keys are computed by the rank holding
            the first latent frame and broadcast.

    Returns:
        ``[B, C, L]`` float32 (``L``: the tokens of this rank).
    """
    heads = attn.heads
    s = tokens_per_frame
    cos, sin = rotary_emb
    query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
    query = _apply_rope_3d(query, cos, sin)
    if hidden_states.shape[1] < s:  # shards are equal: every rank stops here, none waits in the broadcast
        raise ValueError(f"a shard of {hidden_states.shape[1]} tokens is shorter than one frame ({s}): use fewer GPUs")
    if shard is None or shard.start == 0:
        key = attn.norm_k(attn.to_k(hidden_states[:, :s])).unflatten(2, (heads, -1))
        key = _apply_rope_3d(key, cos[:, :s], sin[:, :s]).contiguous()
    else:
        key = query.new_empty(query.shape[0], s, *query.shape[2:])
    if shard is not None:
        dist.broadcast(key, src=dist.get_global_rank(shard.group, 0), group=shard.group)
    used_heads = (heads // 2) * 2
    masks = masks.to(query.dtype)
    weights = (masks / masks.sum(dim=1, keepdim=True)).transpose(0, 1)  # [S, C]
    scale = 1.0 / math.sqrt(query.shape[-1])
    total = None
    for h0 in range(0, used_heads, head_chunk):
        h1 = min(h0 + head_chunk, used_heads)
        q = query[:, :, h0:h1].transpose(1, 2) * scale  # [B, h, L, Dh]
        k = key[:, :, h0:h1].transpose(1, 2)  # [B, h, S, Dh]
        probs = (q @ k.transpose(-1, -2)).softmax(dim=-1)  # [B, h, L, S]
        part = (probs @ weights).sum(dim=1)  # [B, L, C]
        total = part if total is None else total + part
    return (total / used_heads).transpose(1, 2).float()


def label_rope_positions(
    ref_map: torch.Tensor, class_range: int = 24, class_interval: int = 4, group: Any = None
) -> torch.Tensor:
    """L-RoPE position of every video token from a two-speaker reference map.

    ``ref_map``: ``[B, 3, L]`` (person1, person2, background).  Person-1 tokens get their map-0
    value min-max normalised (global min/max of map 0) into ``[0, class_interval]``, person-2
    tokens their map-1 value into ``[class_range - class_interval, class_range]``, background
    tokens ``class_range // 2``; the class of a token is the argmax over the three maps.
    With sequence parallelism (``group``) the min/max are taken over all ranks' tokens.
    Returns ``[B, L]`` float32.
    """
    eps = 1e-8

    def rescale(values, lo, hi):
        vmin = values.amin(dim=-1, keepdim=True)
        vmax = values.amax(dim=-1, keepdim=True)
        if group is not None:
            dist.all_reduce(vmin, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(vmax, op=dist.ReduceOp.MAX, group=group)
        return (values - vmin) / (vmax - vmin + eps) * (hi - lo) + lo

    person1 = rescale(ref_map[:, 0], 0.0, float(class_interval))
    person2 = rescale(ref_map[:, 1], float(class_range - class_interval), float(class_range))
    background = torch.full_like(person1, float(class_range // 2))
    candidates = torch.stack([person1, person2, background], dim=-1)  # [B, L, 3]
    cls = ref_map.argmax(dim=1)  # [B, L]
    return candidates.gather(-1, cls.unsqueeze(-1)).squeeze(-1).float()


def audio_rope_positions(tokens_per_frame: int, class_range: int = 24, class_interval: int = 4) -> torch.Tensor:
    """Positions of one latent frame's audio keys: first half person 1, second half person 2."""
    pos = torch.empty(tokens_per_frame, dtype=torch.float32)
    half = tokens_per_frame // 2
    pos[:half] = class_interval / 2
    pos[half:] = (2 * class_range - class_interval) / 2
    return pos


def apply_rope_1d(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """1D RoPE with interleaved pairs, computed in fp32.

    ``x``: ``[N, M, H, Dh]``; ``positions``: ``[N, M]`` (broadcastable).
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim))
    angles = positions.to(x.device, torch.float32).unsqueeze(-1) * inv_freq  # [N, M, Dh/2]
    angles = angles.repeat_interleave(2, dim=-1).unsqueeze(-2)  # [N, M, 1, Dh]
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (xf * angles.cos() + rotated * angles.sin()).type_as(x)


# --------------------------------------------------------------------------------------------
# Audio cross-attention
# --------------------------------------------------------------------------------------------


class InfiniteTalkAudioAttnProcessor:
    """Per-latent-frame audio cross-attention through diffusers' attention dispatcher.

    The video tokens of each latent frame attend only to that frame's audio tokens (no mask
    needed: frames are folded into the batch).  With two speakers, queries and audio keys are
    rotated by label RoPE (:func:`label_rope_positions`).  Under sequence parallelism the rank's
    slice is padded out to whole frames (:class:`SequenceShard`); the attention itself is local,
    since every rank holds all audio tokens.
    """

    _attention_backend = None
    _parallel_config = None  # set by enable_parallelism; unused: this attention needs no exchange

    def __call__(
        self,
        attn: "InfiniteTalkAudioAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        num_frames: int,
        token_positions: torch.Tensor | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        # hidden_states: [B, L, D] (L = N_t*S, or this rank's slice); encoder_hidden_states: [B, N_t, M, O]
        if shard is not None:
            first, end = shard.frames
            out = self(attn, shard.to_frames(hidden_states), encoder_hidden_states[:, first:end], end - first,
                       None if token_positions is None else shard.to_frames(token_positions))
            return shard.from_frames(out)
        batch, length, _ = hidden_states.shape
        tokens = length // num_frames
        x = hidden_states.reshape(batch * num_frames, tokens, -1)
        audio = encoder_hidden_states.flatten(0, 1)  # [B*N_t, M, O]
        query = attn.to_q(x).unflatten(-1, (attn.heads, -1))  # [B*N_t, S, H, Dh]
        key, value = attn.to_kv(audio).unflatten(-1, (2, attn.heads, -1)).unbind(2)  # [B*N_t, M, H, Dh]
        if token_positions is not None:
            query = apply_rope_1d(query, token_positions.reshape(batch * num_frames, tokens))
            audio_pos = audio_rope_positions(audio.shape[1], attn.class_range, attn.class_interval)
            key = apply_rope_1d(key, audio_pos.unsqueeze(0))
        out = dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        out = out.flatten(2).type_as(query)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out.reshape(batch, length, -1)


class InfiniteTalkAudioAttention(nn.Module, AttentionModuleMixin):
    """Audio cross-attention module (weights); the math lives in the processor."""

    _default_processor_cls = InfiniteTalkAudioAttnProcessor
    _available_processors = [InfiniteTalkAudioAttnProcessor]

    def __init__(
        self,
        dim: int,
        audio_dim: int,
        heads: int,
        class_range: int = 24,
        class_interval: int = 4,
        processor=None,
    ):
        super().__init__()
        self.heads = heads
        self.inner_dim = dim
        self.class_range = class_range
        self.class_interval = class_interval
        self.to_q = nn.Linear(dim, dim, bias=True)
        self.to_kv = nn.Linear(audio_dim, 2 * dim, bias=True)  # rows [0, D) are K, [D, 2D) are V
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=True), nn.Dropout(0.0)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        num_frames: int,
        token_positions: torch.Tensor | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, num_frames, token_positions, shard)


# --------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------


class InfiniteTalkTransformerBlock(nn.Module):
    """Wan block + audio cross-attention: self-attn, text/image cross-attn, audio cross-attn, FFN."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str = "rms_norm_across_heads",
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
        audio_dim: int = 768,
        norm_input_audio: bool = True,
        class_range: int = 24,
        class_interval: int = 4,
    ):
        super().__init__()
        head_dim = dim // num_heads
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim=dim, heads=num_heads, dim_head=head_dim, eps=eps, processor=WanAttnProcessor())
        self.attn2 = WanAttention(
            dim=dim,
            heads=num_heads,
            dim_head=head_dim,
            eps=eps,
            added_kv_proj_dim=added_kv_proj_dim,
            cross_attention_dim_head=head_dim,
            processor=WanAttnProcessor(),
        )
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.norm_audio = FP32LayerNorm(dim, eps, elementwise_affine=True) if norm_input_audio else nn.Identity()
        self.audio_attn = InfiniteTalkAudioAttention(dim, audio_dim, num_heads, class_range, class_interval)
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        audio_hidden_states: torch.Tensor,
        num_frames: int,
        ref_masks: torch.Tensor | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        modulation = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = modulation

        # 1. Self-attention (modulated, gated residual)
        norm_hidden = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_out = self.attn1(norm_hidden, None, None, rotary_emb)
        token_positions = None
        if ref_masks is not None:
            # Two speakers: classify tokens by their attention to each region of the reference frame.
            tokens_per_frame = ref_masks.shape[1]
            ref_map = reference_attention_map(
                self.attn1, norm_hidden, rotary_emb, ref_masks, tokens_per_frame, shard=shard
            )
            token_positions = label_rope_positions(
                ref_map, self.audio_attn.class_range, self.audio_attn.class_interval,
                group=None if shard is None else shard.group,
            )
        hidden_states = (hidden_states.float() + attn_out * gate_msa).type_as(hidden_states)

        # 2. Text + image cross-attention (plain residual)
        norm_hidden = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm_hidden, encoder_hidden_states, None, None)

        # 3. Audio cross-attention, per latent frame (plain residual)
        norm_hidden = self.norm_audio(hidden_states)
        hidden_states = hidden_states + self.audio_attn(norm_hidden, audio_hidden_states, num_frames, token_positions,
                                                        shard)

        # 4. Feed-forward (modulated, gated residual)
        norm_hidden = (self.norm3(hidden_states.float()) * (1 + c_scale) + c_shift).type_as(hidden_states)
        ff_out = self.ffn(norm_hidden)
        return (hidden_states.float() + ff_out.float() * c_gate).type_as(hidden_states)


class InfiniteTalkBlocks(nn.ModuleList):
    """The block stack as one module: calling it runs the blocks in order on ``hidden_states``.

    Still a ``ModuleList`` (state-dict keys stay ``blocks.N.*``, group offloading finds the blocks,
    regional compile compiles each block, not this list).  It is the module the step cache hook
    (:mod:`infinitetalk.step_cache`) wraps: it reads ``hidden_states`` and ``temb`` by name.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        audio_hidden_states: torch.Tensor,
        num_frames: int,
        ref_masks: torch.Tensor | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """The arguments of :meth:`InfiniteTalkTransformerBlock.forward`; returns the last block's output."""
        for block in self:
            hidden_states = block(
                hidden_states, encoder_hidden_states, temb, rotary_emb, audio_hidden_states, num_frames, ref_masks,
                shard,
            )
        return hidden_states


class InfiniteTalkTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    r"""The InfiniteTalk DiT: Wan2.1-I2V transformer with per-block audio cross-attention.

    The first 13 config fields are those of diffusers' ``WanTransformer3DModel`` (so a Wan
    ``transformer/config.json`` builds the base); the ``audio_*`` fields describe the audio
    modules (defaults: the 14B model with chinese-wav2vec2-base, 12 layers x 768).

    Caching: ``enable_cache(StepCacheConfig(...))`` puts the step cache on the block stack (see
    :mod:`infinitetalk.step_cache`); every model call then runs inside
    ``with model.cache_context(branch):``.  Other diffusers cache configs go to ``CacheMixin``.
    """

    _supports_gradient_checkpointing = False
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm", "audio_proj"]
    _no_split_modules = ["InfiniteTalkTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "norm_audio"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["InfiniteTalkTransformerBlock"]
    # Context (sequence) parallelism, see ``ModelMixin.enable_parallelism``: the RoPE tables and the
    # patch tokens are split evenly along the sequence, every rank runs all blocks on its slice (the
    # self-attention exchanges through Ulysses/ring in diffusers' dispatcher; text, image and audio
    # attention are local) and the head's output is gathered.  The split point is a module of its
    # own so that the tokens are split even when the step cache skips the blocks.
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "sequence_split": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,
        text_len: int = 512,
        audio_window: int = 5,
        audio_feature_dim: int = 12 * 768,
        audio_intermediate_dim: int = 512,
        audio_output_dim: int = 768,
        audio_context_tokens: int = 32,
        vae_scale: int = 4,
        norm_input_audio: bool = True,
        norm_output_audio: bool = True,
        class_range: int = 24,
        class_interval: int = 4,
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.rope = WanRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.sequence_split = nn.Identity()  # where context parallelism splits the tokens (see _cp_plan)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
        )
        self.audio_proj = AudioProjModel(
            window=audio_window,
            vae_scale=vae_scale,
            feature_dim=audio_feature_dim,
            intermediate_dim=audio_intermediate_dim,
            output_dim=audio_output_dim,
            context_tokens=audio_context_tokens,
            norm_output=norm_output_audio,
        )
        self.blocks = InfiniteTalkBlocks(
            [
                InfiniteTalkTransformerBlock(
                    inner_dim,
                    ffn_dim,
                    num_attention_heads,
                    qk_norm,
                    cross_attn_norm,
                    eps,
                    added_kv_proj_dim,
                    audio_dim=audio_output_dim,
                    norm_input_audio=norm_input_audio,
                    class_range=class_range,
                    class_interval=class_interval,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

    # ---------------------------------------------------------------------------------------
    def enable_cache(self, config) -> None:
        """A :class:`~infinitetalk.step_cache.StepCacheConfig` enables the step cache on ``self.blocks``;
        any other config is diffusers' (``CacheMixin.enable_cache``)."""
        if not isinstance(config, StepCacheConfig):
            super().enable_cache(config)
            return
        if self.is_cache_enabled:
            raise ValueError(f"a cache is already enabled ({type(self._cache_config).__name__}); disable it first")
        apply_step_cache(self.blocks, config)
        # cache_context reaches hooks through a cached list of child registries: rebuild it.
        HookRegistry.check_if_exists_or_initialize(self).invalidate_child_registries_cache()
        self._cache_config = config

    def disable_cache(self) -> None:
        """Remove the step cache (or, for diffusers' caches, ``CacheMixin.disable_cache``)."""
        if not isinstance(self._cache_config, StepCacheConfig):
            super().disable_cache()
            return
        remove_step_cache(self)
        HookRegistry.check_if_exists_or_initialize(self).invalidate_child_registries_cache()
        self._cache_config = None

    def _context_parallel_group(self):
        """The process group the tokens are split over, or None without context parallelism."""
        config = getattr(self, "_parallel_config", None)
        cp = None if config is None else config.context_parallel_config
        return None if cp is None else cp._flattened_mesh.get_group()

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio windows ``[B, P, F, W, *feat]`` -> audio tokens ``[B, N_t, P*K, O]``.

        Person 1's K tokens come first, then person 2's.
        """
        batch, persons = audio.shape[:2]
        tokens = self.audio_proj(audio.flatten(0, 1))  # [B*P, N_t, K, O]
        tokens = tokens.unflatten(0, (batch, persons))  # [B, P, N_t, K, O]
        return tokens.permute(0, 2, 1, 3, 4).flatten(2, 3)

    def token_masks(self, ref_target_masks: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Latent-resolution class masks ``[C, h, w]`` -> token-grid masks ``[C, N_h*N_w]`` (0/1)."""
        masks = F.interpolate(ref_target_masks[None].float(), size=(grid_h, grid_w), mode="nearest")[0]
        return (masks > 0).flatten(1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """
        Args:
            hidden_states: ``[B, in_channels, N_t, h, w]``: noisy latents (16 channels) followed by
                the image condition (4 mask + 16 latent channels).
            timestep: ``[B]`` in [0, 1000].
            encoder_hidden_states: ``[B, T_txt, text_dim]`` UMT5 states, zero padded to
                ``text_len`` here if shorter.
            encoder_hidden_states_image: ``[B, 257, image_dim]`` CLIP penultimate hidden states.
            audio: ``[B, P, F, W, *feat]`` per-pixel-frame wav2vec2 windows, ``F = 1 + 4 (N_t - 1)``.
            ref_target_masks: ``[3, h, w]`` class masks at latent resolution (person1, person2,
                background). Used only when ``P == 2`` (label RoPE); ignored for one speaker.

        With the step cache enabled (:meth:`enable_cache`), call inside ``with self.cache_context(branch):``.
        """
        batch, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        n_t, n_h, n_w = num_frames // p_t, height // p_h, width // p_w

        shard_group = self._context_parallel_group()
        if shard_group is not None and (n_t * n_h * n_w) % dist.get_world_size(shard_group):
            raise ValueError(
                f"{n_t * n_h * n_w} video tokens ({n_t} frames of {n_h}x{n_w}) cannot be split evenly over "
                f"{dist.get_world_size(shard_group)} GPUs; choose a size whose token count is divisible by it"
            )
        # Split along the tokens under context parallelism. Cloned: the tables are views of a
        # [frames, h, w, Dh] tensor, and the compiled blocks would be guarded on that base's strides,
        # recompiling for every new height/width pair instead of once (infinitetalk/compilation.py).
        rotary_emb = tuple(t.clone() for t in self.rope(hidden_states))
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        hidden_states = self.sequence_split(hidden_states)  # [B, L, D], or this rank's [B, L / W, D]
        shard = None
        if shard_group is not None:
            local = hidden_states.shape[1]
            shard = SequenceShard(dist.get_rank(shard_group) * local, local, n_h * n_w, shard_group)

        text_len = self.config.text_len
        if encoder_hidden_states.shape[1] < text_len:
            encoder_hidden_states = F.pad(encoder_hidden_states, (0, 0, 0, text_len - encoder_hidden_states.shape[1]))
        elif encoder_hidden_states.shape[1] > text_len:
            raise ValueError(f"text context has {encoder_hidden_states.shape[1]} tokens; at most {text_len}")

        temb, timestep_proj, encoder_hidden_states, image_states = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [B, 6, D]
        encoder_hidden_states = torch.cat([image_states, encoder_hidden_states], dim=1)

        audio_tokens = self.encode_audio(audio.to(hidden_states.dtype)).to(hidden_states.dtype)
        if audio_tokens.shape[1] != n_t:
            raise ValueError(f"audio covers {audio_tokens.shape[1]} latent frames; the latents have {n_t}")

        masks = None
        if audio.shape[1] == 2:
            if ref_target_masks is None:
                raise ValueError("two speakers need ref_target_masks [3, h, w]")
            masks = self.token_masks(ref_target_masks.to(hidden_states.device), n_h, n_w)
        elif audio.shape[1] != 1:
            raise ValueError(f"audio has {audio.shape[1]} speakers; 1 or 2 are supported")

        hidden_states = self.blocks(
            hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, audio_tokens, n_t, masks, shard
        )

        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, n_t, n_h, n_w, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
