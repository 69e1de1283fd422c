"""VAE layouts on the GPU (``scripts/benchmark.py vae``): the full-size Wan VAE (fp32, random
weights) decoding one chunk's 21 latent frames and encoding one 81-frame clip, per memory layout
and cuDNN autotuning setting. Outputs are compared with the default layout (rel-L2), so a layout
is only adopted when it gives the same frames.

Variants:
* ``contiguous``: NCDHW tensors, the diffusers default;
* ``channels_last``: ``conditioning.vae_channels_last`` (what the pipeline does on CUDA);
* ``channels_last_io``: the same, but every convolution's output goes back to NCDHW (the other
  ops then see the default layout);
* ``+benchmark`` on any of them: ``torch.backends.cudnn.benchmark = True`` (autotuned algorithms).
"""

from __future__ import annotations

import json

import torch

from bench_common import BUCKETS, env_record, time_cuda

VARIANTS = ("contiguous", "contiguous+benchmark", "channels_last", "channels_last+benchmark", "channels_last_io")


def _vae(state, layout: str):
    from diffusers import AutoencoderKLWan

    from infinitetalk.conditioning import vae_channels_last

    vae = AutoencoderKLWan().to("cuda", torch.float32).eval()
    vae.load_state_dict(state)
    if layout.startswith("channels_last"):
        vae_channels_last(vae)
    if layout == "channels_last_io":
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.register_forward_hook(lambda mod, args, out: out.contiguous())
    return vae


def bench_vae(args) -> list[dict]:
    from diffusers import AutoencoderKLWan

    from infinitetalk.conditioning import vae_decode, vae_encode

    env = env_record()
    env["cudnn"] = torch.backends.cudnn.version()
    torch.backends.cuda.matmul.allow_tf32 = False  # as served (the pipeline leaves torch's default)
    torch.manual_seed(0)
    state = {k: v.cpu() for k, v in AutoencoderKLWan().state_dict().items()}
    variants = list(VARIANTS) if args.variants == ["eager"] else args.variants
    records, refs = [], {}
    for res in args.resolutions:
        h, w = BUCKETS[res]
        gen = torch.Generator("cuda").manual_seed(1)
        latents = torch.randn(1, 16, 21, h // 8, w // 8, device="cuda", generator=gen)
        clip = torch.rand(1, 3, 81, h, w, device="cuda", generator=gen) * 2 - 1
        for variant in variants:
            layout, _, bench = variant.partition("+")
            torch.backends.cudnn.benchmark = bench == "benchmark"
            vae = _vae(state, layout)
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                dec_s = time_cuda(lambda v=vae: vae_decode(v, latents), args.warmup, args.repeats)
                enc_s = time_cuda(lambda v=vae: vae_encode(v, clip), args.warmup, args.repeats)
                dec, enc = vae_decode(vae, latents).float(), vae_encode(vae, clip).float()
            rec = dict(env, mode="vae", variant=variant, resolution=res, width=w, height=h, dtype="float32",
                       decode_frames=81, decode_seconds=round(dec_s, 3), encode_frames=81,
                       encode_seconds=round(enc_s, 3), peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))
            if (res, "dec") in refs:
                for key, out in (("dec", dec), ("enc", enc)):
                    ref = refs[(res, key)]
                    rec[f"rel_l2_{key}_vs_contiguous"] = round(((out - ref).norm() / ref.norm()).item(), 6)
            else:
                refs[(res, "dec")], refs[(res, "enc")] = dec, enc
            print(json.dumps(rec), flush=True)
            records.append(rec)
            del vae
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    return records
