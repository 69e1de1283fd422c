"""Parity of the non-transformer algorithms against a golden folder (golden README §2-6).

``run_algo_cases(golden)`` returns one :class:`CaseResult` per check:

* ``w2v.*``      wav2vec2 audio path (waveform, loudness, CNN, interpolation, embedding);
* ``sched.*``    sampler timesteps;
* ``win.*``      streaming chunk plan, end padding and audio windows; clip mode;
* ``chunks.*``   chunk counts / final frame counts;
* ``bucket.*``   bucket choice and resize + centre crop (PIL and tensor paths);
* ``color.*``    colour correction;
* ``cfg.*``      CFG / APG arithmetic; ``loop.*`` the sampling loop with a replaying stub DiT.

Everything is derived from the files; a group whose file is absent is skipped with a note.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from parity_common import CaseResult, compare, exact  # noqa: E402

W2V_REL = 1e-4
COLOR_ABS = 1e-4
CFG_ABS = 1e-5


def _skip(group: str, why: str) -> CaseResult:
    return CaseResult(f"{group}.skipped", 0.0, 0.0, True, why)


def _fail(name: str, why: str) -> CaseResult:
    return CaseResult(name, float("inf"), float("inf"), False, why)


def _guard(name: str, fn: Callable[[], list[CaseResult]]) -> list[CaseResult]:
    """Run one group; an exception becomes a failed case instead of aborting the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return [_fail(name, f"{type(e).__name__}: {e}")]


# --------------------------------------------------------------------------- wav2vec2
def _w2v_cases(golden: Path) -> list[CaseResult]:
    case_file = golden / "wav2vec_case.safetensors"
    model_dir = golden / "tiny_wav2vec2"
    wav_file = golden / "speech_16k.wav"
    missing = [p.name for p in (case_file, model_dir, wav_file) if not p.exists()]
    if missing:
        return [_skip("w2v", f"missing {', '.join(missing)}")]
    import copy

    from safetensors.numpy import load_file

    from infinitetalk.audio import Wav2Vec2FeatureEncoder, decode_audio, loudness_normalize, num_video_frames

    ref = load_file(str(case_file))
    out: list[CaseResult] = []
    wav = decode_audio(wav_file)
    if "waveform_loaded" in ref:
        out.append(compare("w2v.waveform_loaded", wav, ref["waveform_loaded"], rel_tol=W2V_REL))
    norm = loudness_normalize(wav)
    if "waveform_normalized" in ref:
        out.append(compare("w2v.waveform_normalized", norm, ref["waveform_normalized"], rel_tol=W2V_REL))
    enc = Wav2Vec2FeatureEncoder.from_pretrained(model_dir)
    x = enc.input_values(norm)
    cnn = enc.cnn_features(x)
    T = num_video_frames(len(norm))
    if "cnn_features" in ref:
        out.append(compare("w2v.cnn_features", cnn[0], ref["cnn_features"], rel_tol=W2V_REL))
        windowed = copy.copy(enc)
        windowed.cnn_chunk_frames = max(1, cnn.shape[1] // 5)
        out.append(compare("w2v.cnn_features_windowed", windowed.cnn_features(x)[0], ref["cnn_features"],
                           rel_tol=W2V_REL, note="long-audio windowed CNN path forced on"))
    if "cnn_features_interpolated" in ref:
        out.append(compare("w2v.cnn_features_interpolated", enc.interpolate(cnn, T)[0],
                           ref["cnn_features_interpolated"], rel_tol=W2V_REL, note=f"T={T}"))
    if "embedding" in ref:
        out.append(compare("w2v.embedding", enc.encode(norm), ref["embedding"], rel_tol=W2V_REL))
    if "embedding_do_normalize_true" in ref:
        fe = copy.deepcopy(enc.feature_extractor)
        fe.do_normalize = True
        enc_n = copy.copy(enc)
        enc_n.feature_extractor = fe
        out.append(compare("w2v.embedding_do_normalize_true", enc_n.encode(norm),
                           ref["embedding_do_normalize_true"], rel_tol=W2V_REL))
    return out


# --------------------------------------------------------------------------- schedules
def _infer_shift(timesteps: np.ndarray, base: np.ndarray) -> float:
    """Recover the shift from one shifted value (exact schedule equality is checked after)."""
    for v, u in zip(timesteps / 1000.0, base / 1000.0):
        if 0 < u < 1 and 0 < v < 1:
            s = v * (1 - u) / (u * (1 - v))
            return round(s, 4)
    return 1.0


def _schedule_cases(sched: dict) -> list[CaseResult]:
    from infinitetalk.sampler import get_timesteps

    out: list[CaseResult] = []
    for key, entry in sched.get("timesteps", {}).items():
        ref_t = np.asarray(entry["timesteps_float32"], dtype=np.float32)
        steps = int(entry.get("num_model_timesteps", len(ref_t) - 1))
        m = re.search(r"shift([0-9.]+)", key)
        base = np.asarray(entry.get("unshifted_linspace_float32", []), dtype=np.float32)
        shift = float(m.group(1)) if m else _infer_shift(ref_t, base)
        ours = get_timesteps(steps, shift).numpy()
        out.append(exact(f"sched.{key}.timesteps", ours, ref_t))
        if "dt_over_1000_float32" in entry:
            t = torch.from_numpy(ours)
            dt = ((t[:-1] - t[1:]) / 1000).numpy()
            out.append(exact(f"sched.{key}.dt_over_1000", dt, np.asarray(entry["dt_over_1000_float32"], np.float32)))
        if base.size:
            lin = np.concatenate([np.linspace(1000, 1, steps, dtype=np.float32), np.zeros(1, np.float32)])
            out.append(exact(f"sched.{key}.unshifted", lin, base))
    return out


# --------------------------------------------------------------------------- windows / chunks
def _index_embedding(T: int) -> torch.Tensor:
    """Index-encoded embedding ``emb[f] = f`` as ``[T, 1, 1]`` float64."""
    return torch.arange(T, dtype=torch.float64).reshape(T, 1, 1)


def _streaming_cases(name: str, entry: dict) -> list[CaseResult]:
    from infinitetalk.audio import audio_window_indices, gather_windows, pad_audio_end
    from infinitetalk.chunking import DEFAULT_FRAME_NUM, DEFAULT_MOTION_FRAMES, plan_chunks

    T = int(entry["audio_frames"])
    frame_num = int(entry.get("frame_num", DEFAULT_FRAME_NUM))
    motion = int(entry.get("motion_frame", DEFAULT_MOTION_FRAMES))
    plan = plan_chunks(T, entry.get("max_frame_num"), frame_num=frame_num, motion_frames=motion)
    out = [
        exact(f"win.{name}.num_chunks", plan.num_chunks, entry["num_chunks"]),
        exact(f"win.{name}.final_frame_count", plan.final_frame_count, entry["final_frame_count"]),
    ]
    emb = _index_embedding(T)
    for k, ch in enumerate(entry.get("chunks", [])):
        if k >= plan.num_chunks:
            out.append(_fail(f"win.{name}.chunk{k}", "chunk missing from our plan"))
            continue
        emb = pad_audio_end(emb, plan.pad_before[k])
        start = plan.starts[k]
        p = f"win.{name}.chunk{k}"
        out.append(exact(f"{p}.start_end", [start, plan.ends[k]], [ch["audio_start_idx"], ch["audio_end_idx"]]))
        out.append(exact(f"{p}.padded_len", [emb.shape[0], plan.padded_lengths[k]],
                         [ch["padded_audio_len_during_chunk"]] * 2))
        out.append(exact(f"{p}.motion_frames", plan.motion_frames_per_chunk[k], ch["motion_frames_in_chunk"]))
        win = gather_windows(emb, start, frame_num)[:, :, 0, 0].round().long().numpy()
        idx = audio_window_indices(torch.arange(start, start + frame_num), emb.shape[0]).numpy()
        if "window_first3" in ch:
            n = len(ch["window_first3"])
            out.append(exact(f"{p}.window_first", win[:n], np.asarray(ch["window_first3"])))
            out.append(exact(f"{p}.window_first_index", idx[:n], np.asarray(ch["window_first3_padded_index"])))
        if "window_last3" in ch:
            n = len(ch["window_last3"])
            out.append(exact(f"{p}.window_last", win[-n:], np.asarray(ch["window_last3"])))
            out.append(exact(f"{p}.window_last_index", idx[-n:], np.asarray(ch["window_last3_padded_index"])))
        if "all_center_frames" in ch:
            centre = win[:, win.shape[1] // 2]
            out.append(exact(f"{p}.center_frames", centre, np.asarray(ch["all_center_frames"])))
    return out


def _clip_case(name: str, entry: dict, T: int) -> list[CaseResult]:
    from infinitetalk.chunking import plan_chunks

    plan = plan_chunks(T, entry["max_frames_num"])
    return [exact(f"win.{name}", [plan.num_chunks, plan.final_frame_count],
                  [entry["num_chunks"], entry["final_frame_count"]])]


def _chunk_count_cases(entries: dict) -> list[CaseResult]:
    from infinitetalk.chunking import plan_chunks

    out = []
    for key, e in entries.items():
        T, mx = int(e["audio_frames"]), e.get("max_frame_num")
        plan = plan_chunks(T, mx)
        name = f"chunks.{key}"
        if e.get("error"):
            ok = plan.num_chunks == 1 and plan.final_frame_count == min(T, mx or T) and not plan.official
            out.append(CaseResult(name, 0.0 if ok else float("inf"), 0.0, ok,
                                  f"official refuses ({e['error'].split(':')[0]}); our deliberate extension: "
                                  f"1 chunk, {plan.final_frame_count} frames"))
            continue
        ours = [plan.num_chunks, plan.final_frame_count, plan.padded_lengths[-1]] + list(plan.starts)
        ref = [e["num_chunks"], e["final_frame_count"], e["last_chunk_padded_audio_len"]] + list(e["chunk_starts"])
        out.append(exact(name, ours, ref, note="official streaming rule"))
    return out


def _window_cases(golden: Path) -> list[CaseResult]:
    f = golden / "schedule_and_windows.json"
    if not f.exists():
        return [_skip("sched", "missing schedule_and_windows.json")]
    sched = json.loads(f.read_text())
    out = _guard("sched", lambda: _schedule_cases(sched))
    stream_T = None
    for key, entry in sched.items():
        if isinstance(entry, dict) and "chunks" in entry and "audio_frames" in entry:
            stream_T = int(entry["audio_frames"])
            out += _guard(f"win.{key}", lambda k=key, e=entry: _streaming_cases(k, e))
    for key, entry in sched.items():
        if isinstance(entry, dict) and "max_frames_num" in entry and "chunks" not in entry:
            T = entry.get("audio_frames", stream_T)
            if T is None:
                out.append(_skip(f"win.{key}", "audio length unknown"))
                continue
            out += _guard(f"win.{key}", lambda k=key, e=entry, t=int(T): _clip_case(k, e, t))
    if "chunk_counts" in sched:
        out += _guard("chunks", lambda: _chunk_count_cases(sched["chunk_counts"]))
    return out


# --------------------------------------------------------------------------- buckets
def _bucket_cases(golden: Path) -> list[CaseResult]:
    from infinitetalk.buckets import choose_bucket, resize_and_centercrop, resize_and_centercrop_tensor

    out: list[CaseResult] = []
    jf = golden / "buckets.json"
    meta = {}
    if jf.exists():
        data = json.loads(jf.read_text())
        meta = data.get("resize_and_centercrop_cases", {})
        for size, cases in data.get("buckets", {}).items():
            for key, c in cases.items():
                ours = choose_bucket(int(c["input_H"]), int(c["input_W"]), size)
                out.append(exact(f"bucket.choice.{size}.{key}", list(ours), c["bucket_HW"]))
    else:
        out.append(_skip("bucket.choice", "missing buckets.json"))
    nf = golden / "buckets_case.npz"
    if not nf.exists():
        return out + [_skip("bucket.crop", "missing buckets_case.npz")]
    from PIL import Image

    z = np.load(nf)
    pngs = {"input1": golden / "bucket_input.png", "input2": golden / "bucket_input2.png"}
    for key in z.files:
        m = re.fullmatch(r"(input\d+)_resized_cropped_uint8", key)
        if m:
            png = pngs.get(m.group(1))
            if png is None or not png.exists():
                out.append(_skip(f"bucket.crop.{m.group(1)}", "input png missing"))
                continue
            ref = z[key]  # [1, 3, 1, th, tw]
            target = tuple(ref.shape[-2:])
            with Image.open(png) as img:
                ours = resize_and_centercrop(img.convert("RGB"), target)
            out.append(exact(f"bucket.crop.{m.group(1)}", ours.transpose(2, 0, 1)[None, :, None], ref))
            c = meta.get(m.group(1), {})
            if "bucket_HW" in c and "W" in c:
                out.append(exact(f"bucket.crop.{m.group(1)}.choice",
                                 list(choose_bucket(int(c["H"]), int(c["W"]), "480p")), c["bucket_HW"]))
    for key in z.files:
        m = re.fullmatch(r"(mask\d*)_input_\d+x\d+x\d+", key)
        if m and f"{m.group(1)}_resized_cropped" in z.files:
            ref = z[f"{m.group(1)}_resized_cropped"]
            ours = resize_and_centercrop_tensor(torch.from_numpy(z[key]), tuple(ref.shape[-2:])).numpy()
            out.append(exact(f"bucket.mask.{m.group(1)}", ours, ref))
    return out


# --------------------------------------------------------------------------- colour
def _color_cases(golden: Path) -> list[CaseResult]:
    f = golden / "color_case.npz"
    if not f.exists():
        return [_skip("color", "missing color_case.npz")]
    from infinitetalk.color import match_and_blend_colors

    z = np.load(f)
    src = torch.from_numpy(z["source_chunk"])
    ref = torch.from_numpy(z["reference_image"])
    out = []
    for key in z.files:
        m = re.fullmatch(r"output_strength_(\d+)_(\d+)", key)
        if m:
            s = float(f"{m.group(1)}.{m.group(2)}")
            out.append(compare(f"color.strength_{s}", match_and_blend_colors(src, ref, s), z[key], abs_tol=COLOR_ABS))
    same = match_and_blend_colors(src, ref, 0.0) is src
    out.append(CaseResult("color.strength_0_identity", 0.0, 0.0, same, "returns the input object"))
    return out


# --------------------------------------------------------------------------- CFG / APG
def _fit_scales(target: np.ndarray, base: np.ndarray, terms: list[np.ndarray]) -> list[float]:
    """Least-squares guidance scales of ``target = base + sum(s_i * term_i)``, rounded."""
    A = np.stack([t.ravel().astype(np.float64) for t in terms], axis=1)
    b = (target - base).ravel().astype(np.float64)
    sol, *_ = np.linalg.lstsq(A, b, rcond=None)
    return [round(float(s), 3) for s in sol]


def _direct_cfg_cases(z) -> list[CaseResult]:
    from infinitetalk.sampler import APGState, adaptive_projected_guidance, combine_guidance

    steps = sorted({int(m.group(1)) for k in z.files if (m := re.match(r"step(\d+)\.", k))})
    if not steps:
        return [_skip("cfg.direct", "no step* arrays")]
    g = lambda s, n: torch.from_numpy(z[f"step{s}.{n}"])  # noqa: E731
    s0 = steps[0]
    # Scales are not stored: recover them from the step-0 outputs (2 unknowns over every element).
    c, dt, u, da = (z[f"step{s0}.noise_pred_{n}"] for n in ("cond", "drop_text", "uncond", "drop_audio"))
    st3, sa3 = _fit_scales(z[f"step{s0}.cfg3.noise_pred"], u, [c - dt, dt - u])
    (sa2,) = _fit_scales(z[f"step{s0}.cfg2.noise_pred"], da, [c - da])
    if f"step{s0}.apg3.noise_pred" in z.files:
        ast, asa = _fit_scales(z[f"step{s0}.apg3.noise_pred"], c,
                               [z[f"step{s0}.apg3.apg_text"], z[f"step{s0}.apg3.apg_audio"]])
        ast, asa = ast + 1, asa + 1
        (asa2,) = _fit_scales(z[f"step{s0}.apg2.noise_pred"], c, [z[f"step{s0}.apg2.apg_audio"]])
        asa2 += 1
    note3, note2 = f"s_text={st3} s_audio={sa3}", f"s_audio={sa2}"
    out = []
    apg3, apg2 = APGState(), APGState()
    for s in steps:
        preds3 = {"cond": g(s, "noise_pred_cond"), "drop_text": g(s, "noise_pred_drop_text"),
                  "uncond": g(s, "noise_pred_uncond")}
        preds2 = {"cond": g(s, "noise_pred_cond"), "drop_audio": g(s, "noise_pred_drop_audio")}
        p = f"cfg.step{s}"
        out.append(compare(f"{p}.cfg3", combine_guidance(preds3, st3, sa3), z[f"step{s}.cfg3.noise_pred"],
                           abs_tol=CFG_ABS, note=note3))
        out.append(compare(f"{p}.cfg2", combine_guidance(preds2, 1.0, sa2), z[f"step{s}.cfg2.noise_pred"],
                           abs_tol=CFG_ABS, note=note2))
        if f"step{s}.apg3.noise_pred" not in z.files:
            continue
        # APG components straight from our functions (buffers carried across steps).
        cond = preds3["cond"]
        a_text = adaptive_projected_guidance(cond - preds3["drop_text"], cond, apg3.text)
        a_audio = adaptive_projected_guidance(preds3["drop_text"] - preds3["uncond"], cond, apg3.audio)
        out.append(compare(f"{p}.apg3.text_running_average", apg3.text.running_average,
                           z[f"step{s}.apg3.text_running_average"], abs_tol=CFG_ABS))
        out.append(compare(f"{p}.apg3.audio_running_average", apg3.audio.running_average,
                           z[f"step{s}.apg3.audio_running_average"], abs_tol=CFG_ABS))
        out.append(compare(f"{p}.apg3.apg_text", a_text, z[f"step{s}.apg3.apg_text"], abs_tol=CFG_ABS))
        out.append(compare(f"{p}.apg3.apg_audio", a_audio, z[f"step{s}.apg3.apg_audio"], abs_tol=CFG_ABS))
        # The full combination through combine_guidance with its own state object.
        if s == s0:
            comb3, comb2 = APGState(), APGState()
        out.append(compare(f"{p}.apg3.noise_pred", combine_guidance(preds3, ast, asa, comb3),
                           z[f"step{s}.apg3.noise_pred"], abs_tol=CFG_ABS, note=f"s_text={ast} s_audio={asa}"))
        n2 = combine_guidance(preds2, 1.0, asa2, comb2)
        out.append(compare(f"{p}.apg2.audio_running_average", comb2.audio.running_average,
                           z[f"step{s}.apg2.audio_running_average"], abs_tol=CFG_ABS))
        a2 = adaptive_projected_guidance(preds2["cond"] - preds2["drop_audio"], preds2["cond"], apg2.audio)
        out.append(compare(f"{p}.apg2.apg_audio", a2, z[f"step{s}.apg2.apg_audio"], abs_tol=CFG_ABS))
        out.append(compare(f"{p}.apg2.noise_pred", n2, z[f"step{s}.apg2.noise_pred"], abs_tol=CFG_ABS,
                           note=f"s_audio={asa2}"))
    out.append(CaseResult("cfg.scales_recovered", 0.0, 0.0, True,
                          "guidance scales are not stored; fitted by least squares from step-0 outputs"))
    return out


def _loop_case(z, case: str, loop_meta: Optional[dict]) -> list[CaseResult]:
    from infinitetalk.chunking import DEFAULT_MOTION_FRAMES, motion_latent_frames
    from infinitetalk.sampler import APGState, ContextLatents, get_timesteps, make_guided_denoiser

    p = f"{case}."
    ref_t = z[p + "timesteps"]
    steps = len(ref_t) - 1
    base = np.concatenate([np.linspace(1000, 1, steps, dtype=np.float32), np.zeros(1, np.float32)])
    shift = _infer_shift(ref_t, base)
    ts = get_timesteps(steps, shift)
    out = [exact(f"loop.{case}.timesteps", ts.numpy(), ref_t, note=f"steps={steps} shift={shift}")]
    if loop_meta is None:
        return out + [_skip(f"loop.{case}", "selfcheck.json has no guidance settings for this loop")]
    s_text = float(loop_meta["text_guide_scale"])
    s_audio = float(loop_meta["audio_guide_scale"])
    use_apg = bool(loop_meta.get("use_apg", False))
    chunks = sorted({int(m.group(1)) for k in z.files if (m := re.match(re.escape(p) + r"chunk(\d+)\.", k))})
    gen = torch.Generator().manual_seed(0)
    for c in chunks:
        q = f"{p}chunk{c}."
        motion = torch.from_numpy(z[q + "latent_motion_frames"])
        expect_nm = motion_latent_frames(1 if c == 0 else DEFAULT_MOTION_FRAMES)
        out.append(exact(f"loop.{case}.chunk{c}.motion_latent_frames", motion.shape[1], expect_nm))
        x_init = torch.from_numpy(z[q + "step0.latent_in"]).clone()
        seen: dict[int, torch.Tensor] = {}
        calls: list[str] = []

        def model(x: torch.Tensor, t: torch.Tensor, branch: str, q=q, seen=seen, calls=calls) -> torch.Tensor:
            i = int(torch.nonzero(ts[:-1] == t.reshape(())).reshape(-1)[0])
            seen.setdefault(i, x.clone())
            calls.append(branch)
            return torch.from_numpy(z[f"{q}step{i}.{branch}"])

        denoise = make_guided_denoiser(model, s_text, s_audio, APGState() if use_apg else None)
        x0 = ContextLatents(denoise, motion, generator=gen, replay_noise=c >= 1).sample(x_init, ts)
        for i in range(steps):
            key = f"{q}step{i}.latent_in"
            if i in seen:
                out.append(compare(f"loop.{case}.chunk{c}.step{i}.latent_in", seen[i], z[key], abs_tol=CFG_ABS))
            else:
                out.append(_fail(f"loop.{case}.chunk{c}.step{i}.latent_in", "model not called at this step"))
        nfe = int(loop_meta.get("nfe_per_step", len(calls) // max(1, steps)))
        out.append(exact(f"loop.{case}.chunk{c}.nfe", len(calls), nfe * steps))
        out.append(compare(f"loop.{case}.chunk{c}.x0", x0, z[q + "x0"], abs_tol=CFG_ABS,
                           note=f"s_text={s_text} s_audio={s_audio} apg={use_apg}"))
    return out


def _cfg_cases(golden: Path) -> list[CaseResult]:
    f = golden / "cfg_case.npz"
    if not f.exists():
        return [_skip("cfg", "missing cfg_case.npz")]
    z = np.load(f)
    out = _guard("cfg.direct", lambda: _direct_cfg_cases(z))
    loops_meta = {}
    sc = golden / "selfcheck.json"
    if sc.exists():
        loops_meta = json.loads(sc.read_text()).get("misc", {}).get("loops", {})
    cases = sorted({k.split(".")[0] for k in z.files if k.startswith("loop_")})
    for case in cases:
        out += _guard(f"loop.{case}", lambda c=case: _loop_case(z, c, loops_meta.get(c)))
    return out


# --------------------------------------------------------------------------- entry point
def run_algo_cases(golden: Path) -> list[CaseResult]:
    """Every non-transformer golden case found in ``golden``."""
    golden = Path(golden)
    torch.set_grad_enabled(False)
    results: list[CaseResult] = []
    results += _guard("w2v", lambda: _w2v_cases(golden))
    results += _guard("sched", lambda: _window_cases(golden))
    results += _guard("bucket", lambda: _bucket_cases(golden))
    results += _guard("color", lambda: _color_cases(golden))
    results += _guard("cfg", lambda: _cfg_cases(golden))
    return results


if __name__ == "__main__":
    rs = run_algo_cases(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "golden")
    for r in rs:
        print(r.line())
    bad = [r for r in rs if not r.passed]
    print(f"{len(rs) - len(bad)} passed, {len(bad)} failed")
    sys.exit(1 if bad else 0)
