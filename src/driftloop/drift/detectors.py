"""alibi-detect detectors behind one interface: fitted on a model's reference data at training time,
saved with `save_detector` (config format) next to the model, loaded at serve time.

Importing alibi-detect costs seconds, so it only happens inside the functions that need it; where detectors
are loaded (the monitor's start), through `import_alibi_detect` (drift/deferred.py: transformers deferred, and
torch hidden unless a detector runs on it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.config import DetectorSpec, DriftSpec
from driftloop.drift.deferred import TORCH_KINDS, import_alibi_detect

MANIFEST = "detectors.json"
ONLINE_KINDS = {"cvm_online", "mmd_online"}
CVM_ONLINE_MAX_STREAMS = 20_000  # simulated when the detector is built, at every monitor start: ~40 s here (bench/online.py)


def cvm_online_streams(ert: int, n_features: int) -> int:
    """Null streams CVMDriftOnline must simulate: it tests each feature at 1 - (1 - 1/ert)^(1/features), and a
    quantile that far out needs more than 1/beta streams (alibi-detect refuses fewer), with room for the streams it
    drops as they cross a threshold."""
    import math

    beta = 1 - (1 - 1 / ert) ** (1 / max(n_features, 1))
    return max(10_000, math.ceil(1.2 / beta))


# Drawn at random when an online detector is built (loading one builds it again): its thresholds (simulated) and,
# for MMD, the reference/test split. A restarted detector must keep them, or its running state means nothing.
RANDOM_SETUP = ("thresholds", "ref_inds", "init_test_inds", "k_xx_sub", "k_xx_sub_sum")


@dataclass
class DetectorResult:
    """One detector's verdict on one window (or one online update)."""

    name: str
    kind: str
    is_drift: bool
    p_val: float | None
    distance: float | None
    threshold: float | None
    drifted_features: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _input_of(kind: str) -> str:
    return {"bbsd": "proba", "missing": "missing"}.get(kind, "features")


class Layout:
    """What the feature-input detectors need to know about the columns (driftloop.features): a missing value is
    replaced by the reference's median / most frequent code (the missing rate has its own test), and an unseen
    category (-1) becomes one more category, so two-sample tests see numbers they can compare."""

    def __init__(self, cardinalities: list[int], fill: list[float], imputed: list[int]):
        self.cardinalities, self.fill, self.imputed = list(cardinalities), np.asarray(fill, np.float32), list(imputed)

    @classmethod
    def fit(cls, x_ref: np.ndarray, cardinalities: list[int] | None, imputed: list[int]) -> "Layout":
        from driftloop.features import fill_values

        card = list(cardinalities or [0] * x_ref.shape[1])
        return cls(card, fill_values(x_ref, card).tolist(), imputed)

    @property
    def categorical(self) -> list[int]:
        return [j for j, k in enumerate(self.cardinalities) if k]

    def features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if not (self.imputed or self.categorical):
            return x
        x = np.where(np.isnan(x), self.fill, x).astype(np.float32)
        for j in self.categorical:
            x[x[:, j] < 0, j] = self.cardinalities[j]
        return x

    def missing(self, x: np.ndarray) -> np.ndarray:
        return np.isnan(np.asarray(x, dtype=np.float32)[:, self.imputed]).astype(np.float32)

    def as_dict(self) -> dict[str, Any]:
        return {"cardinalities": self.cardinalities, "fill": self.fill.tolist(), "imputed": self.imputed}


def p_val_each(drift: DriftSpec, kinds: list[str]) -> float:
    """The level each of these detectors tests at. The monitor flags a window when ANY window detector fires, so
    under "bonferroni" p_val is split over them (online detectors have their own expected run time)."""
    windowed = sum(k not in ONLINE_KINDS for k in kinds)
    return drift.p_val / max(windowed, 1) if drift.p_val_split == "bonferroni" else drift.p_val


def _build(d: DetectorSpec, x_ref: np.ndarray, p_val: float, layout: Layout):
    """Construct (fit) one alibi-detect detector on its reference data."""
    from alibi_detect.cd import ChiSquareDrift, CVMDrift, KSDrift, LSDDDrift, MMDDrift, TabularDrift

    if d.kind == "ks" and layout.categorical:  # KS on numbers, chi-square on categories
        return TabularDrift(x_ref, p_val=p_val, correction=d.correction,
                            categories_per_feature={j: None for j in layout.categorical})
    if d.kind == "missing":  # chi-square on each imputed column's missing / present indicator
        return ChiSquareDrift(x_ref, p_val=p_val, correction=d.correction)
    if d.kind in ("ks", "bbsd"):
        return KSDrift(x_ref, p_val=p_val, correction=d.correction)
    if d.kind == "cvm":
        return CVMDrift(x_ref, p_val=p_val, correction=d.correction)
    if d.kind == "mmd":
        return MMDDrift(x_ref, backend="pytorch", p_val=p_val, n_permutations=d.n_permutations)
    if d.kind == "lsdd":
        return LSDDDrift(x_ref, backend="pytorch", p_val=p_val, n_permutations=d.n_permutations)
    if d.kind == "cvm_online":
        from alibi_detect.cd import CVMDriftOnline

        # its per-feature thresholds are simulated: enough null streams for the feature count (cvm_online_streams),
        # in batches that bound memory (each stream holds a (reference + window)^2 boolean matrix)
        return CVMDriftOnline(x_ref, ert=d.ert, window_sizes=d.window_sizes, verbose=False,
                              n_bootstraps=cvm_online_streams(d.ert, x_ref.shape[1]), batch_size=200)
    if d.kind == "mmd_online":
        from alibi_detect.cd import MMDDriftOnline

        # thresholds are simulated; the (1 - 1/ert) quantile needs more bootstrap streams than ert
        return MMDDriftOnline(x_ref, ert=d.ert, window_size=d.window_sizes[0], backend="pytorch",
                              n_bootstraps=max(1000, 2 * d.ert), verbose=False)
    raise ValueError(f"unknown detector kind {d.kind!r}")


def fit_detectors(
    drift: DriftSpec, x_ref: np.ndarray, proba_ref: np.ndarray, features: list[str], out_dir: str | Path, seed: int = 0,
    cardinalities: list[int] | None = None, imputed: list[str] | None = None,
) -> Path:
    """Fit every detector of the spec on the reference sample and save them with a manifest. Features that may be
    missing (`imputed`) get a chi-square test of their missing rate too, whether or not the spec lists one."""
    from alibi_detect.saving import save_detector

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if len(x_ref) > drift.reference_rows:
        keep = np.sort(rng.choice(len(x_ref), drift.reference_rows, replace=False))
        x_ref, proba_ref = x_ref[keep], proba_ref[keep]
    layout = Layout.fit(x_ref, cardinalities, [features.index(f) for f in imputed or []])
    kinds = list(drift.detectors)
    if layout.imputed and not any(d.kind == "missing" for d in kinds):
        kinds.append(DetectorSpec(kind="missing"))
    if not layout.imputed:
        kinds = [d for d in kinds if d.kind != "missing"]
    p_each = p_val_each(drift, [d.kind for d in kinds])
    entries = []
    for i, d in enumerate(kinds):
        name = f"{i}-{d.kind}"
        inp = _input_of(d.kind)
        ref = proba_ref.astype(np.float32) if inp == "proba" else layout.missing(x_ref) if inp == "missing" else layout.features(x_ref)
        det = _build(d, ref, p_each, layout)
        save_detector(det, out / name)
        entries.append({"name": name, "kind": d.kind, "input": inp, "online": d.kind in ONLINE_KINDS})
    manifest = {"features": features, "p_val": drift.p_val, "p_val_split": drift.p_val_split, "p_val_each": p_each, "window": drift.window, "reference_rows": int(len(x_ref)),
                "detectors": entries, "layout": layout.as_dict()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


class FastKSScore:
    """alibi-detect's `KSDrift.feature_score` (two-sided, `mode="asymp"`), with the same numbers and less work.

    alibi-detect calls scipy's `ks_2samp` once per feature, through scipy's NaN-policy wrapper, and that sorts the
    reference again every window and computes each p-value with `kstwo.sf`, ~0.2 ms each in pure Python: for the
    shipped set's 74 columns (64 pixels, 10 class probabilities) it was 65 % of the monitor's CPU under load
    (py-spy, 32-row batches). This does what ks_2samp does, step for step (sort, searchsorted CDFs, the larger
    of the two one-sided gaps, `kstwo.sf(d, round(en))` clipped to [0, 1]), with the reference sorted once, and
    each p-value kept by its statistic: a window of n rows against m reference rows can only give statistics
    on a grid of 1 / lcm(m, n), so the same few hundred values come back. Anything else (NaN in the data,
    one-sided tests) goes to alibi-detect's own method; a unit test checks both give identical arrays."""

    MAX_CACHED = 100_000

    def __init__(self, detector: Any):
        self._det = detector
        self._own = detector.feature_score
        self._ref: np.ndarray | None = None  # the reference array last sorted (kept, so its identity is stable)
        self._ref_sorted: np.ndarray | None = None
        self._sf: dict[tuple[float, float], float] = {}

    def __call__(self, x_ref: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from scipy.stats import kstwo

        x = x.reshape(x.shape[0], -1)
        x_ref = x_ref.reshape(x_ref.shape[0], -1)
        if (self._det.alternative != "two-sided" or not len(x) or not len(x_ref) or np.isnan(x).any()
                or np.isnan(x_ref).any()):
            return self._own(x_ref, x)
        if self._ref is not x_ref:
            self._ref, self._ref_sorted = x_ref, np.sort(x_ref, axis=0)
        n1, n2 = len(x_ref), len(x)
        m, n = sorted([float(n1), float(n2)], reverse=True)
        en = float(np.round(m * n / (m + n)))
        xs = np.sort(x, axis=0)
        p_val = np.zeros(self._det.n_features, dtype=np.float32)
        dist = np.zeros_like(p_val)
        for f in range(self._det.n_features):
            a, b = self._ref_sorted[:, f], xs[:, f]
            both = np.concatenate([a, b])
            diffs = np.searchsorted(a, both, side="right") / n1 - np.searchsorted(b, both, side="right") / n2
            max_s, min_s = diffs.max(), np.clip(-diffs.min(), 0, 1)
            d = float(min_s if min_s > max_s else max_s)
            p = self._sf.get((d, en))
            if p is None:
                p = float(np.clip(kstwo.sf(d, en), 0, 1))
                if len(self._sf) < self.MAX_CACHED:
                    self._sf[(d, en)] = p
            dist[f], p_val[f] = d, p
        return p_val, dist


class LoadedDetector:
    """A saved detector with the uniform predict(features, proba) -> DetectorResult interface."""

    def __init__(self, entry: dict[str, Any], detector: Any, features: list[str], proba_names: list[str],
                 layout: Layout | None = None):
        self.name = entry["name"]
        self.kind = entry["kind"]
        self.input = entry["input"]
        self.online = bool(entry["online"])
        self._det = detector
        if type(detector).__name__ == "KSDrift":  # alibi-detect's method, same numbers, a fraction of the CPU
            detector.feature_score = FastKSScore(detector)
        self._layout = layout or Layout([0] * len(features), [0.0] * len(features), [])
        self._names = {"features": features, "proba": proba_names,
                       "missing": [f"{features[j]} (missing)" for j in self._layout.imputed]}[self.input]

    def _x(self, features: np.ndarray, proba: np.ndarray) -> np.ndarray:
        if self.input == "proba":
            return np.asarray(proba, dtype=np.float32)
        return self._layout.missing(features) if self.input == "missing" else self._layout.features(features)

    def predict(self, features: np.ndarray, proba: np.ndarray) -> DetectorResult:
        """Two-sample test of one window against the reference."""
        out = self._det.predict(self._x(features, proba), return_p_val=True, return_distance=True)["data"]
        p = np.atleast_1d(np.asarray(out.get("p_val"), dtype=np.float64))
        dist = np.atleast_1d(np.asarray(out.get("distance"), dtype=np.float64))
        thr = float(out["threshold"]) if out.get("threshold") is not None else None
        # a p-value per input column names the columns that drifted (a regression's one output, `prediction`, too);
        # a multivariate test's one p-value over several columns names none
        drifted = [self._names[i] for i in np.flatnonzero(p < thr)] if thr is not None and p.size == len(self._names) else []
        return DetectorResult(self.name, self.kind, bool(out["is_drift"]), float(p.min()), float(dist.max()), thr, drifted)

    def update(self, features: np.ndarray, proba: np.ndarray) -> DetectorResult | None:
        """Feed rows to an online detector one by one. An alarm resets it and the rest of the rows go on into the
        fresh run (none is skipped); the first alarm is returned, else the last row's result."""
        last = alarm = None
        for row in self._x(features, proba):
            out = self._det.predict(row, return_test_stat=True)["data"]
            stat = np.asarray(out.get("test_stat"), dtype=np.float64)
            thr = np.asarray(out.get("threshold"), dtype=np.float64)
            last = DetectorResult(self.name, self.kind, bool(out["is_drift"]),
                                  None, float(np.max(stat)) if stat.size else None,
                                  float(np.max(thr)) if thr.size else None)
            if last.is_drift:
                alarm = alarm or last
                self.reset()
        return alarm or last

    def reset(self) -> None:
        if self.online and hasattr(self._det, "reset_state"):
            self._det.reset_state()

    @property
    def time(self) -> int:
        return int(getattr(self._det, "t", 0))

    # --- durable state of an online detector (alibi-detect's `online_state_keys`), as plain arrays ---
    def _stateful(self):
        return getattr(self._det, "_detector", self._det)  # MMDDriftOnline delegates to its backend detector

    def get_state(self) -> dict[str, np.ndarray]:
        """The online detector's running state (t, test window, kernel sums...) as numpy arrays; {} for batch ones.
        alibi-detect's own `save_state` uses torch.save (pickle) for the pytorch backend; this stays pickle-free."""
        if not self.online:
            return {}
        det = self._stateful()
        out: dict[str, np.ndarray] = {}
        for key in det.online_state_keys + RANDOM_SETUP:
            v = getattr(det, key, None)
            if v is None:
                continue
            if isinstance(v, list):
                v = [float(x) for x in v]
            out[key] = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return out

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `get_state` returned, keeping each attribute's type (torch tensor, array or number)."""
        if not self.online or not state:
            return
        det = self._stateful()
        for key in det.online_state_keys + RANDOM_SETUP:
            if key not in state:
                continue
            cur, v = getattr(det, key, None), state[key]
            if isinstance(cur, list):
                import torch

                setattr(det, key, [torch.as_tensor(x) if cur and hasattr(cur[0], "detach") else x for x in v.tolist()])
            elif hasattr(cur, "detach"):
                import torch

                setattr(det, key, torch.as_tensor(v, dtype=cur.dtype, device=cur.device))
            elif isinstance(cur, (int, np.integer)) or (cur is None and v.ndim == 0):
                setattr(det, key, v.item() if v.ndim == 0 else v)
            else:
                setattr(det, key, v)


def load_detectors(path: str | Path, outputs: int | list[str] | None = None) -> tuple[list[LoadedDetector], dict[str, Any]]:
    """Load the detectors saved next to a model version, with their manifest. `outputs` names the model's outputs
    in drift results: a class count (p_0 …) or the names (Spec.output_names)."""
    root = Path(path)
    manifest = json.loads((root / MANIFEST).read_text())
    load_detector = import_alibi_detect(need_torch=any(e["kind"] in TORCH_KINDS for e in manifest["detectors"]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proba_names = (list(outputs) if isinstance(outputs, list) else [f"p_{i}" for i in range(outputs or 0)]) or ["p"]
    layout = Layout(**manifest["layout"]) if "layout" in manifest else None
    dets = [LoadedDetector(e, load_detector(root / e["name"]), manifest["features"], proba_names, layout)
            for e in manifest["detectors"]]
    return dets, manifest
