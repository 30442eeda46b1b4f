"""Sweeps, tracking, the registry bundle and the promotion gate, on real Ray and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BUCKET, ROOT, run_cli
from tests.integration.conftest import free_port, start_mlflow_server, write_spec

pytestmark = pytest.mark.slow


def test_digits_sweep_tracks_registers_and_promotes(trained, settings):
    from driftloop import registry

    spec, o = trained
    assert o.trials == spec.sweep.trials == 2 and spec.training.workers == 2
    assert o.promoted and o.reason == "first version"
    c = registry.client(settings)
    tags = registry.version_tags(settings, "digits", o.version)
    assert float(tags["metric.test_accuracy"]) >= 0.95, tags["metric.test_accuracy"]
    assert registry.champion_version(settings, "digits") == o.version
    # MLflow: one parent run, one child run per trial, the data version as a dataset input
    parent = c.get_run(o.parent_run_id)
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{o.parent_run_id}'")
    assert len(children) == o.trials
    assert all("val_accuracy" in r.data.metrics and "lr" in r.data.params for r in children)
    history = c.get_metric_history(children[0].info.run_id, "val_accuracy")
    assert len(history) >= 1 and all(h.step >= 0 for h in history)
    inputs = parent.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == f"digits@v{o.data.version}"
    assert parent.data.tags["data.digest"] == o.data.digest
    assert tags["data.version"] == str(o.data.version) and tags["data.digest"] == o.data.digest
    # the bundle: model + detectors in the same model version's artifacts
    path = registry.download(settings, "digits", o.version)
    manifest = json.loads((path / "detectors" / "detectors.json").read_text())
    assert [d["kind"] for d in manifest["detectors"]] == [d.kind for d in spec.drift.detectors]
    assert (path / "MLmodel").is_file() and (path / "data" / "model.pt2").is_file()  # torch.export, no pickle
    assert (path / registry.WEIGHTS).is_file()  # what driftloop loads: the state dict, beside the archive


def test_registered_model_and_detectors_load_back_identically(trained, settings):
    import mlflow.pytorch

    from driftloop import registry
    from driftloop.drift.detectors import load_detectors
    from driftloop.model import predict_outputs, scores
    from driftloop.train import load_splits

    spec, o = trained
    registry.configure(settings)
    by_alias = mlflow.pytorch.load_model("models:/digits@champion")  # MLflow's own load: the export archive
    # driftloop's own load: the weights beside the archive
    by_version = registry.load_model(registry.download(settings, "digits", o.version))
    splits = load_splits(spec, o.data)
    p1, p2 = predict_outputs(by_alias, splits.x_test), predict_outputs(by_version, splits.x_test)
    np.testing.assert_array_equal(p1, p2)
    # the same predictions as at the end of training: the recorded test accuracy is reproduced exactly
    tags = registry.version_tags(settings, "digits", o.version)
    assert f"{scores(p1, splits.y_test, spec)['accuracy']:.6f}" == tags["metric.test_accuracy"]
    path = registry.download(settings, "digits", o.version)
    dets_a, _ = load_detectors(path / "detectors", spec.n_classes)
    dets_b, _ = load_detectors(path / "detectors", spec.n_classes)
    window = splits.x_val[:200]
    proba = predict_outputs(by_alias, window)
    for a, b in zip(dets_a, dets_b):
        ra, rb = a.predict(window, proba), b.predict(window, proba)
        assert ra.as_dict() == rb.as_dict()


def test_worse_challenger_refused_recorded_and_rollback(trained, settings, tmp_path):
    import torch

    from driftloop import registry
    from driftloop.drift.detectors import fit_detectors
    from driftloop.model import build_model
    from driftloop.train import load_splits

    spec, o = trained
    champion = registry.champion_version(settings, "digits")
    bad = build_model(spec.n_features, spec.n_classes, [8], 0.0)  # untrained: near chance
    torch.manual_seed(1)
    splits = load_splits(spec, o.data)
    det_dir = fit_detectors(spec.drift, splits.x_val, np.full((len(splits.x_val), 10), 0.1, np.float32),
                            spec.dataset.features, tmp_path / "det")
    b = registry.register_bundle(settings, spec, bad.eval(), det_dir, o.data, o.parent_run_id, {"test_accuracy": 0.1})
    d = registry.gate_and_promote(settings, spec, b.version, splits.x_test, splits.y_test, "test split")
    assert not d.promote and d.champion_score > d.challenger_score
    assert registry.champion_version(settings, "digits") == champion
    tags = registry.version_tags(settings, "digits", b.version)
    assert tags["gate.decision"] == "refused" and tags["gate.champion_version"] == str(champion)
    assert float(tags["gate.champion_score"]) > float(tags["gate.challenger_score"])
    listing = run_cli("models", "digits")
    assert listing.returncode == 0 and "refused" in listing.stdout and "does not beat champion" in listing.stdout
    # forced promotion is recorded as manual; rollback restores the previous champion
    assert run_cli("promote", "digits", str(b.version)).returncode == 0
    assert registry.champion_version(settings, "digits") == b.version
    assert registry.version_tags(settings, "digits", b.version)["gate.decision"] == "manual"
    r = run_cli("rollback", "digits")
    assert r.returncode == 0 and f"version {champion}" in r.stdout
    assert registry.champion_version(settings, "digits") == champion


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"sweep.search_space.lr": {"gaussian": [0.1, 1]}}, "sweep.search_space: lr: unknown distribution 'gaussian'"),
        ({"training.workers": 0}, "training.workers"),
        ({"dataset.features": ["pixel_{0..63}", "pixel_99"]}, "dataset.features: 'pixel_99' is not a column of table 'digits'"),
    ],
)
def test_bad_spec_fails_before_any_ray_work(trained, tmp_path, overrides, expected):
    spec = write_spec(tmp_path / "bad.yaml", **overrides)
    env = {k: v for k, v in os.environ.items()}
    env.pop("RAY_ADDRESS", None)  # a Ray start would show up as a local instance; none must happen
    r = subprocess.run([str(Path(sys.executable).with_name("driftloop")), "sweep", str(spec)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr


def test_rainfall_first_20_years_against_an_mlflow_server_with_everything_on_s3(ray_cluster, session_home, tmp_path,
                                                                                s3, monkeypatch):
    """The rainfall spec, tracked on a real `mlflow server` over HTTP on 127.0.0.1 that keeps its artifacts on the
    object store (`--artifacts-destination s3://…`, moto), with the data root there too: the Delta table, Train's
    checkpoints and the registered model are objects in the bucket, none on the local disk, and the champion loads
    back through the server."""
    from driftloop import registry
    from driftloop.config import load_spec, parse_spec
    from driftloop.data.ingest import ingest
    from driftloop.model import predict_outputs, scores
    from driftloop.settings import get_settings
    from driftloop.sweep import run_sweep
    from driftloop.train import load_splits

    _, client = s3
    port = free_port()
    server = start_mlflow_server(port, f"sqlite:///{tmp_path / 'server.db'}", f"s3://{BUCKET}/rain-mlflow")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("DRIFTLOOP_DATA_ROOT", f"s3://{BUCKET}/rain")
        s = get_settings()
        d = load_spec(ROOT / "configs/rainfall.yaml").model_dump(mode="json")
        d["sweep"].update(trials=1, concurrency=1, scheduler="fifo")
        spec = parse_spec(d)
        assert ingest("rainfall", s.table_uri("rainfall"), spec.dataset) == 0
        o = run_sweep(spec, s, verbose=0)
        assert o.data.rows == 7305 and o.data.uri == f"s3://{BUCKET}/rain/rainfall"  # the first 20 years
        tags = registry.version_tags(s, "rainfall", o.version)
        acc = float(tags["metric.test_accuracy"])
        print(f"rainfall test accuracy (first 20 years): {acc:.3f}")
        assert 0.65 <= acc <= 0.9
        assert registry.champion_version(s, "rainfall") == o.version
        keys = [k for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="rain")
                for k in (o["Key"] for o in page.get("Contents", []))]
        assert any(k.startswith("rain/rainfall/_delta_log/") for k in keys), keys[:5]
        assert any(k.startswith("rain/_train/sweep-rainfall-") and k.endswith("/model.pt") for k in keys), keys[:20]
        assert any(k.startswith("rain-mlflow/") and k.endswith("weights/model.pt") for k in keys), keys[:20]
        assert not list((session_home / "ray_results").glob("sweep-rainfall-*")), "Train wrote to the local disk"
        # through the server from the bucket, on the table's test split read from the bucket: the recorded accuracy
        model = registry.load_model(registry.download(s, "rainfall", o.version, tmp_path / "copy"))
        splits = load_splits(spec, o.data)
        assert f"{scores(predict_outputs(model, splits.x_test), splits.y_test, spec)['accuracy']:.6f}" == tags["metric.test_accuracy"]
    finally:
        server.terminate()
        server.wait(30)


def test_sweep_as_a_ray_job(trained, ray_cluster, tmp_path):
    """`ray job submit --working-dir . -- python jobs/sweep.py --config …` on the running head node. The spec has
    no search space, so its 4 trials would all train the same model: the sweep runs one and says so."""
    spec = write_spec(tmp_path / "tiny.yaml", **{"name": "digitsjob", "sweep.trials": 4, "sweep.search_space": {},
                                                  "training.epochs": 2, "sweep.grace_period": 1})
    ray_bin = str(Path(sys.executable).with_name("ray"))
    r = subprocess.run([ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", ".",
                        "--", sys.executable, "jobs/sweep.py", "--config", str(spec), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{") and '"trials"' in ln))
    assert out["trials"] == 1 and out["model"] == "digitsjob" and out["version"] == 1 and out["promoted"]
    assert "no sweep.search_space, so the sweep runs 1 trial instead of 4" in r.stdout + r.stderr


def test_training_survives_a_worker_failure(trained, settings, tmp_path):
    """A Train worker process is SIGKILLed mid-run, from outside, once the controller has registered a
    checkpoint: the worker group restarts and resumes from that checkpoint or a later one, never from scratch."""
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    from driftloop.config import parse_spec
    from driftloop.train import default_hparams, make_trainer

    spec, o = trained
    d = spec.model_dump(mode="json")
    d["training"].update(epochs=30, checkpoint_every=1, max_failures=2)
    sp = parse_spec(d)
    storage = tmp_path / "results"
    snapshot = storage / "worker-failure" / "checkpoint_manager_snapshot.json"
    killed: dict = {}

    def registered_epoch() -> int:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            return int(latest.get("metrics", {}).get("epoch", -1))
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return -1

    def kill_a_worker_once_a_checkpoint_is_registered():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            epoch = registered_epoch()
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if epoch >= 1 and workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.update(epoch=epoch, pid=workers[-1].pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_a_worker_once_a_checkpoint_is_registered, daemon=True)
    watcher.start()
    res = make_trainer(sp, o.data, default_hparams(sp), "worker-failure", str(storage)).fit()
    watcher.join(5)
    assert killed, "no worker was killed: training ended before a checkpoint was registered"
    assert res.error is None and res.metrics["epoch"] == 29
    resumed = res.metrics["resumed_from_epoch"]
    print(f"worker {killed['pid']} killed with epoch {killed['epoch']} registered; training resumed from epoch {resumed}")
    assert killed["epoch"] + 1 <= resumed < 30
