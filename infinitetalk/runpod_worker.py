"""RunPod Serverless worker: the same service core as the Cog predictor, behind RunPod's job API.

Start with ``python runpod_worker.py`` (the Docker image's CMD; locally add
``--rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000`` for the SDK's development server).
At boot: the worker settings and the output storage are read and checked (a bad configuration
stops the worker here with one line), then every model is loaded once. Each job:

1. its ``input`` is validated by :func:`infinitetalk.service.build_request` (the Cog predictor's
   names, defaults, ranges and messages) before anything is downloaded;
2. file inputs (``image``, ``audio``, ``audio_2``) are http(s) URLs, fetched with the SDK's
   SSRF-safe client (public addresses only, redirects re-checked) under a size and a time limit,
   or ``data:`` URLs (base64); anything else (``file://``, a local path, ``s3://``) is refused;
3. :func:`infinitetalk.service.run_job` probes the files, then generates the MP4 in the job's
   temporary folder, reporting progress through ``runpod.serverless.progress_update`` (chunks done,
   seconds of video) and in the log (plain ``chunk 1/3, step 2/4`` lines: no terminal bars);
4. the MP4 goes to the configured bucket (the job's output carries a presigned URL) or, with no
   bucket, comes back inline as a ``data:video/mp4;base64`` URL when it is small enough.

Invalid inputs end the job with ``{"error": "<the predictor's one-line message>"}`` (status
FAILED). A cancel or an execution timeout reaches the handler as an asyncio cancellation (the SDK
cancels the job's task); the generation thread then stops within one denoising step and the job's
files are removed.

Settings (environment), all read and checked at boot by :meth:`infinitetalk.settings.Settings.from_env`:
the worker's limits (:class:`~infinitetalk.settings.WorkerSettings`: ``INFINITETALK_INPUT_MAX_MB``,
``INFINITETALK_INPUT_TIMEOUT_S``, ``INFINITETALK_INLINE_MAX_MB``, ``INFINITETALK_PROGRESS_INTERVAL_S``),
the storage (:mod:`infinitetalk.storage`) and the model switches (:mod:`infinitetalk.settings`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlparse

from . import service
from .errors import GenerationCancelled, InputError
from .settings import MB, Settings, SettingsError, WorkerConfigError, WorkerSettings
from .storage import S3Storage, StorageError, open_storage

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / MB:g} MB" if n >= MB else f"{n} bytes"


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _suffix(url_path: str) -> str:
    suffix = Path(unquote_to_bytes(url_path).decode("utf-8", "replace")).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def decode_data_url(name: str, url: str, max_bytes: int) -> bytes:
    """``data:[<mime>][;base64],<data>`` -> bytes, refusing more than ``max_bytes``."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise InputError(f"the {name} input is not a valid data URL (no ',' after the media type)")
    is_base64 = head.lower().endswith(";base64")
    estimate = len(payload) * 3 // 4 if is_base64 else len(payload)
    if estimate > max_bytes:
        raise InputError(f"the {name} input is larger than the limit of {_size(max_bytes)}")
    try:
        data = base64.b64decode(payload, validate=True) if is_base64 else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise InputError(f"the {name} input is not valid base64 in its data URL") from None
    if len(data) > max_bytes:
        raise InputError(f"the {name} input is larger than the limit of {_size(max_bytes)}")
    return data


def fetch_input(name: str, value: Any, dest_dir: str | os.PathLike, *, max_bytes: int, timeout_s: float,
                should_stop: Callable[[], bool] | None = None) -> Path:
    """A job's file input (http(s) URL or data URL) -> a local file in ``dest_dir/inputs``.

    URLs are fetched with the SDK's SSRF-safe client (``runpod.serverless.utils.rp_ssrf``: public
    addresses only unless ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1``, every redirect re-checked) and
    read under ``max_bytes`` and a ``timeout_s`` wall-clock deadline. Raises InputError naming the input.
    """
    folder = Path(dest_dir) / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(value, str):
        raise InputError(f"{name} must be an http(s) URL or a data: URL, got {value!r}")
    text = value.strip()
    scheme = urlparse(text).scheme.lower()
    if scheme == "data":
        path = folder / name
        path.write_bytes(decode_data_url(name, text, max_bytes))
        return path
    if scheme not in ("http", "https"):
        raise InputError(f"{name} must be an http(s) URL or a data: URL, got {_shown(text)}")

    import requests
    from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, safe_get

    path = folder / (name + _suffix(urlparse(text).path))
    deadline = time.monotonic() + timeout_s
    try:
        response = safe_get(text, stream=True, timeout=max(1, min(30, int(timeout_s))), max_bytes=max_bytes)
        with response:
            if response.status_code >= 400:
                raise InputError(f"could not download the {name} input: HTTP {response.status_code} from "
                                 f"{urlparse(text).hostname}")
            with open(path, "wb") as f:
                for block in iter_content_capped(response, 1024 * 1024, max_bytes):
                    f.write(block)
                    if time.monotonic() > deadline:
                        raise InputError(f"the {name} input took longer than {timeout_s:g} s to download")
                    if should_stop is not None and should_stop():
                        raise GenerationCancelled("the job was cancelled")
    except SSRFError as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else "blocked"
        if "size cap" in reason:
            raise InputError(f"the {name} input is larger than the limit of {_size(max_bytes)}") from None
        if "could not resolve" in reason or "no addresses" in reason:
            raise InputError(f"could not download the {name} input: {reason}") from None
        raise InputError(f"the {name} input URL is not allowed ({reason})") from None
    except requests.RequestException as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]
        raise InputError(f"could not download the {name} input from {urlparse(text).hostname}: {reason}") from None
    return path


# ----------------------------------------------------------------------------------------------
# The handler
# ----------------------------------------------------------------------------------------------


def _runpod_progress(job: dict, progress: dict) -> None:
    """``runpod.serverless.progress_update`` on RunPod; a log line elsewhere (the SDK's local API server
    has no progress channel: the update would go to an unset URL)."""
    if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        import runpod

        runpod.serverless.progress_update(job, progress)
    else:
        print(f"progress: {progress}", flush=True)


class RunPodWorker:
    """Holds the loaded pipeline and the storage; :meth:`handler` is the SDK's job handler."""

    def __init__(self, pipe, settings: WorkerSettings | None = None, storage: S3Storage | None = None,
                 progress: Callable[[dict, dict], None] = _runpod_progress,
                 log: Callable[[str], None] | None = None) -> None:
        self.pipe = pipe
        self.settings = settings or WorkerSettings()
        self.storage = storage
        self.progress = progress
        self.log = log or (lambda message: print(message, flush=True))
        self._busy = threading.Lock()  # one generation at a time per worker (one model in memory)

    async def handler(self, job: dict) -> dict:
        """The SDK awaits this; the generation runs in a thread so the worker's event loop stays free
        (heartbeats, the stop channel). A cancellation of this task (RunPod cancel or execution
        timeout) sets the stop flag; the thread stops within a denoising step and cleans up."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.run, job, stop.is_set)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            self.log(f"job {job.get('id')}: cancelled, stopping")
            while not future.done():
                try:
                    await asyncio.wait({future}, timeout=1.0)
                except asyncio.CancelledError:
                    continue
            raise

    def run(self, job: dict, should_stop: Callable[[], bool] = lambda: False) -> dict:
        """One job, blocking: the output dict, or ``{"error": message}`` for a failure the user can act on."""
        job_id = str(job.get("id") or "job")
        with self._busy:
            jobdir = Path(tempfile.mkdtemp(prefix="infinitetalk-job-"))
            try:
                return self._run(job, job_id, jobdir, should_stop)
            except (InputError, StorageError) as exc:
                self.log(f"job {job_id} failed: {exc}")
                return {"error": str(exc)}
            except GenerationCancelled:
                self.log(f"job {job_id} cancelled")
                return {"error": "the job was cancelled"}
            except Exception as exc:
                from .pipeline import GenerationError

                if isinstance(exc, GenerationError):  # e.g. out of GPU memory: a user-facing message
                    self.log(f"job {job_id} failed: {exc}")
                    return {"error": str(exc)}
                raise  # a bug: the SDK reports it with its traceback
            finally:
                shutil.rmtree(jobdir, ignore_errors=True)

    def _run(self, job: dict, job_id: str, jobdir: Path, should_stop: Callable[[], bool]) -> dict:
        settings = self.settings
        last_sent = [0.0]

        def on_progress(snapshot: dict) -> None:
            now = time.monotonic()
            if snapshot["chunk_finished"] or now - last_sent[0] >= settings.progress_interval_s:
                last_sent[0] = now
                self.progress(job, {k: v for k, v in snapshot.items() if k != "chunk_finished"})

        def fetch(name: str, value: Any, workdir: Path) -> Path:
            return fetch_input(name, value, jobdir, max_bytes=settings.input_max_bytes,
                               timeout_s=settings.input_timeout_s, should_stop=should_stop)

        t0 = time.perf_counter()
        result = service.run_job(self.pipe, job.get("input"), jobdir / "run", fetch=fetch, on_progress=on_progress,
                                 should_stop=should_stop, log=self.log)
        out = {"seed": result.result.seed, "duration": round(result.result.duration, 3),
               "frames": result.result.num_frames, "width": result.result.width, "height": result.result.height,
               "chunks": result.result.num_chunks, "metrics": dict(result.metrics)}
        size = result.path.stat().st_size
        if self.storage is not None:
            upload = self.storage.upload(result.path, job_id=job_id)
            out.update(video_url=upload.url, storage="s3", bucket=upload.bucket, key=upload.key, bytes=upload.size,
                       sha256=upload.sha256, expires_in=upload.expires_in)
            self.log(f"job {job_id}: uploaded {upload.size} bytes to {upload.key}")
        elif size <= settings.inline_max_bytes:
            out.update(video_url="data:video/mp4;base64," + base64.b64encode(result.path.read_bytes()).decode(),
                       storage="inline", bytes=size)
        else:
            raise StorageError(f"the video is {_size(size)}, more than the {_size(settings.inline_max_bytes)} "
                               "that can be returned inline: configure an output bucket (INFINITETALK_OUTPUT_BUCKET)")
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out


# ----------------------------------------------------------------------------------------------
# Boot
# ----------------------------------------------------------------------------------------------


def boot(env: Mapping[str, str] | None = None, *, settings: Settings | None = None, load=None) -> RunPodWorker:
    """Read and check every setting first (:meth:`Settings.from_env` of ``env``, default
    ``os.environ``; then the bucket over the network), so a bad configuration stops the worker at
    once, before any weight is read; then load the models once (``load(settings)``, default
    :func:`infinitetalk.service.load_pipeline`)."""
    settings = Settings.from_env(env) if settings is None else settings
    service.configure_logging()
    storage = open_storage(settings.storage, check=settings.check_bucket)
    pipe = (load or service.load_pipeline)(settings)
    limits = settings.worker
    where = storage.where() if storage is not None else f"inline (up to {limits.inline_max_bytes / MB:g} MB)"
    print(f"worker ready: outputs {where}", flush=True)
    return RunPodWorker(pipe, limits, storage)


def main() -> None:
    """Entry point: check the settings, boot, then hand the handler to ``runpod.serverless.start``
    (which reads its own ``--rp_*`` arguments from the command line)."""
    from .download import WeightsDownloadError

    # The SDK logs at DEBUG by default, which prints every job's whole output (an inline video is
    # megabytes of base64; a presigned URL is a bearer credential). RUNPOD_LOG_LEVEL overrides this.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    try:
        settings = Settings.from_env()  # first: a bad setting stops the worker in milliseconds
        import runpod

        worker = boot(settings=settings)
    except (SettingsError, WeightsDownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    runpod.serverless.start({"handler": worker.handler})


__all__ = ["RunPodWorker", "WorkerConfigError", "WorkerSettings", "boot", "decode_data_url", "fetch_input", "main"]
