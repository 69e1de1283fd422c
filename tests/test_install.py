"""`pip install -e .` into a fresh venv gives a working `infinitetalk` command, from any directory.

The venv (conftest's ``editable_venv``) is made offline: no pip of its own, this test environment's
packages through a .pth file, and ``--no-build-isolation`` so this environment's setuptools (>= 70.1,
pinned in requirements-dev.txt) builds the editable install.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from test_packaging import _norm, read_pins

ROOT = Path(__file__).resolve().parents[1]


def _run(env: dict, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_console_script_help_works_from_another_directory(editable_venv, venv_env, tmp_path):
    script = editable_venv / "bin" / "infinitetalk"
    assert script.is_file()
    result = _run(venv_env, "infinitetalk", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--image", "--video", "--audio", "--out", "--weights", "--width", "--steps", "--step-cache"):
        assert flag in result.stdout, flag
    # The same parser as `python -m infinitetalk`.
    module = _run(venv_env, str(editable_venv / "bin" / "python"), "-m", "infinitetalk", "--help", cwd=tmp_path)
    assert module.returncode == 0 and module.stdout == result.stdout


def test_the_package_imports_from_the_checkout_in_that_venv(editable_venv, venv_env, tmp_path):
    code = ("import json, sys, infinitetalk, importlib.metadata as m; "
            "print(json.dumps([infinitetalk.__file__, sys.prefix, m.version('infinitetalk'), "
            "m.requires('infinitetalk')]))")
    result = _run(venv_env, str(editable_venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path, prefix, version, requires = json.loads(result.stdout)
    assert Path(path).resolve() == ROOT / "infinitetalk" / "__init__.py"
    assert Path(prefix).resolve() == editable_venv.resolve()
    import infinitetalk

    assert version == infinitetalk.__version__
    # The installed metadata carries exactly the pins of requirements.txt (and of requirements-dev.txt as
    # the "dev" extra): pyproject.toml reads them from those files instead of repeating them.
    runtime, dev = {}, {}
    for req in requires:
        m = re.fullmatch(r'([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^;\s]+)\s*(?:;\s*extra\s*==\s*"(\w+)")?', req)
        assert m, req
        (dev if m.group(3) == "dev" else runtime)[_norm(m.group(1))] = m.group(2)
    assert runtime == read_pins(ROOT / "requirements.txt")
    assert dev == read_pins(ROOT / "requirements-dev.txt")
    assert "torch" not in runtime
