"""Turbo LoRA: a lightx2v-format file through diffusers' PEFT integration, fused or switchable."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import make_tiny_weights as mtw
from infinitetalk.errors import InputError
from infinitetalk.lora import ADAPTER_NAME, TurboLoRA
from infinitetalk.weights import convert_official_state_dict_partial, load_transformer, read_transformer_tensors
from tiny_forward import forward_inputs as _inputs  # tests/ is on sys.path for test modules
from tiny_forward import run_forward as _run

#: Our linear layer -> its official name, for the LoRA files the tests write.
_BLOCK_LINEARS = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}  # fmt: skip


def write_low_rank_lora(path: Path, model, rank: int = 4, seed: int = 0, alpha: float | None = None,
                        ranks: dict[str, int] | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """lightx2v-format factors and bias deltas for every attention / FFN linear of every block.

    Returns ``{our module: (down, up, diff_b)}``. ``alpha`` adds ``.alpha`` entries (ignored by the loader).
    """
    g = torch.Generator().manual_seed(seed)
    sd, factors = {}, {}
    for i, _ in enumerate(model.blocks):
        for ours, official in _BLOCK_LINEARS.items():
            name = f"blocks.{i}.{ours}"
            lin, r = model.get_submodule(name), (ranks or {}).get(name, rank)
            down = torch.randn(r, lin.in_features, generator=g) * 0.1
            up = torch.randn(lin.out_features, r, generator=g) * 0.1
            bias = torch.randn(lin.out_features, generator=g) * 0.1
            key = f"diffusion_model.blocks.{i}.{official}"
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.diff_b": bias})
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
            factors[name] = (down, up, bias)
    save_file(sd, str(path))
    return factors


class OldHookPath:
    """Reference: the removed hand-rolled adapter, reduced to its arithmetic.

    A forward hook adds ``x down^T up^T + diff_b`` to each adapted linear layer's output while enabled.
    """

    def __init__(self, model, factors):
        self.enabled = False
        for name, (down, up, bias) in factors.items():
            model.get_submodule(name).register_forward_hook(self._hook(down, up, bias))

    def _hook(self, down, up, bias):
        def hook(_module, inputs, output):
            if not self.enabled:
                return output
            return output + (F.linear(F.linear(inputs[0], down), up) + bias)

        return hook


@pytest.fixture()
def load(model_paths):
    def make():
        return load_transformer(*model_paths, dtype=torch.float32)

    return make


@pytest.fixture()
def real_lora(tmp_path) -> Path:
    """The tiny turbo LoRA of make_tiny_weights: every key kind of the real file."""
    return mtw.write_turbo_lora(tmp_path, seed=1)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _official_reference(model, path: Path, modulation: bool = True):
    """Apply a lightx2v file to ``model`` the way the official wrapper does: W + up @ down, + diff, + diff_b.

    ``diff_m`` (which the official wrapper skips) is added to ``modulation`` when asked. Names go through the
    weight loader's converter, independently of infinitetalk.lora.
    """
    raw = {k.removeprefix("diffusion_model."): v.float() for k, v in load_file(str(path)).items()}
    params = dict(model.named_parameters())

    def param(official):
        (name,) = convert_official_state_dict_partial({official: torch.empty(0)})
        return params[name]

    with torch.no_grad():
        for key, value in raw.items():
            if key.endswith(".lora_down.weight"):
                up = raw[key.replace(".lora_down.", ".lora_up.")]
                param(key.replace(".lora_down.weight", ".weight")).add_(up @ value)
            elif key.endswith(".diff_b"):
                param(key.removesuffix(".diff_b") + ".bias").add_(value)
            elif key.endswith(".diff"):
                param(key.removesuffix(".diff") + ".weight").add_(value)
            elif key.endswith(".diff_m") and modulation:
                param(key.removesuffix(".diff_m") + ".modulation").add_(value)


def _no_adapter_left(model) -> bool:
    names = [n for n, _ in model.named_parameters()]
    return not any(".lora_" in n or ".base_layer." in n for n in names) and not getattr(model, "peft_config", None)


# ---------------------------------------------------------------------------- numerics


def test_adapter_equals_the_old_hook_path_in_successive_calls(tmp_path, load):
    model, reference = load(), load()
    factors = write_low_rank_lora(tmp_path / "lora.safetensors", model)
    inputs = _inputs(model)
    exact = _run(model, inputs)
    turbo = TurboLoRA.load(model, tmp_path / "lora.safetensors")
    old = OldHookPath(reference, factors)
    assert not turbo.enabled and not turbo.fused
    for _ in range(2):
        assert torch.equal(_run(model, inputs), exact)  # attached but disabled: the exact model
        turbo.set_enabled(True)
        old.enabled = True
        out, ref = _run(model, inputs), _run(reference, inputs)
        assert (out - exact).abs().max() > 1e-2
        assert (out - ref).abs().max() <= 1e-6
        turbo.set_enabled(False)
        old.enabled = False


def test_scale_is_exactly_one_for_every_rank(tmp_path, load):
    model = load()
    odd = {"blocks.0.attn1.to_q": 8, "blocks.1.ffn.net.2": 2}
    factors = write_low_rank_lora(tmp_path / "lora.safetensors", model, rank=4, ranks=odd)
    TurboLoRA.load(model, tmp_path / "lora.safetensors").set_enabled(True)
    config = model.peft_config[ADAPTER_NAME]
    assert config.lora_alpha == config.r == 4
    assert dict(config.alpha_pattern) == dict(config.rank_pattern) and sorted(config.rank_pattern.values()) == [2, 8]
    g = torch.Generator().manual_seed(3)
    for name in ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2", "blocks.1.attn2.add_v_proj"):
        layer = model.get_submodule(name)
        down, up, bias = factors[name]
        assert layer.scaling[ADAPTER_NAME] == 1.0
        x_in = torch.randn(3, 5, layer.in_features, generator=g)
        with torch.no_grad():
            delta = layer(x_in) - layer.base_layer(x_in)
        assert torch.allclose(delta, x_in @ down.T @ up.T + bias, atol=1e-6)


def test_alpha_entries_are_ignored(tmp_path, load):
    plain, with_alpha = load(), load()
    write_low_rank_lora(tmp_path / "plain.safetensors", plain)
    write_low_rank_lora(tmp_path / "alpha.safetensors", plain, alpha=32.0)  # alpha/rank = 8 if it were applied
    a = TurboLoRA.load(plain, tmp_path / "plain.safetensors")
    b = TurboLoRA.load(with_alpha, tmp_path / "alpha.safetensors")
    assert len(b.ignored) == 12 * len(plain.blocks) and all(k.endswith(".alpha") for k in b.ignored)
    a.set_enabled(True)
    b.set_enabled(True)
    inputs = _inputs(plain)
    assert torch.equal(_run(plain, inputs), _run(with_alpha, inputs))


def test_real_key_set_loads_strictly_and_matches_the_official_arithmetic(real_lora, load):
    keys = set(load_file(str(real_lora)))
    kinds = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if "lora_" in k else k.rsplit(".", 1)[-1] for k in keys}
    assert kinds == {"lora_down.weight", "lora_up.weight", "diff_b", "diff", "diff_m"}
    model, reference, plain = load(), load(), load()
    turbo = TurboLoRA.load(model, real_lora, modulation=True)
    assert set(turbo.applied) == keys and not turbo.ignored  # every key of the file applied
    n = len(model.blocks)
    assert len(turbo.lora_modules) == 12 * n + 7  # + text/time embeddings, time projection, image embedder
    assert len(turbo.delta_parameters) == 8 * n + 9  # norms, modulation tables, patch embedding, head
    assert {"patch_embedding.weight", "proj_out.weight", "scale_shift_table", "blocks.1.scale_shift_table",
            "blocks.0.attn2.norm_added_k.weight", "condition_embedder.image_embedder.norm1.bias"} <= set(
        turbo.delta_parameters)
    _official_reference(reference, real_lora, modulation=True)
    inputs = _inputs(model)
    exact = _run(plain, inputs)
    assert torch.equal(_run(model, inputs), exact)
    turbo.set_enabled(True)
    out = _run(model, inputs)
    assert _rel(out, _run(reference, inputs)) < 1e-6 and _rel(out, exact) > 1e-2
    turbo.set_enabled(False)
    assert torch.equal(_run(model, inputs), exact)


def test_by_default_diff_m_is_skipped_like_the_official_wrapper(real_lora, load):
    model, reference = load(), load()
    turbo = TurboLoRA.load(model, real_lora)
    assert sorted(turbo.ignored) == sorted(k for k in load_file(str(real_lora)) if k.endswith(".diff_m"))
    _official_reference(reference, real_lora, modulation=False)
    turbo.set_enabled(True)
    inputs = _inputs(model)
    assert _rel(_run(model, inputs), _run(reference, inputs)) < 1e-6


def test_fused_equals_adapter_and_leaves_no_adapter(real_lora, load):
    adapter, fused, plain = load(), load(), load()
    TurboLoRA.load(adapter, real_lora).set_enabled(True)
    turbo = TurboLoRA.load(fused, real_lora, fuse=True)
    assert turbo.fused and turbo.enabled
    assert _no_adapter_left(fused)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    inputs = _inputs(plain)
    assert _rel(_run(fused, inputs), _run(adapter, inputs)) < 1e-6
    turbo.set_enabled(True)  # a no-op
    with pytest.raises(RuntimeError, match="fused"):
        turbo.set_enabled(False)


def test_merged_switching_gives_the_loaded_bf16_weights_back(real_lora, model_paths):
    """bf16, as served: turbo merged into the weights equals the fused model bit for bit, and exact after
    it has every adapted weight of the loaded model bit for bit (unmerging alone would not: the control
    shows the rounding it leaves), over two round trips."""
    def load16():
        return load_transformer(*model_paths, dtype=torch.bfloat16)

    model, fused, plain, control = load16(), load16(), load16(), load16()
    loaded = {n: p.clone() for n, p in plain.named_parameters()}
    turbo = TurboLoRA.load(model, real_lora, merge_from=partial(read_transformer_tensors, *model_paths))
    assert turbo.strategy == "merge" and not turbo.merged
    TurboLoRA.load(fused, real_lora, fuse=True)
    inputs = [t.to(torch.bfloat16) if t.is_floating_point() and t.ndim > 1 else t for t in _inputs(model)]
    exact_ref, turbo_ref = _run(plain, inputs), _run(fused, inputs)
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".lora_" not in n}
    assert set(base) == set(loaded)
    for _ in range(2):
        turbo.set_enabled(True)
        assert turbo.merged and turbo.last_switch_seconds > 0
        assert torch.equal(_run(model, inputs), turbo_ref)
        turbo.set_enabled(False)
        assert not turbo.merged
        assert all(torch.equal(base[n], loaded[n]) for n in loaded)
        assert torch.equal(_run(model, inputs), exact_ref)
    TurboLoRA.load(control, real_lora)
    control.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER_NAME])
    control.unfuse_lora()
    drift = [n for n, p in control.named_parameters() if ".base_layer.weight" in n
             and not torch.equal(p, loaded[n.replace(".base_layer", "")])]
    assert drift  # why exact mode reads the weights again


def test_merged_switching_refuses_a_source_without_the_weights(real_lora, load):
    model = load()
    turbo = TurboLoRA.load(model, real_lora, merge_from=lambda names: iter(()))
    turbo.set_enabled(True)
    with pytest.raises(RuntimeError, match="were not found"):
        turbo.set_enabled(False)
    assert not turbo.merged


def test_naming_agrees_with_diffusers_lightx2v_converter(real_lora, load):
    """The low-rank part lands where diffusers' own lightx2v conversion puts it; that converter would drop
    the norm, patch-embedding and modulation deltas silently, which is why it is not used."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    raw = load_file(str(real_lora))
    converted = _convert_non_diffusers_wan_lora_to_diffusers(dict(raw))
    by_diffusers = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}
    turbo = TurboLoRA.load(load(), real_lora)
    assert set(turbo.lora_modules) <= by_diffusers
    assert by_diffusers - set(turbo.lora_modules) == {"proj_out"}  # head.head.diff as a rank-64 "LoRA"
    untouched = ("norm", "patch_embedding", "scale_shift_table")
    assert not any(part in k for k in converted for part in untouched)  # no trace of them: dropped
    assert {n for n in turbo.delta_parameters if not n.startswith("proj_out.")} == {
        n for n in turbo.delta_parameters if any(part in n for part in untouched)}  # all applied here


# ---------------------------------------------------------------------------- strictness


def _bad_files(model) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    d = model.config.num_attention_heads * model.config.attention_head_dim
    ok = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, d),
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(d, 2)}
    return {
        "missing block": ({**ok, "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, d),
                           "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(d, 2)}, "blocks.7"),
        "unknown kind": ({**ok, "diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.zeros(2, d)}, "hada_w1_a"),
        "orphan factor": ({**ok, "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, d)}, "ffn.0"),
        "wrong shapes": ({"diffusion_model.blocks.0.self_attn.k.lora_down.weight": torch.zeros(2, d + 1),
                          "diffusion_model.blocks.0.self_attn.k.lora_up.weight": torch.zeros(d, 2)}, "self_attn.k"),
        "T2V patch embedding": ({**ok, "diffusion_model.patch_embedding.diff": torch.zeros(d, 16, 1, 2, 2)},
                                "patch_embedding.diff"),
        "unknown parameter": ({**ok, "diffusion_model.blocks.0.norm9.diff": torch.zeros(d)}, "norm9"),
        "bias of missing layer": ({**ok, "diffusion_model.blocks.0.self_attn.x.diff_b": torch.zeros(d)}, "self_attn.x"),
        "not linear": ({"diffusion_model.patch_embedding.lora_down.weight": torch.zeros(2, 36),
                        "diffusion_model.patch_embedding.lora_up.weight": torch.zeros(d, 2)}, "patch_embedding"),
        "unknown audio key": ({**ok, "diffusion_model.blocks.0.audio_cross_attn.q_proj.diff_b": torch.zeros(d)},
                              "audio_cross_attn"),
    }  # fmt: skip


_BAD_CASES = ["missing block", "unknown kind", "orphan factor", "wrong shapes", "T2V patch embedding",
              "unknown parameter", "bias of missing layer", "not linear", "unknown audio key"]


@pytest.mark.parametrize("case", _BAD_CASES)
def test_strict_loading_names_the_keys_not_applied(case, tmp_path, load):
    model = load()
    sd, needle = _bad_files(model)[case]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="keys not applied") as info:
        TurboLoRA.load(model, tmp_path / "bad.safetensors")
    assert needle in str(info.value)
    assert "blocks.0.self_attn.q.lora" not in str(info.value)  # the keys that fit are not blamed
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert _no_adapter_left(model)


def test_load_order_is_enforced(real_lora, load):
    model = load()
    TurboLoRA.load(model, real_lora)
    with pytest.raises(ValueError, match="already loaded"):
        TurboLoRA.load(model, real_lora)
    offloaded = load()
    offloaded.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=False)
    with pytest.raises(ValueError, match="before enabling group offloading"):
        TurboLoRA.load(offloaded, real_lora)


# ---------------------------------------------------------------------------- compile, offload


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["adapter", "merge"])
def test_compiled_model_switches_between_exact_and_turbo(real_lora, load, model_paths, strategy):
    """The server's regional compile (inductor on the CPU) after the switchable LoRA (unmerged adapter,
    or merged for turbo and read again for exact): turbo differs from exact, equals the fused model, and
    exact comes back, in successive calls (the compiled graphs read the weights as they are now, not as
    they were when compiled); after one call in each mode switching compiles nothing more."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor on the CPU needs a C compiler")
    from torch._dynamo.utils import counters

    model, fused, plain = load(), load(), load()
    merge_from = partial(read_transformer_tensors, *model_paths) if strategy == "merge" else None
    turbo = TurboLoRA.load(model, real_lora, merge_from=merge_from)
    assert turbo.strategy == strategy
    TurboLoRA.load(fused, real_lora, fuse=True)
    inputs = _inputs(model)
    exact_ref, turbo_ref = _run(plain, inputs), _run(fused, inputs)
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(dynamic=False)
    outs = {}
    for step, mode in enumerate((False, True, False, True, False)):
        turbo.set_enabled(mode)
        out = _run(model, inputs)
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
        if mode in outs:
            assert torch.equal(out, outs[mode])  # no drift when switching back and forth
        outs[mode] = out
    assert counters["stats"]["unique_graphs"] == graphs > 0  # both modes compiled once, then reused
    assert _rel(outs[False], exact_ref) < 1e-5
    assert _rel(outs[True], turbo_ref) < 1e-5 and _rel(outs[True], exact_ref) > 1e-2
    torch._dynamo.reset()


def _offload_case(load, real_lora, device, offload):
    model, fused, plain = load().to(device), load().to(device), load().to(device)
    turbo = TurboLoRA.load(model, real_lora)
    TurboLoRA.load(fused, real_lora, fuse=True)
    inputs = tuple(t.to(device) for t in _inputs(model))
    exact_ref, turbo_ref = _run(plain, inputs), _run(fused, inputs)
    model.to("cpu")
    offload(model)
    turbo.set_enabled(True)  # before the first forward: the weights it onloads must be turbo's
    first = _run(model, inputs)
    turbo.set_enabled(False)
    exact = _run(model, inputs)
    turbo.set_enabled(True)
    again = _run(model, inputs)
    assert _rel(first, turbo_ref) < 1e-5 and torch.equal(first, again)
    assert _rel(exact, exact_ref) < 1e-5


def _group_offload(device: str, use_stream: bool):
    def enable(model):
        model.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)

    return enable


def test_group_offload_keeps_both_modes(real_lora, load):
    _offload_case(load, real_lora, "cpu", _group_offload("cpu", use_stream=False))


def test_group_offload_with_streams_keeps_both_modes_emulated_on_cpu(real_lora, load, monkeypatch):
    """The pipeline's offload mode (streams, pinned CPU copies that each onload reads) emulated on the CPU:
    the CPU copies are separate tensors, as pinning makes them; the CPU has no stream to wait for."""
    from contextlib import contextmanager

    from diffusers.hooks import group_offloading as go

    @contextmanager
    def already_pinned(group):
        yield group.cpu_param_dict

    monkeypatch.setattr(go.ModuleGroup, "_to_cpu", staticmethod(lambda tensor, low_cpu_mem_usage: tensor.data.clone()))
    monkeypatch.setattr(go.ModuleGroup, "_pinned_memory_tensors", already_pinned)
    monkeypatch.setattr(torch.cpu.Stream, "synchronize", lambda self: None, raising=False)
    cpu = torch.device("cpu")
    config = go.GroupOffloadingConfig(
        onload_device=cpu, offload_device=cpu, offload_type=go.GroupOffloadingType.BLOCK_LEVEL, non_blocking=False,
        record_stream=False, low_cpu_mem_usage=False, num_blocks_per_group=1, stream=torch.cpu.Stream())
    _offload_case(load, real_lora, "cpu", lambda model: go._apply_group_offloading(model, config))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams need CUDA")
def test_group_offload_with_streams_keeps_both_modes(real_lora, load):
    _offload_case(load, real_lora, "cuda", _group_offload("cuda", use_stream=True))


# ---------------------------------------------------------------------------- files, pipeline


def test_tiny_lora_is_written_at_the_product_path(tmp_path):
    from infinitetalk.download import TURBO_DIR, TURBO_FILE

    assert (mtw.TURBO_DIR, mtw.TURBO_FILE) == (TURBO_DIR, TURBO_FILE)
    assert mtw.write_turbo_lora(tmp_path) == tmp_path / TURBO_DIR / TURBO_FILE
    shapes = mtw.turbo_lora_shapes()
    assert {k: tuple(v.shape) for k, v in load_file(str(tmp_path / TURBO_DIR / TURBO_FILE)).items()} == shapes
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(tmp_path / TURBO_DIR / TURBO_FILE)).values())


@pytest.mark.slow
def test_pipeline_turbo_and_exact_requests_on_one_pipeline(tmp_path, tiny_weights, portrait, make_speech,
                                                           monkeypatch):
    """Successive turbo / exact / turbo requests on one pipeline with the switchable LoRA (merged for
    turbo, read again for exact: the default on one unquantised model) give the latents of the official
    arithmetic (W + up @ down and the deltas, in fp32) within 1e-6 and, for exact, the plain model's bit
    for bit; a pipeline without the LoRA refuses turbo, a fused one refuses exact."""
    from infinitetalk.pipeline import GenerationRequest, InfiniteTalkPipeline

    latents = []
    decode = InfiniteTalkPipeline._decode

    def recording_decode(self, job, x0):
        latents.append(x0.clone())
        return decode(self, job, x0)

    monkeypatch.setattr(InfiniteTalkPipeline, "_decode", recording_decode)
    speech = make_speech(1.0, "turbo")
    lora = mtw.write_turbo_lora(tmp_path)
    plain = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu")
    # Same sampling settings in both modes (turbo's defaults), so only the weights differ.
    base = dict(image=portrait, audio=speech, width=64, height=64, seed=5, steps=2, text_guidance=1.0,
                audio_guidance=2.0, shift=2.0)
    with pytest.raises(InputError, match="LoRA"):
        plain.generate(GenerationRequest(**base, turbo=True), tmp_path / "x.mp4", show_progress=False)

    def run(pipe, turbo: bool) -> torch.Tensor:
        latents.clear()
        result = pipe.generate(GenerationRequest(**base, turbo=turbo), tmp_path / "out.mp4", show_progress=False)
        assert result.num_frames == 25
        return latents[-1]

    exact_ref = run(plain, False)
    _official_reference(plain.transformer, lora, modulation=False)
    turbo_ref = run(plain, False)
    pipe = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu", turbo_lora=lora)
    assert pipe.turbo_loaded and not pipe.turbo_only and pipe.turbo.strategy == "merge"
    for turbo in (True, False, True, False):
        out = run(pipe, turbo)
        assert pipe.turbo.enabled is turbo and pipe.turbo.merged is turbo
        assert _rel(out, turbo_ref if turbo else exact_ref) < 1e-6, turbo
        if not turbo:
            assert torch.equal(out, exact_ref)
    assert _rel(turbo_ref, exact_ref) > 1e-2
    fused = InfiniteTalkPipeline.from_pretrained(tiny_weights, device="cpu", turbo_lora=lora, fuse_turbo=True)
    assert fused.turbo_only
    assert _rel(run(fused, True), turbo_ref) < 1e-6
    with pytest.raises(InputError, match="turbo mode only"):
        fused.generate(GenerationRequest(**base), tmp_path / "x.mp4", show_progress=False)
