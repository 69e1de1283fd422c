"""The fast option (infinitetalk/fast.py) without its GPU kernels: what is refused where, which layers go to
FP8, the 8-bit attention's routing through diffusers' dispatcher as one opaque op, the weight swaps' order
with the turbo LoRA and the speaker checkpoints, and the bf16 decoder. The kernels themselves (SageAttention
2's sm90 kernel, torchao's FP8 GEMMs) are measured on an H200 (BENCHMARKS.md sections 12 and 13); here a
stand-in computes exact attention in their place."""

from __future__ import annotations

import sys
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import make_tiny_weights as mtw
from infinitetalk import fast
from infinitetalk.errors import InputError
from infinitetalk.lora import TurboLoRA
from infinitetalk.request import GenerationRequest, build_request
from infinitetalk.weights import load_transformer, read_transformer_tensors
from tiny_forward import forward_inputs as _inputs  # tests/ is on sys.path for test modules
from tiny_forward import run_forward as _run


@pytest.fixture()
def stand_in_kernel(monkeypatch):
    """A ``sageattention`` module whose sm90 entry computes exact attention (NHD layout), and a device check
    that accepts the CPU; counts its calls."""
    calls = []

    def sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None,
                                          pv_accum_dtype="fp32+fp32"):
        assert tensor_layout == "NHD" and not is_causal and pv_accum_dtype == "fp32+fp32"
        calls.append(q.shape)
        # like the real entry's pybind helpers, something the compiler cannot trace: only the op around it
        # keeps the block one graph
        torch._dynamo.graph_break()
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=sm_scale)
        return out.transpose(1, 2)

    module = types.ModuleType("sageattention")
    module.sageattn_qk_int8_pv_fp8_cuda_sm90 = sageattn_qk_int8_pv_fp8_cuda_sm90
    monkeypatch.setitem(sys.modules, "sageattention", module)
    monkeypatch.setattr(fast, "attention_unavailable", lambda device: None)
    return calls


def test_fast_is_refused_on_this_machine_with_the_reason(monkeypatch):
    reason = fast.unavailable("cpu", compiled=True, memory_mode="none", parallel=False)
    assert "Hopper" in reason
    monkeypatch.setattr(fast, "attention_unavailable", lambda device: None)
    assert "one GPU" in fast.unavailable("cpu", compiled=True, memory_mode="none", parallel=True)
    assert "memory mode is fp8" in fast.unavailable("cpu", compiled=True, memory_mode="fp8", parallel=False)
    assert "compiled model" in fast.unavailable("cpu", compiled=False, memory_mode="none", parallel=False)


def test_fast_is_a_request_input(portrait):
    req = build_request({"image": str(portrait), "audio": "speech.wav", "fast": True, "turbo": True})
    assert req.fast and req.turbo
    with pytest.raises(InputError, match="fast"):
        build_request({"image": str(portrait), "audio": "speech.wav", "fast": "sometimes"})


def test_a_fast_request_is_refused_before_any_work(tiny_weights, portrait, make_speech, tmp_path):
    from infinitetalk.pipeline import InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu", text_to_speech=False)
    assert pipe.fast is None and "Hopper" in pipe.fast_unavailable
    req = GenerationRequest(image=portrait, audio=make_speech(1.0), fast=True, width=64, height=64, steps=1)
    with pytest.raises(InputError, match="fast is not available on this server: .*Hopper"):
        pipe.generate(req, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


def test_a_fast_request_decodes_with_a_bf16_copy_of_the_vae(tiny_weights):
    from infinitetalk.conditioning import vae_decode
    from infinitetalk.pipeline import InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu", text_to_speech=False)
    assert pipe._decoder(False) is pipe.vae and pipe.vae.dtype == torch.float32
    decoder = pipe._decoder(True)
    assert decoder is not pipe.vae and decoder.dtype == torch.bfloat16 and pipe._decoder(True) is decoder
    assert pipe.vae.dtype == torch.float32  # a copy: exact requests still decode in fp32
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact, approx = vae_decode(pipe.vae, latents), vae_decode(decoder, latents)
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    error = ((approx - exact).norm() / exact.norm()).item()
    assert 0 < error < 0.05, error


def test_fp8_layers_are_the_blocks_linears_but_lora(model_paths, tmp_path):
    model = load_transformer(*model_paths, dtype=torch.float32)
    TurboLoRA.load(model, mtw.write_turbo_lora(tmp_path, seed=1))
    names = [n for n, m in model.named_modules() if fast.fp8_layer(m, n)]
    assert names and all(n.startswith("blocks.") for n in names)
    assert not [n for n in names if ".audio_attn." in n or ".lora_" in n]
    assert any(n.endswith("attn1.to_q.base_layer") for n in names)  # the adapted layers' own weights
    assert any(".ffn." in n for n in names)
    per_block = {n.split(".", 2)[2] for n in names}
    assert len(names) == len(per_block) * len(model.blocks)
    # the fast option's copies also cover the audio attention's three linears (the memory mode's do not)
    with_audio = [n for n, m in model.named_modules() if fast.fp8_layer(m, n, audio=True)]
    audio = sorted({n.split(".", 2)[2] for n in with_audio} - per_block)
    assert audio == ["audio_attn.to_kv", "audio_attn.to_out.0", "audio_attn.to_q"]
    assert [n for n, _ in fast.FastPreset(model)._layers] == with_audio


def test_8bit_self_attention_goes_through_the_dispatcher_as_one_op(model_paths, stand_in_kernel):
    model = load_transformer(*model_paths, dtype=torch.float32)
    inputs = _inputs(model)
    reference = _run(model, inputs)
    assert fast.set_self_attention_8bit(model, True) == len(model.blocks)
    assert all(str(b.attn1.processor._attention_backend.value) == fast.ATTENTION_BACKEND for b in model.blocks)
    assert all(b.attn2.processor._attention_backend is None for b in model.blocks)  # cross-attention stays
    switched = _run(model, inputs)
    assert len(stand_in_kernel) == len(model.blocks)  # only the self-attention, once per block
    torch.testing.assert_close(switched, reference, rtol=1e-4, atol=1e-5)
    # one graph per block: the kernel's call is opaque to the compiler (no graph break at the attention)
    explained = torch._dynamo.explain(model.blocks[0].forward)
    block_args = _block_inputs(model, inputs)
    report = explained(*block_args)
    assert report.graph_break_count == 0, report.break_reasons
    fast.set_self_attention_8bit(model, False)
    assert all(b.attn1.processor._attention_backend is None for b in model.blocks)
    stand_in_kernel.clear()
    torch.testing.assert_close(_run(model, inputs), reference, rtol=0, atol=0)
    assert not stand_in_kernel


def _block_inputs(model, inputs):
    """The first block's positional inputs, captured from a forward."""
    captured = {}

    def hook(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run(model, inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    assert not captured["kwargs"], "the block is called positionally"
    return captured["args"]


class _Stop(Exception):
    pass


def test_fast_swaps_weights_per_request_and_requantises_after_lora_or_speaker_switches(model_paths, tmp_path,
                                                                               stand_in_kernel, monkeypatch):
    """FP8 copies are swapped in by pointer; the LoRA and the speaker checkpoints only ever write the bf16
    weights; a LoRA or speaker switch while fast makes the copies again from the new weights."""
    model = load_transformer(*model_paths, dtype=torch.float32)
    turbo = TurboLoRA.load(model, mtw.write_turbo_lora(tmp_path, seed=1),
                           merge_from=partial(read_transformer_tensors, *model_paths))
    preset = fast.FastPreset(model)
    made = []

    def quantize(self):  # the stand-in "FP8" copy: a negated clone, so a wrong swap shows in the values
        made.append(turbo.merged)
        for name, module in self._layers:
            self._bf16[name] = module.weight
            self._fp8[name] = torch.nn.Parameter(-module.weight.detach().clone(), requires_grad=False)

    monkeypatch.setattr(fast.FastPreset, "_quantize", quantize)
    name, layer = preset._layers[0]
    bf16 = layer.weight

    audio_name, audio_layer = next((n, m) for n, m in preset._layers if ".audio_attn." in n)
    audio_bf16 = audio_layer.weight

    class Pipe:  # the pipeline's own switching order (InfiniteTalkPipeline._select_mode)
        from infinitetalk.pipeline import InfiniteTalkPipeline
        _select_mode = InfiniteTalkPipeline._select_mode
        turbo_loaded, turbo_only = True, False
        _active_audio_set = "single"

        def _use_audio_set(self, name):  # the speaker checkpoint writes in place, into the bf16 weights only
            if name != self._active_audio_set:
                writes.append(audio_layer.weight is audio_bf16)
                made.append(name)
                self._active_audio_set = name

    pipe = Pipe()
    pipe.turbo, pipe.fast, pipe.fast_unavailable = turbo, preset, None
    writes = []
    original = turbo.set_enabled

    def set_enabled(enabled):
        # the LoRA changes the weights only while they are the bf16 ones
        writes.append(enabled == turbo.enabled or layer.weight is bf16)
        original(enabled)

    monkeypatch.setattr(turbo, "set_enabled", set_enabled)
    pipe._select_mode(GenerationRequest(image="x", audio="y", fast=True))
    assert preset.active and layer.weight is preset._fp8[name] and made == [False]
    assert all(b.attn1.processor._attention_backend is not None for b in model.blocks)
    pipe._select_mode(GenerationRequest(image="x", audio="y", fast=True))
    assert made == [False]  # same weights: the copies are reused
    pipe._select_mode(GenerationRequest(image="x", audio="y", fast=True, turbo=True))
    assert turbo.merged and made == [False, True] and layer.weight is preset._fp8[name]
    torch.testing.assert_close(preset._fp8[name], -bf16)  # made from the merged bf16 weights
    pipe._select_mode(GenerationRequest(image="x", audio="y", turbo=True))
    assert not preset.active and layer.weight is bf16
    assert all(b.attn1.processor._attention_backend is None for b in model.blocks)
    pipe._select_mode(GenerationRequest(image="x", audio="y"))
    assert layer.weight is bf16 and not turbo.merged
    # two speakers while fast: the swap reaches the bf16 weights, then the copies are made again
    pipe._select_mode(GenerationRequest(image="x", audio="y", fast=True))
    assert made == [False, True, False]
    pipe._select_mode(GenerationRequest(image="x", audio="y", audio_2="z", fast=True))
    assert made == [False, True, False, "multi", False] and audio_layer.weight is preset._fp8[audio_name]
    pipe._select_mode(GenerationRequest(image="x", audio="y", audio_2="z", fast=True))
    assert made[-1] == False and len(made) == 5  # noqa: E712 - reused
    pipe._select_mode(GenerationRequest(image="x", audio="y"))
    assert made[-1] == "single" and audio_layer.weight is audio_bf16 and not preset.active
    assert writes and all(writes)


def test_forward_benchmark_variants_switch_the_self_attention(model_paths, stand_in_kernel):
    """``benchmark.py forward``'s variants go through this module (the device runs them; here only their
    switching), and its profile names each kernel's part of the forward."""
    import benchmark
    from bench_common import kernel_kind

    model = load_transformer(*model_paths, dtype=torch.float32)
    benchmark.apply_variant(model, "sage8")
    assert model.bench_8bit_attention
    assert all(str(b.attn1.processor._attention_backend.value) == fast.ATTENTION_BACKEND for b in model.blocks)
    benchmark.apply_variant(model, "attn-bf16")
    assert not model.bench_8bit_attention and all(b.attn1.processor._attention_backend is None for b in model.blocks)
    with pytest.raises(ValueError, match="unknown variant"):
        benchmark.apply_variant(model, "faster")
    kinds = {  # kernel names as the H200 profiles show them
        "void qk_int8_sv_f8_attn_kernel<128u, 64u, 128u>(signed char*, ...)": "attention, 8-bit (SageAttention)",
        "quant_query_per_thread_int8_kernel": "attention, 8-bit quantisation",
        "void TransposePadPermuteKernel<64u, true, __nv_bfloat16>(...)": "attention, 8-bit quantisation",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128": "attention, bf16",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopB_TNT": "GEMM",
        "void cutlass::device_kernel<f8f8bf16_rowwise_kernel>": "GEMM",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "fused elementwise (compiled)",
        "void at::native::vectorized_elementwise_kernel<4, ...>": "other",
    }
    assert {name: kernel_kind(name) for name in kinds} == kinds
