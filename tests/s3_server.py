"""A throwaway S3 service for tests: moto's standalone server on loopback, plus a bucket.

    with moto_s3_server() as s3:          # or the `s3_server` pytest fixture below
        url = s3.url("checkpoints")         # s3://qwen2-test-<port>/checkpoints
        ...                                 # anything that uses boto3's default chain

The server is `python -m moto.server` (PyPI `moto[server]`) started as a subprocess on
127.0.0.1 with a free port; nothing leaves the machine. While the context is open the process
environment carries the endpoint and dummy credentials, so boto3, multi-storage-client's
implicit `s3://bucket/...` profiles and child processes (torch.multiprocessing spawn) all reach
it without any configuration file:

    AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3   http://127.0.0.1:<port>
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY  testing
    AWS_DEFAULT_REGION                        us-east-1
    AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE  /dev/null (a developer's ~/.aws is not read)

Everything is restored and the server is stopped (its state is in memory only) on exit.
moto[server] comes with the `test` extra (tools/setup_env.sh installs it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from qwen2_megatron.parallel.local_launch import free_port
from tests.processes import stop_process

STARTUP_TIMEOUT_S = 120.0  # about 2 s on an idle machine; far more on a loaded one


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    env: dict[str, str]  # what was put into os.environ (also handy for subprocess env=)

    def url(self, *parts: str) -> str:
        """s3://<bucket>/<parts joined by '/'>"""
        key = "/".join(p.strip("/") for p in parts if p)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def client(self) -> Any:
        """A boto3 S3 client for the server (for checks that look at the objects directly)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (sorted)."""
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(
            obj["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        )


def _wait_until_up(endpoint: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode} before it was up")
        try:
            with opener.open(f"{endpoint}/moto-api/", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    raise TimeoutError(f"moto server at {endpoint} not up after {timeout:.0f} s")


def _forget_msc_clients() -> None:
    """multi-storage-client caches one client per profile (for s3://bucket URLs: per bucket) for
    the life of the process, endpoint included: drop them so that a later server is reached.
    (A fresh bucket name per server avoids the problem too.) Private API, hence guarded."""
    shortcuts = sys.modules.get("multistorageclient.shortcuts")
    cache = getattr(shortcuts, "_STORAGE_CLIENT_CACHE", None)
    if isinstance(cache, dict):
        cache.clear()


@contextlib.contextmanager
def moto_s3_server(bucket: str | None = None) -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1, create `bucket` (default: qwen2-test-<port>, unique
    per server), point the AWS env vars at it."""
    port = free_port()
    bucket = bucket or f"qwen2-test-{port}"
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    }
    saved = {key: os.environ.get(key) for key in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    try:
        _wait_until_up(endpoint, proc, STARTUP_TIMEOUT_S)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(env)
        server = S3Server(endpoint=endpoint, bucket=bucket, env=env)
        server.client().create_bucket(Bucket=bucket)
        _forget_msc_clients()
        yield server
    finally:
        _forget_msc_clients()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_process(proc, 10)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """One moto server (and bucket) per test module; tests use distinct prefixes in it."""
    with moto_s3_server() as server:
        yield server
