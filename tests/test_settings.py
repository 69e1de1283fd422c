"""Settings: every INFINITETALK_* variable read and checked first, one line per mistake, before any
weight is read (Cog setup, RunPod boot and main), and build_pipeline's resolution of the auto choices."""

from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from file_audit import SEEN, WATCHED
from file_audit import forbidden as audit_forbidden  # tests/ is on sys.path for test modules
from infinitetalk import build, download, runpod_worker, service
from infinitetalk.pipeline import MEMORY_MODES, InfiniteTalkPipeline
from infinitetalk.settings import KNOWN_VARIABLES, MB, Settings, SettingsError, WorkerSettings
from infinitetalk.storage import StorageConfigError

ROOT = Path(__file__).resolve().parents[1]
BUCKET = {"INFINITETALK_OUTPUT_BUCKET": "bkt"}

#: (environment, the variable the one-line error must name): a typo value for every server setting.
TYPOS = [
    ({"INFINITETALK_MEMORY_MODE": "fp9"},
     "INFINITETALK_MEMORY_MODE must be one of auto, none, fp8, offload; got 'fp9'"),
    ({"INFINITETALK_COMPILE": "maybe"}, "INFINITETALK_COMPILE must be 1 or 0"),
    ({"INFINITETALK_FUSE_TURBO": "2"}, "INFINITETALK_FUSE_TURBO must be 1 or 0"),
    ({"INFINITETALK_NUM_GPUS": "3"}, "INFINITETALK_NUM_GPUS must be one of auto, 1, 2, 4, 8; got '3'"),
    ({"INFINITETALK_INPUT_MAX_MB": "lots"}, "INFINITETALK_INPUT_MAX_MB must be a number, got 'lots'"),
    ({"INFINITETALK_INPUT_TIMEOUT_S": "-1"}, "INFINITETALK_INPUT_TIMEOUT_S must be between 1 and 86400"),
    ({"INFINITETALK_INLINE_MAX_MB": "ten"}, "INFINITETALK_INLINE_MAX_MB must be a number, got 'ten'"),
    ({"INFINITETALK_PROGRESS_INTERVAL_S": "5s"}, "INFINITETALK_PROGRESS_INTERVAL_S must be a number"),
    ({"INFINITETALK_HANG_TIMEOUT_S": "5"}, "INFINITETALK_HANG_TIMEOUT_S must be between 10 and 86400 seconds, got 5"),
    ({**BUCKET, "INFINITETALK_OUTPUT_URL_EXPIRY": "1d"}, "INFINITETALK_OUTPUT_URL_EXPIRY must be a whole number"),
    ({**BUCKET, "INFINITETALK_S3_MULTIPART_MB": "1"}, "INFINITETALK_S3_MULTIPART_MB must be between 5 and"),
    ({**BUCKET, "INFINITETALK_S3_ADDRESSING_STYLE": "dns"}, "INFINITETALK_S3_ADDRESSING_STYLE must be one of"),
    ({**BUCKET, "INFINITETALK_S3_ENDPOINT_URL": "r2.example"}, "INFINITETALK_S3_ENDPOINT_URL must be an http(s) URL"),
    ({"INFINITETALK_S3_CHECK": "perhaps"}, "INFINITETALK_S3_CHECK must be 1 or 0"),
    ({"INFINITETALK_REQUIRE_BUCKET": "1"}, "no output bucket configured: set INFINITETALK_OUTPUT_BUCKET"),
    ({"INFINITETALK_MEMROY_MODE": "fp8"}, "INFINITETALK_MEMROY_MODE is not an InfiniteTalk setting; "
                                          "did you mean INFINITETALK_MEMORY_MODE?"),
    ({"INFINITETALK_WEIGHTS": "FILE"}, "INFINITETALK_WEIGHTS must be a folder"),
]
IDS = [next(iter(set(env) - set(BUCKET)), "INFINITETALK_OUTPUT_BUCKET") for env, _ in TYPOS]

#: A variable name (not a pattern such as ``INFINITETALK_S3_*``).
NAME = re.compile(r"INFINITETALK_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")


@pytest.fixture
def untouchable(monkeypatch, tmp_path):
    """A clean INFINITETALK_* environment whose weights folder nothing may open or list, loaders
    and downloads that fail the test when called, and CUDA that must not be asked about."""
    for name in list(os.environ):
        if name.startswith("INFINITETALK_"):
            monkeypatch.delenv(name)
    weights = tmp_path / "weights"
    (weights / download.WAN_DIR).mkdir(parents=True)
    (weights / download.WAN_DIR / "model_index.json").write_text("{}")
    monkeypatch.setenv("INFINITETALK_WEIGHTS", str(weights))
    called: list[str] = []

    def forbidden(what):
        return audit_forbidden(called, what, "before the settings were checked")

    monkeypatch.setattr(download, "ensure_weights", forbidden("ensure_weights"))
    monkeypatch.setattr(build, "build_pipeline", forbidden("build_pipeline"))
    monkeypatch.setattr(service, "load_pipeline", forbidden("load_pipeline"))
    monkeypatch.setattr(InfiniteTalkPipeline, "from_pretrained", staticmethod(forbidden("from_pretrained")))
    monkeypatch.setattr(torch.cuda, "is_available", forbidden("torch.cuda.is_available"))
    monkeypatch.setattr(torch.cuda, "device_count", forbidden("torch.cuda.device_count"))
    WATCHED.append(str(weights))
    SEEN.clear()
    try:
        yield SimpleNamespace(weights=weights, file=tmp_path / "a-file", called=called)
    finally:
        WATCHED.clear()
    assert not called and not SEEN, (called, SEEN)


def _typo_env(env: dict, folder) -> dict:
    if env.get("INFINITETALK_WEIGHTS") == "FILE":
        folder.file.write_text("not a folder")
        return {**env, "INFINITETALK_WEIGHTS": str(folder.file)}
    return env


def _check_one_line(exc: BaseException, message: str, seconds: float) -> None:
    assert message in str(exc) and "\n" not in str(exc), str(exc)
    assert seconds < 2.0, f"took {seconds:.2f} s"


@pytest.mark.parametrize("env, message", TYPOS, ids=IDS)
def test_cog_setup_stops_on_a_bad_setting_before_any_weight(untouchable, monkeypatch, env, message):
    cog = pytest.importorskip("cog")  # noqa: F841
    import predict

    for name, value in _typo_env(env, untouchable).items():
        monkeypatch.setenv(name, value)
    t0 = time.perf_counter()
    with pytest.raises(SettingsError) as err:
        predict.Predictor().setup()
    _check_one_line(err.value, message, time.perf_counter() - t0)


@pytest.mark.parametrize("env, message", TYPOS, ids=IDS)
def test_runpod_boot_stops_on_a_bad_setting_before_any_weight(untouchable, env, message):
    env = {"INFINITETALK_WEIGHTS": str(untouchable.weights), **_typo_env(env, untouchable)}
    t0 = time.perf_counter()
    with pytest.raises(SettingsError) as err:
        runpod_worker.boot(env)
    _check_one_line(err.value, message, time.perf_counter() - t0)


def test_runpod_main_prints_one_line_and_exits_2(untouchable, monkeypatch, capsys):
    monkeypatch.setenv("INFINITETALK_MEMORY_MODE", "fp9")
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        runpod_worker.main()
    assert exc.value.code == 2 and time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err
    assert err == "error: INFINITETALK_MEMORY_MODE must be one of auto, none, fp8, offload; got 'fp9'\n"


def test_defaults_and_valid_values():
    s = Settings.from_env({})
    assert s == Settings() and s.weights == ROOT / "weights"
    assert (s.memory_mode, s.compile, s.fuse_turbo, s.num_gpus, s.storage) == ("auto", None, False, None, None)
    assert s.worker == WorkerSettings() and s.check_bucket
    s = Settings.from_env({
        "INFINITETALK_WEIGHTS": " /data/w ", "INFINITETALK_MEMORY_MODE": "FP8", "INFINITETALK_COMPILE": "false",
        "INFINITETALK_FUSE_TURBO": "yes", "INFINITETALK_NUM_GPUS": "4", "INFINITETALK_INLINE_MAX_MB": "0",
        "INFINITETALK_PROGRESS_INTERVAL_S": "0.5", "INFINITETALK_S3_CHECK": "0", **BUCKET,
        "INFINITETALK_WAN_REVISION": "abc123", "INFINITETALK_TURBO_REVISION": "main",
        "INFINITETALK_KOKORO_REVISION": "def456", "INFINITETALK_SPACY_REVISION": "main",
        "INFINITETALK_HANG_TIMEOUT_S": "1800",
    })
    assert (s.weights, s.memory_mode, s.compile, s.fuse_turbo, s.num_gpus) == (Path("/data/w"), "fp8", False, True, 4)
    assert s.hang_timeout_s == 1800.0 and Settings().hang_timeout_s == 600.0
    assert (s.worker.inline_max_bytes, s.worker.progress_interval_s) == (0, 0.5)
    assert s.storage.bucket == "bkt" and not s.check_bucket
    assert Settings.from_env({"INFINITETALK_COMPILE": "1"}).compile is None  # on CUDA only
    assert Settings.from_env({"INFINITETALK_NUM_GPUS": "auto", "INFINITETALK_MEMORY_MODE": ""}).num_gpus is None


def test_one_error_type_under_the_old_names():
    assert StorageConfigError is SettingsError and runpod_worker.WorkerConfigError is SettingsError
    assert issubclass(SettingsError, ValueError)
    assert runpod_worker.WorkerSettings is WorkerSettings and runpod_worker.MB == MB
    # A far-off name lists the settings instead of guessing.
    with pytest.raises(SettingsError, match="INFINITETALK_FOO is not an InfiniteTalk setting; the settings are "):
        Settings.from_env({"INFINITETALK_FOO": "1"})


def test_constructor_checks_what_the_cli_gives():
    assert Settings.__dataclass_params__.frozen
    assert MEMORY_MODES == ("none", "fp8", "offload")  # the pipeline's modes, plus auto in the settings
    with pytest.raises(SettingsError, match=r"num_gpus must be one of \(1, 2, 4, 8\)"):
        Settings(num_gpus=3)
    with pytest.raises(SettingsError, match="memory_mode must be one of auto, none, fp8, offload; got 'fp9'"):
        Settings(memory_mode="fp9")


def test_build_resolves_the_auto_choices_for_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    server, cli = Settings(), Settings(memory_mode="none", compile=True, turbo_lora="L.safetensors")
    assert build.load_options(server, cpu) == dict(memory_mode="none", compile=False, fuse_turbo=False,
                                                   turbo_lora=None, attention_backend=None,
                                                   text_to_speech=None)
    assert build.load_options(cli, cpu)["compile"] is True  # the CLI's --compile: on any device
    assert build.load_options(cli, cpu)["turbo_lora"] == Path("L.safetensors")
    for total, mode in ((48e9, "offload"), (141e9, "none")):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, t=total: SimpleNamespace(total_memory=t))
        assert build.load_options(server, cuda)["memory_mode"] == mode
        assert build.load_options(server, cuda)["compile"] is True
    assert build.load_options(Settings(compile=False, memory_mode="fp8"), cuda)["compile"] is False


def test_build_gives_the_multi_gpu_pipeline_its_hang_timeout(monkeypatch):
    made = {}

    class Fake:
        def __init__(self, loader, ranks, device_type=None, hang_timeout=None):
            made.update(ranks=ranks, hang_timeout=hang_timeout)

    monkeypatch.setattr(build, "MultiGPUPipeline", Fake)
    monkeypatch.setattr(build, "num_ranks", lambda settings, device=None: 2)
    build.build_pipeline(Settings(num_gpus=2, hang_timeout_s=42.0), device="cpu")
    assert made == {"ranks": 2, "hang_timeout": 42.0}


def test_setup_line_names_the_real_placement():
    pipe = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, parallel=None)
    assert build.placement(pipe) == "cpu (torch.float32)"
    pipe = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, parallel=SimpleNamespace(world_size=2))
    assert build.placement(pipe) == "cuda:0 (torch.bfloat16), split over 2 GPUs"


def _names_in_code(path: Path) -> set[str]:
    """INFINITETALK_* names in the string literals of a Python file (messages, docstrings, lookups)."""
    text = path.read_text()
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(NAME.findall(node.value))
    return found


def test_every_variable_the_repo_mentions_is_a_known_setting_and_documented():
    files = [*ROOT.glob("*.py"), *(ROOT / "infinitetalk").rglob("*.py"), *(ROOT / "scripts").glob("*.py"),
             *(ROOT / "tests").glob("*.py")]
    mentioned = set().union(*(_names_in_code(p) for p in files if p.name != "test_settings.py"))
    docs = {p: p.read_text() for p in (ROOT / "README.md", ROOT / "weights" / "README.md", ROOT / "cog.yaml",
                                       ROOT / "Dockerfile.runpod")}
    for text in docs.values():
        mentioned |= set(NAME.findall(text))
    assert mentioned - set(KNOWN_VARIABLES) == {"INFINITETALK_MEMROY_MODE"}  # settings.py's example of a typo
    documented = docs[ROOT / "README.md"] + docs[ROOT / "weights" / "README.md"]
    assert [name for name in KNOWN_VARIABLES if f"`{name}`" not in documented] == []
