"""RunPod Serverless worker: the same service core as the Cog predictor, behind RunPod's job API.

Start with ``python runpod_worker.py`` (the Docker image's CMD; locally add
``--rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000`` for the SDK's development server).
At boot: the worker settings and the output storage are read and checked (a bad configuration
stops the worker here with one line), then every model is loaded once. Each job:

1. its ``input`` is validated by :func:`infinitetalk.service.build_request` (the Cog predictor's
   names, defaults, ranges and messages) before anything is downloaded;
2. file inputs (``image``, ``audio``, ``audio_2``) are http(s) URLs, fetched with the SDK's
   SSRF-safe client (public addresses only, redirects re-checked) under a size and a time limit,
   or ``data:`` URLs (base64); anything else (``file://``, a local path, ``s3://``) is refused
   (:mod:`infinitetalk.jobs`, shared with the Modal endpoint);
3. :func:`infinitetalk.service.run_job` probes the files, then generates the MP4 in the job's
   temporary folder, reporting progress through ``runpod.serverless.progress_update`` (chunks done,
   seconds of video) and in the log (plain ``chunk 1/3, step 2/4`` lines: no terminal bars);
4. the MP4 goes to the configured bucket (the job's output carries a presigned URL) or, with no
   bucket, comes back inline as a ``data:video/mp4;base64`` URL when it is small enough.

The handler streams: with ``"preview": true`` every finished chunk yields a preview item (a playable
MP4 of the video so far, delivered the same way) on ``/stream/<id>``; the result is always the last
item, and the job's output (``/run`` + ``/status``, ``/runsync``) is the list of items
(``return_aggregate_stream``): ``output[-1]`` is the result, as on Cog.

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
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from . import service
from .errors import GenerationCancelled, InputError
from .jobs import decode_data_url, fetch_input, result_fields, run_input_job, size_text, upload_fields
from .settings import MB, Settings, SettingsError, WorkerConfigError, WorkerSettings
from .storage import S3Storage, StorageError, open_storage

logger = logging.getLogger(__name__)

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

    async def handler(self, job: dict):
        """The SDK's job handler, an async generator (its items go to ``/stream/<id>``; with
        ``return_aggregate_stream`` the job's output is the list of them). With ``"preview": true`` in
        the input, one item per finished chunk: ``{"preview": k, "seconds": s, "preview_url": ...}``, a
        playable MP4 of the video so far (uploaded like the video, or inline when small). The last item
        is always the job's result, the same dict as without previews (or ``{"error": ...}``).

        The generation runs in a thread so the worker's event loop stays free (heartbeats, the stop
        channel). A cancellation of this task (RunPod cancel or execution timeout) sets the stop flag;
        the thread stops within a denoising step and cleans up."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue = asyncio.Queue()
        future = loop.run_in_executor(None, self.run, job, stop.is_set,
                                      lambda item: loop.call_soon_threadsafe(previews.put_nowait, item))
        try:
            while not future.done() or not previews.empty():
                getter = asyncio.ensure_future(previews.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            yield future.result()
        except (asyncio.CancelledError, GeneratorExit):
            stop.set()
            self.log(f"job {job.get('id')}: cancelled, stopping")
            while not future.done():
                try:
                    await asyncio.wait({future}, timeout=1.0)
                except asyncio.CancelledError:
                    continue
            raise

    def run(self, job: dict, should_stop: Callable[[], bool] = lambda: False,
            on_preview: Callable[[dict], None] | None = None) -> dict:
        """One job, blocking: the output dict, or ``{"error": message}`` for a failure the user can act on.
        ``on_preview(item)``: each preview item (see :meth:`handler`) when the input asks for previews."""
        job_id = str(job.get("id") or "job")
        with self._busy:
            jobdir = Path(tempfile.mkdtemp(prefix="infinitetalk-job-"))
            try:
                return self._run(job, job_id, jobdir, should_stop, on_preview)
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

    def _run(self, job: dict, job_id: str, jobdir: Path, should_stop: Callable[[], bool],
             on_preview: Callable[[dict], None] | None = None) -> dict:
        settings = self.settings
        last_sent = [0.0]

        def on_progress(snapshot: dict) -> None:
            now = time.monotonic()
            if snapshot["chunk_finished"] or now - last_sent[0] >= settings.progress_interval_s:
                last_sent[0] = now
                self.progress(job, {k: v for k, v in snapshot.items() if k != "chunk_finished"})

        t0 = time.perf_counter()
        job_input = job.get("input")
        wants = on_preview is not None and isinstance(job_input, Mapping) and job_input.get("preview") is True
        uploaded: list[str] = []  # the previews' keys: removed again if the job does not complete
        try:
            result = run_input_job(self.pipe, job_input, jobdir, settings, should_stop=should_stop,
                                   on_progress=on_progress, log=self.log,
                                   on_preview=self._previewer(job_id, on_preview, uploaded) if wants else None)
        except BaseException:
            if uploaded and self.storage is not None:
                self.storage.delete(uploaded)
            raise
        out = result_fields(result)
        delivered = self._deliver(result.path, job_id)
        if delivered is None:
            raise StorageError(f"the video is {size_text(result.path.stat().st_size)}, more than the "
                               f"{size_text(settings.inline_max_bytes)} that can be returned inline: configure an "
                               "output bucket (INFINITETALK_OUTPUT_BUCKET)")
        out.update(delivered)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out

    def _deliver(self, path: Path, job_id: str) -> dict | None:
        """An MP4 as output fields: uploaded to the bucket (``upload_fields``: a presigned ``video_url``, its
        key, size, hash, expiry), else inline as a ``data:`` URL when small enough; None when neither."""
        if self.storage is not None:
            upload = self.storage.upload(path, job_id=job_id)
            self.log(f"job {job_id}: uploaded {upload.size} bytes to {upload.key}")
            return upload_fields(upload)
        size = path.stat().st_size
        if size > self.settings.inline_max_bytes:
            return None
        return {"video_url": "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode(),
                "storage": "inline", "bytes": size}

    def _previewer(self, job_id: str, on_preview: Callable[[dict], None],
                   uploaded: list[str]) -> Callable[[Path, float], None]:
        """Deliver each preview MP4 as the video is (:meth:`_deliver`), as an item whose ``preview_url`` is
        the delivered URL; the keys of uploaded previews go to ``uploaded``."""
        count = [0]

        def deliver(path: Path, seconds: float) -> None:
            delivered = self._deliver(path, job_id)
            if delivered is None:  # too big to send inline and no bucket: the final video says why
                return
            if delivered["storage"] == "s3":
                uploaded.append(delivered["key"])
            on_preview({"preview": count[0], "seconds": round(seconds, 3),
                        "preview_url": delivered.pop("video_url"), **delivered})
            count[0] += 1

        return deliver


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
    # The handler streams (previews, then the result); the job's output is the list of its items.
    runpod.serverless.start({"handler": worker.handler, "return_aggregate_stream": True})


__all__ = ["RunPodWorker", "WorkerConfigError", "WorkerSettings", "boot", "decode_data_url", "fetch_input", "main"]
