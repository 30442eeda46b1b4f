"""Online detectors (`cvm_online`, `mmd_online`, window 50): false alarms on clean rows against the expected run
time (ert) they were configured with, and delay in rows after an onset. Row by row through the same
LoadedDetector.update the monitor calls. No Ray: the model is trained in-process (as bench/detection.py).

mmd_online runs at the spec's default ert (1000). cvm_online tests each of the 64 pixels at 1/(ert x 64), which at
ert 1000 needs ~77,000 simulated null streams at every monitor start: the spec refuses that, so it runs at the
largest ert the spec accepts for 64 features."""

from __future__ import annotations

import time

import numpy as np

KINDS = ("cvm_online", "mmd_online")
ERTS = (1000, 500, 250, 100)
CLEAN_ROWS = 5_000      # five expected run times of clean rows per detector
STREAMS = 10            # drifted streams per corruption
PREFIX = 200            # clean rows before the onset (the detector's windows fill first)
MAX_AFTER = 1_000       # an onset not alarmed within this many rows counts as missed
ONSETS = ("noise:3", "blur:3")


def run() -> dict:
    import tempfile

    from bench.common import ROOT, wilson
    from bench.detection import _model
    from driftloop.config import DetectorSpec, DriftSpec, load_spec
    from driftloop.drift.detectors import CVM_ONLINE_MAX_STREAMS, cvm_online_streams
    from driftloop.data import examples
    from driftloop.model import predict_outputs
    from driftloop.train import split_frame

    spec = load_spec(ROOT / "configs/digits.yaml")
    ex = examples.builtin("digits")
    sp = split_frame(ex.reference, spec)
    model = _model(sp.x_train, sp.y_train, 10)
    feats = examples.DIGITS_FEATURES
    # exchangeable: the images the model never trained on, split at random into the reference and the clean stream
    x_unseen = np.concatenate([sp.x_val, sp.x_test, ex.pool[feats].to_numpy(np.float32)])
    perm = np.random.default_rng(7).permutation(len(x_unseen))
    x_ref, x_clean = x_unseen[perm[:-400]], x_unseen[perm[-400:]]
    default_ert = DetectorSpec(kind="cvm_online").ert
    out: dict = {"ert": default_ert, "window_sizes": DetectorSpec(kind="cvm_online").window_sizes, "clean_rows": CLEAN_ROWS,
                 "streams": STREAMS, "prefix_rows": PREFIX, "max_rows_after_onset": MAX_AFTER, "detectors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            ert = default_ert if kind == "mmd_online" else next(
                e for e in ERTS if cvm_online_streams(e, len(feats)) <= CVM_ONLINE_MAX_STREAMS)
            dspec = DriftSpec(window=500, reference_rows=spec.drift.reference_rows, detectors=[DetectorSpec(kind=kind, ert=ert)])
            t0 = time.perf_counter()
            det = _fitted(dspec, x_ref, model, feats, f"{tmp}/{kind}")
            fit_s = time.perf_counter() - t0
            rng = np.random.default_rng(11)
            clean = x_clean[rng.integers(0, len(x_clean), CLEAN_ROWS)]
            t0 = time.perf_counter()
            alarms = _alarm_rows(det, clean, predict_outputs(model, clean))
            per_row_ms = 1000 * (time.perf_counter() - t0) / CLEAN_ROWS
            runs = np.diff([0] + alarms)
            lo, hi = wilson(len(alarms), CLEAN_ROWS)
            ties = None
            if kind == "cvm_online":  # the control for its measured cause: the same rows with ties broken
                ties = _ties_broken(dspec, x_ref, clean, model, feats, f"{tmp}/{kind}-jitter")
            res = {"ert": ert, "ties": ties, "fit_s": round(fit_s, 1), "update_ms_per_row": round(per_row_ms, 3), "false_alarms": len(alarms),
                   "false_alarms_per_ert": len(alarms) * ert / CLEAN_ROWS,
                   "false_alarms_per_ert_ci95": [lo * ert, hi * ert],
                   "mean_run_length": float(np.mean(runs)) if len(runs) else None, "delay": {}}
            for onset in ONSETS:
                corruption, sev = onset.split(":")
                delays, missed = [], 0
                for seed in range(STREAMS):
                    det.reset()
                    s = examples.digits_stream(ex.pool, PREFIX + MAX_AFTER, PREFIX, corruption, int(sev), seed=60_000 + seed)
                    x = s[feats].to_numpy(np.float32)
                    after = [a - PREFIX for a in _alarm_rows(det, x, predict_outputs(model, x)) if a > PREFIX]
                    if after:
                        delays.append(after[0])
                    else:
                        missed += 1
                res["delay"][onset] = {"median_rows": float(np.median(delays)) if delays else None,
                                       "p90_rows": float(np.percentile(delays, 90)) if delays else None,
                                       "detected": f"{len(delays)}/{STREAMS}", "missed": missed}
            out["detectors"][kind] = res
            print(f"online {kind}: {len(alarms)} false alarms in {CLEAN_ROWS} clean rows (ert {ert}); delay {res['delay']}",
                  flush=True)
    return out


def _fitted(dspec, x_ref: np.ndarray, model, feats: list[str], path: str):
    """The spec's one detector, fitted on x_ref (and the model's outputs there), saved and loaded as the monitor does."""
    from driftloop.drift.detectors import fit_detectors, load_detectors
    from driftloop.model import predict_outputs

    return load_detectors(fit_detectors(dspec, x_ref, predict_outputs(model, x_ref), feats, path), 10)[0][0]


def _ties_broken(dspec, x_ref, clean, model, feats, path) -> dict:
    """CVM's thresholds are simulated for continuous data; digits' pixels take 17 values. Refit and rerun on the
    same rows with uniform +-0.5 jitter (reference and stream): what is left of the false alarms without ties."""
    from driftloop.model import predict_outputs

    rng = np.random.default_rng(12)
    jr = x_ref + rng.uniform(-0.5, 0.5, x_ref.shape).astype(np.float32)
    jc = clean + rng.uniform(-0.5, 0.5, clean.shape).astype(np.float32)
    det = _fitted(dspec, jr, model, feats, path)
    return {"distinct_values_per_feature_median": float(np.median([len(np.unique(x_ref[:, j])) for j in range(x_ref.shape[1])])),
            "false_alarms_jittered": len(_alarm_rows(det, jc, predict_outputs(model, jc)))}


def _alarm_rows(det, x: np.ndarray, proba: np.ndarray) -> list[int]:
    """1-based row numbers at which the detector alarmed, fed one row at a time (an alarm resets it, as live)."""
    rows = []
    for i in range(len(x)):
        res = det.update(x[i:i + 1], proba[i:i + 1])
        if res is not None and res.is_drift:
            rows.append(i + 1)
    return rows
