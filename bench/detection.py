"""Detection quality: delay in rows after onset (median over seeded streams) and false alarms on clean
windows, for each detector kind and each digits corruption at severities 1-5; rainfall year over year.
No Ray: the model is trained in-process; the detectors are the same alibi-detect wrappers the monitor runs."""

from __future__ import annotations

import numpy as np

WINDOW = 500
STREAMS = 20
CLEAN_WINDOWS = 200
COMBINED_WINDOWS = 1000  # the shipped set's (OR) rate: enough windows that a 1 % rate has a 95 % upper bound under 2 %
MAX_WINDOWS = 4  # a stream not flagged within 4 windows counts as missed


def _model(x, y, n_classes, epochs=30, seed=0):
    import torch
    import torch.nn.functional as F

    from driftloop.model import Outputs, build_model

    torch.manual_seed(seed)
    m = build_model(x.shape[1], n_classes, [128, 64], 0.1)
    m.set_standardisation(x)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(epochs):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            F.cross_entropy(m(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    return Outputs(m).eval()


def _fit(kinds, x_ref, p_ref, features, tmp, p_val, split="each", n_perm=100):
    """Fit through the monitor's own wrapper. split="each": every detector at p_val (one detector's figures, at the
    level it tests at inside the shipped set); the shipped set itself is fitted with the spec's p_val and split."""
    from driftloop.config import DetectorSpec, DriftSpec
    from driftloop.drift.detectors import fit_detectors, load_detectors

    spec = DriftSpec(window=WINDOW, p_val=p_val, p_val_split=split, reference_rows=len(x_ref),
                     detectors=[DetectorSpec(kind=k, n_permutations=n_perm) for k in kinds])
    fit_detectors(spec, x_ref, p_ref, features, tmp)
    return load_detectors(tmp, p_ref.shape[1])[0]


def run() -> dict:
    import tempfile

    from driftloop.data import examples
    from driftloop.model import predict_outputs
    from driftloop.train import split_frame
    from driftloop.config import load_spec
    from driftloop.drift.detectors import p_val_each
    from bench.common import ROOT

    spec = load_spec(ROOT / "configs/digits.yaml")
    ex = examples.builtin("digits")
    sp = split_frame(ex.reference, spec)
    model = _model(sp.x_train, sp.y_train, 10)
    x_ref = np.concatenate([sp.x_val, sp.x_test])
    feats = examples.DIGITS_FEATURES
    default = [d.kind for d in spec.drift.detectors]
    # one detector alone is measured at the level it tests at inside the shipped set (the set's p_val, Bonferroni-split)
    p_each = p_val_each(spec.drift, default)
    out: dict = {"window": WINDOW, "streams": STREAMS, "clean_windows": CLEAN_WINDOWS, "digits": {}, "false_alarms": {},
                 "p_val": spec.drift.p_val, "p_val_split": spec.drift.p_val_split, "p_val_each": p_each}
    with tempfile.TemporaryDirectory() as tmp:
        dets = _fit(["bbsd", "ks", "mmd"], x_ref, predict_outputs(model, x_ref), feats, tmp, p_each)
        budget = {"bbsd": (STREAMS, CLEAN_WINDOWS), "ks": (STREAMS, CLEAN_WINDOWS), "mmd": (5, 40)}  # MMD permutations cost ~0.7 s a window
        for det in dets:
            n_streams, n_clean = budget[det.kind]
            fa = 0
            for w in range(n_clean):
                xw = examples.digits_stream(ex.pool, WINDOW, None, seed=10_000 + w)[feats].to_numpy(np.float32)
                fa += det.predict(xw, predict_outputs(model, xw)).is_drift
            out["false_alarms"][det.kind] = {"windows": n_clean, "rate": fa / n_clean}
            for kind in examples.CORRUPTIONS:
                for sev in range(1, 6):
                    delays = []
                    for seed in range(n_streams):
                        delay = None
                        for w in range(MAX_WINDOWS):
                            xw = examples.digits_stream(ex.pool, WINDOW, 0, kind, sev, seed=1000 * seed + w)[feats].to_numpy(np.float32)
                            if det.predict(xw, predict_outputs(model, xw)).is_drift:
                                delay = (w + 1) * WINDOW
                                break
                        delays.append(delay)
                    hit = [d for d in delays if d is not None]
                    out["digits"].setdefault(det.kind, {})[f"{kind}:{sev}"] = {
                        "median_delay_rows": float(np.median(hit)) if len(hit) > len(delays) / 2 else None,
                        "detected": f"{len(hit)}/{len(delays)}"}
            print(f"detection {det.kind}: false alarms {out['false_alarms'][det.kind]['rate']:.3f}", flush=True)
        # Calibration on exchangeable clean windows: all 1,017 images the model never trained on, split at random
        # into a fresh reference and a 500-row window, detectors refitted each time (no shift by construction).
        x_unseen = np.concatenate([x_ref, ex.pool[feats].to_numpy(np.float32)])
        p_unseen = predict_outputs(model, x_unseen)
        out["false_alarms_exchangeable"] = {}
        for kind, n in (("bbsd", CLEAN_WINDOWS), ("ks", CLEAN_WINDOWS), ("mmd", 40)):
            fa = 0
            for w in range(n):
                perm = np.random.default_rng(20_000 + w).permutation(len(x_unseen))
                ref_i, win_i = perm[:-WINDOW], perm[-WINDOW:]
                det = _fit([kind], x_unseen[ref_i], p_unseen[ref_i], feats, f"{tmp}/x{kind}{w}", p_each)[0]
                fa += det.predict(x_unseen[win_i], p_unseen[win_i]).is_drift
            out["false_alarms_exchangeable"][kind] = {"windows": n, "rate": fa / n}
            print(f"detection {kind}: false alarms on exchangeable windows {fa / n:.3f}", flush=True)
        out["false_alarms_combined"] = _combined_false_alarms(default, spec.drift, x_unseen, p_unseen, feats, f"{tmp}/or")
        shipped = _fit(default, x_ref, predict_outputs(model, x_ref), feats, f"{tmp}/shipped", spec.drift.p_val,
                       spec.drift.p_val_split)
        out["delay_random_onset"] = _random_onset_delays(shipped, model, ex.pool, feats)
        out["rainfall"] = _rainfall(tmp + "/rain")
    sev3 = [(k, s) for k in examples.CORRUPTIONS for s in (3, 4, 5)]
    first_window = all(any(out["digits"][d][f"{k}:{s}"]["median_delay_rows"] == WINDOW for d in default) for k, s in sev3)
    fa_default = max(out["false_alarms"][d]["rate"] for d in default)
    fa_exch = max(out["false_alarms_exchangeable"][d]["rate"] for d in default)
    out["target"] = {"default_detectors": default, "every_severity_ge3_within_one_window": first_window,
                     "false_alarm_rate_default_max": fa_default, "false_alarm_rate_default_max_exchangeable": fa_exch,
                     "false_alarm_ratio_to_1pct_target": fa_exch / 0.01}
    return out


def _combined_false_alarms(kinds, drift, x_unseen, p_unseen, feats, tmp) -> dict:
    """What a user gets: the monitor flags a window when ANY detector of the set fires. Exchangeable clean windows
    (random split of unseen images into reference + window, the whole set refitted each time, with the spec's p_val
    and split), with a 95 % interval."""
    import shutil

    from bench.common import wilson

    flagged = 0
    for w in range(COMBINED_WINDOWS):
        perm = np.random.default_rng(30_000 + w).permutation(len(x_unseen))
        ref_i, win_i = perm[:-WINDOW], perm[-WINDOW:]
        dets = _fit(kinds, x_unseen[ref_i], p_unseen[ref_i], feats, f"{tmp}{w}", drift.p_val, drift.p_val_split)
        flagged += any(d.predict(x_unseen[win_i], p_unseen[win_i]).is_drift for d in dets)
        shutil.rmtree(f"{tmp}{w}")
    lo, hi = wilson(flagged, COMBINED_WINDOWS)
    print(f"detection {'+'.join(kinds)} (OR): false alarms {flagged}/{COMBINED_WINDOWS}", flush=True)
    return {"detectors": kinds, "p_val": drift.p_val, "p_val_split": drift.p_val_split, "windows": COMBINED_WINDOWS,
            "flagged": flagged, "rate": flagged / COMBINED_WINDOWS, "ci95": [lo, hi]}


ONSET_SEVERITIES = (2, 3, 5)


def _random_onset_delays(dets, model, pool, feats) -> dict:
    """Delay as the monitor sees it: its windows are fixed 500-row blocks from the start of serving, and the drift
    starts at a uniformly random offset inside one of them. Delay = rows from the onset to the end of the first
    window the shipped set (OR) flags; a stream not flagged within MAX_WINDOWS windows after the onset is a miss."""
    from driftloop.data import examples
    from driftloop.model import predict_outputs

    out = {}
    for kind in examples.CORRUPTIONS:
        for sev in ONSET_SEVERITIES:
            delays, missed = [], 0
            for seed in range(STREAMS):
                offset = int(np.random.default_rng(40_000 + seed).integers(0, WINDOW))
                n = offset + MAX_WINDOWS * WINDOW
                x = examples.digits_stream(pool, n, offset, kind, sev, seed=50_000 + seed)[feats].to_numpy(np.float32)
                end = next((w * WINDOW + WINDOW for w in range(n // WINDOW)
                            if w * WINDOW + WINDOW > offset and any(
                                d.predict(xw := x[w * WINDOW:(w + 1) * WINDOW], predict_outputs(model, xw)).is_drift for d in dets)),
                           None)
                if end is None:
                    missed += 1
                else:
                    delays.append(end - offset)
            out[f"{kind}:{sev}"] = {"median_rows": float(np.median(delays)) if delays else None,
                                    "p90_rows": float(np.percentile(delays, 90)) if delays else None,
                                    "detected": f"{len(delays)}/{STREAMS}", "missed": missed}
    return out


def _rainfall(tmp) -> dict:
    from driftloop.data import examples

    ex = examples.builtin("rainfall")
    feats = examples.RAINFALL_FEATURES
    ref = ex.reference
    x_ref = ref[feats].to_numpy(np.float32)
    model = _model(x_ref, ref["rain"].to_numpy(), 2, epochs=10)
    from driftloop.model import predict_outputs

    from bench.common import ROOT
    from driftloop.config import load_spec

    drift = load_spec(ROOT / "configs/rainfall.yaml").drift
    dets = _fit([d.kind for d in drift.detectors], x_ref[-3650:], predict_outputs(model, x_ref[-3650:]), feats, tmp,
                drift.p_val, drift.p_val_split)
    years = []
    pool = ex.pool
    for y in range(len(pool) // 365):
        xw = pool.iloc[y * 365:(y + 1) * 365][feats].to_numpy(np.float32)
        p = predict_outputs(model, xw)
        years.append({d.kind: bool(d.predict(xw, p).is_drift) for d in dets})
    return {"years": len(years), "flagged_fraction": {k: float(np.mean([y[k] for y in years])) for k in years[0]}}
