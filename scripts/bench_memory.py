"""Memory-mode and cold-start benchmarks (used by ``scripts/benchmark.py memory|setup``).

memory: peak GPU memory and time per forward of the full 14B transformer in the ``offload``
memory mode (blocks streamed from pinned CPU memory on a side stream) at 480p and 720p, and the
peak of an 81-frame VAE decode (the other big allocation of a chunk).

setup: cold start from the prepared format.  A fraction of the transformer's blocks (disk on the
GPU box is 64 GB) is written with :func:`infinitetalk.weights.save_prepared` (bf16 safetensors
shards) and loaded straight to the GPU with :func:`load_transformer`; UMT5-XXL is written and loaded
whole.  The transformer time is extrapolated to 40 blocks by bytes.  Raw disk throughput is measured
with O_DIRECT reads so page-cache hits do not flatter the result.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import time
from functools import partial
from pathlib import Path

import torch

from bench_common import BUCKETS, FULL_CONFIG, build_random_model, env_record, forward_flops, forward_inputs, time_cuda


def bench_memory(args) -> list[dict]:
    from infinitetalk.pipeline import apply_memory_mode

    env = env_record()
    records = []
    model = build_random_model(FULL_CONFIG)
    apply_memory_mode(model, "offload", torch.device("cuda"), torch.bfloat16)
    gc.collect()
    torch.cuda.empty_cache()
    for res in args.resolutions:
        h, w = BUCKETS[res]
        inputs, masks = forward_inputs(model.config, h, w, 1)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            sec = time_cuda(partial(model, *inputs, return_dict=False), args.warmup, args.repeats)
        floor = forward_flops(FULL_CONFIG, h, w)["floor_seconds"]
        rec = dict(env, mode="memory-offload", resolution=res, width=w, height=h, speakers=1,
                   seconds_per_forward=round(sec, 3), floor_seconds_per_forward=round(floor, 3),
                   peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                   resident_memory_gb=round(torch.cuda.memory_allocated() / 1e9, 2))
        print(rec, flush=True)
        records.append(rec)
        del inputs
    del model
    gc.collect()
    torch.cuda.empty_cache()
    records += _vae_peaks(args.resolutions)
    return records


@torch.no_grad()
def _vae_peaks(resolutions) -> list[dict]:
    from diffusers import AutoencoderKLWan

    from infinitetalk.conditioning import vae_decode, vae_encode

    out = []
    vae = AutoencoderKLWan().to("cuda").eval()
    for res in resolutions:
        h, w = BUCKETS[res]
        for tiled in (False, True):
            if tiled:
                vae.enable_tiling()
            else:
                vae.disable_tiling()
            z = torch.randn(1, 16, 21, h // 8, w // 8, device="cuda")
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            video = vae_decode(vae, z)
            torch.cuda.synchronize()
            dec = time.perf_counter() - t0
            dec_peak = torch.cuda.max_memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            vae_encode(vae, video)
            torch.cuda.synchronize()
            enc = time.perf_counter() - t0
            enc_peak = torch.cuda.max_memory_allocated() - base
            rec = dict(mode="vae-memory", resolution=res, tiled=tiled, decode_seconds=round(dec, 2),
                       decode_peak_gb=round(dec_peak / 1e9, 2), encode_81_seconds=round(enc, 2),
                       encode_81_peak_gb=round(enc_peak / 1e9, 2))
            print(rec, flush=True)
            out.append(rec)
            del video, z
            torch.cuda.empty_cache()
    return out


def _disk_read_gbps(path: Path) -> float | None:
    """Raw sequential read throughput with O_DIRECT (bypasses the page cache)."""
    try:
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M", "iflag=direct"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return path.stat().st_size / (time.perf_counter() - t0) / 1e9
    except Exception:  # noqa: BLE001
        return None


def bench_setup(args) -> list[dict]:
    from transformers import UMT5Config, UMT5EncoderModel

    from infinitetalk.weights import load_transformer, save_prepared

    env = env_record()
    layers = args.layers or 10
    root = Path(args.scratch)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model = build_random_model(FULL_CONFIG, num_layers=layers)
    t0 = time.perf_counter()
    save_prepared(model, root / "transformer", dtype=torch.bfloat16, max_shard_gb=5.0)
    write_s = time.perf_counter() - t0
    part_bytes = sum(f.stat().st_size for f in (root / "transformer").glob("*.safetensors"))
    per_block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    full_bytes = part_bytes + (FULL_CONFIG["num_layers"] - layers) * per_block
    del model
    gc.collect()
    torch.cuda.empty_cache()
    shards = sorted((root / "transformer").glob("*.safetensors"))
    disk = _disk_read_gbps(shards[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loaded = load_transformer(root / "transformer", None, device="cuda", dtype=None)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    assert loaded.config.num_layers == layers
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    rate = part_bytes / load_s
    # UMT5-XXL encoder, bf16, written and loaded whole.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu"))
    torch.set_default_dtype(prev)
    t5.save_pretrained(root / "text_encoder", max_shard_size="5GB")
    t5_bytes = sum(f.stat().st_size for f in (root / "text_encoder").glob("*.safetensors"))
    del t5
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    t5 = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    t5_s = time.perf_counter() - t0
    del t5
    rec = dict(
        env, mode="setup", layers_written=layers, transformer_part_gb=round(part_bytes / 1e9, 2),
        transformer_full_gb=round(full_bytes / 1e9, 2), write_seconds=round(write_s, 1),
        transformer_part_load_seconds=round(load_s, 2), load_rate_gbps=round(rate / 1e9, 2),
        transformer_full_load_seconds_extrapolated=round(full_bytes / rate, 1),
        raw_disk_read_gbps_odirect=None if disk is None else round(disk, 2),
        transformer_full_disk_bound_seconds=None if not disk else round(full_bytes / 1e9 / disk, 1),
        t5_gb=round(t5_bytes / 1e9, 2), t5_load_seconds=round(t5_s, 2),
    )
    cold = max(rec["transformer_full_load_seconds_extrapolated"], rec["transformer_full_disk_bound_seconds"] or 0)
    t5_cold = max(t5_s, (t5_bytes / 1e9 / disk) if disk else 0)
    rec["setup_480p_estimate_seconds"] = round(cold + t5_cold + 3.0, 1)  # + VAE, CLIP, wav2vec2 (~2 GB)
    print(rec, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return [rec]
