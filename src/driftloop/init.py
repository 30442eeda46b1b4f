"""`driftloop init DATA --label COL`: a user's own table -> a model spec and a Serve config, every inferred choice
commented, ready for `data ingest`, `sweep` and `serve`. Both files are written whole or not at all."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from driftloop.data.ingest import SourceError, load_source
from driftloop.features import category_strings

MAX_CLASSES = 50  # an integer label with more distinct values than this is a quantity (regression), not a class
MAX_CATEGORIES = 1000  # a text column with more distinct values than this (or than half the rows) looks like an id
MAX_MISSING = 0.5  # a column missing in more than this fraction of rows is left out, not imputed


class InitError(ValueError):
    """A file `init` cannot turn into a spec; the message is one line naming the problem."""


@dataclass(frozen=True)
class Inferred:
    name: str
    source: str
    label: str
    features: list[str]
    skipped: dict[str, str]  # column -> why it is not a feature
    categorical: dict[str, list[str]]  # feature -> its values, most frequent first
    imputed: dict[str, float]  # feature -> fraction of rows missing it
    classes: list[int] | list[str] | None  # None: regression
    counts: dict  # rows per class; regression: the label's min, median, max
    task: str
    task_reason: str
    time_column: str | None
    rows: int
    window: int
    reference_rows: int
    hidden: list[int]
    batch_size: int


def _name_of(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", path.stem) or "model"


def _task_and_classes(y: pd.Series, label: str, task: str | None) -> tuple[str, list | None, str]:
    """(task, classes, why): class names, integers with at most MAX_CLASSES values, or a number to predict."""
    text = pd.api.types.is_object_dtype(y) or pd.api.types.is_string_dtype(y) or isinstance(y.dtype, pd.CategoricalDtype)
    if text and not all(isinstance(v, str) for v in y.unique()):
        raise InitError(f"label {label!r} mixes strings and other values: make every label a class name")
    numeric = not text and pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
    integral = numeric and (pd.api.types.is_integer_dtype(y) or bool(np.all(np.mod(y.to_numpy(dtype=np.float64), 1) == 0)))
    if task == "regression":
        if not numeric:
            raise InitError(f"--task regression: label {label!r} is not a number (dtype {y.dtype}, e.g. {y.iloc[0]!r})")
        if not np.isfinite(y.to_numpy(dtype=np.float64)).all():
            raise InitError(f"label {label!r} has inf values: a regression target must be finite")
        return "regression", None, "--task regression"
    if text:
        return "classification", sorted(str(v) for v in y.unique()), f"the label holds {y.nunique()} class names"
    if task == "classification":
        if not integral:
            raise InitError(f"label {label!r} is not a class (dtype {y.dtype}, e.g. {y.iloc[0]!r}): a classifier needs integer "
                            "or string labels; a continuous target is regression (--task regression)")
        if y.nunique() > MAX_CLASSES:
            raise InitError(f"label {label!r} has {y.nunique()} distinct values: more than {MAX_CLASSES} classes; a quantity is "
                            "regression (--task regression)")
        return "classification", sorted(int(v) for v in y.unique()), f"--task classification: {y.nunique()} integer values"
    if not numeric:
        raise InitError(f"label {label!r} is neither class names nor a number (dtype {y.dtype})")
    if integral and y.nunique() <= MAX_CLASSES:
        return "classification", sorted(int(v) for v in y.unique()), f"the label has {y.nunique()} integer values (at most {MAX_CLASSES})"
    if not np.isfinite(y.to_numpy(dtype=np.float64)).all():
        raise InitError(f"label {label!r} has inf values: a regression target must be finite")
    why = (f"the label has {y.nunique()} distinct integer values (more than {MAX_CLASSES}): a quantity" if integral
           else "the label is a continuous number")
    return "regression", None, why


def infer(data: str, label: str, name: str | None = None, time_column: str | None = None,
          task: str | None = None) -> Inferred:
    """Read the file and infer a spec (classification or regression, from the label unless `task` says);
    InitError names what makes it unusable."""
    if task not in (None, "classification", "regression"):
        raise InitError(f"--task {task!r}: use classification or regression")
    path = Path(data)
    if not path.is_file():
        raise InitError(f"{data}: no such file")
    try:
        df = load_source(str(path))
    except SourceError as err:
        raise InitError(str(err)) from None
    if df.empty or len(df.columns) < 2:
        raise InitError(f"{data}: no rows or fewer than two columns: nothing to learn from")
    if label not in df.columns:
        raise InitError(f"--label {label!r} is not a column of {data} (columns: {', '.join(map(str, df.columns[:12]))}"
                        f"{' …' if len(df.columns) > 12 else ''})")
    if time_column is not None and time_column not in df.columns:
        raise InitError(f"--time-column {time_column!r} is not a column of {data}")
    y = df[label]
    if y.isna().any():
        raise InitError(f"label {label!r} has {int(y.isna().sum())} missing value(s): label every row, or drop those rows")
    if y.nunique() < 2:
        raise InitError(f"label {label!r} is constant ({y.iloc[0]!r}): there is nothing to learn to predict")
    task, classes, why = _task_and_classes(y, label, task)
    if classes is None:
        v = y.to_numpy(dtype=np.float64)
        label_counts = {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
    else:
        label_counts = {(k if isinstance(k, str) else int(k)): int(n) for k, n in y.value_counts().items()}
    features, skipped, categorical, imputed = [], {}, {}, {}
    for col in df.columns:
        if col in (label, time_column):
            continue
        s = df[col]
        missing = float(s.isna().mean())
        numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
        if not isinstance(col, str) or not col or re.search(r"[ ,;{}()\n\t=]", col):
            skipped[str(col)] = "its name has a character a Delta column cannot (space , ; { } ( ) = tab); rename it"
        elif missing > MAX_MISSING:
            skipped[col] = f"missing in {missing:.0%} of rows (more than {MAX_MISSING:.0%})"
        elif s.nunique() < 2:
            skipped[col] = "constant"
        elif numeric and np.isinf(s.to_numpy(dtype=np.float64)).any():
            skipped[col] = f"{int(np.isinf(s.to_numpy(dtype=np.float64)).sum())} inf values"
        elif not numeric and s.nunique() > min(MAX_CATEGORIES, len(df) / 2):
            skipped[col] = f"text with {s.nunique()} distinct values: an identifier or free text, not a category"
        else:
            features.append(col)
            if not numeric:
                counts = category_strings(s.dropna()).value_counts()
                categorical[col] = sorted(counts.index, key=lambda v: (-counts[v], v))
            if missing:
                imputed[col] = missing
    if not features:
        why = "; ".join(f"{c}: {w}" for c, w in list(skipped.items())[:4])
        raise InitError(f"{data}: no usable feature column (not constant, not mostly missing, not an id)"
                        f"{': ' + why if why else ''}")
    n = len(df)
    window = int(min(500, max(50, n // 10)))
    width = int(min(128, max(16, 2 ** math.ceil(math.log2(max(len(features), 2) * 2)))))
    return Inferred(
        name=name or _name_of(path), source=str(path), label=label, features=features, skipped=skipped,
        categorical=categorical, imputed=imputed, classes=classes, counts=label_counts, task=task, task_reason=why,
        time_column=time_column, rows=n, window=window,
        reference_rows=int(min(1000, max(10, round(n * 0.3)))), hidden=[width, max(8, width // 2)],
        batch_size=int(min(128, max(16, 2 ** round(math.log2(max(n / 50, 1)))))))


def _flow(items: list) -> str:
    """A YAML flow list; names that YAML would read as something else (yes, no, 1.0) are quoted."""
    import yaml

    return yaml.safe_dump(list(items), default_flow_style=True, width=10**6).strip()


def spec_text(inf: Inferred) -> str:
    """The spec as YAML, each inferred value with the reason for it."""
    import yaml

    quote = lambda s: yaml.safe_dump(s, default_style=None).strip().removesuffix("...").strip()  # noqa: E731
    skipped = "".join(f"\n#   {c}: {w}" for c, w in inf.skipped.items()) or " none"
    if inf.task == "regression":
        c = inf.counts
        task_line = f"task: regression                # {inf.task_reason}"
        label_lines = (f"  # no classes: the label is a number (in the file: min {c['min']:g}, median {c['median']:g}, "
                       f"max {c['max']:g}); the model predicts it, trained on mean squared error\n")
        bbsd = "    - {kind: bbsd}                         # Kolmogorov-Smirnov on the model's predictions (y-hat)"
        gate = ("  gate: {metric: rmse}           # a challenger must have a lower root mean squared error on the same rows\n"
                "  # policy.max_error: N retrains when the rolling mean absolute error of labelled rows exceeds N\n")
    else:
        counts = ", ".join(f"{c}: {inf.counts[c]}" for c in inf.classes)  # rows per class
        task_line = f"task: classification            # {inf.task_reason}"
        label_lines = f"  classes: {_flow(inf.classes)}   # rows per class in the file: {counts}\n"
        bbsd = "    - {kind: bbsd}                         # black-box shift detection on the model's outputs"
        gate = ""
    features = "\n".join(f"    - {quote(f)}" for f in inf.features)
    cat_lines = "".join(
        f"    {quote(c)}:                 # {len(v)} values in the file, most frequent first\n"
        f"      categories: {_flow(v)}\n"
        f"      unseen: other           # a value not listed: no category (one-hot all zero); `refuse`: 422\n"
        for c, v in inf.categorical.items())
    categorical = (f"  categorical:                  # text columns: one-hot coded in the model (embedded above 16 values)\n"
                   f"{cat_lines}") if inf.categorical else ""
    missing = ("  missing:                      # columns with missing values: imputed with the training median (a number)"
               " or most frequent value (a category); the missing rate is monitored for drift; unlisted columns refuse"
               " a missing value\n" + "".join(f"    {quote(c)}: impute           # missing in {r:.1%} of rows\n"
                                                for c, r in inf.imputed.items())) if inf.imputed else ""
    time_line = f"  time_column: {quote(inf.time_column)}   # --time-column: kept beside the features, not learned from\n" if inf.time_column else ""
    return f"""# Model spec written by `driftloop init {inf.source} --label {inf.label}`: {inf.rows} rows, {len(inf.features)} features.
# Every value below was inferred from the file; change any of them. Columns not used as features:{skipped}
name: {quote(inf.name)}
{task_line}
dataset:
  source: {quote(inf.source)}
  table: {quote(inf.name)}      # the Delta table `driftloop data ingest` appends to
  features:                     # columns with more than one value, missing in at most half the rows
{features}
  feature_dtype: float
{categorical}{missing}  label: {quote(inf.label)}
{label_lines}{time_line}  min_rows: 10
  split: [0.7, 0.15, 0.15]      # train / validation / test; validation + test are the detectors' reference
  seed: 0
model:
  kind: mlp
  hidden: {_flow(inf.hidden)}          # about twice the feature count, halved in the second layer
  dropout: 0.1
training:
  epochs: 20
  batch_size: {inf.batch_size}                # about rows / 50, a power of two in [16, 128]
  lr: 0.003
  workers: 2
  cpus_per_worker: 0.5
sweep:
  trials: 2                     # two learning rates; widen the search space for more
  concurrency: 2
  search_space:
    lr: {{loguniform: [0.001, 0.01]}}
drift:
  window: {inf.window}                   # rows per drift test: a tenth of the file, in [50, 500]
  p_val: 0.01                   # a clean window's chance of a flag, split over the detectors below
  reference_rows: {inf.reference_rows}           # at most 30 % of the file (the held-out splits supply them)
  detectors:
    - {{kind: ks, correction: bonferroni}}   # per-feature Kolmogorov-Smirnov on the inputs (chi-square on categories)
{bbsd}
{"    - {kind: missing}                      # chi-square on the missing rate of each imputed column" + chr(10) if inf.imputed else ""}retraining:
  policy: {{k: 2, m: 3}}           # drift in two of the last three windows triggers a retrain
  cooldown_s: 300
  min_labelled_rows: {inf.window}         # at least one window of labelled production rows first
{gate}"""


def serve_text(inf: Inferred, spec_path: str) -> str:
    return f"""# Ray Serve config written by `driftloop init`: `driftloop serve serve_configs/{inf.name}.yaml`.
# Binds to 127.0.0.1; put an authenticating proxy in front before exposing it.
proxy_location: HeadOnly
http_options:
  host: 127.0.0.1
  port: 8000
logging_config:
  enable_access_log: false
applications:
  - name: {inf.name}
    route_prefix: /{inf.name}
    import_path: driftloop.serving.app:build
    args:
      spec: {spec_path}
    deployments:
      - name: Predictor
        autoscaling_config:      # Serve adds replicas while each holds more than 8 requests in flight (README: Scaling)
          min_replicas: 2        # >= 2 so a rolling update never leaves the app without a replica
          max_replicas: 8
          target_ongoing_requests: 8
          upscale_delay_s: 10
          downscale_delay_s: 120
        max_ongoing_requests: 64
        ray_actor_options: {{num_cpus: 0.1}}
        health_check_period_s: 2
      - name: DriftMonitor
        num_replicas: 1        # one monitor owns the windows of the application
        ray_actor_options: {{num_cpus: 0.1}}
        health_check_period_s: 2
"""


def write(inf: Inferred, root: Path, force: bool = False) -> tuple[Path, Path]:
    """Write configs/NAME.yaml and serve_configs/NAME.yaml: both validated first, then each renamed into place;
    an existing file is refused unless `force`. Returns the two paths."""
    from driftloop.config import parse_spec

    import yaml

    spec_path, serve_path = root / "configs" / f"{inf.name}.yaml", root / "serve_configs" / f"{inf.name}.yaml"
    if not force:
        for p in (spec_path, serve_path):
            if p.exists():
                raise InitError(f"{p} exists; pass --force to replace it, or --name for another model name")
    spec_doc = spec_text(inf)
    parse_spec(yaml.safe_load(spec_doc), "generated spec")  # what we write is a spec the loop accepts
    serve_doc = serve_text(inf, f"configs/{inf.name}.yaml")
    tmps = []
    try:
        for p, text in ((spec_path, spec_doc), (serve_path, serve_doc)):
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmps.append((tmp, p))
        existed = [p.exists() for _, p in tmps]
        for i, (tmp, p) in enumerate(tmps):
            try:
                os.replace(tmp, p)
            except OSError:
                if i and not existed[0]:  # the spec went in, its Serve config did not: take the spec back out
                    tmps[0][1].unlink(missing_ok=True)
                raise
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
    return spec_path, serve_path
