"""Shared fixtures. Unit tests need none of Ray; integration fixtures live in tests/integration."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh DRIFTLOOP_HOME for one test (tables, MLflow store, state)."""
    h = tmp_path / "home"
    monkeypatch.setenv("DRIFTLOOP_HOME", str(h))
    monkeypatch.delenv("DRIFTLOOP_DATA_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return h


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `driftloop` command the way a user would, from the project root."""
    exe = Path(sys.executable).with_name("driftloop")
    return subprocess.run(
        [str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


BUCKET = "driftloop-test"


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 (one per test session) and the environment a command needs to use it; yields
    (env, boto3 client) with the bucket BUCKET created."""
    import boto3  # moto's own dependency (dev extra)

    from tests.integration.conftest import answers_200, wait_for

    server = Path(sys.executable).with_name("moto_server")  # the dev extra's, in this environment
    port = free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and answers_200(url), 60, every=0.2, what=f"moto_server on {url}")
    except AssertionError:
        proc.kill()
        raise
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield env, client
    finally:
        proc.kill()
        proc.wait(10)
