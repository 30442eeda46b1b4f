"""Every detector kind a spec can select, through the one wrapper the monitor uses (real alibi-detect)."""

import numpy as np
import pytest

from driftloop.config import DetectorSpec, DriftSpec
from driftloop.drift.detectors import fit_detectors, load_detectors


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    rng = np.random.default_rng(0)
    x_ref = rng.normal(size=(300, 4)).astype(np.float32)
    p_ref = rng.dirichlet(np.ones(3), size=300).astype(np.float32)
    spec = DriftSpec(window=100, p_val=0.01, reference_rows=300, detectors=[
        DetectorSpec(kind="ks"), DetectorSpec(kind="cvm"), DetectorSpec(kind="bbsd"),
        DetectorSpec(kind="mmd", n_permutations=50), DetectorSpec(kind="lsdd", n_permutations=50),
        DetectorSpec(kind="mmd_online", ert=100, window_sizes=[10])])
    path = fit_detectors(spec, x_ref, p_ref, ["a", "b", "c", "d"], tmp_path_factory.mktemp("det"))
    return load_detectors(path, 3)


def test_batch_detectors_flag_a_shift_and_name_features(fitted):
    dets, manifest = fitted
    assert [d.kind for d in dets] == ["ks", "cvm", "bbsd", "mmd", "lsdd", "mmd_online"]
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(100, 4)).astype(np.float32)
    shifted = clean.copy()
    shifted[:, 2] += 3.0
    proba = rng.dirichlet(np.ones(3), size=100).astype(np.float32)
    for d in dets:
        if d.online:
            continue
        assert not d.predict(clean, proba).is_drift, d.kind
        if d.kind != "bbsd":
            res = d.predict(shifted, proba)
            assert res.is_drift and res.p_val < 0.01, d.kind
            if d.kind in ("ks", "cvm"):
                assert res.drifted_features == ["c"]  # the per-feature tests name what drifted
    skewed = np.tile([[0.9, 0.05, 0.05]], (100, 1)).astype(np.float32)
    assert next(d for d in dets if d.kind == "bbsd").predict(clean, skewed).is_drift


def test_the_window_detectors_share_p_val_so_a_clean_window_is_flagged_at_most_that_often(fitted, tmp_path):
    """The monitor flags a window when any detector fires: by default each of the five window detectors tests at
    0.01 / 5 (the online one has its own expected run time); `p_val_split: each` gives each the whole 0.01."""
    dets, manifest = fitted
    assert manifest["p_val"] == 0.01 and manifest["p_val_split"] == "bonferroni" and manifest["p_val_each"] == 0.01 / 5
    rng = np.random.default_rng(4)
    x, proba = rng.normal(size=(100, 4)).astype(np.float32), rng.dirichlet(np.ones(3), size=100).astype(np.float32)
    thr = {d.kind: d.predict(x, proba).threshold for d in dets if not d.online}
    assert thr["mmd"] == pytest.approx(0.002) and thr["lsdd"] == pytest.approx(0.002)
    assert thr["ks"] == pytest.approx(0.002 / 4) and thr["bbsd"] == pytest.approx(0.002 / 3)  # then per column
    spec = DriftSpec(window=100, p_val=0.01, p_val_split="each", reference_rows=300,
                     detectors=[DetectorSpec(kind="ks"), DetectorSpec(kind="mmd", n_permutations=20)])
    each, m = load_detectors(fit_detectors(spec, x, proba, ["a", "b", "c", "d"], tmp_path), 3)
    assert m["p_val_each"] == 0.01
    assert [d.predict(x, proba).threshold for d in each] == pytest.approx([0.01 / 4, 0.01])


def test_online_detector_alarms_on_a_shift(fitted):
    dets, _ = fitted
    online = next(d for d in dets if d.online)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 4)).astype(np.float32) + 4.0
    res = online.update(x, np.zeros((60, 3), np.float32))
    assert res is not None and res.is_drift and res.distance > res.threshold


@pytest.mark.parametrize("kind", ["mmd_online", "cvm_online"])
def test_online_detector_state_survives_a_restart(kind, tmp_path):
    """Snapshot an online detector mid-stream, restore it into a freshly loaded copy: both continue identically."""
    from driftloop.drift import state

    rng = np.random.default_rng(3)
    x_ref = rng.normal(size=(200, 3)).astype(np.float32)
    spec = DriftSpec(window=50, reference_rows=200, detectors=[DetectorSpec(kind=kind, ert=300, window_sizes=[10])])
    path = fit_detectors(spec, x_ref, rng.dirichlet(np.ones(2), size=200).astype(np.float32), ["a", "b", "c"], tmp_path / "d")
    live = load_detectors(path, 2)[0][0]
    p = np.zeros((1, 2), np.float32)
    live.update(rng.normal(size=(25, 3)).astype(np.float32), np.repeat(p, 25, 0))
    assert live.time > 0
    state.save(tmp_path / "s.npz", {}, live.get_state())
    restarted = load_detectors(path, 2)[0][0]
    assert restarted.time == 0
    restarted.set_state(state.load(tmp_path / "s.npz")[1])
    assert restarted.time == live.time
    t = live.time
    more = rng.normal(size=(5, 3)).astype(np.float32)
    a, b = live.update(more, np.repeat(p, 5, 0)), restarted.update(more, np.repeat(p, 5, 0))
    assert a.distance == pytest.approx(b.distance, rel=1e-5) and a.is_drift == b.is_drift
    assert restarted.time == live.time > t


def test_cvm_online_builds_for_as_many_features_as_the_spec_allows(tmp_path):
    """CVMDriftOnline tests each feature at 1/(ert x features): with 12 features at ert 1000 alibi-detect's default
    10,000 null streams cannot estimate that quantile, and fitting failed ("should not be estimated using only
    10000 samples"). The streams now follow the feature count; the fitted detector alarms on a shift."""
    rng = np.random.default_rng(4)
    x_ref = rng.normal(size=(200, 12)).astype(np.float32)
    spec = DriftSpec(window=50, reference_rows=200, detectors=[DetectorSpec(kind="cvm_online", ert=1000, window_sizes=[10])])
    names = [f"f{i}" for i in range(12)]
    det = load_detectors(fit_detectors(spec, x_ref, np.full((200, 2), 0.5, np.float32), names, tmp_path / "d"), 2)[0][0]
    res = det.update(rng.normal(size=(80, 12)).astype(np.float32) + 3.0, np.full((80, 2), 0.5, np.float32))
    assert res is not None and res.is_drift



DEFERRED = """
import json, sys
import numpy as np
from driftloop.drift.detectors import load_detectors
x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
p = np.full((100, 3), 1 / 3, dtype=np.float32)
dets, _ = load_detectors(sys.argv[1], 3)
out = {"heavy": [m for m in ("torch", "torch._dynamo", "sympy", "torch.distributed.tensor") if m in sys.modules],
       "deferred": getattr(sys.modules["transformers"], "_driftloop_deferred", False),
       "flagged": bool(dets[0].predict(x + 3.0, p).is_drift), "clean": bool(dets[0].predict(x, p).is_drift)}
mmd, _ = load_detectors(sys.argv[2], 3)  # a detector on alibi-detect's pytorch backend: imported again, with torch
out |= {"torch_after_mmd": "torch" in sys.modules, "mmd_flagged": bool(mmd[0].predict(x + 3.0, p).is_drift),
        "first_still_flags": bool(dets[0].predict(x + 3.0, p).is_drift)}
from alibi_detect.models.pytorch.embedding import AutoConfig  # what alibi-detect imported from the stand-in
out["resolves"] = callable(AutoConfig.from_pretrained)
real = sys.modules["transformers"]
out["real_after_use"] = not getattr(real, "_driftloop_deferred", False) and hasattr(real, "BertConfig")
print(json.dumps(out))
"""


def test_loading_detectors_defers_transformers_and_torch_until_used(tmp_path):
    """alibi-detect imports transformers for text models driftloop never uses, and torch only to probe for its
    pytorch backend; a process that loads detectors not on that backend (the monitor) must pay for neither
    (torch, torch._dynamo, sympy), must get working detectors, a later detector on the backend (mmd) must load and
    work beside them, and the first use of a transformers name imports the real package."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    spec = DriftSpec(window=100, p_val=0.01, reference_rows=300, detectors=[DetectorSpec(kind="ks"), DetectorSpec(kind="bbsd")])
    path = fit_detectors(spec, rng.normal(size=(300, 4)).astype(np.float32), rng.dirichlet(np.ones(3), size=300).astype(np.float32),
                         list("abcd"), tmp_path / "det")
    mmd = fit_detectors(DriftSpec(window=100, p_val=0.01, reference_rows=300, detectors=[DetectorSpec(kind="mmd", n_permutations=50)]),
                        rng.normal(size=(300, 4)).astype(np.float32), rng.dirichlet(np.ones(3), size=300).astype(np.float32),
                        list("abcd"), tmp_path / "mmd")
    r = subprocess.run([sys.executable, "-c", DEFERRED, str(path), str(mmd)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["deferred"] and out["heavy"] == [], out
    assert out["flagged"] and not out["clean"] and out["resolves"] and out["real_after_use"], out
    assert out["torch_after_mmd"] and out["mmd_flagged"] and out["first_still_flags"], out


def test_fast_ks_score_gives_alibi_detects_own_numbers(tmp_path):
    """The monitor's KS detectors score windows with FastKSScore; every p-value, distance and verdict must be
    alibi-detect's own (scipy's ks_2samp per feature), on continuous and tied data, odd sizes, shifted windows,
    repeated windows (the p-value cache) and NaN (handed to alibi-detect's method)."""
    from alibi_detect.saving import load_detector

    from driftloop.drift.detectors import FastKSScore

    rng = np.random.default_rng(3)
    for n_ref, n_win, tied in ((1000, 500, True), (137, 61, False), (300, 100, True)):
        draw = (lambda *s: rng.integers(0, 17, s).astype(np.float32)) if tied else (lambda *s: rng.normal(size=s).astype(np.float32))
        x_ref = draw(n_ref, 6)
        spec = DriftSpec(window=n_win, p_val=0.05, reference_rows=n_ref, detectors=[DetectorSpec(kind="ks")])
        path = fit_detectors(spec, x_ref, rng.dirichlet(np.ones(3), size=n_ref).astype(np.float32), list("abcdef"),
                             tmp_path / f"ks-{n_ref}")
        fast = load_detectors(path, 3)[0][0]
        assert isinstance(fast._det.feature_score, FastKSScore)
        own = load_detector(path / "0-ks")  # alibi-detect's detector as saved, its own feature_score
        windows = [draw(n_win, 6) for _ in range(3)]
        windows.append(windows[0] + np.float32(6.0) * (np.arange(6) % 2).astype(np.float32))  # half the columns shifted
        windows.append(windows[1].copy())  # the same statistics again: from the cache
        nan = windows[2].copy()
        nan[0, 0] = np.nan
        windows.append(nan)
        for w in windows:
            a = fast._det.predict(w, return_p_val=True, return_distance=True)["data"]
            b = own.predict(w, return_p_val=True, return_distance=True)["data"]
            np.testing.assert_array_equal(a["p_val"], b["p_val"])
            np.testing.assert_array_equal(a["distance"], b["distance"])
            assert a["is_drift"] == b["is_drift"]
        assert fast._det.predict(windows[3])["data"]["is_drift"]
