"""scripts/check_parity.py on the golden data computed by the official implementation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_parity.py"


def _run(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(folder), *extra], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


def test_every_golden_case_passes(golden):
    result = _run(golden)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if " rel_l2=" in ln]
    names = {ln.split()[0] for ln in lines}
    # transformer (one and two speakers, outputs and intermediates), audio projection, wav2vec2,
    # schedules, windows, chunk counts, buckets, colour, CFG/APG and the sampling loop
    needles = ("dit.caseA.output", "dit.caseB.output", "dit.caseB.audio_proj_out", "dit.caseB.block1_lrope_pos_visual")
    for needle in needles:
        assert needle in names, needle
    for prefix in ("w2v.", "sched.", "win.", "chunks.", "bucket.choice.", "bucket.crop", "color.", "cfg.step0.apg3",
                   "loop.loop_apg2"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert not any(n.endswith(".skipped") for n in names)
    assert all(ln.rstrip().endswith("ok") or " ok " in ln for ln in lines)
    assert result.stdout.strip().splitlines()[-1].endswith("0 failed")


@pytest.mark.parametrize("key", ["caseB.output", "caseA.block0_audio_cross_attn_out"])
def test_a_wrong_reference_value_fails_the_check(golden, tmp_path, key):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "golden"
    shutil.copytree(golden, folder)
    cases = load_file(str(folder / "tiny_dit_cases.safetensors"))
    cases[key] = cases[key] * 1.001  # a 1e-3 relative error, 10x the tolerance
    save_file({k: v.contiguous() for k, v in cases.items()}, str(folder / "tiny_dit_cases.safetensors"))
    result = _run(folder, "--only", "dit")
    assert result.returncode == 1
    failing = [ln for ln in result.stdout.splitlines() if "FAIL" in ln]
    assert failing and all(f"dit.{key}" in ln for ln in failing), failing
    assert torch.isfinite(cases[key]).all()


def test_empty_folder_is_an_error(tmp_path):
    result = _run(tmp_path)
    assert result.returncode != 0
