"""The data root on an S3-compatible object store: moto in server mode on 127.0.0.1 (started here), the Delta tables
under `DRIFTLOOP_DATA_ROOT=s3://bucket/prefix`, each command its own process, as on a cluster whose nodes share no
disk. Nothing is written to the local home's tables folder; what a user reads back is what was written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import BUCKET, free_port, run_cli


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


def test_request_id_keys_are_one_object_every_replica_reads(s3, home, monkeypatch):
    """Under an object-store data root the request-id key is shared by replicas on every node: `driftloop serve`
    creates it once (a second deploy keeps it), replicas read it and never create it, a missing one refuses the
    replica's start in one line."""
    from driftloop import ids
    from driftloop.settings import get_settings

    env, client = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(ids.ID_SECRET_ENV, raising=False)
    monkeypatch.setenv("DRIFTLOOP_DATA_ROOT", f"s3://{BUCKET}/keys")
    root = get_settings().ensure().state_root
    with pytest.raises(RuntimeError, match=r"s3://driftloop-test/keys/_state/ids-digits.key does not exist: deploy with"):
        ids.app_secret(root, "digits")
    ids.ensure_shared_secret(root, "digits")
    key = ids.app_secret(root, "digits")
    ids.ensure_shared_secret(root, "digits")  # a second deploy keeps the key: ids already issued stay valid
    assert ids.app_secret(root, "digits") == key and len(key) >= 32
    ids.ensure_shared_secret(root, "other")
    assert ids.app_secret(root, "other") != key
    assert sorted(_keys(client, "keys/")) == ["keys/_state/ids-digits.key", "keys/_state/ids-other.key"]
    assert not (home / "state").exists() or not any((home / "state").glob("*.key")), "a key on the local disk"
    rid = ids.issue(key, 1, 1)
    assert ids.verify(ids.app_secret(root, "digits"), rid).version == 1  # what one node signed, another verifies


def test_a_trial_checkpoint_on_an_s3_storage_path_is_read_back(s3, home, monkeypatch):
    """Train's storage on the object store (Settings.train_storage): a trial reports its checkpoint without the
    scheme (`bucket/key`), and the sweep downloads it from there to register the model."""
    from driftloop.settings import get_settings
    from driftloop.sweep import best_checkpoint

    env, client = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DRIFTLOOP_DATA_ROOT", f"s3://{BUCKET}/train")
    storage = get_settings().train_storage
    assert storage == f"s3://{BUCKET}/train/_train"
    key = "train/_train/sweep-x/trial-1/checkpoint_000001"
    client.put_object(Bucket=BUCKET, Key=f"{key}/model.pt", Body=b"weights")
    with best_checkpoint(f"{BUCKET}/{key}", storage).as_directory() as d:
        assert (Path(d) / "model.pt").read_bytes() == b"weights"
    monkeypatch.delenv("DRIFTLOOP_DATA_ROOT")
    assert get_settings().train_storage == str(home.resolve() / "ray_results")
