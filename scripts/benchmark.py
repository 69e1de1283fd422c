#!/usr/bin/env python
"""Benchmark the full-size InfiniteTalk model on a GPU with random weights.

Builds the 14B configuration (Wan2.1-I2V-14B + audio modules, 18.9 B parameters) directly on
the GPU in bf16 and measures, per resolution bucket, attention backend and speaker count:
seconds per forward, achieved TFLOP/s, the ratio to the FLOP floor (measured H200 kernel
rates: bf16 GEMM 750 TFLOP/s, cuDNN attention 570 TFLOP/s; research/performance.md section 4)
and peak memory.  Chunk-level modes (exact / turbo, with VAE and conditioning) time the whole
chunk loop of the pipeline.

Usage:
    python scripts/benchmark.py forward --resolutions 480p,720p --backends native,_native_cudnn
    python scripts/benchmark.py chunk --modes exact,turbo
    python scripts/benchmark.py parallel --ref /tmp/ref.pt        # one GPU: reference outputs, times
    torchrun --nproc-per-node 2 scripts/benchmark.py parallel --ref /tmp/ref.pt
    python scripts/benchmark.py lora --variants fp8   # turbo LoRA adapter on/off, fused, none (compiled)
    python scripts/benchmark.py served --plan main --scratch /data/bench   # as served: Predictor.setup()/run()
    python scripts/benchmark.py vae --resolutions 480p        # VAE layouts / cuDNN autotuning
Results: a table on stdout and a JSON list of records (``--json PATH``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

from bench_common import (
    BUCKETS,
    FULL_CONFIG,
    build_random_model,
    env_record,
    forward_flops,
    forward_inputs,
    kernel_profile,
    time_cuda,
)


def apply_variant(model, variant: str) -> None:
    """Speed/memory variants of one model: ``eager``, ``compile`` (regional), ``fp8-torchao`` (the fp8 memory
    mode's layers), ``sage8`` (8-bit self-attention), ``fast`` (the fast request option as served: its FP8
    copies swapped in and 8-bit self-attention), ``attn-bf16`` (the self-attention back to bf16: with
    ``fast`` before it, FP8 GEMMs alone), ``fp8-storage``."""
    from infinitetalk import fast

    if variant == "compile":
        from infinitetalk.pipeline import compile_transformer

        compile_transformer(model)
    elif variant == "fp8-torchao":
        from infinitetalk.pipeline import quantize_fp8

        print(f"fp8 (torchao) on {quantize_fp8(model)} linear layers", flush=True)
    elif variant == "sage8":  # issue 15: the blocks' self-attention in 8 bits (SageAttention 2, sm90)
        print(f"8-bit self-attention in {fast.set_self_attention_8bit(model)} blocks", flush=True)
        model.bench_8bit_attention = True
    elif variant == "fast":
        model.bench_fast = fast.FastPreset(model)
        model.bench_fast.set(True)
        model.bench_8bit_attention = True
        print(f"fast: {len(model.bench_fast._layers)} FP8 layers, {model.bench_fast.last_switch_seconds:.1f} s",
              flush=True)
    elif variant == "attn-bf16":
        fast.set_self_attention_8bit(model, False)
        model.bench_8bit_attention = False
    elif variant == "fp8-storage":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    elif variant != "eager":
        raise ValueError(f"unknown variant {variant}")


def bench_forward(args) -> list[dict]:
    env = env_record()
    torch.manual_seed(0)  # same random weights in every process, so outputs can be compared
    model = build_random_model(FULL_CONFIG, num_layers=args.layers)
    layers = model.config.num_layers
    records = []
    refs = torch.load(args.ref, weights_only=True) if args.ref and args.ref.exists() else {}
    applied = []
    for variant in args.variants:
        apply_variant(model, variant)
        applied.append(variant)
        label = "+".join(v for v in applied if v != "eager") or "eager"  # e.g. compile+fp8-torchao+sage8
        if args.measure is None or label in args.measure:
            records += _forward_sweep(args, model, env, layers, label, refs)
    if args.ref and not args.ref.exists():
        torch.save(refs, args.ref)
    return records


def _forward_sweep(args, model, env, layers, variant, refs) -> list[dict]:
    from infinitetalk import fast

    records = []
    for res in args.resolutions:
        h, w = BUCKETS[res]
        for speakers, batch in [(s, b) for s in args.speakers for b in args.batch]:
            inputs, masks = forward_inputs(model.config, h, w, speakers, batch=batch)
            for backend in args.backends:
                model.set_attention_backend(backend)
                eight_bit = getattr(model, "bench_8bit_attention", False)
                if eight_bit:  # set_attention_backend set every module: the self-attention in 8 bits again
                    fast.set_self_attention_8bit(model)
                torch.cuda.reset_peak_memory_stats()
                forward = partial(model, *inputs, ref_target_masks=masks, return_dict=False)
                with torch.no_grad():
                    sec = time_cuda(forward, args.warmup, args.repeats)
                    out = model(*inputs, ref_target_masks=masks, return_dict=False)[0][:1].float()
                    profile = kernel_profile(forward) if args.profile else None
                sec /= batch  # per forward
                key = f"{res}-{speakers}"
                rel_err = rel_compiled = None
                if key in refs:
                    ref = refs[key].to(out.device)
                    rel_err = round(((out - ref).norm() / ref.norm()).item(), 5)
                elif variant == "eager":
                    refs[key] = out.cpu()
                if variant == "compile":  # the exact path as served: compiled bf16
                    refs[key + "-compiled"] = out.cpu()
                elif key + "-compiled" in refs and variant != "eager":
                    ref = refs[key + "-compiled"].to(out.device)
                    rel_compiled = round(((out - ref).norm() / ref.norm()).item(), 5)
                scale = FULL_CONFIG["num_layers"] / layers  # extrapolate when fewer layers were built
                fl = forward_flops(FULL_CONFIG, h, w, speakers=speakers)
                sec_full = sec * scale
                rec = dict(
                    env, mode="forward", variant=variant, rel_l2_vs_eager_bf16=rel_err,
                    rel_l2_vs_compiled_bf16=rel_compiled, resolution=res, width=w,
                    height=h, speakers=speakers, backend=backend, batch=batch,
                    attention_backend=fast.ATTENTION_BACKEND if eight_bit else backend, kernel_profile=profile,
                    weights_memory_gb=round(torch.cuda.memory_allocated() / 1e9, 2),
                    layers_measured=layers, seconds_per_forward=round(sec_full, 4),
                    achieved_tflops=round(fl["total_flops"] / sec_full / 1e12, 1),
                    floor_seconds_per_forward=round(fl["floor_seconds"], 4),
                    ratio_to_floor=round(sec_full / fl["floor_seconds"], 3), tokens=fl["tokens"],
                    peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                    seconds_per_chunk=None, gpu_seconds_per_video_second=None,
                )
                print(json.dumps(rec), flush=True)
                records.append(rec)
                if args.json:  # each record as it comes, so a run cut by a time limit keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.json.with_suffix(".partial.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
            del inputs
            gc.collect()
            torch.cuda.empty_cache()
    return records


#: The subcommands (each a function returning its records; none on ranks other than 0 under torchrun).
COMMANDS = ("forward", "chunk", "approx", "memory", "setup", "parallel", "lora", "served", "vae")


def _run(args) -> list[dict] | None:
    if args.what == "forward":
        return bench_forward(args)
    if args.what in ("chunk", "approx"):  # kept apart: needs the pipeline
        from bench_chunk import bench_approx, bench_chunk

        return (bench_chunk(args) or None) if args.what == "chunk" else bench_approx(args)
    if args.what == "parallel":  # run once plainly and once under torchrun, same --ref
        from bench_parallel import bench_parallel

        return bench_parallel(args) or None
    if args.what == "lora":
        from bench_lora import bench_lora

        return bench_lora(args)
    if args.what == "served":  # the Cog predictor's own setup() and run(), full-size weights on disk
        from bench_served import bench_served

        return bench_served(args)
    if args.what == "vae":  # VAE memory layouts and cuDNN autotuning (one chunk's decode and encode)
        from bench_vae import bench_vae

        return bench_vae(args)
    from bench_memory import bench_memory, bench_setup

    return bench_memory(args) if args.what == "memory" else bench_setup(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="InfiniteTalk GPU benchmark")
    ap.add_argument("what", choices=COMMANDS)
    ap.add_argument("--scratch", default="/tmp/infinitetalk-setup-bench", help="setup: where to write weights")
    ap.add_argument("--plan", default="main", help="served: which servers and predictions (bench_served.PLANS)")
    ap.add_argument("--page-cache", default="cold", choices=["cold", "warm", "written"],
                    help="served: the first server starts with the weights evicted (cold), read once (warm), or as "
                         "this command just wrote them (written: in the page cache, recorded as warm)")
    ap.add_argument("--resolutions", default="480p", type=lambda s: s.split(","))
    ap.add_argument("--backends", default="_native_cudnn", type=lambda s: s.split(","))
    ap.add_argument("--speakers", default="1", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--modes", default="exact,turbo", type=lambda s: s.split(","))
    ap.add_argument("--layers", type=int, default=None, help="build fewer blocks and extrapolate (memory/time)")
    ap.add_argument("--variants", default="eager", type=lambda s: s.split(","),
                    help="forward: eager, compile, fp8-torchao, sage8 (8-bit self-attention), fast (the fast "
                         "option's FP8 copies + 8-bit self-attention), attn-bf16, fp8-storage (applied in order "
                         "to one model; a record's variant names all applied so far)")
    ap.add_argument("--profile", action="store_true",
                    help="forward: also profile one forward per measured variant (GPU time per kind of kernel)")
    ap.add_argument("--measure", default=None, type=lambda s: s.split(","),
                    help="forward: measure only these cumulative variants (e.g. fp8-torchao+sage8+compile); "
                         "the others are applied without a sweep")
    ap.add_argument("--ref", type=Path, default=None,
                    help="forward/parallel: file holding the reference (eager / one-GPU) outputs to compare with")
    ap.add_argument("--compile", action="store_true", help="chunk: regional torch.compile of the blocks")
    ap.add_argument("--vae-bf16", action="store_true", help="chunk: run the VAE in bf16")
    ap.add_argument("--fuse-turbo", action="store_true",
                    help="chunk/lora: the turbo LoRA fused into the weights (default: switchable adapter, as served)")
    ap.add_argument("--memory-mode", default="none", choices=["none", "fp8", "offload"],
                    help="parallel: memory mode applied before the split")
    ap.add_argument("--approx", default="cache,fp8", type=lambda s: s.split(","),
                    help="approx: which approximations to measure against the exact bf16 path")
    ap.add_argument("--size", default="320x320", type=lambda s: tuple(int(x) for x in s.split("x")),
                    help="approx cache: WxH of the 40-step exact runs")
    ap.add_argument("--cache-rel-l1", default=0.05, type=float,
                    help="approx cache: step-to-step rel-L1 of e0 the skip rule sees (random weights)")
    ap.add_argument("--cache-thresholds", default="0.2,0.3", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--batch", default="1", type=lambda s: [int(x) for x in s.split(",")],
                    help="forward: batch sizes (CFG batching: time per forward = time / batch)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("BENCH_SMOKE") != "1":
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    records = _run(args)
    if records is None:  # ranks other than 0 under torchrun
        return 0
    print_table(records)
    print(f"total wall time {time.time() - t0:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    return 0


def print_table(records: list[dict]) -> None:
    cols = ["mode", "variant", "num_gpus", "resolution", "speakers", "backend", "seconds_per_forward",
            "achieved_tflops", "floor_seconds_per_forward", "ratio_to_floor", "seconds_per_chunk",
            "gpu_seconds_per_video_second", "decode_seconds", "encode_seconds", "peak_memory_gb",
            "rel_l2_vs_eager_bf16", "rel_l2_vs_compiled_bf16", "attention_backend", "speedup_vs_1gpu",
            "rel_l2_vs_1gpu"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in records:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
