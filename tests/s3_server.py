"""An S3-compatible server on loopback for the storage and RunPod tests: moto's standalone server
(``ThreadedMotoServer``, a werkzeug thread in this process) on 127.0.0.1 and a free port."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    client: object

    def env(self, **extra: str) -> dict[str, str]:
        """The INFINITETALK_* storage variables that point at this server's bucket."""
        return {
            "INFINITETALK_OUTPUT_BUCKET": self.bucket,
            "INFINITETALK_S3_ENDPOINT_URL": self.endpoint,
            "INFINITETALK_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "INFINITETALK_S3_SECRET_ACCESS_KEY": SECRET_KEY,
            "INFINITETALK_S3_REGION": REGION,
            "INFINITETALK_S3_ADDRESSING_STYLE": "path",
            **extra,
        }

    def keys(self) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.bucket)
        return sorted(obj["Key"] for obj in listing.get("Contents", []))


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY)
        client.create_bucket(Bucket="videos")
        yield S3Server(endpoint, "videos", client)
    finally:
        server.stop()
