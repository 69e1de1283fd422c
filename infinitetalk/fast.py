"""The ``fast`` request option: FP8 GEMMs and 8-bit self-attention on Hopper, per request.

Approximations of the exact path, each measured on an H200 (BENCHMARKS.md sections 12 and 13):

* **8-bit self-attention.** SageAttention 2 quantises Q and K to INT8 (per thread block, with K's
  mean over the sequence subtracted first) and P and V to FP8, accumulating in FP32; on sm90 that
  kernel is ``sageattn_qk_int8_pv_fp8_cuda_sm90``, which diffusers' attention dispatcher names
  ``_sage_qk_int8_pv_fp8_cuda_sm90``. diffusers calls the kernel's Python entry directly, and that
  entry runs helpers torch.compile cannot trace (pybind functions of its ``_fused`` extension), so in
  the regionally compiled block it would split the graph. Here the whole call is one custom op (opaque
  to the compiler, with a fake implementation for tracing), registered for that backend name: the
  block stays one graph and the choice is made per attention module through the dispatcher. Only the
  blocks' self-attention (``attn1``) is switched: the text/image and audio cross-attentions are short
  (at most 769 and 32 keys) and stay bf16.
* **FP8 GEMMs.** torchao's e4m3 weights with per-row scales and dynamically quantised activations
  for the blocks' linear layers, the audio attention's included (:func:`fp8_layer` says which), the
  recipe the ``fp8`` memory mode uses. Here the FP8 weights are a second copy beside the bf16 ones
  (:class:`FastPreset`), made on the first fast request from the weights as they are then (turbo
  LoRA merged or not, the speaker checkpoint) and swapped in per request, so a server serves exact,
  turbo and fast requests side by side: one byte per weight of those 600 layers, about 21 GB more on
  the GPU.
* **The VAE decode in bf16.** A bf16 copy of the VAE (0.25 GB) decodes fast requests' chunks; the
  exact path decodes in fp32 (the pipeline's ``_decoder``).

The first two need the compiled model (FP8 GEMMs are slower than bf16 uncompiled), one GPU, the resident
memory mode, a Hopper GPU with room for both weight copies, torchao, and the sageattention package
built for sm90 (cog.yaml builds it); where one is missing :func:`unavailable` says which, and a fast
request is refused with that sentence.
"""

from __future__ import annotations

import logging
import time

import torch

__all__ = ["ATTENTION_BACKEND", "MIN_GPU_MEMORY_GB", "SEVERAL_GPUS", "FastPreset", "fp8_config", "fp8_layer",
           "set_self_attention_8bit", "unavailable"]

logger = logging.getLogger(__name__)

#: diffusers' name of the 8-bit kernel (``AttentionBackendName._SAGE_QK_INT8_PV_FP8_CUDA_SM90``).
ATTENTION_BACKEND = "_sage_qk_int8_pv_fp8_cuda_sm90"
#: GPU memory a fast server needs: bf16 weights 38 GB + their FP8 copy 21 GB + the encoders 15 GB +
#: 720p activations (measured peaks: 61 GB as served at 480p, +3.4 GB for 720p forwards), with margin.
MIN_GPU_MEMORY_GB = 90

#: Why a pipeline split over several GPUs serves no fast requests.
SEVERAL_GPUS = "it runs on one GPU (this server splits each forward over several)"

_registered = False


def fp8_layer(module: torch.nn.Module, fqn: str, *, audio: bool = False) -> bool:
    """The linear layers that compute in FP8: the blocks' own, except the turbo adapter's low-rank matrices
    (the layers they adapt, ``base_layer``, are included) and, unless ``audio``, the audio attention. The
    ``fp8`` memory mode leaves the audio attention in bf16, because the speaker checkpoints swap its weights
    in place; the fast option's copies include it and are made again after such a swap."""
    return (isinstance(module, torch.nn.Linear) and fqn.startswith("blocks.")
            and (audio or ".audio_attn." not in fqn) and ".lora_" not in fqn
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def fp8_config():
    """torchao's FP8 recipe (e4m3 weights with per-row scales, dynamically quantised activations), shared by
    the ``fp8`` memory mode and the fast option's copy; RuntimeError without torchao."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    except ImportError as exc:  # optional GPU dependency
        raise RuntimeError("fp8 compute needs torchao (pip install torchao)") from exc
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def attention_unavailable(device: torch.device | str) -> str | None:
    """None where the 8-bit attention kernel runs on ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it needs an NVIDIA Hopper GPU (compute capability 9.0)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"its 8-bit attention runs on Hopper GPUs (compute capability 9.0); this GPU is {major}.{minor}"
    try:
        from sageattention import core
    except ImportError as exc:
        return f"its 8-bit attention needs the sageattention package built for this GPU ({exc}; see cog.yaml)"
    if not getattr(core, "SM90_ENABLED", False):
        return "the installed sageattention package was built without its sm90 kernels"
    return None


def unavailable(device: torch.device | str, *, compiled: bool, memory_mode: str, parallel: bool) -> str | None:
    """None where a pipeline so placed can serve fast requests, else a sentence saying why not."""
    reason = attention_unavailable(device)
    if reason is not None:
        return reason
    if parallel:
        return SEVERAL_GPUS
    if memory_mode != "none":
        return f"it needs the weights resident in bf16 (this server's memory mode is {memory_mode})"
    if not compiled:
        return "it needs the compiled model (INFINITETALK_COMPILE): FP8 GEMMs are slower than bf16 uncompiled"
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
    if total < MIN_GPU_MEMORY_GB:
        return (f"it keeps FP8 weights beside the bf16 ones: {MIN_GPU_MEMORY_GB} GB of GPU memory, "
                f"this GPU has {total:.0f}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "its FP8 GEMMs need torchao"
    return None


# ---------------------------------------------------------------------------------------- attention
def _register_attention() -> None:
    """Route diffusers' ``_sage_qk_int8_pv_fp8_cuda_sm90`` backend through one custom op (see the module doc)."""
    global _registered
    if _registered:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    @torch.library.custom_op("infinitetalk::sage_fp8_attention", mutates_args=())
    def sage_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        from sageattention import sageattn_qk_int8_pv_fp8_cuda_sm90

        out = sageattn_qk_int8_pv_fp8_cuda_sm90(query, key, value, tensor_layout="NHD", is_causal=False,
                                                sm_scale=scale, pv_accum_dtype="fp32+fp32")
        return out.contiguous()

    @sage_fp8_attention.register_fake
    def _(query, key, value, scale):
        return query.new_empty(query.shape)

    name = AttentionBackendName(ATTENTION_BACKEND)
    constraints = _AttentionBackendRegistry._constraints.get(name, [])

    def attention(query, key, value, attn_mask=None, is_causal=False, scale=None, return_lse=False,
                  _parallel_config=None):
        if attn_mask is not None or is_causal or return_lse:
            raise ValueError("8-bit attention: masks, causal attention and the log-sum-exp are not supported")
        return sage_fp8_attention(query, key, value, query.shape[-1] ** -0.5 if scale is None else float(scale))

    _AttentionBackendRegistry.register(name, constraints=constraints)(attention)
    _registered = True


def set_self_attention_8bit(transformer, enabled: bool = True) -> int:
    """Run every block's self-attention with the 8-bit kernel (``enabled``) or with the backend it had
    before; returns how many attention modules were switched. Raises RuntimeError where the kernel is
    unavailable (:func:`attention_unavailable`)."""
    if enabled:
        reason = attention_unavailable(next(transformer.parameters()).device)
        if reason is not None:
            raise RuntimeError(f"8-bit attention is not available: {reason}")
        _register_attention()
        from diffusers.models.attention_dispatch import AttentionBackendName

        backend = AttentionBackendName(ATTENTION_BACKEND)
    for block in transformer.blocks:
        processor = block.attn1.processor
        if enabled:
            if processor._attention_backend != backend:  # what to go back to
                processor._default_backend = processor._attention_backend
            processor._attention_backend = backend
        else:
            processor._attention_backend = getattr(processor, "_default_backend", processor._attention_backend)
    return len(transformer.blocks)


# ---------------------------------------------------------------------------------------- the preset
class FastPreset:
    """Switch one transformer between its bf16 forward and the fast one (FP8 GEMMs + 8-bit self-attention).

    The FP8 weights are made from the bf16 weights as they are when :meth:`set` first turns fast on,
    and again whenever ``weights_state`` differs from the state they were made from (the turbo LoRA
    merged or not, the speaker checkpoint); switching is a pointer swap per layer. Any change to the
    bf16 weights (the LoRA's merge, a speaker swap) must happen while fast is off: the pipeline turns
    it off first (:meth:`off`).
    """

    def __init__(self, transformer) -> None:
        self._transformer = transformer
        self._layers = [(name, module) for name, module in transformer.named_modules()
                        if fp8_layer(module, name, audio=True)]
        self._bf16: dict[str, torch.nn.Parameter] = {}
        self._fp8: dict[str, torch.nn.Parameter] = {}
        self._fp8_state: object = None
        self.active = False
        self.last_switch_seconds = 0.0

    def off(self) -> None:
        """The bf16 weights and attention again (a no-op when fast is off)."""
        if not self.active:
            return
        for name, module in self._layers:
            module.weight = self._bf16[name]
        set_self_attention_8bit(self._transformer, False)
        self.active = False

    @torch.no_grad()
    def set(self, enabled: bool, weights_state: object = None) -> None:
        """Fast (``enabled``) or bf16 for the next forwards; ``weights_state`` names the bf16 weights' state."""
        t0, self.last_switch_seconds = time.perf_counter(), 0.0
        if not enabled:
            self.off()
            return
        if self.active and weights_state == self._fp8_state:
            return
        self.off()
        if not self._fp8 or weights_state != self._fp8_state:
            self._quantize()
            self._fp8_state = weights_state
        for name, module in self._layers:
            module.weight = self._fp8[name]
        set_self_attention_8bit(self._transformer, True)
        self.active = True
        self.last_switch_seconds = time.perf_counter() - t0
        logger.info("fast: FP8 weights in %d layers and 8-bit self-attention in %.1fs", len(self._layers),
                    self.last_switch_seconds)

    def _quantize(self) -> None:
        """FP8 copies of the current bf16 weights; the modules keep their bf16 weights."""
        from torchao.quantization import quantize_

        config = fp8_config()
        self._fp8.clear()  # the old copies go before the new ones are made
        for name, module in self._layers:
            self._bf16[name] = module.weight
            shell = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            shell.weight = module.weight  # shared, not copied: quantize_ replaces the shell's parameter
            quantize_(shell, config)
            self._fp8[name] = shell.weight
