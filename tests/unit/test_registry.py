"""The registry fails closed: "no champion yet" only when MLflow itself says so, never on an error."""

from __future__ import annotations

import socket
import sqlite3

import pytest

from driftloop import registry
from driftloop.settings import get_settings


def test_no_model_and_no_alias_read_as_no_champion(home):
    s = get_settings().ensure()
    assert registry.champion_version(s, "nothing-registered") is None
    registry.client(s).create_registered_model("bare")
    assert registry.champion_version(s, "bare") is None     # registered, never promoted


def test_a_broken_registry_store_is_an_error_not_no_champion(home):
    s = get_settings().ensure()
    registry.client(s).create_registered_model("m")
    db = s.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:                          # the alias table disappears under MLflow: a real store fault
        con.execute("ALTER TABLE registered_model_aliases RENAME TO aliases_gone")
    with pytest.raises(registry.RegistryUnavailable, match="model registry at sqlite:///.* unavailable"):
        registry.champion_version(s, "m")


def test_an_unreachable_tracking_server_is_an_error_not_no_champion(home, monkeypatch):
    with socket.socket() as sock:                              # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    s = get_settings()
    with pytest.raises(registry.RegistryUnavailable, match=f"127.0.0.1:{port}"):
        registry.champion_version(s, "digits")
