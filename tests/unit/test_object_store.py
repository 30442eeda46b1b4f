"""The data root on an S3-compatible object store: moto in server mode on 127.0.0.1 (started here), the Delta tables
under `DRIFTLOOP_DATA_ROOT=s3://bucket/prefix`, each command its own process, as on a cluster whose nodes share no
disk. Nothing is written to the local home's tables folder; what a user reads back is what was written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli
from tests.integration.conftest import answers_200, wait_for

BUCKET = "driftloop-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 and the environment a command needs to use it; yields (env, boto3 client)."""
    import boto3  # moto's own dependency (dev extra)

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


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_tables_on_an_s3_data_root_version_time_travel_and_stay_off_the_local_disk(s3, home):
    env, client = s3
    env = {**env, "DRIFTLOOP_DATA_ROOT": f"s3://{BUCKET}/root"}
    first = run_cli("data", "ingest", "digits", "--table", "digits", env=env)
    second = run_cli("data", "ingest", "digits", "--table", "digits", env=env)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert first.stdout.strip() == "digits: version 0" and second.stdout.strip() == "digits: version 1"
    keys = _keys(client, "root/digits/")
    assert "root/digits/_delta_log/00000000000000000000.json" in keys and any(k.endswith(".parquet") for k in keys), keys
    listing = run_cli("data", "versions", "digits", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    versions = json.loads(listing.stdout)
    assert [(v["version"], v["rows"], v["added"]) for v in versions] == [(0, 1300, 1300), (1, 2600, 1300)], versions
    assert versions[0]["digest"] != versions[1]["digest"]
    show = run_cli("data", "show", "digits", "--version", "0", env=env)
    assert show.returncode == 0 and "version 0: 1300 rows" in show.stdout, show.stdout + show.stderr
    assert not (home / "tables").exists() or not any((home / "tables").iterdir()), "tables written to the local disk"


def test_an_unreachable_object_store_is_one_line_and_no_version(s3, home):
    """The store down (a port nothing listens on): the command fails in one line naming it; nothing half-written."""
    env, client = s3
    down = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "DRIFTLOOP_DATA_ROOT": f"s3://{BUCKET}/down"}
    r = run_cli("data", "ingest", "digits", "--table", "digits", env=down, timeout=180)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "Traceback" not in r.stderr and f"s3://{BUCKET}/down/digits" in r.stderr, r.stderr
    assert _keys(client, "down/") == []
    listing = run_cli("data", "versions", "digits", env=down, timeout=180)
    assert listing.returncode != 0 and listing.stderr.strip().count("\n") == 0, listing.stderr
    assert "Traceback" not in listing.stderr and "Connection refused" in listing.stderr, listing.stderr


def test_monitor_snapshots_live_under_an_s3_data_root_and_a_store_down_is_not_no_snapshot(s3, home, monkeypatch):
    """A monitor replica rescheduled onto another node restores from the data root, not from a node's disk: its
    snapshot is one object under `<data root>/_state`, replaced whole; a missing one is "start afresh", a store
    that does not answer is an error (starting afresh would forget a pending trigger)."""
    import numpy as np

    from driftloop.drift import state
    from driftloop.settings import get_settings

    env, client = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DRIFTLOOP_DATA_ROOT", f"s3://{BUCKET}/snap")
    s = get_settings().ensure()
    assert s.state_root == f"s3://{BUCKET}/snap/_state"
    where = f"{s.state_root}/monitor-app-model.npz"
    assert state.load(where) is None
    meta, arrays = {"policy": {"labelled": 3}, "saved_at": 1.5}, {"window": np.arange(12, dtype=np.float32).reshape(3, 4)}
    state.save(where, meta, arrays)
    state.save(where, {**meta, "saved_at": 2.5}, arrays)  # replaced whole
    got_meta, got_arrays = state.load(where)
    assert got_meta == {**meta, "saved_at": 2.5} and np.array_equal(got_arrays["window"], arrays["window"])
    assert _keys(client, "snap/_state/") == ["snap/_state/monitor-app-model.npz"]
    assert not any((home / "state").glob("*.npz")), "a snapshot on the local disk"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(OSError):
        state.load(where)
