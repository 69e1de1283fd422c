"""Compile as the server does it: every compile counted and logged with its cause, automatic dynamic
shapes (at most one recompile per variant for a new size, none after), no silent eager fallback,
and the setup warm-up that leaves nothing to compile at the warmed size."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import make_tiny_weights as mtw
from infinitetalk import compilation
from infinitetalk.settings import Settings, SettingsError, parse_warmup

ROOT = Path(__file__).resolve().parents[1]

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="inductor on the CPU needs a C compiler")


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x, mask=None):
        y = self.linear(x).relu()
        return y if mask is None else y * mask


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    yield compilation.install()
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


def _delta(before: dict) -> dict:
    after = compilation.compile_stats()
    return {k: round(after[k] - before[k], 2) for k in ("compiles", "recompiles", "eager_fallbacks")}


@needs_cc
def test_compiles_are_counted_and_logged_with_their_cause(fresh_dynamo, caplog):
    block = _Block()
    block.compile(dynamic=compilation.DYNAMIC)
    before = compilation.compile_stats()
    with caplog.at_level(logging.INFO, logger="infinitetalk.compile"):
        block(torch.randn(2, 4, 8))
        block(torch.randn(2, 4, 8))  # same shape: nothing new
        assert _delta(before) == {"compiles": 1, "recompiles": 0, "eager_fallbacks": 0}
        block(torch.randn(2, 6, 8))  # a new size: one recompile, sizes now symbolic
        block(torch.randn(2, 9, 8))  # any further size: served by that graph
        block(torch.randn(2, 13, 8))
        assert _delta(before) == {"compiles": 2, "recompiles": 1, "eager_fallbacks": 0}
        block(torch.randn(2, 4, 8), torch.ones(1))  # another variant (a mask): one more graph
    assert _delta(before) == {"compiles": 3, "recompiles": 2, "eager_fallbacks": 0}
    lines = [r.getMessage() for r in caplog.records if "recompiled" in r.getMessage()]
    assert len(lines) == 2
    assert "size mismatch at index 1. expected 4, actual 6" in lines[0]
    assert "mask is None" in lines[1]


@needs_cc
def test_hitting_the_recompile_limit_is_an_error_not_silent(fresh_dynamo, caplog):
    import torch._dynamo

    block = _Block()
    block.compile(dynamic=False)  # one graph per size
    torch._dynamo.config.recompile_limit = 2
    before = compilation.compile_stats()
    with caplog.at_level(logging.ERROR, logger="infinitetalk.compile"):
        for n in (3, 4, 5, 6):
            out = block(torch.randn(1, n, 8))
            assert out.shape == (1, n, 8)  # still correct, only uncompiled
    assert _delta(before)["eager_fallbacks"] >= 1
    assert any("runs uncompiled" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_the_server_raises_the_recompile_limit_above_its_variants(fresh_dynamo):
    import torch._dynamo

    assert torch._dynamo.config.recompile_limit >= compilation.RECOMPILE_LIMIT >= 16


def test_warmup_setting():
    assert parse_warmup(None) is None and parse_warmup("auto") is None
    assert parse_warmup("off") == ()
    assert parse_warmup("640x640, 832x480") == ((640, 640), (832, 480))
    for bad in ("640", "640x641", "32x32", "big", "640x640,"):
        with pytest.raises(SettingsError, match="INFINITETALK_WARMUP must be auto, off or sizes"):
            parse_warmup(bad)
    assert Settings.from_env({"INFINITETALK_WARMUP": "512x512"}).warmup == ((512, 512),)
    auto = Settings.from_env({})
    assert auto.warmup_sizes(compiled=True) == (None,) and auto.warmup_sizes(compiled=False) == ()
    assert Settings.from_env({"INFINITETALK_WARMUP": "off"}).warmup_sizes(compiled=True) == ()


@pytest.mark.slow
@needs_cc
def test_served_pipeline_compiles_in_setup_and_not_at_the_warmed_size(fresh_dynamo, tiny_weights, make_speech,
                                                                      portrait, tmp_path):
    """load_pipeline as the servers call it (compile on, warm-up of one explicit size): the warm-up
    compiles both modes; requests at that size in either mode compile nothing; a new size costs one
    recompile, further sizes none; nothing falls back to eager."""
    from infinitetalk import service

    lora = mtw.write_turbo_lora(tmp_path / "lora")
    settings = Settings(weights=tiny_weights, turbo_lora=lora, compile=True, warmup=((64, 64),))
    start = compilation.compile_stats()
    logs: list[str] = []
    pipe = service.load_pipeline(settings, log=logs.append)
    assert pipe.compiled and pipe.turbo_loaded
    warm = [line for line in logs if line.startswith("warm-up: 64x64")]
    assert len(warm) == 2, logs  # exact and turbo
    in_setup = _delta(start)
    assert in_setup["compiles"] >= 2 and in_setup["eager_fallbacks"] == 0, in_setup
    after_setup = compilation.compile_stats()
    speech = make_speech(1.0)

    def run(width, height, turbo):
        inputs = dict(image=str(portrait), audio=str(speech), width=width, height=height, turbo=turbo, steps=1,
                      seed=1)
        service.run_job(pipe, inputs, tmp_path / f"{width}x{height}-{turbo}", log=lambda m: None,
                        show_progress=False)

    run(64, 64, True)
    run(64, 64, False)
    assert _delta(after_setup) == {"compiles": 0, "recompiles": 0, "eager_fallbacks": 0}
    run(96, 64, True)  # a new width: one recompile (the turbo graph, now with symbolic sizes)
    assert _delta(after_setup) == {"compiles": 1, "recompiles": 1, "eager_fallbacks": 0}
    before = compilation.compile_stats()
    run(128, 96, True)  # another width and height: that graph serves it
    run(96, 128, True)
    assert _delta(before) == {"compiles": 0, "recompiles": 0, "eager_fallbacks": 0}


_CACHE_SCRIPT = """
import sys, time, torch
from pathlib import Path
from torch._dynamo.utils import counters
from infinitetalk import compilation

class Block(torch.nn.Module):  # defined here: dynamo does not compile torch's own modules' frames
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


block = Block()
path, action = Path(sys.argv[1]), sys.argv[2]
loaded = compilation.load_compile_cache(path) if action == "load" else None
block.compile(dynamic=compilation.DYNAMIC)
block(torch.randn(3, 8))
if action == "save":
    assert compilation.save_compile_cache(path)
print(loaded, counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow
@needs_cc
def test_compile_cache_saved_by_one_process_warms_a_fresh_one(tmp_path):
    """What the servers keep in the weights folder (compile-cache/): a process with an empty inductor
    cache that loads it compiles from it (cache hits, no misses) instead of from scratch."""
    import os
    import subprocess
    import sys

    artifacts = compilation.compile_cache_file(tmp_path / "weights", "cpu")

    def run(action: str, cache_dir: str) -> list[str]:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / cache_dir), PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(artifacts), action], env=env, check=True,
                             capture_output=True, text=True, timeout=600).stdout
        return out.split()[-3:]

    loaded, hits, misses = run("save", "first")
    assert artifacts.is_file() and artifacts.stat().st_size > 0 and int(misses) >= 1
    loaded, hits, misses = run("load", "second")  # a fresh inductor cache folder: only the artifacts help
    assert loaded == "True" and int(hits) >= 1 and int(misses) == 0
    cold = run("none", "third")
    assert int(cold[2]) >= 1  # without them the same compile misses


@pytest.mark.slow
@needs_cc
def test_a_compiler_that_fails_in_setup_leaves_a_working_uncompiled_server(fresh_dynamo, tiny_weights, make_speech,
                                                                           portrait, tmp_path, caplog):
    """An image without a working C compiler (Triton's and inductor's need one): the warm-up's compile
    fails, setup says so in an error line and serves uncompiled instead of failing every request."""
    import torch._inductor.config as inductor_config

    from infinitetalk import service

    settings = Settings(weights=tiny_weights, compile=True, warmup=((64, 64),))
    old = inductor_config.cpp.cxx
    inductor_config.cpp.cxx = (str(tmp_path / "no-such-compiler"),)
    try:
        with caplog.at_level(logging.ERROR, logger="infinitetalk.compile"):
            pipe = service.load_pipeline(settings, log=lambda m: None)
        assert not pipe.compiled
        assert any("torch.compile failed in setup, serving uncompiled" in r.getMessage() for r in caplog.records)
        job = service.run_job(pipe, dict(image=str(portrait), audio=str(make_speech(1.0)), width=64, height=64,
                                         steps=1, seed=1), tmp_path / "job", log=lambda m: None, show_progress=False)
        assert job.path.stat().st_size > 0
    finally:
        inductor_config.cpp.cxx = old
        torch.compiler.set_stance("default")


def test_warm_up_runs_every_mode_and_fast_only_when_asked_and_available():
    """Each size in each served mode, and with INFINITETALK_WARMUP_FAST each of them fast too, where the
    pipeline can serve fast (else one log line says why it was skipped)."""
    from types import SimpleNamespace

    class Pipe:
        turbo_only, turbo_loaded = False, True

        def __init__(self, fast):
            self.fast, self.fast_unavailable, self.asked = fast, None if fast else "no Hopper GPU here", []

        def generate(self, request, path, show_progress=True):
            self.asked.append((request.width, request.turbo, request.fast, request.steps))
            return SimpleNamespace(width=request.width or 640, height=request.height or 640, timings={})

    logs: list[str] = []
    pipe = Pipe(fast=object())
    compilation.warm_up(pipe, [(64, 64)], log=logs.append, fast=True)
    assert sorted(pipe.asked) == [(64, turbo, fast, 1) for turbo in (False, True) for fast in (False, True)]
    assert "warm-up: 64x64 turbo fast in" in "\n".join(logs)
    for fast, ask in ((None, True), (object(), False)):
        logs.clear()
        pipe = Pipe(fast=fast)
        compilation.warm_up(pipe, [(64, 64)], log=logs.append, fast=ask)
        assert sorted(pipe.asked) == [(64, False, False, 1), (64, True, False, 1)]
        assert any("fast skipped: no Hopper GPU here" in line for line in logs) == (fast is None)
    assert Settings.from_env({"INFINITETALK_WARMUP_FAST": "1"}).warmup_fast and not Settings().warmup_fast
