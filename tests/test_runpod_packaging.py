"""Dockerfile.runpod cannot be built here (no Docker, no GPU): keep it in step with cog.yaml instead."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from test_packaging import read_pins  # noqa: E402  (tests/ is on sys.path for test modules)

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> str:
    # Join continuation lines so each instruction is one line.
    return re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile.runpod").read_text())


def test_dockerfile_matches_cog_yaml_and_the_pins():
    cfg = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]
    text = _dockerfile()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 1 and f"nvidia/cuda:{cfg['cuda']}." in froms[0], froms  # same CUDA as cog.yaml
    py = cfg["python_version"]
    assert f"python{py} " in text and f"python{py} -m venv" in text
    apt = next(ln for ln in lines if "apt-get install" in ln)
    for pkg in cfg["system_packages"]:
        assert f" {pkg} " in apt + " ", pkg
    gpu = read_pins(ROOT / cfg["python_requirements"])
    assert cfg["python_requirements"] == "requirements-gpu.txt"
    assert "COPY requirements-gpu.txt" in text and "pip install -r requirements-gpu.txt" in text
    torch_tag = "cu" + cfg["cuda"].replace(".", "")
    assert f"pip install torch=={gpu['torch']} --index-url https://download.pytorch.org/whl/{torch_tag}" in text
    assert {"runpod", "boto3", "botocore"} <= set(gpu)
    env_line = " ".join(ln for ln in lines if ln.startswith("ENV "))
    for item in yaml.safe_load((ROOT / "cog.yaml").read_text()).get("environment") or []:
        assert item in env_line, item  # cog.yaml's environment is the worker's too
    assert lines[-1] == 'CMD ["python", "-u", "runpod_worker.py"]'
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), src
    assert "COPY infinitetalk/" in text and "COPY runpod_worker.py" in text
