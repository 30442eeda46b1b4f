"""The model spec: one typed YAML file per model. A bad field is rejected with its path and reason."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A model spec that cannot be used; the message names the field path and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_RANGE = re.compile(r"^(?P<prefix>.*)\{(?P<lo>\d+)\.\.(?P<hi>\d+)\}(?P<suffix>.*)$")


def expand_names(names: list[str]) -> list[str]:
    """Expand 'pixel_{0..63}' into pixel_0 … pixel_63 so specs stay short."""
    out: list[str] = []
    for name in names:
        m = _RANGE.match(name)
        if m:
            lo, hi = int(m["lo"]), int(m["hi"])
            out.extend(f"{m['prefix']}{i}{m['suffix']}" for i in range(lo, hi + 1))
        else:
            out.append(name)
    return out


@functools.lru_cache(maxsize=256)
def _category_index(categories: tuple[str, ...]) -> dict[str, int]:
    return {c: i for i, c in enumerate(categories)}


class CategoricalSpec(_Strict):
    categories: list[str] = Field(min_length=1, description="the column's known values, in the model's order")
    unseen: Literal["refuse", "other"] = Field(
        default="other", description="a value outside `categories` at serving time: refused with 422 naming the known "
        "ones (refuse), or encoded as no known category, as scikit-learn's handle_unknown='ignore' (other)")

    @field_validator("categories")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate categories: {sorted({c for c in v if v.count(c) > 1})}")
        return v

    @property
    def index(self) -> dict[str, int]:
        """Category name -> its code (cached: the request path looks values up in it)."""
        return _category_index(tuple(self.categories))


# a categorical column with more values than this is embedded (a learned vector per value) instead of one-hot coded
EMBED_ABOVE = 16


class DatasetSpec(_Strict):
    source: str = Field(description="builtin:digits, builtin:rainfall, or a CSV/Parquet path")
    table: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    features: list[str] = Field(min_length=1)
    feature_dtype: Literal["float", "int"] = "float"
    label: str
    classes: list[int] | list[str] | None = Field(
        default=None, min_length=2, description="classification: the label's values, integers or strings (e.g. "
        "[benign, malignant]; predictions and feedback use them as they are); regression: none (the label is a number)")
    categorical: dict[str, CategoricalSpec] = Field(default_factory=dict, description="features whose values are "
                                                    "names (one-hot coded in the model, or embedded above 16 values)")
    missing: dict[str, Literal["refuse", "impute"]] = Field(
        default_factory=dict, description="per feature: a missing value (null) is refused (the default for a feature not "
        "listed), or imputed with the training rows' median (numeric) or most frequent value (categorical), which the "
        "model carries")
    time_column: str | None = None
    min_rows: int = Field(default=1, ge=1)
    max_rows: int = Field(default=5_000_000, ge=1)
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0

    @field_validator("features")
    @classmethod
    def _expand(cls, v: list[str]) -> list[str]:
        names = expand_names(v)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {dupes}")
        return names

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list | None) -> list | None:
        if v is None:
            return v
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate classes: {sorted({c for c in v if v.count(c) > 1})}")
        if any(isinstance(c, str) and not c for c in v):
            raise ValueError("a class name must not be empty")
        return v

    @property
    def string_labels(self) -> bool:
        return bool(self.classes) and isinstance(self.classes[0], str)

    @property
    def regression(self) -> bool:
        """No classes: the label is a number to predict."""
        return self.classes is None

    def label_value(self, value: Any) -> int | str | float:
        """A label as the spec's classes hold it (a plain int or str, from numpy or JSON); a float for regression."""
        value = value.item() if hasattr(value, "item") else value
        if self.regression:
            return float(value)
        return str(value) if self.string_labels else int(value)

    @property
    def cardinalities(self) -> list[int]:
        """Per feature: 0 for a number, else its number of categories."""
        return [len(self.categorical[f].categories) if f in self.categorical else 0 for f in self.features]

    @property
    def imputed(self) -> list[str]:
        return [f for f in self.features if self.missing.get(f) == "impute"]

    @field_validator("split")
    @classmethod
    def _split_sums(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(p <= 0 for p in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("train/val/test fractions must be positive and sum to 1")
        return v

    @model_validator(mode="after")
    def _label_not_feature(self) -> "DatasetSpec":
        if self.label in self.features:
            raise ValueError(f"label {self.label!r} is also listed as a feature")
        for what, cols in (("categorical", self.categorical), ("missing", self.missing)):
            unknown = [c for c in cols if c not in self.features]
            if unknown:
                raise ValueError(f"{what}: {unknown[0]!r} is not one of the features")
        if self.min_rows > self.max_rows:
            raise ValueError("min_rows is larger than max_rows")
        return self


class ModelSpec(_Strict):
    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default=[128, 64])
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h <= 0 for h in v):
            raise ValueError("hidden layer sizes must be positive")
        return v


class TrainingSpec(_Strict):
    epochs: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    use_gpu: bool = False
    max_failures: int = Field(default=2, ge=0)
    checkpoint_every: int = Field(default=5, ge=1, description="epochs between checkpoints (the last is always kept)")
    seed: int = 0


_DISTRIBUTIONS = {"uniform", "loguniform", "choice", "randint", "quniform"}


class SweepSpec(_Strict):
    trials: int = Field(default=4, ge=1)
    concurrency: int = Field(default=2, ge=1)
    metric: str | None = Field(default=None, description="what the sweep optimises (default: val_accuracy, max; "
                               "regression: val_rmse, min)")
    mode: Literal["max", "min"] | None = None
    search: Literal["optuna", "random"] = "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=3, ge=1)
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("search_space")
    @classmethod
    def _known(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        tunable = {"lr", "hidden", "dropout", "batch_size", "weight_decay", "epochs"}
        for name, dist in v.items():
            if name not in tunable:
                raise ValueError(f"{name}: not a tunable parameter (one of {sorted(tunable)})")
            if len(dist) != 1:
                raise ValueError(f"{name}: give exactly one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}")
            (kind, args), = dist.items()
            if kind not in _DISTRIBUTIONS:
                raise ValueError(f"{name}: unknown distribution {kind!r} (one of {sorted(_DISTRIBUTIONS)})")
            if kind == "choice":
                if not isinstance(args, list) or not args:
                    raise ValueError(f"{name}: choice needs a non-empty list")
            elif not (isinstance(args, list) and len(args) in (2, 3) and all(isinstance(a, (int, float)) for a in args)):
                raise ValueError(f"{name}: {kind} needs [low, high]")
            elif args[0] >= args[1]:
                raise ValueError(f"{name}: low must be below high")
            elif kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{name}: loguniform needs a positive low")
        return v


class DetectorSpec(_Strict):
    kind: Literal["ks", "cvm", "mmd", "lsdd", "bbsd", "cvm_online", "mmd_online", "missing"] = Field(
        description="ks: per-feature KS (chi-square on categorical features); missing: chi-square on the missing rate "
        "of each imputed feature (added by itself when a feature is imputed); cvm_online: per-feature online CVM (continuous "
        "features; ert x features is bounded, see the error); mmd_online: one multivariate online test")
    correction: Literal["bonferroni", "fdr"] = "bonferroni"
    ert: int = Field(default=1000, ge=10, description="expected run time of an online detector")
    window_sizes: list[int] = Field(default=[50])
    n_permutations: int = Field(default=100, ge=10)


class DriftSpec(_Strict):
    window: int = Field(default=500, ge=10)
    p_val: float = Field(default=0.05, gt=0, lt=1, description="a clean window's chance of being flagged: the monitor "
                         "flags a window when any detector fires, so by default each window detector tests at p_val / "
                         "their count (see p_val_split)")
    p_val_split: Literal["bonferroni", "each"] = Field(
        default="bonferroni", description="bonferroni: p_val is the whole set's false-alarm budget, split evenly over the "
        "window detectors (the missing-rate test included when it is added); each: every detector tests at p_val")
    reference_rows: int = Field(default=1000, ge=10)
    history: int = Field(default=20, ge=1, description="window results kept in /drift")
    detectors: list[DetectorSpec] = Field(default_factory=lambda: [DetectorSpec(kind="bbsd"), DetectorSpec(kind="ks")])


class NewDataSpec(_Strict):
    min_rows: int = Field(ge=1, description="retrain when the training table gains this many rows past the champion's data version")


class PolicySpec(_Strict):
    k: int = Field(default=2, ge=1, description="drift in k of the last m windows")
    m: int = Field(default=3, ge=1)
    warmup_windows: int | None = Field(default=None, ge=0, description="windows a new champion's detectors see before a "
                                       "drift trigger counts (default: m)")
    online_alarm: bool = True
    accuracy_floor: float | None = Field(default=None, ge=0, le=1, description="classification: retrain when the "
                                         "champion's rolling accuracy falls below this")
    max_error: float | None = Field(default=None, gt=0, description="regression: retrain when the champion's rolling "
                                    "mean absolute error rises above this (in the label's units)")
    new_labels: int | None = Field(default=None, ge=1)
    new_data: NewDataSpec | None = None
    window_drift: bool = Field(default=True, description="drift in k of m windows triggers (false: windows are only "
                               "recorded, e.g. where the world always 'drifts' statistically and only the error matters)")
    accuracy_drop: float | None = Field(default=None, gt=0, lt=1, description="retrain when a block of one window of "
                                        "labels scores this much below the champion's earlier blocks")

    @model_validator(mode="after")
    def _k_le_m(self) -> "PolicySpec":
        if self.k > self.m:
            raise ValueError("k must not exceed m")
        return self


class GateSpec(_Strict):
    metric: Literal["accuracy", "rmse", "mae"] | None = Field(default=None, description="what the challenger must beat "
                                                              "the champion on (default: accuracy; regression: rmse)")
    min_improvement: float = Field(default=0.0, description="the margin a challenger must win by, in the metric's "
                                   "units (accuracy: a fraction; rmse, mae: the label's units)")


class RetrainSpec(_Strict):
    policy: PolicySpec = Field(default_factory=PolicySpec)
    cooldown_s: float = Field(default=300, ge=0)
    min_labelled_rows: int = Field(default=200, ge=0)
    max_retries: int = Field(default=2, ge=0)
    backoff_s: float = Field(default=10, ge=0)
    sweep: bool = False
    training_window: int | None = Field(default=None, ge=10, description="a retrain trains on the newest N rows of the "
                                        "table (with the new labelled rows); none: all history")
    reference: Literal["recent", "table"] = Field(
        default="recent", description="the new champion's drift reference: the newest served rows it did not train on "
        "(recent), or the held-out splits of its whole table (table)")
    eval_fraction: float = Field(default=0.3, gt=0, lt=1, description="labelled production rows held out for the gate")
    gate: GateSpec = Field(default_factory=GateSpec)


class LifecycleSpec(_Strict):
    """How long the application's logs live and how the files it writes are kept small and few."""

    retention_days: float = Field(default=90, gt=0, description="rows of the inference log, feedback and drift events "
                                  "older than this many days are deleted (their day partitions) and their files vacuumed")
    vacuum_grace_hours: float = Field(default=24, ge=0, description="files that compaction or retention replaced stay on "
                                      "storage this long, so a reader that began before the change and time travel "
                                      "across it still work")
    maintenance_every_s: float = Field(default=3600, ge=0, description="the DriftMonitor compacts, expires and vacuums "
                                       "its tables this often (0: never; `driftloop gc` runs it by hand)")
    keep_versions: int = Field(default=20, ge=1, description="registry versions older than the newest N that are "
                               "neither the champion nor one of the last keep_champions champions are archived")
    keep_champions: int = Field(default=3, ge=1)
    local_cache_hours: float = Field(default=24, ge=0, description="node-local caches (Ray Train trial folders, model "
                                     "copies left by a crashed process) older than this are removed")


class Spec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    task: Literal["classification", "regression"] = "classification"
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    retraining: RetrainSpec = Field(default_factory=RetrainSpec)
    lifecycle: LifecycleSpec = Field(default_factory=LifecycleSpec)

    @property
    def n_features(self) -> int:
        return len(self.dataset.features)

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def n_classes(self) -> int:
        """The model's output width: one per class, or one predicted value (regression)."""
        return 1 if self.regression else len(self.dataset.classes)

    @property
    def output_names(self) -> list[str]:
        """Names of the model's outputs, as drift results name them: p_0 … per class, or `prediction`."""
        return ["prediction"] if self.regression else [f"p_{i}" for i in range(self.n_classes)]

    @property
    def tune_metric(self) -> tuple[str, str]:
        """(metric, mode) of the sweep: the spec's, or the task's default."""
        metric = self.sweep.metric or ("val_rmse" if self.regression else "val_accuracy")
        return metric, self.sweep.mode or ("min" if metric.split("_")[-1] in ("rmse", "mae", "loss") else "max")

    @property
    def gate_metric(self) -> str:
        return self.retraining.gate.metric or ("rmse" if self.regression else "accuracy")

    @model_validator(mode="after")
    def _task_fields(self) -> "Spec":
        ds, p, g = self.dataset, self.retraining.policy, self.retraining.gate
        if self.regression:
            wrong = [(ds.classes is not None, "dataset.classes: a regression label has no classes; remove them"),
                     (p.accuracy_floor is not None, "retraining.policy.accuracy_floor: regression has no accuracy; use max_error"),
                     (p.accuracy_drop is not None, "retraining.policy.accuracy_drop: regression has no accuracy; use max_error"),
                     (g.metric == "accuracy", "retraining.gate.metric: regression is gated on rmse or mae"),
                     (self.sweep.metric is not None and "accuracy" in self.sweep.metric,
                      "sweep.metric: regression trials report val_rmse and val_mae, not accuracy")]
        else:
            wrong = [(ds.classes is None, "dataset.classes: a classifier needs its classes (or set task: regression)"),
                     (p.max_error is not None, "retraining.policy.max_error: applies to regression; use accuracy_floor"),
                     (self.sweep.metric is not None and self.sweep.metric.split("_")[-1] in ("rmse", "mae"),
                      "sweep.metric: a classifier's trials report val_accuracy, not errors"),
                     (g.metric in ("rmse", "mae"), f"retraining.gate.metric: {g.metric} applies to regression"),
                     (g.metric in (None, "accuracy") and abs(g.min_improvement) > 1,
                      "retraining.gate.min_improvement: an accuracy margin lies in [-1, 1]")]
        from driftloop.drift.detectors import CVM_ONLINE_MAX_STREAMS, cvm_online_streams

        for d in self.drift.detectors:
            streams = cvm_online_streams(d.ert, self.n_features) if d.kind == "cvm_online" else 0
            wrong.append((streams > CVM_ONLINE_MAX_STREAMS,
                          f"drift.detectors: cvm_online tests each of the {self.n_features} features at false-alarm rate "
                          f"1/(ert x features); at ert {d.ert} its thresholds need {streams:,} simulated streams at every "
                          f"monitor start (at most {CVM_ONLINE_MAX_STREAMS:,}): lower ert, or use mmd_online (one multivariate test)"))
        for bad, msg in wrong:
            if bad:
                raise ValueError(msg)
        return self


def _format(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    # a key can be any string (newlines, control characters): quote those so the error stays one line
    path = ".".join(str(p) if str(p).isprintable() else repr(str(p)) for p in first["loc"]) or "(root)"
    msg = " ".join(first["msg"].removeprefix("Value error, ").split())
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {path}: {msg}{more}"


def parse_spec(data: Any, where: str = "spec") -> Spec:
    """Validate a spec mapping; raise SpecError naming the first bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format(err, where)) from None


def load_spec(path: str | Path) -> Spec:
    """Load and validate configs/<name>.yaml."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_spec(data, str(p))
