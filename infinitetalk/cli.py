"""Command line: ``python -m infinitetalk --image face.png --audio speech.wav --out talk.mp4``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .download import default_weights_dir
from .errors import InputError
from .settings import Settings, SettingsError


def _bbox(text: str) -> list[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"a box is TOP,LEFT,BOTTOM,RIGHT in source pixels, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"box values must be numbers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m infinitetalk",
        description="Lip-synced talking video of any length from a portrait image (or a video) and speech.",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="reference portrait image")
    src.add_argument("--video", type=Path, help="reference video to dub (V2V), any frame rate")
    speech = ap.add_mutually_exclusive_group(required=True)
    speech.add_argument("--audio", type=Path, help="speech (any ffmpeg-readable audio or video file)")
    speech.add_argument("--text", default=None,
                        help="words to speak instead of --audio (Kokoro TTS); a dialogue tags its turns "
                             "'(s1) ... (s2) ...' and animates two speakers")
    speech.add_argument("--text-file", type=Path, default=None, help="--text read from a UTF-8 file")
    ap.add_argument("--voice", default=None, help="voice of --text (of speaker 1 in a dialogue), default af_heart; "
                                                  "the voices are listed in README.md")
    ap.add_argument("--voice2", default=None, help="voice of speaker 2 in a dialogue (default am_michael)")
    ap.add_argument("--speech-speed", type=float, default=1.0, help="speaking rate of --text, 0.5-2 (default 1)")
    ap.add_argument("--audio2", type=Path, default=None, help="second speaker's speech (uses the multi checkpoint)")
    ap.add_argument("--audio-mode", choices=["para", "add"], default="para",
                    help="two speakers: para = simultaneous, add = speaker 1 then speaker 2 (default para)")
    ap.add_argument("--bbox", type=_bbox, action="append", default=None, metavar="T,L,B,R",
                    help="speaker box in source pixels, give twice (speaker 1 then 2); default left/right halves")
    ap.add_argument("--out", type=Path, required=True, help="output .mp4")
    ap.add_argument("--hls", type=Path, default=None, metavar="DIR",
                    help="also write a live HLS folder (index.m3u8 + fMP4 segments) that grows by one segment per "
                         "chunk while the video is generated; play it with viewer/index.html")
    ap.add_argument("--weights", type=Path, default=None,
                    help="weights folder (weights/README.md); default $INFINITETALK_WEIGHTS, else the repository's "
                         "weights/")
    ap.add_argument("--resolution", choices=["480p", "720p"], default="480p", help="bucket family (default 480p)")
    ap.add_argument("--width", type=int, default=None, help="explicit width, multiple of 16 (with --height)")
    ap.add_argument("--height", type=int, default=None, help="explicit height, multiple of 16 (with --width)")
    ap.add_argument("--turbo", action="store_true",
                    help="distilled lightx2v LoRA: 4 steps, 2 forwards per step (needs weights/lightx2v/)")
    ap.add_argument("--lora", type=Path, default=None, help="turbo LoRA file (default: weights/lightx2v/*.safetensors)")
    ap.add_argument("--fast", action="store_true",
                    help="FP8 GEMMs + 8-bit self-attention (approximate; Hopper GPU, the sageattention package; "
                         "compiles the model)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default 40; turbo 4)")
    ap.add_argument("--text-guidance", type=float, default=None,
                    help="text CFG scale (default 5; turbo 1); 1 = 2-forward audio-only CFG")
    ap.add_argument("--audio-guidance", type=float, default=None, help="audio CFG scale (default 4; turbo 2)")
    ap.add_argument("--shift", type=float, default=None, help="timestep shift (default 7 at 480p, 11 at 720p; turbo 2)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--max-duration", type=float, default=None, help="cap the output length in seconds")
    ap.add_argument("--color-correction", type=float, default=1.0, help="0..1 colour match to the reference")
    ap.add_argument("--apg", action="store_true", help="adaptive projected guidance instead of plain CFG")
    ap.add_argument("--step-cache", type=float, default=0.0,
                    help="step cache threshold (TeaCache rule per guidance branch); 0 = off (default)")
    ap.add_argument("--prompt", default=None, help="text prompt")
    ap.add_argument("--negative-prompt", default=None, help="negative prompt (default: the official one)")
    quality = ap.add_mutually_exclusive_group()
    quality.add_argument("--quality", type=int, default=None, choices=range(1, 11), metavar="1-10",
                         help="output quality, higher is better and bigger: H.264 CRF = 40 - 3 x quality, as the "
                              "servers' quality input (default 8 = CRF 16)")
    quality.add_argument("--crf", type=int, default=None, help="H.264 CRF 0-51 instead of --quality, lower is better")
    ap.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    ap.add_argument("--attention-backend", default=None,
                    help="diffusers attention backend, e.g. native or _native_cudnn (default: native)")
    ap.add_argument("--memory-mode", choices=["none", "fp8", "offload"], default="none",
                    help="smaller GPUs: fp8 weight storage, or block offloading from CPU memory (default none)")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile (GPU: ~13%% faster forwards)")
    ap.add_argument("--num-gpus", type=int, default=1,
                    help="split each forward over this many GPUs of this host (1, 2, 4 or 8; default 1; lowered "
                         "to the GPUs present); alternatively start the CLI with torchrun --nproc-per-node N")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def _check_inputs(args: argparse.Namespace, request) -> None:
    """Every input file exists and passes :func:`infinitetalk.inputs.probe_request` (headers and limits),
    and the output folder exists: a bad file fails in a second, not after the model load."""
    from .inputs import probe_request

    for flag, path in (("--image", args.image), ("--video", args.video), ("--audio", args.audio),
                       ("--audio2", args.audio2)):
        if path is not None and not path.is_file():
            raise InputError(f"{flag} file not found: {path}")
    if not args.out.parent.is_dir():
        raise InputError(f"--out folder does not exist: {args.out.parent}")
    hls = getattr(args, "hls", None)
    if hls is not None and hls.exists() and (not hls.is_dir() or any(hls.iterdir())):
        raise InputError(f"--hls must be a new or empty folder: {hls}")
    probe_request(request, labels={"image": "--video" if args.video is not None else "--image",
                                   "audio": "--audio", "audio_2": "--audio2"})


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """The CLI's settings: its flags, with the weights folder from ``--weights``, else
    ``$INFINITETALK_WEIGHTS``, else the repository's ``weights/`` (the servers' rule,
    :func:`infinitetalk.download.default_weights_dir`); no other variable is read (the servers' memory
    mode, compile and GPU switches do not apply to the CLI, whose defaults are no compile, memory mode
    none and one GPU). Raises :class:`SettingsError` for an invalid value."""
    env = os.environ if env is None else env
    weights = args.weights if args.weights is not None else default_weights_dir(env)
    speaks = getattr(args, "text", None) is not None or getattr(args, "text_file", None) is not None
    compile_ = True if getattr(args, "fast", False) else args.compile  # fast needs the compiled model
    return Settings(weights=weights, memory_mode=args.memory_mode, compile=compile_, num_gpus=args.num_gpus,
                    turbo_lora=args.lora, attention_backend=args.attention_backend, text_to_speech=speaks)


def request_from_args(args: argparse.Namespace):
    """The :class:`~infinitetalk.request.GenerationRequest` of the flags (not yet validated)."""
    from .request import DEFAULT_PROMPT, INPUTS, GenerationRequest, quality_to_crf

    quality = args.quality if args.quality is not None else INPUTS["quality"].default  # the servers' default
    text = args.text
    if args.text_file is not None:
        try:
            text = args.text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--text-file cannot be read as UTF-8 text: {exc}") from None
    voices = {k: v for k, v in (("voice", args.voice), ("voice_2", args.voice2)) if v is not None}

    return GenerationRequest(
        image=args.image or args.video, audio=args.audio, audio_2=args.audio2, audio_mode=args.audio_mode,
        text=text, speech_speed=args.speech_speed, **voices,
        bboxes=args.bbox, prompt=args.prompt or DEFAULT_PROMPT, negative_prompt=args.negative_prompt,
        resolution=args.resolution, width=args.width, height=args.height, max_duration=args.max_duration,
        steps=args.steps, text_guidance=args.text_guidance, audio_guidance=args.audio_guidance, shift=args.shift,
        seed=args.seed, color_correction=args.color_correction, apg=args.apg, turbo=args.turbo, fast=args.fast,
        crf=args.crf if args.crf is not None else quality_to_crf(quality), step_cache=args.step_cache,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)  # before anything is imported or loaded
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        request = request_from_args(args)
        request.validate()
        _check_inputs(args, request)  # before the model load (about a minute with real weights)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .build import build_pipeline, close_pipeline
    from .pipeline import GenerationError
    from .weights import WeightsError

    pipe = None
    try:
        # Under torchrun every process runs this; --num-gpus N spawns the other ranks.
        pipe = build_pipeline(settings, device=args.device)
        context = getattr(pipe, "parallel", None)
        live = {}
        if args.hls is not None:
            from .preview import HLSOutput

            live["hls"] = HLSOutput(args.hls, on_segment=lambda seg: logging.getLogger("infinitetalk").info(
                "live: %s/index.m3u8 now plays %.2f s", seg.folder, seg.seconds))
        result = pipe.generate(request, args.out, show_progress=not args.quiet and (context is None or context.is_main),
                               **live)
    except (InputError, GenerationError, WeightsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if pipe is not None:
            close_pipeline(pipe)
    if context is not None and not context.is_main:
        return 0
    print(f"wrote {result.path}: {result.num_frames} frames, {result.duration:.2f} s, "
          f"{result.width}x{result.height}, {result.num_chunks} chunk(s), seed {result.seed}")
    return 0
