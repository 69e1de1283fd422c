"""scripts/check_parity.py on the golden data computed by the official implementation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_parity.py"


def _run(folder: Path | None, *extra: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    folder_arg = [] if folder is None else [str(folder)]
    return subprocess.run([sys.executable, str(SCRIPT), *folder_arg, *extra], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def test_every_golden_case_passes(golden, tmp_path):
    # No folder argument, from another directory: the script defaults to the repository's tests/golden.
    result = _run(None, cwd=tmp_path)
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
@pytest.mark.slow
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


@pytest.mark.slow
def test_an_explicit_golden_folder_is_still_accepted(golden, tmp_path):
    folder = tmp_path / "elsewhere"
    shutil.copytree(golden, folder)
    result = _run(folder, "--only", "algo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].endswith("0 failed")


def test_the_golden_data_is_in_the_repository(golden):
    """The parity tests run from a plain clone: every test reads the golden data from tests/golden."""
    assert golden == ROOT / "tests" / "golden"
    assert (golden / "README.md").is_file() and (golden / "tiny_wav2vec2" / "model.safetensors").is_file()
    files = sorted(str(p.relative_to(ROOT)) for p in golden.rglob("*") if p.is_file())
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == "", f".gitignore hides golden files: {ignored.stdout}"  # (empty too outside git)
    here = Path(__file__).name
    outside = [p.name for p in sorted((ROOT / "tests").glob("*.py")) if p.name != here and '"shared"' in p.read_text()]
    assert not outside, f"tests that look for golden data outside the repository: {outside}"
