"""Turbo LoRA as the servers load it: compiled forwards with the PEFT adapter (on and off), fused, none.

Every model is the same full-size random transformer (seed 0) with a random turbo LoRA that has the
real file's key set at rank 64 (``bench_common.write_random_turbo_lora``), loaded with
``TurboLoRA.load`` before ``compile_transformer`` exactly as ``from_pretrained`` does. Per variant:
seconds per compiled forward at the 480p bucket, graphs compiled (dynamo's unique graphs: switching
turbo on and off must not keep recompiling) and the output's rel-L2 against its reference (adapter on
vs fused; adapter off vs no LoRA). With ``--variants`` containing ``fp8``: the adapter on top of the
fp8 memory mode (eager: its compile takes minutes), turbo output against the bf16 adapter's.
"""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import torch

from bench_common import (
    BUCKETS,
    FULL_CONFIG,
    build_random_model,
    env_record,
    forward_flops,
    forward_inputs,
    time_cuda,
    write_random_turbo_lora,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a - b).float().norm() / b.float().norm()).item(), 5)


def _fresh_model(args, lora: Path | None, fuse: bool):
    from infinitetalk.lora import TurboLoRA

    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)  # the same random weights in every model
    model = build_random_model(FULL_CONFIG, num_layers=args.layers)
    turbo = TurboLoRA.load(model, lora, fuse=fuse) if lora is not None else None
    return model, turbo


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _measure(args, model, inputs, label: str, env: dict, **extra) -> tuple[dict, torch.Tensor]:
    with torch.no_grad():
        sec = time_cuda(lambda: model(*inputs, return_dict=False), args.warmup, args.repeats)
        out = model(*inputs, return_dict=False)[0].float()
    h, w = BUCKETS["480p"]
    layers = model.config.num_layers
    sec_full = sec * FULL_CONFIG["num_layers"] / layers
    rec = dict(env, mode="lora", variant=label, resolution="480p", width=w, height=h, speakers=1,
               layers_measured=layers, seconds_per_forward=round(sec_full, 4),
               floor_seconds_per_forward=round(forward_flops(FULL_CONFIG, h, w)["floor_seconds"], 4),
               graphs_compiled_so_far=_graphs(), peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
               **extra)
    print(json.dumps(rec), flush=True)
    return rec, out


def _release() -> None:
    """After the caller dropped its model: compiled graphs and cached blocks go too."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def bench_lora(args) -> list[dict]:
    from infinitetalk.pipeline import apply_memory_mode, compile_transformer

    env = env_record()
    h, w = BUCKETS["480p"]
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        lora = write_random_turbo_lora(Path(tmp) / "turbo.safetensors", num_layers=args.layers)
        # 1. No LoRA: the reference cost and exact output.
        model, _ = _fresh_model(args, None, fuse=False)
        compile_transformer(model)
        inputs, _ = forward_inputs(model.config, h, w, 1)
        rec, exact = _measure(args, model, inputs, "none", env, lora="none")
        records.append(rec)
        base = rec["seconds_per_forward"]
        del model
        _release()
        # 2. The served default: the adapter loaded before compile, switched per request.
        model, turbo = _fresh_model(args, lora, fuse=False)
        compile_transformer(model)
        outs = {}
        for enabled in (True, False, True, False):
            turbo.set_enabled(enabled)
            graphs_before = _graphs()
            label = "adapter-on" if enabled else "adapter-off"
            rec, out = _measure(args, model, inputs, label, env, lora="adapter")
            rec["new_graphs"] = _graphs() - graphs_before  # after the first run of each mode: 0
            rec["ratio_to_no_lora"] = round(rec["seconds_per_forward"] / base, 4)
            rec["rel_l2_vs_no_lora"] = _rel(out, exact)  # adapter-off: the exact model's output
            if label in outs:
                rec["rel_l2_vs_first_run_of_this_mode"] = _rel(out, outs[label])
            outs.setdefault(label, out)
            records.append(rec)
        del model, turbo
        _release()
        # 3. A turbo-only server: fused.
        model, _ = _fresh_model(args, lora, fuse=True)
        compile_transformer(model)
        rec, fused = _measure(args, model, inputs, "fused", env, lora="fused")
        rec["ratio_to_no_lora"] = round(rec["seconds_per_forward"] / base, 4)
        rec["rel_l2_vs_adapter_on"] = _rel(fused, outs["adapter-on"])
        rec["rel_l2_turbo_vs_exact"] = _rel(fused, exact)
        records.append(rec)
        del model
        _release()
        # 4. fp8 compute with the adapter (quantised base layers, bf16 adapter), eager.
        if "fp8" in args.variants:
            model, turbo = _fresh_model(args, lora, fuse=False)
            apply_memory_mode(model, "fp8", torch.device("cuda"), torch.bfloat16)
            turbo.set_enabled(True)
            rec, out = _measure(args, model, inputs, "fp8-adapter-on-eager", env, lora="adapter")
            rec["rel_l2_vs_bf16_adapter_on"] = _rel(out, outs["adapter-on"])
            rec["finite"] = bool(torch.isfinite(out).all())
            records.append(rec)
            del model, turbo
            _release()
    return records

