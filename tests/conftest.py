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
