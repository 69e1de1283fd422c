"""Sequence-parallel forward benchmark (used by ``scripts/benchmark.py parallel``).

Run it once on one GPU and once under ``torchrun --nproc-per-node N`` with the same ``--ref``
file: the one-GPU run saves its outputs and times there, the N-GPU run (the full-size random
model rebuilt from the same seed on every rank, tokens split with
:func:`infinitetalk.distributed.enable_sequence_parallel`) reports its time per forward, the
speed-up and the output's relative L2 error against the one-GPU output.
"""

from __future__ import annotations

import json
from functools import partial

import torch

from bench_common import BUCKETS, FULL_CONFIG, build_random_model, env_record, forward_flops, forward_inputs, time_cuda


def bench_parallel(args) -> list[dict]:
    from infinitetalk import distributed

    context = distributed.init_from_env()
    world = 1 if context is None else context.world_size
    main = context is None or context.is_main
    env = env_record()
    torch.manual_seed(0)  # identical random weights on every rank and in the one-GPU run
    model = build_random_model(FULL_CONFIG, num_layers=args.layers)
    if args.memory_mode != "none":  # as from_pretrained does: memory mode first, then the split
        from infinitetalk.pipeline import apply_memory_mode

        apply_memory_mode(model, args.memory_mode, model.device, model.dtype)
        torch.cuda.empty_cache()
    if context is not None:
        distributed.enable_sequence_parallel(model, context)
    refs = torch.load(args.ref, weights_only=False) if args.ref and args.ref.exists() else {}
    records = []
    for res in args.resolutions:
        h, w = BUCKETS[res]
        for speakers in args.speakers:
            inputs, masks = forward_inputs(model.config, h, w, speakers)
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                sec = time_cuda(partial(model, *inputs, ref_target_masks=masks, return_dict=False),
                                args.warmup, args.repeats)
                out = model(*inputs, ref_target_masks=masks, return_dict=False)[0].float().cpu()
            key = f"{res}-{speakers}-{args.memory_mode}"
            fl = forward_flops(FULL_CONFIG, h, w, speakers=speakers)
            rec = dict(env, mode="forward-sequence-parallel", num_gpus=world, backend="native",
                       memory_mode=args.memory_mode,
                       parallelism="ulysses" if world > 1 else "none", resolution=res, width=w, height=h,
                       speakers=speakers, layers_measured=model.config.num_layers, seconds_per_forward=round(sec, 4),
                       floor_seconds_per_forward=round(fl["floor_seconds"] / world, 4),
                       ratio_to_floor=round(sec / (fl["floor_seconds"] / world), 3),
                       peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                       seconds_per_chunk=None, gpu_seconds_per_video_second=None)
            if world == 1:
                refs[key] = dict(output=out, seconds=sec)
            elif key in refs:
                ref = refs[key]["output"]
                rec["rel_l2_vs_1gpu"] = round(((out - ref).norm() / ref.norm()).item(), 5)
                rec["max_abs_vs_1gpu"] = round((out - ref).abs().max().item(), 4)
                rec["seconds_per_forward_1gpu"] = round(refs[key]["seconds"], 4)
                rec["speedup_vs_1gpu"] = round(refs[key]["seconds"] / sec, 3)
                rec["parallel_efficiency"] = round(refs[key]["seconds"] / sec / world, 3)
            if main:
                print(json.dumps(rec), flush=True)
            records.append(rec)
            del inputs, out
            torch.cuda.empty_cache()
    if world == 1 and args.ref:
        torch.save(refs, args.ref)
    if context is not None:
        distributed.shutdown()
    return records if main else []
