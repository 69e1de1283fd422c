"""What the benchmark scripts share: the full-size configuration, FLOP counts, random models and
inputs, CUDA timing and the environment record.

Imported by ``scripts/benchmark.py`` and by the ``bench_*`` modules it runs (never the other way:
they do not import ``benchmark.py``, which is the command line).
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMM_TFLOPS = 750.0  # measured bf16 GEMM rate on the H200
ATTN_TFLOPS = 570.0  # measured cuDNN SDPA rate on the H200
VIDEO_FPS = 25.0
NEW_FRAMES_PER_CHUNK = 72  # 81-frame chunks, 9 context frames

BUCKETS = {"480p": (640, 640), "720p": (960, 960)}

FULL_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
    text_len=512, audio_window=5, audio_feature_dim=12 * 768, audio_intermediate_dim=512, audio_output_dim=768,
    audio_context_tokens=32, vae_scale=4,
)


def forward_flops(cfg: dict, height: int, width: int, frames: int = 81, speakers: int = 1) -> dict:
    """FLOPs of one DiT forward (multiply-add = 2 FLOPs), split into linear and attention."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n_t = (frames - 1) // 4 + 1
    tokens_per_frame = (height // 16) * (width // 16)
    length = n_t * tokens_per_frame
    layers, ffn = cfg["num_layers"], cfg["ffn_dim"]
    ctx = 512 + 257
    audio_tokens = cfg["audio_context_tokens"] * speakers
    per_token_params = 4 * d * d + 2 * d * d + 2 * d * ffn + 2 * d * d  # self qkvo, cross q/o, ffn, audio q/o
    linear = 2 * length * per_token_params * layers
    linear += 2 * ctx * 2 * d * d * layers  # text + image k/v
    linear += 2 * n_t * audio_tokens * cfg["audio_output_dim"] * 2 * d * layers  # audio k/v
    attn = 4 * length * length * d * layers + 4 * length * (ctx + audio_tokens) * d * layers
    floor = linear / (GEMM_TFLOPS * 1e12) + attn / (ATTN_TFLOPS * 1e12)
    return dict(tokens=length, linear_flops=linear, attention_flops=attn, total_flops=linear + attn,
                floor_seconds=floor)


def env_record() -> dict:
    """Hardware and library versions, the first fields of every JSON record."""
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return dict(
        gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
        transformers=transformers.__version__, python=platform.python_version(),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    )


def build_random_model(cfg: dict, device="cuda", dtype=torch.bfloat16, num_layers: int | None = None):
    from infinitetalk.models import InfiniteTalkTransformer3DModel

    cfg = dict(cfg)
    if num_layers is not None:
        cfg["num_layers"] = num_layers
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InfiniteTalkTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    keep = tuple(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    # RoPE tables were built in the default dtype; rebuild them in float64 like the real model.
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    model.rope = WanRotaryPosEmbed(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"]).to(device)
    return model.eval().requires_grad_(False)


def forward_inputs(cfg, height, width, speakers, device="cuda", dtype=torch.bfloat16, frames=81, batch=1):
    """Random inputs of one forward; with ``batch`` > 1 the batch-1 inputs are repeated, so every
    element's output can be compared with the batch-1 output."""
    g = torch.Generator(device=device).manual_seed(0)
    n_t = (frames - 1) // 4 + 1
    lat = torch.randn(1, cfg["in_channels"], n_t, height // 8, width // 8, device=device, dtype=dtype, generator=g)
    t = torch.full((1,), 500.0, device=device)
    text = torch.randn(1, 512, cfg["text_dim"], device=device, dtype=dtype, generator=g)
    clip = torch.randn(1, 257, cfg["image_dim"], device=device, dtype=dtype, generator=g)
    audio = torch.randn(1, speakers, frames, 5, 12, 768, device=device, dtype=dtype, generator=g)
    lat, t, text, clip, audio = (x.repeat(batch, *([1] * (x.dim() - 1))) for x in (lat, t, text, clip, audio))
    masks = None
    if speakers == 2:
        masks = torch.zeros(3, height // 8, width // 8, device=device)
        masks[0, :, : width // 16] = 1
        masks[1, :, width // 16 :] = 1
        masks[2, : height // 32] = 1
    return (lat, t, text, clip, audio), masks


def time_cuda(fn, warmup=1, repeats=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def write_random_turbo_lora(path: Path, num_layers: int | None = None, rank: int = 64, seed: int = 0) -> Path:
    """A turbo LoRA file with the key set of the real lightx2v file (``make_tiny_weights``' list) at the
    full model's sizes, random bf16 values small enough that the model stays finite. The benchmarks
    load it as the servers do (``TurboLoRA.load``), so turbo is measured with the LoRA in place."""
    from safetensors.torch import save_file

    from make_tiny_weights import TinySpec, turbo_lora_shapes

    cfg = FULL_CONFIG
    spec = TinySpec(num_attention_heads=cfg["num_attention_heads"], attention_head_dim=cfg["attention_head_dim"],
                    ffn_dim=cfg["ffn_dim"], num_layers=num_layers or cfg["num_layers"], t5_d_model=cfg["text_dim"],
                    clip_hidden=cfg["image_dim"], freq_dim=cfg["freq_dim"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in turbo_lora_shapes(spec, rank).items():
        scale = 0.02 if key.endswith((".lora_down.weight", ".lora_up.weight")) else 1e-3
        tensors[key] = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


#: Kernel name fragments -> the part of a forward they do (first match wins; lower case).
KERNEL_KINDS = (
    ("attention, 8-bit (SageAttention)", ("qk_int8_sv_f8", "qk_int_sv_f8")),
    ("attention, 8-bit quantisation", ("quantint8", "submean", "transposepadpermute", "meanscale",
                                       "per_thread_int8", "per_warp_int8", "per_block_int8")),
    ("attention, bf16", ("cudnn", "fmha", "flash", "sdpa", "attention")),
    ("GEMM", ("gemm", "xmma", "nvjet", "cutlass", "scaled_mm", "f8f8bf16", "cublas", "wgmma")),
    ("fused elementwise (compiled)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    """Which part of a forward a GPU kernel of this name does (``KERNEL_KINDS``), else ``other``."""
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def kernel_profile(fn, top: int = 15) -> dict:
    """One call of ``fn`` under torch.profiler: GPU milliseconds per kind of kernel (``KERNEL_KINDS``),
    the ``top`` kernels by GPU time, and the total (the sum of kernel times; gaps between kernels are
    not in it)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.name, [0.0, 0])
        entry[0] += event.device_time_total / 1e3  # microseconds -> ms
        entry[1] += 1
    kinds: dict[str, float] = {}
    for name, (ms, _count) in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    return dict(
        total_kernel_ms=round(sum(ms for ms, _ in kernels.values()), 1),
        by_kind_ms={k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda item: -item[1])},
        top_kernels=[dict(name=name[:160], ms=round(ms, 2), calls=count) for name, (ms, count) in ranked],
    )
