"""driftloop's command line: one command per step of the loop. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from driftloop.cli_common import _fail, clean_errors
from driftloop.cli_data import data_app

app = typer.Typer(
    help=(
        "driftloop keeps ML models healthy on Ray. The loop, in order:\n\n"
        "data ingest → sweep → models / promote → serve → replay → status (drift) → retrain → rollback.\n\n"
        "`driftloop demo` runs the whole loop end to end on the embedded default."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


@app.command("init")
@clean_errors
def init_cmd(
    data: Path = typer.Argument(..., help="your table: a CSV or Parquet file"),
    label: str = typer.Option(..., "--label", help="the column to predict"),
    name: Optional[str] = typer.Option(None, "--name", help="model, table and app name (default: the file's name)"),
    time_column: Optional[str] = typer.Option(None, "--time-column", help="a time column kept beside the features"),
    task: Optional[str] = typer.Option(None, "--task", help="classification or regression (default: from the label: "
                                       "class names or up to 50 integer values are classes, other numbers regression)"),
    force: bool = typer.Option(False, "--force", help="replace existing configs/NAME.yaml and serve_configs/NAME.yaml"),
) -> None:
    """Write configs/NAME.yaml and serve_configs/NAME.yaml from a file: features, task and classes, split and drift window
    inferred, each choice commented. Then: `driftloop data ingest FILE --table NAME`, `driftloop sweep
    configs/NAME.yaml`, `driftloop serve serve_configs/NAME.yaml`."""
    from driftloop.init import InitError, infer, write

    if name is not None and not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", name):
        raise InitError(f"--name {name!r}: use letters, digits, _ and - only")
    inf = infer(str(data), label, name, time_column, task)
    spec_path, serve_path = write(inf, Path.cwd(), force)
    what = f"classes {inf.classes}" if inf.classes is not None else f"regression of {inf.label}"
    typer.echo(f"wrote {spec_path.relative_to(Path.cwd())} ({len(inf.features)} features, {what}, "
               f"window {inf.window}) and {serve_path.relative_to(Path.cwd())}")
    if inf.skipped:
        typer.echo(f"not used as features: {', '.join(f'{c} ({w})' for c, w in inf.skipped.items())}")
    typer.echo(f"next: driftloop data ingest {data} --table {inf.name} && driftloop sweep {spec_path.relative_to(Path.cwd())} "
               f"&& driftloop serve {serve_path.relative_to(Path.cwd())}")


@app.command("sweep")
@clean_errors
def sweep_cmd(
    config: Path = typer.Argument(..., help="model spec, e.g. configs/digits.yaml"),
    data_version: Optional[int] = typer.Option(None, "--data-version", help="table version to train on (default: latest)"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome as one JSON object"),
) -> None:
    """Run a Ray Tune sweep (each trial a Ray Train TorchTrainer), register the best, gate and promote it."""
    from driftloop.config import load_spec
    from driftloop.settings import get_settings
    from driftloop.sweep import run_sweep

    spec = load_spec(config)
    o = run_sweep(spec, get_settings(), data_version, verbose=0 if as_json else 1)
    out = {"model": spec.name, "version": o.version, "promoted": o.promoted, "reason": o.reason,
           "best_config": o.best_config, "best_metrics": o.best_metrics, "trials": o.trials,
           "data": o.data.as_dict(), "parent_run_id": o.parent_run_id, "seconds": round(o.seconds, 1)}
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{spec.name}: {o.trials} trials in {o.seconds:.0f}s; best {o.best_config} -> {o.best_metrics}")
    verdict = "promoted to champion" if o.promoted else "refused"
    typer.echo(f"registered version {o.version} ({verdict}: {o.reason}); data {o.data.uri}@v{o.data.version} {o.data.digest}")


@app.command("models")
@clean_errors
def models_cmd(name: str = typer.Argument(..., help="model name"), as_json: bool = typer.Option(False, "--json")) -> None:
    """List a model's versions: scores, data versions, gate decisions, which one is champion, which are archived."""
    from driftloop.registry import list_versions
    from driftloop.settings import get_settings

    rows = list_versions(get_settings(), name)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        _fail(f"no registered versions of model {name!r}")
    score = "test_rmse" if any(r.get("test_rmse") for r in rows) else "test_accuracy"  # regression: the error
    typer.echo(f"{'ver':>4} {'champ':<8} {score.replace('accuracy', 'acc'):>9}  {'decision':<9} {'data':<40} reason")
    for r in rows:
        data = r["data"] if len(r["data"]) <= 40 else "…" + r["data"][-39:]
        mark = "*" if r["champion"] else "archived" if r.get("archived") else ""
        typer.echo(f"{r['version']:>4} {mark:<8} {r[score]:>9}  {r['decision']:<9} {data:<40} {r['reason']}")


@app.command("promote")
@clean_errors
def promote_cmd(name: str = typer.Argument(...), version: int = typer.Argument(...),
                reason: str = typer.Option("manual", "--reason"),
                force: bool = typer.Option(False, "--force", help="promote even an archived version")) -> None:
    """Force the champion alias onto VERSION (recorded as a manual decision)."""
    from driftloop.errors import LoopError
    from driftloop.registry import promote
    from driftloop.settings import get_settings

    try:
        promote(get_settings(), name, version, reason, force=force)
    except Exception as err:
        if isinstance(err, LoopError):
            raise
        raise LoopError(f"cannot promote {name} version {version}: {str(err).splitlines()[0]}") from None
    typer.echo(f"{name}: champion is now version {version}")


@app.command("rollback")
@clean_errors
def rollback_cmd(name: str = typer.Argument(...)) -> None:
    """Move the champion alias back to the previous champion."""
    from driftloop.registry import rollback
    from driftloop.settings import get_settings

    v = rollback(get_settings(), name)
    typer.echo(f"{name}: champion rolled back to version {v}")


@app.command("serve")
@clean_errors
def serve_cmd(
    file: Path = typer.Argument(..., help="Serve config, e.g. serve_configs/digits.yaml"),
    wait_s: float = typer.Option(300, "--wait", help="seconds to wait for the applications to be RUNNING"),
    ingress: str = typer.Option("proxy", "--ingress", envvar="DRIFTLOOP_INGRESS",
                                help="for a local head this command starts: proxy (Serve's default) | haproxy (Serve's "
                                     "HAProxy ingress on loopback, the production choice: README, \"Production ingress\")"),
) -> None:
    """Deploy the champion of each model in FILE with its drift monitor (starts local Ray on 127.0.0.1 if needed).

    Applications already running that FILE does not name keep running (a plain `serve deploy` deletes them)."""
    from driftloop.serving.deploy import deploy_file

    if ingress not in ("proxy", "haproxy"):
        _fail(f"--ingress {ingress}: must be proxy or haproxy", 2)
    for name, url in deploy_file(file, wait_s, ingress).items():
        typer.echo(f"{name}: {url}/predict  (drift: {url}/drift, docs: {url}/docs)")


@app.command("replay")
@clean_errors
def replay_cmd(
    app_name: str = typer.Argument(..., metavar="APP", help="application name (route prefix), e.g. digits"),
    scenario: str = typer.Option("clean", "--scenario", help="clean | corrupt:KIND:SEVERITY (noise, blur, contrast, shift, dropout; 1-5)"),
    source: Optional[Path] = typer.Option(None, "--from", help="replay this CSV/Parquet file in file order instead of a built-in example"),
    rows: Optional[int] = typer.Option(None, "--rows", min=1, max=1_000_000, help="rows to send (default 500; with --from: the rest of the file)"),
    start: int = typer.Option(0, "--start", min=0, help="with --from: the first row to send"),
    rps: float = typer.Option(50.0, "--rps", min=0.1, max=10_000),
    labels: bool = typer.Option(False, "--labels", help="post each row's ground truth to /feedback"),
    label_delay: int = typer.Option(0, "--label-delay", min=0, help="send a row's label once this many later rows were answered"),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", envvar="DRIFTLOOP_SERVE_URL"),
    seed: int = typer.Option(0, "--seed"),
    batch: int = typer.Option(1, "--batch", min=1, max=256, help="rows per /predict request (each row is labelled under its own id; the labels an answer makes due go to /feedback as one batch)"),
    spec: Optional[Path] = typer.Option(None, "--spec", help="with --from: the app's spec (default configs/APP.yaml)"),
) -> None:
    """Send real HTTP traffic, from the examples (with a corruption from the first row) or from your own file in
    file order (--from), and print what came back."""
    import asyncio

    from driftloop.replay import replay, replay_async

    if source is None:
        rep = replay(url, app_name, scenario, rows or 500, rps, labels, seed, batch=batch, label_delay=label_delay)
    else:
        from driftloop.config import load_spec
        from driftloop.data.ingest import load_source
        from driftloop.errors import LoopError

        sp = load_spec(spec or Path("configs") / f"{app_name}.yaml")
        df = load_source(str(source))
        missing = [c for c in sp.dataset.features if c not in df.columns]
        if missing:
            raise LoopError(f"{source}: missing feature column(s) of {sp.name}: {', '.join(missing[:5])}")
        if labels and sp.dataset.label not in df.columns:
            raise LoopError(f"{source}: --labels needs the label column {sp.dataset.label!r}")
        if start >= len(df):
            raise LoopError(f"--start {start}: {source} has {len(df)} rows")
        df = df.iloc[start: start + rows if rows else None].reset_index(drop=True)
        rep = asyncio.run(replay_async(url, app_name, df, sp.dataset.features, sp.dataset.label, rps, labels, batch=batch,
                                       label_delay=label_delay, regression=sp.regression))
    typer.echo(json.dumps(rep.summary()))
    if rep.failed:
        raise typer.Exit(1)


@app.command("status")
@clean_errors
def status_cmd(
    name: str = typer.Argument(..., help="model name"),
    url: Optional[str] = typer.Option(None, "--url", envvar="DRIFTLOOP_SERVE_URL", help="also ask the live app's /drift"),
    events: int = typer.Option(10, "--events", help="drift events to show"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Champion, drift history (drift_events table), retraining jobs and lineage of a model.

    Exits 1 when the retraining path is failing (the Jobs API does not answer, or the live monitor says so)."""
    import logging

    from driftloop.status import model_status, render, retraining_failure

    logging.getLogger("driftloop.jobs").setLevel(logging.ERROR)  # the command says it itself, once
    st = model_status(name, url, events)
    typer.echo(json.dumps(st, default=str) if as_json else render(st))
    if failing := retraining_failure(st):
        _fail(f"{name}: the retraining path is failing: {failing}", 1)


@app.command("retrain")
@clean_errors
def retrain_cmd(
    config: Path = typer.Argument(..., metavar="NAME|SPEC", help="model name (uses configs/NAME.yaml) or a spec path"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for the job to finish"),
) -> None:
    """Manually trigger retraining: submits the retraining Ray job (same id rules as drift triggers).

    Starts a local Ray head on 127.0.0.1 when none runs (the job outlives this command). Exits 1 when the job
    fails or, with --no-wait, when the Jobs API does not take it; with --wait a refused submission is retried."""
    import logging
    import time as _t

    from driftloop.config import load_spec
    from driftloop.jobs import JobTracker, RetrainPathDown, follow, make_trigger, submit_until_taken
    from driftloop.registry import champion_version
    from driftloop.serving.deploy import ensure_head
    from driftloop.settings import get_settings

    spec = load_spec(config if config.suffix in (".yaml", ".yml", ".json") else Path("configs") / f"{config}.yaml")
    s = get_settings()
    logging.getLogger("driftloop.jobs").setLevel(logging.ERROR)  # the command says it itself, once
    tracker = JobTracker(spec, s, address=ensure_head())
    trig = make_trigger("manual trigger (CLI)", _t.time(), champion_version(s, spec.name), cause="manual")
    say = lambda msg: typer.echo(f"{spec.name}: {msg}", err=True)  # noqa: E731
    try:
        out = submit_until_taken(tracker, trig, wait, say)
    except RetrainPathDown as err:
        _fail(f"{spec.name}: retraining job not submitted: {err}", 1)
    job = out["job"]
    typer.echo(f"{spec.name}: retraining job {job['submission_id']} ({'submitted' if out['submitted'] else out['why']})")
    if wait:
        job = follow(tracker, job["base_id"], say)
        typer.echo(f"{spec.name}: job {job['submission_id']} {job['status']}")
        if job["status"] != "SUCCEEDED":
            raise typer.Exit(1)


@app.command("gc")
@clean_errors
def gc_cmd(
    config: Path = typer.Argument(..., metavar="NAME|SPEC", help="model name (uses configs/NAME.yaml) or a spec path"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count files and list what would be removed; change nothing"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the maintenance the live monitor runs every `lifecycle.maintenance_every_s`: compact the inference log,
    feedback and drift events (Delta OPTIMIZE), delete rows past `lifecycle.retention_days`, vacuum replaced files
    after `vacuum_grace_hours`, remove stale node-local caches and archive old registry versions."""
    from driftloop.config import load_spec
    from driftloop.data.maintenance import maintain
    from driftloop.settings import get_settings

    spec = load_spec(config if config.suffix in (".yaml", ".yml", ".json") else Path("configs") / f"{config}.yaml")
    rep = maintain(get_settings().ensure(), spec, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps(rep, default=str))
        return
    for kind, t in rep["tables"].items():
        if not t.get("exists"):
            typer.echo(f"{kind:<13} no table yet")
        elif dry_run:
            typer.echo(f"{kind:<13} {t['active']} files in use, {t['stored']} on storage")
        else:
            typer.echo(f"{kind:<13} files {t['files_before']} -> {t['files_after']} (on storage {t['stored_before']} -> "
                       f"{t['stored_after']}), {t['rows_expired']} rows past {rep['retention_days']:g} days deleted")
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"local caches  {verb} {len(rep['local_removed'])} folders")
    if "archived" in rep:
        typer.echo(f"registry      {'would archive' if dry_run else 'archived'} versions {rep['archived'] or 'none'}")


@app.command("cluster-env")
@clean_errors
def cluster_env_cmd(
    data_root: Optional[str] = typer.Option(None, "--data-root", help="the object store every node reads and writes, "
                                            "e.g. s3://bucket/driftloop (default: DRIFTLOOP_DATA_ROOT)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="the MLflow tracking server every node "
                                               "logs to (default: MLFLOW_TRACKING_URI)"),
    retrain_resources: Optional[str] = typer.Option(None, "--retrain-resources", help='where retraining jobs run: Ray '
                                                    'resources as JSON, e.g. \'{"CPU": 1}\' (default: the head)'),
    fmt: str = typer.Option("shell", "--format", help="shell (export lines) or kuberay (a container's env: list)"),
) -> None:
    """Print the environment every node of a multi-node cluster starts with, head and workers alike: one data root and
    one tracking server, from which driftloop derives every shared place. The secrets it names come from your
    secret store on each node; no value of one is printed."""
    import os
    import shlex

    from driftloop.envs import CLUSTER_SECRETS, cluster_env

    if fmt not in ("shell", "kuberay"):
        _fail(f"--format {fmt!r}: use shell or kuberay")
    try:
        env = cluster_env(data_root or os.environ.get("DRIFTLOOP_DATA_ROOT", ""),
                          tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), retrain_resources)
    except ValueError as err:
        _fail(str(err))
    if fmt == "shell":
        for k, v in env.items():
            typer.echo(f"export {k}={shlex.quote(v)}")
        for k, (what, _) in CLUSTER_SECRETS.items():
            typer.echo(f"# {k}: {what} (from your secret store)")
        return
    for k, v in env.items():
        typer.echo(f"- {{name: {k}, value: {json.dumps(v)}}}")
    for k, (what, (secret, key)) in CLUSTER_SECRETS.items():
        typer.echo(f"- name: {k}   # {what}\n  valueFrom: {{secretKeyRef: {{name: {secret}, key: {key}}}}}")


@app.command("backtest")
@clean_errors
def backtest_cmd(
    config: Path = typer.Argument(..., help="model spec, e.g. configs/rainfall.yaml"),
    stream: str = typer.Option(..., "--stream", help="time-ordered labelled CSV/Parquet file, builtin:rainfall or builtin:digits-phases"),
    compare: str = typer.Option("static", "--compare", help="strategies beside driftloop's policy: static, periodic:N (every N rows)"),
    label_delay: int = typer.Option(0, "--label-delay", help="rows between a prediction and its label"),
    initial: Optional[int] = typer.Option(None, "--initial", help="rows that train the starting champion (default: 40%; rainfall: 20 years)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for backtest.json and backtest.png"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
) -> None:
    """Replay history test-then-train through the loop's own detectors, policy, Ray Train retraining and gate,
    beside simpler strategies: what would each have done? (Models and tables of its own; the champion is untouched.)"""
    from driftloop.backtest import parse_strategies, render, run_backtest
    from driftloop.config import load_spec
    from driftloop.settings import get_settings

    spec = load_spec(config)
    strategies = parse_strategies(compare)
    summary = run_backtest(spec, get_settings().ensure(), stream, strategies, label_delay, initial, out, show_progress=not as_json)
    if as_json:
        typer.echo(json.dumps(summary, default=str))
        return
    typer.echo(render(summary))
    typer.echo(f"written: {summary['out_dir']}/backtest.json, {summary['png']} (MLflow run {summary['mlflow_run']})")


@app.command("demo")
@clean_errors
def demo_cmd(
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
    out: Path = typer.Option(Path("demo-out"), "--out", help="folder for the timeline PNG and summary"),
    quick: bool = typer.Option(False, "--quick", help="smaller sweep and traffic (for tests)"),
    as_shipped: bool = typer.Option(False, "--as-shipped", help="configs/digits.yaml unchanged (no demo overrides: min_labelled_rows 600, cooldown 60 s), every drifted row at 60/s"),
) -> None:
    """Run the whole loop: ingest, sweep, promote, serve, clean then drifted traffic, drift → retrain job → swap.
    Prints driftloop's own progress and summary; what Ray, Tune, Serve and MLflow write goes to OUT/demo.log."""
    from driftloop import demo

    demo.check_options(quick, as_shipped)  # before the libraries' output is redirected: one line, exit 2
    out.mkdir(parents=True, exist_ok=True)
    with demo.libraries_to(out / "demo.log") as own:
        demo.OUT = own
        summary = demo.run_demo(out, quick=quick, quiet=as_json, as_shipped=as_shipped)
    typer.echo(json.dumps(summary) if as_json else demo.summary_text(summary))


def main() -> None:
    """Entry point of the `driftloop` console script.

    Once the command has finished and its output is flushed, the process exits without interpreter
    finalisation: native thread pools (Arrow/Delta readers) have been seen to abort the process at
    teardown ("terminate called without an active exception"), turning a finished command into exit -6.
    """
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # a command's output is its own, not MLflow's INFO chatter
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        app()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
