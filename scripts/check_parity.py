#!/usr/bin/env python
"""Check numerical parity of this project against a golden folder computed by the official code.

Usage: python scripts/check_parity.py [GOLDEN_DIR]   (default: tests/golden, in the repository)

Prints one line per case (``name rel_l2=... max_abs=...``) and exits non-zero if any case
exceeds its tolerance (see the golden README: rel-L2 < 1e-4 for the DiT and audio features,
exact for schedules/windows/buckets, max-abs for colour and CFG cases). Case groups whose files
are absent from the folder are skipped with a note; a folder with no known case fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_GOLDEN = HERE.parent / "tests" / "golden"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from parity_common import CaseResult  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("golden_dir", type=Path, nargs="?", default=DEFAULT_GOLDEN,
                    help=f"folder of golden data (default: {DEFAULT_GOLDEN.relative_to(HERE.parent)})")
    ap.add_argument("--only", default=None, help="comma-separated group names (dit, algo)")
    args = ap.parse_args(argv)
    golden = args.golden_dir
    if not golden.is_dir():
        print(f"error: {golden} is not a directory", file=sys.stderr)
        return 2

    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    from parity_algo import run_algo_cases
    from parity_dit import run_dit_cases

    groups = {"dit": run_dit_cases, "algo": run_algo_cases}
    only = set(args.only.split(",")) if args.only else set(groups)
    results: list[CaseResult] = []
    for name, fn in groups.items():
        if name in only:
            results.extend(fn(golden))
    for r in results:
        print(r.line(), flush=True)
    if not [r for r in results if not r.name.endswith(".skipped")]:
        print("error: no golden case found in", golden, file=sys.stderr)
        return 1
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
