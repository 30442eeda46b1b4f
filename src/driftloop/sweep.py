"""Sweeps: Ray Tune runs function trials, each fitting a TorchTrainer; MLflow gets one parent run per
sweep and one child run per trial; the best model is registered once with its detectors and gated."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftloop.config import Spec, SpecError
from driftloop.data import tables
from driftloop.data.tables import DataVersion
from driftloop.settings import Settings, is_object_store


def preflight(spec: Spec, settings: Settings, version: int | None = None) -> DataVersion:
    """Everything that can be wrong with a spec against its table, checked before any Ray work."""
    uri = settings.table_uri(spec.dataset.table)
    if not tables.exists(uri):
        raise SpecError(f"dataset.table: no table {spec.dataset.table!r} at {uri} (run `driftloop data ingest`)")
    dv = tables.data_version(uri, version)
    schema_cols = set(tables.columns(uri, dv.version))
    missing = [f for f in spec.dataset.features if f not in schema_cols]
    if missing:
        raise SpecError(f"dataset.features: {missing[0]!r} is not a column of table {spec.dataset.table!r}")
    if spec.dataset.label not in schema_cols:
        raise SpecError(f"dataset.label: {spec.dataset.label!r} is not a column of table {spec.dataset.table!r}")
    n_train = int(dv.rows * spec.dataset.split[0])
    if n_train < spec.training.workers:
        raise SpecError(f"training.workers: {spec.training.workers} workers for {n_train} training rows")
    return dv


def search_space(spec: Spec) -> dict[str, Any]:
    """The spec's search space as Tune distributions; list-valued choices travel JSON-encoded."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, dist in spec.sweep.search_space.items():
        (kind, args), = dist.items()
        if kind == "choice":
            out[name] = tune.choice([json.dumps(a) if isinstance(a, (list, dict)) else a for a in args])
        elif kind == "uniform":
            out[name] = tune.uniform(*args[:2])
        elif kind == "loguniform":
            out[name] = tune.loguniform(*args[:2])
        elif kind == "randint":
            out[name] = tune.randint(int(args[0]), int(args[1]))
        elif kind == "quniform":
            out[name] = tune.quniform(args[0], args[1], args[2] if len(args) > 2 else 1.0)
    return out


def _trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One Tune trial: build and fit a TorchTrainer (the Train V2 pattern)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from driftloop.train import decode_hparams, make_trainer

    spec = Spec.model_validate(job["spec"])
    dv = DataVersion(**job["data"])
    hp = decode_hparams(spec, config)
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(spec, dv, hp, name=f"{job['sweep']}-{trial_id}", storage_path=job["storage"],
                           callbacks=[TuneReportCallback()])
    trainer.fit()


def _mlflow_callback(settings: Settings, parent_run_id: str, experiment_id: str, spec: Spec, dv: DataVersion, sample):
    """A Tune callback (runs in the driver) that mirrors every trial into a nested MLflow run, live."""
    from ray.tune import Callback

    from driftloop import registry
    from driftloop.train import METRICS

    class MlflowTrials(Callback):
        def __init__(self):
            self.c = registry.client(settings)
            self.runs: dict[str, str] = {}

        def _run(self, trial) -> str:
            if trial.trial_id not in self.runs:
                run = self.c.create_run(experiment_id, run_name=f"trial-{trial.trial_id}",
                                        tags={"mlflow.parentRunId": parent_run_id, "trial_id": trial.trial_id})
                rid = run.info.run_id
                self.runs[trial.trial_id] = rid
                for k, v in trial.config.items():
                    self.c.log_param(rid, k, v)
                registry.log_data_input(self.c, rid, spec, dv, sample)
            return self.runs[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rid = self._run(trial)
            step = int(result.get("epoch", result.get("training_iteration", 0)))
            ts = int(time.time() * 1000)
            from mlflow.entities import Metric

            metrics = [Metric(k, float(result[k]), ts, step) for k in METRICS if k in result]
            self.c.log_batch(rid, metrics=metrics)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.c.set_terminated(self._run(trial), "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.c.set_terminated(self._run(trial), "FAILED")

    return MlflowTrials()


def best_checkpoint(path: str, storage: str):
    """The checkpoint a trial reported: Train reports its path without the scheme (on S3: `bucket/key`)."""
    from ray.train import Checkpoint

    scheme = storage.split("://")[0] if is_object_store(storage) else None
    return Checkpoint(f"{scheme}://{path}" if scheme else path)


def data_sample(spec: Spec, dv: DataVersion):
    """The first rows of a data version, the example MLflow keeps with its dataset input."""
    return tables.read(dv.uri, dv.version, columns=spec.dataset.features + [spec.dataset.label]).head(20)


@dataclass
class SweepOutcome:
    parent_run_id: str
    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    trials: int
    version: int
    promoted: bool
    reason: str
    data: DataVersion
    seconds: float


def run_sweep(spec: Spec, settings: Settings, data_version: int | None = None, verbose: int = 1,
              extra_tags: dict[str, str] | None = None) -> SweepOutcome:
    """Sweep, register the best trial's model with its detectors, and apply the promotion gate."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from driftloop import registry
    from driftloop.gate import register_and_gate
    from driftloop.cluster import ensure_ray
    from driftloop.train import METRICS

    t0 = time.monotonic()
    dv = preflight(spec, settings, data_version)
    ensure_ray(settings)
    exp_id = registry.experiment_id(settings, spec.name)
    c = registry.client(settings)
    sweep_name = f"sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = c.create_run(exp_id, run_name=sweep_name, tags={"driftloop.kind": "sweep", **(extra_tags or {})})
    pid = parent.info.run_id
    c.log_dict(pid, spec.model_dump(mode="json"), "spec.json")
    trials = spec.sweep.trials if spec.sweep.search_space else 1
    if trials < spec.sweep.trials:  # every trial would train the same model with the same seed
        print(f"{spec.name}: the spec has no sweep.search_space, so the sweep runs 1 trial instead of {spec.sweep.trials} "
              "(add a search_space to search)", file=sys.stderr, flush=True)
    for k, v in {"trials": trials, "concurrency": spec.sweep.concurrency, "search": spec.sweep.search,
                 "scheduler": spec.sweep.scheduler, "workers_per_trial": spec.training.workers}.items():
        c.log_param(pid, k, v)
    if (commit := registry.git_commit()):
        c.set_tag(pid, "mlflow.source.git.commit", commit)
    sample = data_sample(spec, dv)
    registry.log_data_input(c, pid, spec, dv, sample)

    storage = settings.train_storage
    job = {"spec": spec.model_dump(mode="json"), "data": dv.as_dict(), "sweep": sweep_name, "storage": storage}
    sw = spec.sweep
    metric, mode = spec.tune_metric
    if sw.search == "optuna" and spec.sweep.search_space:
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=spec.training.seed),
                                      max_concurrent=sw.concurrency)
    else:
        searcher = None
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=spec.training.epochs,
                               grace_period=min(sw.grace_period, spec.training.epochs), reduction_factor=2)
                 if sw.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, job=job), {"CPU": 0.01}),
        param_space=search_space(spec),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=trials, search_alg=searcher,
                                    scheduler=scheduler, max_concurrent_trials=sw.concurrency),
        run_config=tune.RunConfig(name=sweep_name, storage_path=storage, verbose=verbose,
                                  callbacks=[_mlflow_callback(settings, pid, exp_id, spec, dv, sample)]),
    )
    try:
        results = tuner.fit()
        finished = [r for r in results if r.metrics and "checkpoint_path" in r.metrics and metric in r.metrics]
        if not finished:
            errors = [str(r.error).splitlines()[0] for r in results if r.error]
            raise RuntimeError(f"no trial finished with a checkpoint; errors: {errors[:3]}")
        best = (max if mode == "max" else min)(finished, key=lambda r: r.metrics[metric])
        with best_checkpoint(best.metrics["checkpoint_path"], storage).as_directory() as ckpt:  # a download on S3
            outcome = register_and_gate(spec, settings, dv, Path(ckpt), pid, extra_tags)
    except BaseException:
        c.set_terminated(pid, "FAILED")
        raise
    best_cfg = dict(best.config)
    for k, v in best_cfg.items():
        c.log_param(pid, f"best.{k}", v)
    c.set_terminated(pid, "FINISHED")
    return SweepOutcome(pid, best_cfg, {k: best.metrics[k] for k in (*METRICS[1:], "epoch") if k in best.metrics},
                        len(results), outcome["version"], outcome["promoted"], outcome["reason"], dv,
                        time.monotonic() - t0)
