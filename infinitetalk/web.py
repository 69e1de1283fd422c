"""The web endpoint's core, without a web framework: one JSON request in, the MP4 (or an error) out.

``modal_app.py`` serves it (FastAPI in a Modal container); anything that can hand over the request body
and send back a :class:`WebReply` could. The request is the RunPod worker's job, ``{"input": {...}}``:
the inputs of the Cog predictor (names, defaults, ranges and messages of
:data:`infinitetalk.service.INPUTS`) with the files as http(s) or ``data:`` URLs, fetched under the
:class:`~infinitetalk.settings.WorkerSettings` limits (:mod:`infinitetalk.jobs`, shared with the worker).

Answers (:meth:`WebEndpoint.handle`):

* 200 ``video/mp4`` without an output bucket: the video itself, streamed from the job's folder; its seed,
  duration, frames, size and chunks in ``X-InfiniteTalk-*`` headers;
* 200 JSON with a bucket (``INFINITETALK_OUTPUT_BUCKET``): the RunPod worker's fields, ``video_url`` (a
  presigned URL), ``key``, ``sha256``, ``seed``, ``duration``, ...;
* 400 JSON ``{"error": "..."}``: the body is not a JSON object ``{"input": {...}}``;
* 422 JSON ``{"error": "..."}``: an input the prediction refuses, with the one-line message of the other
  front ends (also a file that cannot be downloaded, decoded or read);
* 500 JSON ``{"error": "..."}``: a generation failure that is not the input's (e.g. out of GPU memory);
  502: the upload to the bucket failed.

Each job has its own folder (inputs, output). It is removed before an error answer, and after the
video has been sent (:meth:`WebReply.close`, which the server calls once the response is done).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .jobs import result_fields, run_input_job, upload_fields
from .settings import WorkerSettings
from .storage import StorageError

#: The one shape of a request.
REQUEST_SHAPE = '{"input": {"image": "<https or data: URL>", "audio": "<https or data: URL>", ...}}'


class BadRequest(ValueError):
    """The request body is not ``{"input": {...}}``; the message says what is wrong."""


@dataclass
class WebReply:
    """One answer: ``json`` (a dict), or the MP4 at ``path`` to stream. ``close()`` removes the job's
    folder: call it once the response has been sent (or has failed to be)."""

    status: int
    json: dict[str, Any] | None = None
    path: Path | None = None
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None

    def close(self) -> None:
        cleanup, self.cleanup = self.cleanup, None
        if cleanup is not None:
            cleanup()


def error(status: int, message: str) -> WebReply:
    return WebReply(status, json={"error": message})


def parse_request(body: bytes | str | Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """The ``input`` object of a request body (JSON text, or already parsed); :class:`BadRequest` otherwise."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError:  # also UnicodeDecodeError
            raise BadRequest(f"the request body is not JSON; send {REQUEST_SHAPE}") from None
    if not isinstance(body, Mapping):
        raise BadRequest(f"the request must be a JSON object, got {type(body).__name__}; send {REQUEST_SHAPE}")
    unknown = sorted(set(body) - {"input"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))} in the request; send {REQUEST_SHAPE}")
    if not isinstance(body.get("input"), Mapping):
        raise BadRequest(f"the request needs an 'input' object; send {REQUEST_SHAPE}")
    return body["input"]


def video_headers(fields: Mapping[str, Any]) -> dict[str, str]:
    """The result's fields as response headers of the MP4."""
    names = {"seed": "Seed", "duration": "Duration", "frames": "Frames", "width": "Width", "height": "Height",
             "chunks": "Chunks"}
    headers = {f"X-InfiniteTalk-{header}": str(fields[key]) for key, header in names.items()}
    headers["Content-Disposition"] = f'inline; filename="infinitetalk-{fields["seed"]}.mp4"'
    return headers


class WebEndpoint:
    """Holds the loaded pipeline, the input limits and the optional bucket; :meth:`handle` answers one request.
    Requests run one at a time (one model in memory); a second one waits for the first."""

    def __init__(self, pipe, limits: WorkerSettings | None = None, storage=None,
                 log: Callable[[str], None] | None = None) -> None:
        self.pipe = pipe
        self.limits = limits or WorkerSettings()
        self.storage = storage
        self.log = log or (lambda message: print(message, flush=True))
        self._busy = threading.Lock()

    def handle(self, body: bytes | str | Mapping[str, Any] | Any) -> WebReply:
        """One request -> its :class:`WebReply` (see the module doc). Call ``close()`` on it once it is sent."""
        try:
            job_input = parse_request(body)
        except BadRequest as exc:
            return error(400, str(exc))
        job_id = uuid.uuid4().hex[:16]
        with self._busy:
            jobdir = Path(tempfile.mkdtemp(prefix="infinitetalk-job-"))
            handed_over = False
            try:
                reply = self._run(job_input, job_id, jobdir)
                handed_over = reply.cleanup is not None
                return reply
            except InputError as exc:
                self.log(f"job {job_id} refused: {exc}")
                return error(422, str(exc))
            except StorageError as exc:
                self.log(f"job {job_id} failed: {exc}")
                return error(502, str(exc))
            except Exception as exc:
                from .pipeline import GenerationError

                if isinstance(exc, GenerationError):  # e.g. out of GPU memory: a user-facing message
                    self.log(f"job {job_id} failed: {exc}")
                    return error(500, str(exc))
                raise  # a bug: the server reports it with its traceback
            finally:
                if not handed_over:
                    shutil.rmtree(jobdir, ignore_errors=True)

    def _run(self, job_input: Mapping[str, Any], job_id: str, jobdir: Path) -> WebReply:
        t0 = time.perf_counter()
        result = run_input_job(self.pipe, job_input, jobdir, self.limits, log=self.log)
        fields = result_fields(result)
        if self.storage is not None:
            upload = self.storage.upload(result.path, job_id=job_id)
            seconds = round(time.perf_counter() - t0, 2)
            self.log(f"job {job_id}: uploaded {upload.size} bytes to {upload.key} in {seconds:.1f}s")
            return WebReply(200, json={**upload_fields(upload), **fields, "seconds": seconds})
        self.log(f"job {job_id}: {result.path.stat().st_size} bytes of MP4 in {time.perf_counter() - t0:.1f}s")
        return WebReply(200, path=result.path, media_type="video/mp4", headers=video_headers(fields),
                        cleanup=lambda: shutil.rmtree(jobdir, ignore_errors=True))


__all__ = ["REQUEST_SHAPE", "BadRequest", "WebEndpoint", "WebReply", "error", "parse_request", "video_headers"]
