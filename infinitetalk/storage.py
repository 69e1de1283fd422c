"""Output storage: upload the MP4 to an S3-compatible bucket and hand out a presigned GET URL.

Works with AWS S3, Cloudflare R2, Backblaze B2, MinIO and anything else that speaks the S3 API.
Configured by environment variables, read and checked once at start-up with the other settings
(:meth:`infinitetalk.settings.Settings.from_env`, then :func:`open_storage`; or :func:`storage_from_env`
alone): a wrong or half-done configuration stops the server at boot with one clear line, never after
a generation:

=====================================  =========================================================
``INFINITETALK_OUTPUT_BUCKET``         bucket name; unset = no bucket (Cog returns the file, the
                                       RunPod worker returns small videos inline)
``INFINITETALK_OUTPUT_PREFIX``         key prefix, default ``infinitetalk/``
``INFINITETALK_OUTPUT_URL_EXPIRY``     presigned URL lifetime in seconds, default 86400 (1 day),
                                       at most 604800 (7 days, the SigV4 limit)
``INFINITETALK_S3_ENDPOINT_URL``       e.g. ``https://<account>.r2.cloudflarestorage.com``,
                                       ``https://s3.us-west-004.backblazeb2.com``; unset = AWS
``INFINITETALK_S3_REGION``             default ``$AWS_REGION``/``$AWS_DEFAULT_REGION``, else
                                       ``us-east-1`` (R2: ``auto``)
``INFINITETALK_S3_ACCESS_KEY_ID``      credentials; unset = boto3's usual chain (``AWS_ACCESS_KEY_ID``
``INFINITETALK_S3_SECRET_ACCESS_KEY``  and ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role)
``INFINITETALK_S3_ADDRESSING_STYLE``   ``auto`` (default), ``path`` (MinIO) or ``virtual``
``INFINITETALK_S3_MULTIPART_MB``       files this large or larger go up as a multipart upload in
                                       parts of this size; default 64, at least 5 (the S3 minimum)
``INFINITETALK_S3_CHECK``              1 (default): at start-up, check that the bucket exists and
                                       is reachable (``HeadBucket``); 0 skips the network check
``INFINITETALK_REQUIRE_BUCKET``        1: a missing bucket is a start-up error (production workers)
=====================================  =========================================================

Objects are named ``<prefix><job id>/<first 16 hex of the SHA-256 of the file>.mp4``: a retried
job never overwrites another job's video, and a retry that made the same bytes lands on the same
key. Retention is the bucket's job: set a lifecycle rule on the prefix (e.g. expire after the URL
expiry).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .envvars import SettingsError, env_choice, env_flag, env_number, env_text

logger = logging.getLogger(__name__)

ENV_BUCKET = "INFINITETALK_OUTPUT_BUCKET"
ENV_PREFIX = "INFINITETALK_OUTPUT_PREFIX"
ENV_EXPIRY = "INFINITETALK_OUTPUT_URL_EXPIRY"
ENV_ENDPOINT = "INFINITETALK_S3_ENDPOINT_URL"
ENV_REGION = "INFINITETALK_S3_REGION"
ENV_ACCESS_KEY = "INFINITETALK_S3_ACCESS_KEY_ID"
ENV_SECRET_KEY = "INFINITETALK_S3_SECRET_ACCESS_KEY"
ENV_ADDRESSING = "INFINITETALK_S3_ADDRESSING_STYLE"
ENV_MULTIPART_MB = "INFINITETALK_S3_MULTIPART_MB"
ENV_CHECK = "INFINITETALK_S3_CHECK"
ENV_REQUIRE = "INFINITETALK_REQUIRE_BUCKET"
#: Every variable this module reads (for messages and documentation).
ENV_VARS = (ENV_BUCKET, ENV_PREFIX, ENV_EXPIRY, ENV_ENDPOINT, ENV_REGION, ENV_ACCESS_KEY, ENV_SECRET_KEY,
            ENV_ADDRESSING, ENV_MULTIPART_MB, ENV_CHECK, ENV_REQUIRE)

DEFAULT_PREFIX = "infinitetalk/"
DEFAULT_EXPIRY_S = 86400
MAX_EXPIRY_S = 604800  # SigV4 presigned URLs live at most 7 days
DEFAULT_MULTIPART_MB = 64
MIN_PART_MB = 5  # S3's smallest part (all but the last)
MB = 1024 * 1024


#: The storage configuration is missing or invalid (also: no credentials, no such bucket, endpoint
#: unreachable); one line that names the variable. The name of the settings' error in this module.
StorageConfigError = SettingsError


class StorageError(RuntimeError):
    """An upload failed; one line for the job's error."""


@dataclass(frozen=True)
class StorageConfig:
    bucket: str
    prefix: str = DEFAULT_PREFIX
    url_expiry: int = DEFAULT_EXPIRY_S
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    addressing_style: str = "auto"
    multipart_threshold: int = DEFAULT_MULTIPART_MB * MB
    multipart_chunksize: int = DEFAULT_MULTIPART_MB * MB

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageConfig | None:
        """The configuration in ``env`` (default ``os.environ``); None when no bucket is configured.

        Raises :class:`StorageConfigError` when it is half done (storage variables without a bucket,
        a key id without its secret) or a value is invalid.
        """
        env = os.environ if env is None else env
        bucket = env_text(env, ENV_BUCKET)
        if bucket is None:
            stray = [n for n in (ENV_PREFIX, ENV_EXPIRY, ENV_ENDPOINT, ENV_ACCESS_KEY, ENV_SECRET_KEY)
                     if env_text(env, n)]
            if stray:
                raise StorageConfigError(f"{', '.join(stray)} set but {ENV_BUCKET} is not: set the bucket name "
                                         f"(or unset the storage variables)")
            return None
        if "/" in bucket or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]", bucket):
            hint = f"; put a key prefix in {ENV_PREFIX}" if "/" in bucket else ""
            raise StorageConfigError(f"{ENV_BUCKET} must be a bucket name (3-255 letters, digits, '.', '-', '_'), "
                                     f"got {bucket!r}{hint}")
        prefix = env.get(ENV_PREFIX, DEFAULT_PREFIX).strip().lstrip("/")  # blank: no prefix
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        expiry = env_number(env, ENV_EXPIRY, DEFAULT_EXPIRY_S, 1, MAX_EXPIRY_S, integer=True, unit="seconds")
        part_mb = env_number(env, ENV_MULTIPART_MB, DEFAULT_MULTIPART_MB, MIN_PART_MB, 5 * 1024, integer=True,
                             unit="MB")
        endpoint = env_text(env, ENV_ENDPOINT)
        if endpoint is not None:
            parsed = urlparse(endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise StorageConfigError(f"{ENV_ENDPOINT} must be an http(s) URL such as "
                                         f"https://<account>.r2.cloudflarestorage.com, got {endpoint!r}")
        key_id, secret = env_text(env, ENV_ACCESS_KEY), env_text(env, ENV_SECRET_KEY)
        if (key_id is None) != (secret is None):
            missing = ENV_SECRET_KEY if secret is None else ENV_ACCESS_KEY
            raise StorageConfigError(f"{missing} is not set: give {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} together "
                                     "(or neither, for boto3's usual credential chain)")
        style = env_choice(env, ENV_ADDRESSING, "auto", ("auto", "path", "virtual"))
        region = (env_text(env, ENV_REGION) or env_text(env, "AWS_REGION") or env_text(env, "AWS_DEFAULT_REGION")
                  or "us-east-1")
        return cls(bucket=bucket, prefix=prefix, url_expiry=expiry, endpoint_url=endpoint, region=region,
                   access_key_id=key_id, secret_access_key=secret, addressing_style=style,
                   multipart_threshold=part_mb * MB, multipart_chunksize=part_mb * MB)


@dataclass(frozen=True)
class Upload:
    url: str  # presigned GET URL
    bucket: str
    key: str
    size: int
    sha256: str
    multipart: bool
    expires_in: int
    seconds: float


def _safe_job_id(job_id: str | None) -> str:
    if not job_id:
        return uuid.uuid4().hex
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(job_id)).strip("._")[:128] or uuid.uuid4().hex


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MB), b""):
            h.update(block)
    return h.hexdigest()


class S3Storage:
    """Uploads to one bucket; :meth:`upload` returns a presigned GET URL with the configured expiry."""

    def __init__(self, config: StorageConfig, client=None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.config = config
        if client is None:
            session = boto3.session.Session(aws_access_key_id=config.access_key_id,
                                            aws_secret_access_key=config.secret_access_key,
                                            region_name=config.region)
            if session.get_credentials() is None:
                raise StorageConfigError(
                    f"no credentials for the bucket {config.bucket!r}: set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} "
                    "(or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an instance role)")
            client = session.client(
                "s3", endpoint_url=config.endpoint_url,
                config=Config(signature_version="s3v4", s3={"addressing_style": config.addressing_style},
                              connect_timeout=10, read_timeout=120, retries={"max_attempts": 5, "mode": "standard"}))
        self.client = client
        self.transfer_config = TransferConfig(multipart_threshold=config.multipart_threshold,
                                              multipart_chunksize=config.multipart_chunksize,
                                              max_concurrency=4, use_threads=True)

    def where(self) -> str:
        return f"s3://{self.config.bucket}/{self.config.prefix}" + (
            f" at {self.config.endpoint_url}" if self.config.endpoint_url else "")

    def check(self) -> None:
        """Start-up check: the bucket exists and the endpoint answers (``HeadBucket``).

        A 403 is only a warning: a write-only key may not be allowed to list or head the bucket.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.config.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 403 or code in ("403", "AccessDenied", "Forbidden"):
                logger.warning("cannot check the bucket %s (access denied to HeadBucket); uploads may still work",
                               self.config.bucket)
                return
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageConfigError(f"the bucket {self.config.bucket!r} does not exist at "
                                         f"{self.config.endpoint_url or 'AWS S3'} ({ENV_BUCKET})") from None
            raise StorageConfigError(f"cannot use the bucket {self.config.bucket!r}: {code or exc}") from None
        except BotoCoreError as exc:
            raise StorageConfigError(f"cannot reach the storage endpoint {self.config.endpoint_url or 'AWS S3'} "
                                     f"for the bucket {self.config.bucket!r}: {exc}") from None

    def object_key(self, job_id: str | None, sha256: str) -> str:
        return f"{self.config.prefix}{_safe_job_id(job_id)}/{sha256[:16]}.mp4"

    def presign(self, key: str) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.config.bucket, "Key": key},
                                                  ExpiresIn=self.config.url_expiry)

    def delete(self, keys: list[str]) -> None:
        """Remove objects this worker uploaded (a cancelled or failed job's previews); failures are logged only."""
        from botocore.exceptions import BotoCoreError, ClientError

        for key in keys:
            try:
                self.client.delete_object(Bucket=self.config.bucket, Key=key)
            except (BotoCoreError, ClientError) as exc:
                logger.warning("could not delete %s from %s: %s", key, self.where(), exc)

    def upload(self, path: str | os.PathLike, job_id: str | None = None, content_type: str = "video/mp4") -> Upload:
        """Upload ``path`` (multipart at or above the threshold) and return its presigned URL."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        t0 = time.perf_counter()
        size = Path(path).stat().st_size
        digest = file_sha256(path)
        key = self.object_key(job_id, digest)
        try:
            self.client.upload_file(str(path), self.config.bucket, key, Config=self.transfer_config,
                                    ExtraArgs={"ContentType": content_type,
                                               "Metadata": {"sha256": digest, "job-id": str(job_id or "")[:256]}})
            url = self.presign(key)
        except (S3UploadFailedError, BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not upload the video to {self.where()}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        upload = Upload(url=url, bucket=self.config.bucket, key=key, size=size, sha256=digest,
                        multipart=size >= self.config.multipart_threshold, expires_in=self.config.url_expiry,
                        seconds=time.perf_counter() - t0)
        logger.info("uploaded %s (%.1f MB%s) in %.1f s", key, size / MB, ", multipart" if upload.multipart else "",
                    upload.seconds)
        return upload


def bucket_required(env: Mapping[str, str] | None = None) -> bool:
    """``$INFINITETALK_REQUIRE_BUCKET`` (default 0)."""
    return env_flag(os.environ if env is None else env, ENV_REQUIRE, False)


def bucket_check(env: Mapping[str, str] | None = None) -> bool:
    """``$INFINITETALK_S3_CHECK`` (default 1): check the bucket over the network at start-up."""
    return env_flag(os.environ if env is None else env, ENV_CHECK, True)


def check_required(config: StorageConfig | None, required: bool) -> None:
    """A missing bucket is an error when one is required (production workers)."""
    if config is None and required:
        raise StorageConfigError(f"no output bucket configured: set {ENV_BUCKET} (and {ENV_ENDPOINT}, "
                                 f"{ENV_ACCESS_KEY}, {ENV_SECRET_KEY} for a non-AWS store)")


def open_storage(config: StorageConfig | None, *, check: bool = True, client=None) -> S3Storage | None:
    """The storage of an already validated ``config`` (None: no bucket, no storage); with ``check``
    the bucket is also verified over the network. Raises :class:`StorageConfigError` (no credentials,
    no such bucket, endpoint unreachable)."""
    if config is None:
        return None
    storage = S3Storage(config, client=client)
    if check:
        storage.check()
    logger.info("outputs go to %s (URLs valid %d s)", storage.where(), config.url_expiry)
    return storage


def storage_from_env(env: Mapping[str, str] | None = None, *, check: bool | None = None,
                     require: bool | None = None, client=None) -> S3Storage | None:
    """The configured storage, checked; None when no bucket is configured (and none is required).

    Every configuration problem raises :class:`StorageConfigError` here. ``check`` (default
    ``$INFINITETALK_S3_CHECK``, on) also verifies the bucket over the network; ``require`` (default
    ``$INFINITETALK_REQUIRE_BUCKET``) makes a missing bucket an error. The servers read these as part
    of :meth:`infinitetalk.settings.Settings.from_env` and call :func:`open_storage`.
    """
    env = os.environ if env is None else env
    config = StorageConfig.from_env(env)
    check_required(config, bucket_required(env) if require is None else require)
    return open_storage(config, check=bucket_check(env) if check is None else check, client=client)


__all__ = [
    "ENV_VARS",
    "S3Storage",
    "StorageConfig",
    "StorageConfigError",
    "StorageError",
    "Upload",
    "bucket_check",
    "bucket_required",
    "check_required",
    "file_sha256",
    "open_storage",
    "storage_from_env",
]
