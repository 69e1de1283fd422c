"""Served benchmark: the path users are served, measured end to end (``scripts/benchmark.py served``).

Nothing here replaces a part of the server. The full-size random model is supplied where a real
install supplies it, as files: :func:`write_full_weights` writes the whole 480p model (prepared
transformer, UMT5-XXL, CLIP ViT-H/14, Wan VAE, wav2vec2-base, the multi-speaker audio weights, the
turbo LoRA) in the layout of ``weights/README.md``, with random values. Then, per server
configuration, a fresh process does what Cog does: ``Predictor().setup()`` with the server's
default settings (plus the configuration's ``INFINITETALK_*`` variables), then ``Predictor.run()``
for each prediction, with real H.264/AAC encoding by ffmpeg. The parent times that process from
its start to the end of ``setup()`` (imports, CUDA init, loading, warm-up compile): the cold-start
record. The child only observes: it wraps ``pipe.generate`` to read the result's per-chunk timings
and, for one prediction, records a CUDA trace (torch.profiler) to measure how long the GPU sat idle
per chunk.

Records: the fields the issue names (``path: "served"``, ``mode``, ``lora``, ``encoder``,
``seconds_per_chunk``, ``gpu_seconds_per_video_second``, ``first_prediction_seconds``,
``recompiles``, ``gpu_idle_fraction``, ``peak_memory_gb``, ``measured``) plus what they are made of.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FPS = 25.0
NEW_FRAMES_PER_CHUNK = 72  # 81-frame chunks after the first, 9 context frames

# ---------------------------------------------------------------------------------------------- weights


def write_full_weights(root: Path, log=print) -> dict:
    """The whole 480p model at full size with random values, in the real layout. Starts from the
    tiny folder of ``make_tiny_weights.py`` (tokenizer, processor and scheduler configs, the layout)
    and replaces every model by its full-size random twin, built on the GPU."""
    import gc

    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2Model,
    )

    sys.path.insert(0, str(HERE))
    import make_tiny_weights as mtw
    from bench_common import FULL_CONFIG, build_random_model, write_random_turbo_lora
    from infinitetalk.download import PREPARED_DIR, TURBO_DIR, TURBO_FILE
    from infinitetalk.weights import save_prepared

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    mtw.make_tiny_weights(root, with_tts=False)  # the text-to-speech weights need kokoro, not carried here
    base = root / mtw.WAN_DIR
    shutil.rmtree(base / "transformer")  # the prepared copy replaces the base transformer + single file
    (root / mtw.INFINITETALK_DIR / "single" / mtw.INFINITETALK_FILE).unlink()
    torch.manual_seed(0)
    model = build_random_model(FULL_CONFIG)
    save_prepared(model, root / PREPARED_DIR)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    log(f"weights: transformer written ({time.perf_counter() - t0:.0f}s)")

    def replace(folder: Path, make, dtype) -> None:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cuda"):
                module = make()
        finally:
            torch.set_default_dtype(prev)
        keep = [p for p in folder.iterdir() if p.name in ("preprocessor_config.json",)]
        saved = {p.name: p.read_bytes() for p in keep}
        shutil.rmtree(folder)
        module.save_pretrained(folder, max_shard_size="5GB")
        for name, data in saved.items():
            (folder / name).write_bytes(data)
        del module
        torch.cuda.empty_cache()

    replace(base / "text_encoder", lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu")), torch.bfloat16)
    replace(base / "image_encoder", lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu")), torch.bfloat16)
    replace(base / "vae", AutoencoderKLWan, torch.float32)
    replace(root / mtw.WAV2VEC_DIR, lambda: Wav2Vec2Model(Wav2Vec2Config()), torch.float32)
    log(f"weights: encoders and VAE written ({time.perf_counter() - t0:.0f}s)")
    # The multi-speaker audio weights at full size (bf16: the real file is fp32, 9.7 GB; bf16 halves the
    # disk it takes here and the first two-speaker request's load).
    spec = mtw.TinySpec(num_attention_heads=FULL_CONFIG["num_attention_heads"],
                        attention_head_dim=FULL_CONFIG["attention_head_dim"], ffn_dim=FULL_CONFIG["ffn_dim"],
                        num_layers=FULL_CONFIG["num_layers"], t5_d_model=FULL_CONFIG["text_dim"],
                        clip_hidden=FULL_CONFIG["image_dim"], freq_dim=FULL_CONFIG["freq_dim"], w2v_hidden=768,
                        w2v_layers=12, audio_intermediate_dim=FULL_CONFIG["audio_intermediate_dim"],
                        audio_output_dim=FULL_CONFIG["audio_output_dim"])
    gen = torch.Generator("cuda").manual_seed(1)
    multi = {key: mtw._random_tensor(key, shape, gen).to(torch.bfloat16).cpu()
             for key, shape in mtw.infinitetalk_shapes(spec).items()}
    save_file(multi, str(root / mtw.INFINITETALK_DIR / "multi" / mtw.INFINITETALK_FILE), metadata={"format": "pt"})
    del multi
    write_random_turbo_lora(root / TURBO_DIR / TURBO_FILE)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    log(f"weights: {size / 1e9:.1f} GB written in {time.perf_counter() - t0:.0f}s")
    return {"weights_gb": round(size / 1e9, 2), "write_seconds": round(time.perf_counter() - t0, 1)}


def drop_page_cache(root: Path) -> str:
    """Evict the weights from the page cache: the kernel's drop_caches when allowed (root, a writable
    /proc/sys), else ``posix_fadvise(DONTNEED)`` per file (works for any clean file on a disk). Returns
    ``cold`` when one of them ran, else ``warm``."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "cold"
    except OSError:
        pass
    dropped = False
    for f in root.rglob("*"):
        if f.is_file():
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    dropped = True
                finally:
                    os.close(fd)
            except OSError:
                pass
    return "cold" if dropped else "warm"


def warm_page_cache(root: Path) -> str:
    """Read every file under ``root`` once, so the page cache holds the weights (if memory allows)."""
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass
    return "warm"


def _page_cache(weights: Path, policy: str) -> str:
    """The first server's page cache: ``warm`` (every file read once, as on a warm restart), ``written``
    (as this command just wrote them: in the page cache, not re-read; recorded as warm) or ``cold``."""
    if policy == "warm":
        return warm_page_cache(weights)
    if policy == "written":
        return "warm"
    return drop_page_cache(weights)


def cached_fraction(root: Path) -> float | None:
    """Share of the weights' pages in the page cache (mincore through ``fincore`` when installed)."""
    if shutil.which("fincore") is None:
        return None
    files = [str(f) for f in root.rglob("*.safetensors")]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *files],
                             capture_output=True, text=True, timeout=60).stdout
        res = size = 0
        for line in out.splitlines():
            r, s = line.split()[:2]
            res, size = res + int(r), size + int(s)
        return round(res / size, 3) if size else None
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------- plans

#: Server configurations: extra INFINITETALK_* variables (the rest are the servers' defaults).
SERVERS = {
    "switchable": {},  # the default server: exact and turbo (the LoRA merged for turbo on one GPU)
    "fused": {"INFINITETALK_FUSE_TURBO": "1"},
    "fp8": {"INFINITETALK_MEMORY_MODE": "fp8"},
    # the default server without the setup warm-up: its first request compiles (chunk 1); later chunks are as served
    "switchable-nowarm": {"INFINITETALK_WARMUP": "off"},
    # the fast option's graphs and FP8 copy made in setup (issue 15): setup's cost, and no compile in a fast request
    "switchable-fastwarm": {"INFINITETALK_WARMUP_FAST": "1"},
}

#: The text inputs' scripts: about 6 s of speech each with Kokoro's real voices (2 chunks).
TEXT = "Hello! This is a talking video made from text. The voice, the lips and the face are all generated."
DIALOGUE = "(s1) Good morning! Did you sleep well? (s2) Very well, thank you. And you? (s1) Not at all, sadly."

#: Predictions: (record mode, audio seconds, speakers, run() inputs); ``seq-*`` are the short predictions of
#: the compile sequence (their exact mode runs 2 steps: the graphs are the same, the time is not the mode's).
#: 6.0 s of audio = 2 chunks (81 + 72 frames); 2.0 s = 1 chunk.
PREDICTIONS = {
    "turbo": ("turbo", 6.0, 1, {"turbo": True}),
    "turbo-idle": ("turbo", 6.0, 1, {"turbo": True}),  # under torch.profiler: GPU idle per chunk
    "turbo-1nfe": ("turbo-1nfe", 6.0, 1, {"turbo": True, "audio_guidance": 1.0}),
    "turbo-2spk": ("turbo", 6.0, 2, {"turbo": True}),
    "exact": ("exact", 2.0, 1, {}),
    "turbo-720p": ("turbo", 6.0, 1, {"turbo": True, "resolution": "720p"}),
    "turbo-832x480": ("turbo", 6.0, 1, {"turbo": True, "width": 832, "height": 480}),  # Wan's own 480p size
    # issue 15: the fast option (FP8 GEMMs + 8-bit self-attention) on the default server, after its bf16 twin
    "fast-turbo": ("fast-turbo", 6.0, 1, {"turbo": True, "fast": True}),
    "fast-turbo-1nfe": ("fast-turbo-1nfe", 6.0, 1, {"turbo": True, "audio_guidance": 1.0, "fast": True}),
    "fast-turbo-720p": ("fast-turbo", 6.0, 1, {"turbo": True, "resolution": "720p", "fast": True}),
    "fp8-turbo": ("fp8-turbo", 6.0, 1, {"turbo": True}),
    "smoke-turbo": ("turbo", 6.0, 1, {"turbo": True, "width": 64, "height": 64, "steps": 1}),
    "smoke-turbo-preview": ("turbo", 6.0, 1, {"turbo": True, "width": 64, "height": 64, "steps": 1, "preview": True}),
    "turbo-preview": ("turbo", 6.0, 1, {"turbo": True, "preview": True}),  # after "turbo": the preview record
    "smoke-exact-2spk": ("exact", 2.0, 2, {"width": 64, "height": 64, "steps": 1}),
    # the sequence: short predictions across buckets, speakers and modes
    "seq-exact-640": ("exact", 2.0, 1, {"steps": 2}),
    "seq-turbo-640": ("turbo", 2.0, 1, {"turbo": True}),
    "seq-turbo-832x480": ("turbo", 2.0, 1, {"turbo": True, "width": 832, "height": 480}),
    "seq-exact-832x480": ("exact", 2.0, 1, {"steps": 2, "width": 832, "height": 480}),
    "seq-turbo-480x832": ("turbo", 2.0, 1, {"turbo": True, "width": 480, "height": 832}),
    "seq-turbo-2spk-640": ("turbo", 2.0, 2, {"turbo": True}),
    "seq-exact-2spk-640": ("exact", 2.0, 2, {"steps": 2}),
    # text input (issue 16): no audio file, the speech is synthesised in the prediction (timings["speech"])
    "turbo-text": ("turbo", 0.0, 1, {"turbo": True, "text": TEXT}),
    "turbo-text-2spk": ("turbo", 0.0, 2, {"turbo": True, "text": DIALOGUE}),
    "smoke-text-2spk": ("turbo", 0.0, 2, {"turbo": True, "text": DIALOGUE, "width": 64, "height": 64, "steps": 1}),
}

#: Predictions whose video is kept for a fast twin's frame comparison (``fast-<name>``).
_BASELINES = {"turbo", "turbo-1nfe", "turbo-720p"}

PLANS = {
    # call 1: cold start, turbo as served (profiled), the sequence, two speakers, one forward per step
    "main": [("switchable", ["turbo", "seq-exact-640", "seq-turbo-832x480", "seq-exact-832x480",
                          "seq-turbo-480x832", "turbo-2spk", "seq-turbo-640", "turbo-1nfe"])],
    # call 2: one whole exact chunk (40 steps x 3 forwards), then the fused server
    "exact": [("switchable", ["exact"]), ("fused", ["turbo"])],
    # what the 2026-12-03 session's device time did not reach: the fused server first (its setup is the
    # cold-page-cache one), then an adapter server (a warm-cache setup) for two speakers, one forward
    # per step and the sixth prediction of the sequence
    "rest": [("fused", ["turbo"]), ("switchable", ["turbo-2spk", "turbo-1nfe", "seq-turbo-640"])],
    # fp8 and 720p
    "fp8": [("fp8", ["fp8-turbo"]), ("switchable", ["turbo-720p"])],
    # 2026-12-03, later session (page cache warm, --page-cache warm). The whole compile sequence on one
    # server (both buckets, one and two speakers, both modes), then a second server's setup (warm compile cache)
    "seq": [("switchable", ["seq-exact-640", "seq-turbo-640", "seq-turbo-832x480", "seq-exact-832x480",
                         "seq-turbo-2spk-640", "seq-exact-2spk-640", "seq-turbo-480x832"]), ("switchable", [])],
    # turbo as served (adapter, unprofiled; one forward per step), the fused server, then an adapter
    # server's setup with the compile cache the first one wrote
    "final": [("switchable", ["turbo", "turbo-1nfe"]), ("fused", ["turbo"]), ("switchable", [])],
    # the switchable server with turbo merged: turbo, the switches to exact and back, two speakers over two chunks
    "merged": [("switchable", ["turbo", "seq-exact-640", "seq-turbo-640", "turbo-2spk"])],
    # the least device time that measures the merged default's steady turbo chunk (chunk 2 of 2)
    "merged-quick": [("switchable-nowarm", ["turbo"])],
    # the merged default as served after the launch-order changes: turbo at both 480p shapes, previews (issue 14),
    # one forward per step, the switches to exact and back
    "served": [("switchable", ["turbo", "turbo-832x480", "turbo-preview", "turbo-1nfe", "seq-exact-640",
                               "seq-turbo-640"])],
    # issue 15: fast as served, each after its bf16 twin (the decoded frames compared), then 720p
    "fast": [("switchable", ["turbo-1nfe", "fast-turbo-1nfe", "turbo", "fast-turbo", "fast-turbo-720p"])],
    "fast-warm": [("switchable-fastwarm", ["fast-turbo"])],
    # CPU dry run of the whole flow with tiny weights at 64x64 (BENCH_SMOKE=1; tests/test_bench_served.py)
    "smoke": [("switchable", ["smoke-turbo", "smoke-exact-2spk", "smoke-turbo-preview", "smoke-text-2spk"])],
    # issue 14: time to the first preview and the cost of previews, turbo 480p as served
    "preview": [("switchable", ["turbo", "turbo-preview"])],
    # issue 16: text input as served (synthesis in the prediction; the tiny folder's Kokoro has the real decoder widths)
    "text": [("switchable", ["turbo", "turbo-text", "turbo-text-2spk"])],
}

# ---------------------------------------------------------------------------------------------- parent


def bench_served(args) -> list[dict]:
    from bench_common import env_record

    smoke = os.environ.get("BENCH_SMOKE") == "1"
    env = env_record()
    scratch = Path(args.scratch)
    weights = scratch / "weights"
    inputs = scratch / "inputs"
    records: list[dict] = []
    setup_info: dict = {}
    marker = weights / ".complete.json"
    if marker.is_file():
        setup_info = json.loads(marker.read_text())
        print(f"weights: reusing {weights} ({setup_info.get('weights_gb')} GB)", flush=True)
    else:
        if smoke:
            shutil.rmtree(weights, ignore_errors=True)
            sys.path.insert(0, str(HERE))
            import make_tiny_weights as mtw

            mtw.make_tiny_weights(weights)
            mtw.write_turbo_lora(weights)
            size = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
            setup_info = {"weights_gb": round(size / 1e9, 3), "write_seconds": 0.0}
        else:
            setup_info = write_full_weights(weights)
        marker.write_text(json.dumps(setup_info))
    inputs.mkdir(parents=True, exist_ok=True)
    first_server = True
    command = (f"python scripts/benchmark.py served --plan {args.plan} --scratch {args.scratch}"
               + (f" --page-cache {args.page_cache}" if args.page_cache != "cold" else ""))
    for server, names in PLANS[args.plan]:
        page_cache = _page_cache(weights, args.page_cache) if first_server else "warm"
        cached = cached_fraction(weights)
        out = scratch / f"{server}-{int(time.time())}.jsonl"
        child_env = dict(os.environ, INFINITETALK_WEIGHTS=str(weights), PYTHONUNBUFFERED="1", **SERVERS[server])
        if smoke:
            child_env.update(INFINITETALK_COMPILE="0")
        cmd = [sys.executable, str(Path(__file__)), "child", "--out", str(out), "--inputs", str(inputs),
               "--predictions", ",".join(names)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=child_env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        setup_seconds = None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("SERVED-READY") and setup_seconds is None:
                setup_seconds = time.perf_counter() - t0
                ready = json.loads(line.split(" ", 1)[1])
                rec = dict(env, path="served", kind="setup", server=server, setup_seconds=round(setup_seconds, 1),
                           weights_gb=setup_info.get("weights_gb"), page_cache=page_cache,
                           page_cache_resident_before=cached, weights_write_seconds=setup_info.get("write_seconds"),
                           **ready, measured=True, command=command,
                           note="process start to the end of Predictor.setup(): interpreter, imports, CUDA "
                                "init, loading every model, warm-up compile and runs")
                records.append(rec)
                print("RECORD " + json.dumps(rec), flush=True)
            elif line.startswith("SERVED-RECORD "):
                rec = dict(env, **json.loads(line.split(" ", 1)[1]), command=command)
                records.append(rec)
            if args.json:  # written as they come: a command cut short keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(records, indent=1))
        proc.wait()
        if proc.returncode:
            print(f"server {server}: child exited with {proc.returncode}", flush=True)
        first_server = False
    return records


# ---------------------------------------------------------------------------------------------- child


def _make_inputs(folder: Path, seconds: float, speakers: int) -> dict:
    """A portrait (square: the 480p bucket 640x640) and speech of ``seconds`` per speaker."""
    folder.mkdir(parents=True, exist_ok=True)
    portrait = folder / "portrait.png"
    if not portrait.exists():
        subprocess.run([sys.executable, str(HERE / "make_sample_inputs.py"), str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
    out = {"image": portrait}
    for k in range(speakers):
        wav = folder / f"speech-{seconds:g}s-{k}.wav"
        if not wav.exists():
            tmp = folder / f"tmp-{k}"
            subprocess.run([sys.executable, str(HERE / "make_sample_inputs.py"), str(tmp), "--seconds", str(seconds)],
                           check=True, stdout=subprocess.DEVNULL)
            (tmp / "speech.wav").rename(wav)
            shutil.rmtree(tmp, ignore_errors=True)
        out["audio" if k == 0 else "audio_2"] = wav
    return out


def _idle_per_chunk(trace_path: Path, marks: list[str]) -> list[float]:
    """GPU idle share of each chunk after the first, from a chrome trace: the chunk spans two
    ``chunk-done`` marks; busy = the union of kernel, memcpy and memset intervals inside it."""
    trace = json.loads(trace_path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    done = sorted(e["ts"] for e in events if e.get("name") in marks and "ts" in e)
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e)
    shares = []
    for start, end in zip(done, done[1:]):
        busy, cursor = 0.0, start
        for s, e in gpu:
            if e <= cursor or s >= end:
                continue
            s, e = max(s, cursor), min(e, end)
            busy += e - s
            cursor = e
        shares.append(round(1 - busy / (end - start), 4))
    return shares


def _fast_fields(name: str, fast: bool, video: Path, pipe, keep: Path) -> dict:
    """Issue 15: a fast prediction's switch time and its decoded frames against its bf16 twin's (same seed,
    same server, run just before: ``fast-<twin>``); a twin's video is kept here for that, since the
    predictor removes each output at the next prediction."""
    if name in _BASELINES:
        shutil.copyfile(video, keep / f"{name}.mp4")
    if not fast:
        return {}
    twin = keep / f"{name.removeprefix('fast-')}.mp4"
    return {"fast_switch_seconds": round(pipe.fast.last_switch_seconds, 2) if pipe.fast is not None else None,
            "frames_rel_l2_vs_bf16": _frames_rel_l2(video, twin) if twin.is_file() else None}


def _frames_rel_l2(path: Path, reference: Path) -> float:
    """Relative L2 distance of two videos' decoded RGB frames (both through the served H.264 encode)."""
    import numpy as np

    def frames(p: Path):
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(p), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                             capture_output=True, check=True).stdout
        return np.frombuffer(raw, dtype=np.uint8).astype(np.float64)

    a, b = frames(path), frames(reference)
    if a.shape != b.shape:
        raise RuntimeError(f"{path.name} and {reference.name} differ in size: {a.shape} vs {b.shape}")
    return round(float(np.linalg.norm(a - b) / np.linalg.norm(b)), 5)


def _ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                          "stream=codec_name,codec_type,width,height,nb_frames,sample_rate,channels:format=duration",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    streams = {s["codec_type"]: s for s in info.get("streams", [])}
    v, a = streams.get("video", {}), streams.get("audio", {})
    return {"video_codec": v.get("codec_name"), "audio_codec": a.get("codec_name"),
            "frames": int(v.get("nb_frames", 0)), "width": v.get("width"), "height": v.get("height"),
            "duration": float(info["format"]["duration"])}


def _observe(pipe) -> list:
    """Wrap ``pipe.generate`` to keep each result (its per-chunk timings) and to mark each chunk's end
    in a profiler trace; the pipeline itself is untouched. Returns the list the results go to."""
    import torch

    results = []
    real_generate = pipe.generate

    def observed_generate(request, output_path, callback=None, show_progress=True, **kwargs):
        last = []

        def marked(event):
            if callback is not None:
                callback(event)
            # The pipeline reports a chunk's last step again once the chunk is written: the chunk's end.
            done = last == [(event.chunk, event.step)]
            last[:] = [(event.chunk, event.step)]
            with torch.profiler.record_function(f"served-chunk-done-{event.chunk}" if done else "served-step"):
                pass

        result = real_generate(request, output_path, callback=marked, show_progress=show_progress, **kwargs)
        results.append(result)
        return result

    pipe.generate = observed_generate
    return results


def _timed_run(predictor, kwargs: dict, trace: Path | None):
    """``predictor.run(**kwargs)`` run to its end: (the video: the output's last file, its wall seconds,
    the seconds at which each output file came). With ``trace``, under torch.profiler (CPU and CUDA
    activity) whose chrome trace is written there."""
    import contextlib

    import torch
    from torch.profiler import ProfilerActivity

    profiler = (torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if trace
                else contextlib.nullcontext())
    t0 = time.perf_counter()
    arrivals, path = [], None
    with profiler as prof:
        for path in predictor.run(**kwargs):
            arrivals.append(round(time.perf_counter() - t0, 2))
    seconds = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(str(trace))
    return path, seconds, arrivals


def _preview_record(name: str, arrivals: list[float], seconds: float, baseline: float | None, result) -> None:
    """The issue's preview record: time from the request to the first playable preview, and the whole
    prediction's time against the same prediction without previews (run just before, same server)."""
    rec = {"path": "served", "kind": "preview", "name": name, "width": result.width, "height": result.height,
           "num_chunks": result.num_chunks, "previews": len(arrivals) - 1, "output_arrivals": arrivals,
           "seconds_to_first_preview": arrivals[0] if len(arrivals) > 1 else None,
           "prediction_seconds": round(seconds, 2), "baseline_seconds": round(baseline, 2) if baseline else None,
           "overhead_fraction": round(seconds / baseline - 1, 4) if baseline else None,
           "measured": True if baseline else "no baseline prediction without previews on this server"}
    print("SERVED-RECORD " + json.dumps(rec), flush=True)


def child(argv) -> int:
    import argparse
    import inspect

    t_start = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--predictions", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import cog
    import torch

    import predict
    from infinitetalk import compilation

    t_imports = time.perf_counter() - t_start
    predictor = predict.Predictor()
    predictor.setup()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    pipe = predictor.pipe
    setup_call = time.perf_counter() - t_start - t_imports
    ready = {"imports_seconds": round(t_imports, 1), "setup_call_seconds": round(setup_call, 1),
             "load_timings": {k: round(v, 1) for k, v in getattr(pipe, "load_timings", {}).items()
                              if isinstance(v, (int, float))},
             "warmup_compiles": compilation.compile_stats(), "compiled": bool(getattr(pipe, "compiled", False)),
             "peak_memory_gb_after_setup": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None}
    print("SERVED-READY " + json.dumps(ready), flush=True)

    results = _observe(pipe)
    defaults = {}
    for name, param in inspect.signature(predict.Predictor.run).parameters.items():
        if name != "self":
            defaults[name] = param.default.default if isinstance(param.default, cog.FieldInfo) else param.default
    first = True
    plain: dict[str, float] = {}  # prediction name -> its wall seconds (the baseline of its "-preview" twin)
    for name in filter(None, args.predictions.split(",")):
        mode, seconds, speakers, overrides = PREDICTIONS[name]
        files = _make_inputs(args.inputs, seconds, 0 if "text" in overrides else speakers)
        kwargs = dict(defaults, seed=7, **{k: cog.Path(v) for k, v in files.items()}, **overrides)
        profile = name == "turbo-idle" and cuda
        stats0 = compilation.compile_stats()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        trace = args.out.with_suffix(".trace.json") if profile else None
        path, seconds_total, arrivals = _timed_run(predictor, kwargs, trace)
        stats1 = compilation.compile_stats()
        result = results[-1]
        strategy = pipe.turbo.strategy if pipe.turbo is not None else None
        chunks = [round(c, 2) for c in result.timings.get("chunk_seconds", [])]
        probe = _ffprobe(Path(path))
        video_seconds = result.num_frames / FPS
        steady = chunks[1:]
        per_chunk = sum(steady) / len(steady) if steady else (chunks[0] if chunks else None)
        num_gpus = 1
        rec = {
            "path": "served", "name": name, "mode": mode, "server": os.environ.get("INFINITETALK_MEMORY_MODE", "auto"),
            "resolution": kwargs.get("resolution"), "width": result.width, "height": result.height,
            "speakers": speakers, "steps": int(overrides.get("steps", 4 if overrides.get("turbo") else 40)),
            # turbo: the LoRA merged into the weights (fused, or merged by a switchable server) or an adapter;
            # exact on a switchable server: the adapter disabled / the merged weights read again
            "lora": ("adapter" if strategy == "adapter" else "fused") if kwargs.get("turbo") else
                    {"adapter": "adapter-disabled", "merge": "unmerged", None: "none"}[strategy],
            "lora_strategy": strategy,
            "lora_switch_seconds": round(pipe.turbo.last_switch_seconds, 2) if pipe.turbo is not None else None,
            "input": "text" if "text" in overrides else "audio",
            # text input: seconds of Kokoro synthesis inside the prediction (before the first chunk)
            "speech_seconds": round(result.timings["speech"], 2) if "text" in overrides else None,
            "encoder": "ffmpeg", "output": probe, "num_chunks": result.num_chunks, "chunk_seconds": chunks,
            "seconds_per_chunk": round(per_chunk, 2) if per_chunk else None,
            "gpu_seconds_per_video_second": round(per_chunk * num_gpus / (NEW_FRAMES_PER_CHUNK / FPS), 2)
            if steady else None,
            "prediction_seconds": round(seconds_total, 2),
            "wall_seconds_per_video_second": round(seconds_total / video_seconds, 2),
            "first_prediction_seconds": round(seconds_total, 2) if first else None,
            "recompiles": stats1["recompiles"] - stats0["recompiles"],
            "compiles": stats1["compiles"] - stats0["compiles"],
            "eager_fallbacks": stats1["eager_fallbacks"] - stats0["eager_fallbacks"],
            "compile_seconds": round(stats1["compile_seconds"] - stats0["compile_seconds"], 1),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None,
            "timings": {k: round(v, 2) if isinstance(v, (int, float)) else [round(x, 2) for x in v]
                        for k, v in result.timings.items() if isinstance(v, (int, float, list))},
            "num_gpus": num_gpus, "gpu_idle_fraction": None, "measured": True,
            "warmup": os.environ.get("INFINITETALK_WARMUP", "auto"),
        }
        if name.startswith("seq-"):
            rec["sequence"] = True
        rec.update(_fast_fields(name, overrides.get("fast"), Path(path), pipe, args.inputs))
        if name.startswith("seq-exact"):
            rec["measured"] = "compile sequence: exact mode at 2 of its 40 steps (same graphs); not the mode's time"
        elif not steady:
            rec["measured"] = ("one chunk: seconds_per_chunk is chunk 0's (81 new frames); no steady-state "
                               "GPU-seconds per video-second")
        if profile:
            marks = [f"served-chunk-done-{k}" for k in range(result.num_chunks)]
            idle = _idle_per_chunk(trace, marks)
            rec["gpu_idle_fraction"] = max(idle) if idle else None
            rec["gpu_idle_per_steady_chunk"] = idle
            rec["profiled"] = "torch.profiler (CPU+CUDA activity) was on for this prediction"
            trace.unlink()
        print("SERVED-RECORD " + json.dumps(rec), flush=True)
        plain[name] = seconds_total
        if overrides.get("preview"):
            _preview_record(name, arrivals, seconds_total, plain.get(name.removesuffix("-preview")), result)
        predictor._cleanup_previous()
        first = False
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child(sys.argv[2:]))
    print("run through scripts/benchmark.py served", file=sys.stderr)
    sys.exit(2)
