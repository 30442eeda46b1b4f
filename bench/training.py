"""Training and sweeps: sweep wall time at 4/8 trials and concurrency 1/2; one run with 1 vs 2 workers;
where the time goes. Epochs are reduced (4) so that `make bench` stays within its 30-minute budget."""

from __future__ import annotations

import time

EPOCHS = 4


def run() -> dict:
    import ray

    from bench.common import ROOT, setup_home
    from driftloop.cluster import ensure_ray
    from driftloop.config import load_spec, parse_spec
    from driftloop.data import tables
    from driftloop.data.ingest import ingest
    from driftloop.settings import get_settings
    from driftloop.sweep import run_sweep
    from driftloop.train import default_hparams, make_trainer

    t = time.perf_counter()
    setup_home("training")
    s = get_settings().ensure()
    ensure_ray(s, join_running=False)
    ray_start = time.perf_counter() - t
    base = load_spec(ROOT / "configs/digits.yaml").model_dump(mode="json")
    base["training"]["epochs"] = EPOCHS
    base["sweep"]["grace_period"] = 2
    spec = parse_spec(base)
    ingest("digits", s.table_uri("digits"), spec.dataset)
    dv = tables.data_version(s.table_uri("digits"))
    runs = {}
    for workers in (1, 2):
        d = dict(base, training={**base["training"], "workers": workers})
        sp = parse_spec(d)
        t = time.perf_counter()
        res = make_trainer(sp, dv, default_hparams(sp), f"w{workers}", str(s.home / "rr")).fit()
        wall = time.perf_counter() - t
        df = res.metrics_dataframe
        runs[f"{workers}_workers"] = {"wall_s": wall, "epochs": EPOCHS, "val_accuracy": float(df["val_accuracy"].iloc[-1])}
        print(f"training {workers} workers: {wall:.1f}s", flush=True)
    sweeps = {}
    for trials, conc in ((4, 1), (4, 2), (8, 2)):
        d = dict(base, sweep={**base["sweep"], "trials": trials, "concurrency": conc}, name=f"sweep{trials}c{conc}")
        t = time.perf_counter()
        o = run_sweep(parse_spec(d), s, verbose=0)
        sweeps[f"{trials}_trials_c{conc}"] = {"wall_s": time.perf_counter() - t, "best_val_accuracy": o.best_metrics.get("val_accuracy")}
        print(f"sweep {trials} trials c{conc}: {sweeps[f'{trials}_trials_c{conc}']['wall_s']:.1f}s", flush=True)
    ray.shutdown()
    return {"epochs": EPOCHS, "ray_start_s": ray_start, "runs": runs, "sweeps": sweeps,
            "note": "a run's wall time includes starting its worker group (actors, gloo process group, torch import) and "
                    "one checkpointed report per epoch, which dominate a tiny MLP's compute; a sweep's includes "
                    "registering the best model (log_model and its detectors)"}
