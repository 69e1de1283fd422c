"""A job given as JSON over HTTP: the part the RunPod worker and the Modal endpoint share.

* :func:`fetch_input` (and :func:`decode_data_url`): a file input given as an http(s) URL (fetched with
  the RunPod SDK's SSRF-safe client: public addresses only, every redirect re-checked) or a ``data:``
  URL (base64) -> a local file, under a size and a time limit; anything else (``file://``, a local
  path, ``s3://``) is refused with an :class:`~infinitetalk.errors.InputError` naming the input;
* :func:`run_input_job`: a job's ``input`` object through :func:`infinitetalk.service.run_job` with those
  fetches, in a folder of the caller's (the caller removes it once the video is delivered);
* :func:`result_fields` and :func:`upload_fields`: the JSON fields that describe the result (seed,
  duration, size, metrics) and, with a bucket, the uploaded object (presigned URL, key, sha256).

The limits are the :class:`~infinitetalk.settings.WorkerSettings` (``INFINITETALK_INPUT_MAX_MB``,
``INFINITETALK_INPUT_TIMEOUT_S``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlparse

from . import service
from .errors import GenerationCancelled, InputError
from .settings import MB, WorkerSettings

# ----------------------------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------------------------


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``10 MB`` or ``1000 bytes``."""
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
        raise InputError(f"the {name} input is larger than the limit of {size_text(max_bytes)}")
    try:
        data = base64.b64decode(payload, validate=True) if is_base64 else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise InputError(f"the {name} input is not valid base64 in its data URL") from None
    if len(data) > max_bytes:
        raise InputError(f"the {name} input is larger than the limit of {size_text(max_bytes)}")
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
        # Not a bare word, so that errors name it "the <name> input" (inputs.name_inputs); no extension: files
        # are recognised by their content.
        path = folder / f"{name}-data-url"
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
            raise InputError(f"the {name} input is larger than the limit of {size_text(max_bytes)}") from None
        if "could not resolve" in reason or "no addresses" in reason:
            raise InputError(f"could not download the {name} input: {reason}") from None
        raise InputError(f"the {name} input URL is not allowed ({reason})") from None
    except requests.RequestException as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]
        raise InputError(f"could not download the {name} input from {urlparse(text).hostname}: {reason}") from None
    return path


# ----------------------------------------------------------------------------------------------
# One job
# ----------------------------------------------------------------------------------------------


def run_input_job(pipe, job_input: Mapping[str, Any] | Any, jobdir: str | os.PathLike, limits: WorkerSettings, *,
                  should_stop: Callable[[], bool] | None = None, on_progress: Callable[[dict], None] | None = None,
                  on_preview: Callable[[Path, float], None] | None = None,
                  log: Callable[[str], None] = service._log) -> service.JobResult:
    """Validate ``job_input`` (the inputs of :data:`infinitetalk.service.INPUTS`, files as URLs), fetch its
    files into ``jobdir/inputs`` and generate into ``jobdir/run`` (:func:`infinitetalk.service.run_job`,
    which removes ``jobdir/run`` on failure). ``jobdir`` is the caller's: it removes it after delivery."""
    jobdir = Path(jobdir)

    def fetch(name: str, value: Any, workdir: Path) -> Path:
        return fetch_input(name, value, jobdir, max_bytes=limits.input_max_bytes, timeout_s=limits.input_timeout_s,
                           should_stop=should_stop)

    return service.run_job(pipe, job_input, jobdir / "run", fetch=fetch, on_progress=on_progress,
                           should_stop=should_stop, on_preview=on_preview, log=log)


def result_fields(job: service.JobResult) -> dict[str, Any]:
    """What a JSON answer says about the video: seed, duration (s), frames, width, height, chunks, metrics."""
    r = job.result
    return {"seed": r.seed, "duration": round(r.duration, 3), "frames": r.num_frames, "width": r.width,
            "height": r.height, "chunks": r.num_chunks, "metrics": dict(job.metrics)}


def upload_fields(upload) -> dict[str, Any]:
    """What a JSON answer says about the uploaded MP4 (an :class:`infinitetalk.storage.Upload`)."""
    return {"video_url": upload.url, "storage": "s3", "bucket": upload.bucket, "key": upload.key,
            "bytes": upload.size, "sha256": upload.sha256, "expires_in": upload.expires_in}


__all__ = ["decode_data_url", "fetch_input", "result_fields", "run_input_job", "size_text", "upload_fields"]
