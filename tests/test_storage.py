"""Output storage (infinitetalk/storage.py) against moto's S3-compatible server on loopback.

Multipart above the (lowered) threshold, single PUT below it; presigned GET URLs carry the
configured expiry and fetch the object; object keys by job id + content hash (no clobbering);
every configuration mistake is a one-line StorageConfigError from storage_from_env (start-up),
and the Cog predictor's setup() stops on it before loading any model.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from infinitetalk import storage  # noqa: E402
from infinitetalk.storage import StorageConfig, StorageConfigError, storage_from_env  # noqa: E402
from s3_server import s3_server  # noqa: E402,F401  (tests/ is on sys.path for test modules)

MB = 1024 * 1024


@pytest.fixture
def no_ambient_aws(monkeypatch, tmp_path):
    """No credentials from this machine's environment, files or instance metadata."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_large_file_goes_up_multipart_small_file_in_one_put(s3_server, tmp_path):
    st = storage_from_env(s3_server.env(INFINITETALK_S3_MULTIPART_MB="5"))
    assert st.transfer_config.multipart_threshold == 5 * MB
    calls = []
    st.client.meta.events.register("before-call.s3.*", lambda model, **kw: calls.append(model.name))

    big = st.upload(_file(tmp_path / "big.mp4", 12 * MB), job_id="job-big")
    assert big.multipart and big.size == 12 * MB
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 3, calls
    assert calls.count("CompleteMultipartUpload") == 1 and "PutObject" not in calls
    head = s3_server.client.head_object(Bucket=s3_server.bucket, Key=big.key)
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == 12 * MB  # a 3-part object
    assert head["ContentType"] == "video/mp4" and head["Metadata"]["sha256"] == big.sha256

    calls.clear()
    small = st.upload(_file(tmp_path / "small.mp4", 100_000), job_id="job-small")
    assert not small.multipart and calls.count("PutObject") == 1 and "CreateMultipartUpload" not in calls
    head = s3_server.client.head_object(Bucket=s3_server.bucket, Key=small.key)
    assert "-" not in head["ETag"] and head["ContentLength"] == 100_000


def test_presigned_url_has_the_configured_expiry_and_fetches_the_video(s3_server, tmp_path):
    st = storage_from_env(s3_server.env(INFINITETALK_OUTPUT_URL_EXPIRY="900"))
    path = _file(tmp_path / "v.mp4", 50_000)
    t0 = time.time()
    up = st.upload(path, job_id="job-expiry")
    query = parse_qs(urlparse(up.url).query)
    assert query["X-Amz-Expires"] == ["900"] and up.expires_in == 900
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and "host" in query["X-Amz-SignedHeaders"][0]
    signed_at = time.mktime(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")) - time.timezone
    assert abs(signed_at - t0) < 120
    with urllib.request.urlopen(up.url, timeout=30) as resp:
        assert resp.read() == path.read_bytes()
    # The default is one day; the SigV4 maximum of 7 days is enforced at start-up.
    assert storage_from_env(s3_server.env()).config.url_expiry == 86400
    with pytest.raises(StorageConfigError, match="INFINITETALK_OUTPUT_URL_EXPIRY must be between 1 and 604800"):
        storage_from_env(s3_server.env(INFINITETALK_OUTPUT_URL_EXPIRY="604801"))


def test_keys_are_per_job_and_content_so_retries_never_clobber(s3_server, tmp_path):
    st = storage_from_env(s3_server.env(INFINITETALK_OUTPUT_PREFIX="renders/v1"))
    a, b = _file(tmp_path / "a.mp4", 1000), _file(tmp_path / "b.mp4", 1000)
    first = st.upload(a, job_id="job-7")
    retry_other_bytes = st.upload(b, job_id="job-7")
    other_job = st.upload(a, job_id="job-8")
    assert first.key.startswith("renders/v1/job-7/") and first.key.endswith(".mp4")
    assert len({first.key, retry_other_bytes.key, other_job.key}) == 3
    assert st.upload(a, job_id="job-7").key == first.key  # same job, same bytes: same object
    assert st.upload(a, job_id="../../etc").key.startswith("renders/v1/etc/")  # no path tricks in keys
    assert {first.key, retry_other_bytes.key, other_job.key} <= set(s3_server.keys())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INFINITETALK_S3_ENDPOINT_URL": "https://r2.example"}, "set but INFINITETALK_OUTPUT_BUCKET is not"),
        ({"INFINITETALK_OUTPUT_BUCKET": "bkt", "INFINITETALK_S3_ACCESS_KEY_ID": "k"},
         "INFINITETALK_S3_SECRET_ACCESS_KEY is not set"),
        ({"INFINITETALK_OUTPUT_BUCKET": "my-bucket/videos"}, "put a key prefix in INFINITETALK_OUTPUT_PREFIX"),
        ({"INFINITETALK_OUTPUT_BUCKET": "bkt", "INFINITETALK_OUTPUT_URL_EXPIRY": "1d"},
         "INFINITETALK_OUTPUT_URL_EXPIRY must be a whole number of seconds"),
        ({"INFINITETALK_OUTPUT_BUCKET": "bkt", "INFINITETALK_S3_ENDPOINT_URL": "r2.example.com"},
         "INFINITETALK_S3_ENDPOINT_URL must be an http(s) URL"),
        ({"INFINITETALK_OUTPUT_BUCKET": "bkt", "INFINITETALK_S3_MULTIPART_MB": "1"},
         "INFINITETALK_S3_MULTIPART_MB must be between 5 and"),
        ({"INFINITETALK_OUTPUT_BUCKET": "bkt", "INFINITETALK_S3_ADDRESSING_STYLE": "dns"},
         "INFINITETALK_S3_ADDRESSING_STYLE must be one of auto, path, virtual; got 'dns'"),
        ({"INFINITETALK_REQUIRE_BUCKET": "1"}, "no output bucket configured: set INFINITETALK_OUTPUT_BUCKET"),
    ],
)
def test_missing_or_invalid_configuration_is_one_clear_line(env, message):
    with pytest.raises(StorageConfigError) as err:
        storage_from_env(env, check=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_no_bucket_means_no_storage_and_defaults(monkeypatch):
    assert storage_from_env({}) is None
    cfg = StorageConfig.from_env({"INFINITETALK_OUTPUT_BUCKET": "bkt", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (cfg.prefix, cfg.url_expiry, cfg.region, cfg.endpoint_url) == ("infinitetalk/", 86400, "eu-west-1", None)
    assert cfg.multipart_threshold == 64 * MB
    assert set(storage.ENV_VARS) >= {"INFINITETALK_OUTPUT_BUCKET", "INFINITETALK_S3_ENDPOINT_URL"}


def test_start_up_checks_credentials_and_the_bucket(s3_server, no_ambient_aws):
    env = s3_server.env()
    del env["INFINITETALK_S3_ACCESS_KEY_ID"], env["INFINITETALK_S3_SECRET_ACCESS_KEY"]
    with pytest.raises(StorageConfigError, match="no credentials for the bucket 'videos'"):
        storage_from_env(env)
    with pytest.raises(StorageConfigError, match="the bucket 'missing-bucket' does not exist at http://127.0.0.1"):
        storage_from_env(s3_server.env(INFINITETALK_OUTPUT_BUCKET="missing-bucket"))
    closed = s3_server.env(INFINITETALK_S3_ENDPOINT_URL="http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.monotonic()
    with pytest.raises(StorageConfigError, match="cannot reach the storage endpoint http://127.0.0.1:9"):
        storage_from_env({**closed})
    assert time.monotonic() - t0 < 60


def test_cog_setup_stops_on_bad_storage_before_loading_models(monkeypatch, tmp_path):
    pytest.importorskip("cog")
    import predict

    monkeypatch.setenv("INFINITETALK_WEIGHTS", str(tmp_path / "no-weights"))  # would fail later, differently
    monkeypatch.setenv("INFINITETALK_OUTPUT_BUCKET", "bkt")
    monkeypatch.setenv("INFINITETALK_S3_ACCESS_KEY_ID", "k")
    monkeypatch.delenv("INFINITETALK_S3_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StorageConfigError, match="INFINITETALK_S3_SECRET_ACCESS_KEY is not set"):
        predict.Predictor().setup()
