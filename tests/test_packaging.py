"""Packaging checks: cog.yaml, pyproject.toml and requirements files in step, every import pinned, schema current."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: import name -> distribution name, where they differ (or to be explicit).
IMPORT_TO_DIST = {
    "PIL": "pillow",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "soundfile": "soundfile",
    "soxr": "soxr",
    "pyloudnorm": "pyloudnorm",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface-hub",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "tqdm": "tqdm",
    "numpy": "numpy",
    "scipy": "scipy",
    "requests": "requests",
    "cog": "cog",
    "torch": "torch",
    "sentencepiece": "sentencepiece",
    "tokenizers": "tokenizers",
    "torchao": "torchao",
    "runpod": "runpod",
    "boto3": "boto3",
    "botocore": "botocore",
    "ftfy": "ftfy",
    "peft": "peft",
    "kokoro": "kokoro",
    "misaki": "misaki",
    "spacy": "spacy",
    "sageattention": "sageattention",
}
#: Built in the GPU image by cog.yaml's build step (from source at a pinned commit, no wheel exists), not pinned
#: in a requirements file: the fast input's 8-bit attention (infinitetalk/fast.py imports it only on Hopper).
BUILT_IN_IMAGE = {"sageattention"}
LOCAL_PACKAGES = {"infinitetalk"}
#: Pinned for the GPU image only: the CUDA torch, and torchao (FP8 GEMMs on Hopper, imported only by
#: the fp8 memory mode on CUDA; on the CPU build it cannot load its kernels and only adds warnings).
GPU_ONLY = {"torch", "torchao"}
#: CUDA versions cog's compatibility matrix lists for the torch pin.
TORCH_CUDA = {"2.11.0": {"12.6", "12.8", "12.9", "13.0"}}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: options/includes are not supported by cog: {line!r}"
        name, sep, version = line.partition("==")
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[A-Za-z0-9_,\-]+\])?", name.strip())  # extras allowed
        assert sep and version and m, f"{path.name}: every requirement must be pinned with ==: {line!r}"
        pins[_norm(m.group(1))] = version.strip()
    return pins


def _optional_import_nodes(tree: ast.AST) -> set[int]:
    """Import nodes inside ``try: ... except ImportError`` (optional dependencies)."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            names = set()
            for handler in node.handlers:
                t = handler.type
                for elt in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(elt, ast.Name):
                        names.add(elt.id)
            if names & {"ImportError", "ModuleNotFoundError"}:
                for stmt in node.body:
                    optional.update(id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return optional


def third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        optional = _optional_import_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in LOCAL_PACKAGES or top == "__future__":
                    continue
                found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


def _package_files() -> list[Path]:
    return [ROOT / "predict.py", *sorted((ROOT / "infinitetalk").rglob("*.py"))]


def test_cog_yaml_is_valid_and_points_at_the_predictor():
    cfg = yaml.safe_load((ROOT / "cog.yaml").read_text())
    assert set(cfg) <= {"build", "image", "model", "run", "predict", "train", "concurrency", "environment", "weights"}
    build = cfg["build"]
    assert build["gpu"] is True
    assert build["python_version"] in ("3.11", "3.12")
    assert "ffmpeg" in build["system_packages"]
    assert "python_packages" not in build  # every Python pin is in python_requirements
    # the one build step: SageAttention (the fast input) from its source at a pinned commit, for Hopper
    (step,) = build["run"]
    assert re.fullmatch(r"TORCH_CUDA_ARCH_LIST=9\.0 MAX_JOBS=\d+ pip install --no-build-isolation --no-deps "
                        r"https://github\.com/thu-ml/SageAttention/archive/[0-9a-f]{40}\.tar\.gz", step), step
    assert (ROOT / build["python_requirements"]).is_file()
    assert cfg["run"] == "predict.py:Predictor" and "predict" not in cfg
    module, cls = cfg["run"].split(":")
    tree = ast.parse((ROOT / module).read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert cls in classes and {"setup", "run"} <= {n.name for n in classes[cls].body if isinstance(n, ast.FunctionDef)}
    for item in cfg.get("environment") or []:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item), item
    gpu_pins = read_pins(ROOT / build["python_requirements"])
    assert build["cuda"] in TORCH_CUDA[gpu_pins["torch"]], "cuda must have a torch wheel in cog's matrix"
    # cog installs the SDK from build.sdk_version and strips cog from python_requirements.
    assert build["sdk_version"] == read_pins(ROOT / "requirements.txt")["cog"]


def test_requirement_files_agree():
    cpu = read_pins(ROOT / "requirements.txt")
    gpu = read_pins(ROOT / "requirements-gpu.txt")
    assert "torch" not in cpu, "requirements.txt is torch-free (CI installs the CPU wheel itself)"
    assert "torch" in gpu and "cog" not in gpu and "coglet" not in gpu
    expected = {k: v for k, v in cpu.items() if k != "cog"}
    assert {k: v for k, v in gpu.items() if k not in GPU_ONLY} == expected


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_takes_its_pins_from_the_requirement_files():
    """One source: pyproject.toml repeats no version; setuptools reads requirements.txt (and the dev extra from
    requirements-dev.txt) at build time. The expanded configuration is exactly those pins, torch-free."""
    from setuptools.config.pyprojecttoml import read_configuration

    project = _pyproject()["project"]
    assert "dependencies" not in project and "optional-dependencies" not in project
    assert set(project["dynamic"]) == {"dependencies", "optional-dependencies"}
    dynamic = _pyproject()["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"] == {"file": ["requirements.txt"]}
    assert dynamic["optional-dependencies"] == {"dev": {"file": ["requirements-dev.txt"]}}
    expanded = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]

    def pins(reqs: list[str]) -> dict[str, str]:
        out = {}
        for req in reqs:
            name, _, version = req.partition("==")
            out[_norm(name.split("[")[0])] = version
        return out

    assert pins(expanded["dependencies"]) == read_pins(ROOT / "requirements.txt")
    assert pins(expanded["optional_dependencies"]["dev"]) == read_pins(ROOT / "requirements-dev.txt")
    assert "torch" not in pins(expanded["dependencies"])


def test_pyproject_metadata_matches_the_package_and_cog_yaml():
    import infinitetalk

    data = _pyproject()
    project = data["project"]
    assert project["name"] == "infinitetalk" and project["version"] == infinitetalk.__version__
    python = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["python_version"]
    assert project["requires-python"] == f">={python}"
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    # `infinitetalk` is `python -m infinitetalk`: both call infinitetalk.cli.main.
    assert project["scripts"] == {"infinitetalk": "infinitetalk.cli:main"}
    main = ast.parse((ROOT / "infinitetalk" / "__main__.py").read_text())
    assert "from .cli import main" in ast.unparse(main) and "sys.exit(main())" in ast.unparse(main)


def test_tool_configuration_lives_in_pyproject():
    tool = _pyproject()["tool"]
    assert not (ROOT / "ruff.toml").exists() and not (ROOT / ".ruff.toml").exists()
    assert not (ROOT / "pytest.ini").exists() and not (ROOT / "setup.cfg").exists()
    assert tool["ruff"]["line-length"] == 120 and tool["ruff"]["lint"]["mccabe"]["max-complexity"] == 12
    pytest_cfg = tool["pytest"]["ini_options"]
    assert "-rs" in pytest_cfg["addopts"].split()  # every skip prints its reason
    assert any(m.startswith("slow:") for m in pytest_cfg["markers"])


def _torch_cpu_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"pip install torch==\S+ --index-url", ln)]
    assert len(lines) == 1, lines
    return re.sub(r"^python -m pip", "pip", lines[0])


def test_ci_installs_torch_as_the_readme_says():
    """README's CPU install and .ci/run install the same CPU torch wheel with the same line."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    line = _torch_cpu_line(ci)
    assert line == "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert line in readme
    python = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["python_version"]
    assert f"python{python} -m venv" in readme and f"Python {python}" in readme
    install = [ln.strip() for ln in ci.splitlines() if re.match(r"\s*python -m pip install -e", ln)]
    assert install and install[0].replace("python -m pip", "pip") in readme

def test_every_import_is_pinned():
    cpu = read_pins(ROOT / "requirements.txt")
    gpu = read_pins(ROOT / "requirements-gpu.txt")
    imports = third_party_imports(_package_files())
    unknown = {m: sorted(f) for m, f in imports.items() if m not in IMPORT_TO_DIST}
    assert not unknown, f"imports with no known distribution (add to IMPORT_TO_DIST and the requirements): {unknown}"
    for module, files in imports.items():
        dist = _norm(IMPORT_TO_DIST[module])
        if dist in BUILT_IN_IMAGE:
            assert dist in yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["run"][0].lower(), files
        elif dist in GPU_ONLY:
            assert dist in gpu, files
        elif dist == "cog":
            assert dist in cpu, files  # the GPU image gets it from build.sdk_version
        else:
            assert dist in cpu and dist in gpu, f"{module} ({dist}) imported by {sorted(files)} is not pinned"


def test_predict_imports_nothing_else():
    imports = third_party_imports([ROOT / "predict.py"])
    assert set(imports) <= {"cog"}, imports


def test_openapi_schema_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_openapi_schema.py"), "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant)
    if isinstance(node, (ast.List, ast.Tuple)):
        return all(_literal(e) for e in node.elts)
    return False


def test_inputs_are_statically_resolvable_by_cog_build():
    """`cog build` parses predict.py without running it (pkg/schema/python in cog 0.22/0.23): it resolves
    literals and, for default/description/choices, names bound to literals at module level. Anything else
    is dropped silently (ge/le vanish, an unresolved default turns into "required")."""
    tree = ast.parse((ROOT / "predict.py").read_text())
    module_literals = {
        t.id for n in tree.body if isinstance(n, ast.Assign) and _literal(n.value)
        for t in n.targets if isinstance(t, ast.Name)
    }
    run = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Predictor"
               for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "run")
    problems = []
    for arg, default in zip(run.args.args[-len(run.args.defaults):], run.args.defaults):
        assert isinstance(default, ast.Call) and getattr(default.func, "id", "") == "Input", arg.arg
        if default.args:
            problems.append(f"{arg.arg}: pass default= as a keyword")
        for kw in default.keywords:
            ok = _literal(kw.value) or (kw.arg in ("default", "description", "choices")
                                        and isinstance(kw.value, ast.Name) and kw.value.id in module_literals)
            if not ok:
                problems.append(f"{arg.arg}: {kw.arg}={ast.unparse(kw.value)} is not a literal")
    assert not problems, problems
