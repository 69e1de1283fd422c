#!/usr/bin/env python
"""Download the production weights into the layout of weights/README.md (thin CLI).

Usage::

    python scripts/download_weights.py [--dest weights] [--prepare] [--no-turbo] [--no-tts]

Only the needed files are fetched, at pinned revisions, with resume and progress bars
(huggingface_hub). A complete folder is left alone without touching the network.
Besides the required weights, the optional groups are fetched unless skipped: the turbo mode's
distilled LoRA (``--no-turbo``) and the text-to-speech files of the ``text`` input, Kokoro-82M and
spaCy's en_core_web_sm, about 365 MB (``--no-tts``).
``--prepare`` then writes ``prepared/transformer-single`` (Wan base + single audio weights,
bf16, one merged checkpoint) for a faster ``setup()``; it needs about 30 GB of free RAM.
Set ``HF_TOKEN`` for authenticated (faster, less rate-limited) downloads and
``HF_XET_HIGH_PERFORMANCE=1`` for more parallelism. Exit code 1 with one line on failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinitetalk.download import WeightsDownloadError, default_weights_dir, ensure_weights, prepare_transformer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help="weights folder (default: $INFINITETALK_WEIGHTS, else weights/ in the repo)")
    parser.add_argument("--prepare", action="store_true",
                        help="also write prepared/transformer-single (bf16 merged transformer) for fast setup")
    parser.add_argument("--no-turbo", action="store_true",
                        help="skip the lightx2v distilled LoRA (about 0.7 GB) that the turbo mode needs")
    parser.add_argument("--no-tts", action="store_true",
                        help="skip the text-to-speech files (Kokoro-82M, spaCy en_core_web_sm; about 365 MB) "
                             "that the text input needs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dest = args.dest or default_weights_dir()
    try:
        ensure_weights(dest, log=print, turbo=not args.no_turbo, tts=not args.no_tts)
        if args.prepare:
            prepare_transformer(dest, log=print)
    except WeightsDownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"weights ready in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
