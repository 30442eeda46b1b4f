"""`make bench`: run every benchmark, write bench/results.md and bench/results.json (ratios keyed `*ratio*`)."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

HERE = Path(__file__).resolve().parent


def _ray_fresh():
    import ray

    if ray.is_initialized():
        ray.shutdown()


def main() -> int:
    only = set(sys.argv[1:])
    results: dict = {"machine": common.machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if only and (HERE / "results.json").is_file():  # rerun some benchmarks, keep the others' last results
        kept = json.loads((HERE / "results.json").read_text())
        results |= {k: v for k, v in kept.items() if k not in only and k not in ("machine", "started")}
        results["started"] = kept.get("started", results["started"])
        results["rerun"] = kept.get("rerun", {})
    for name in ("detection", "online", "tabular", "footprint", "serving", "training", "loop", "backtest", "live", "soak"):
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            mod = __import__(f"bench.{name}", fromlist=["run"])
            results[name] = mod.run(results) if name == "live" else mod.run()
        except Exception as err:
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            _ray_fresh()
        results[name]["bench_seconds"] = round(time.perf_counter() - t, 1)
        if only:
            results.setdefault("rerun", {})[name] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"== {name} done in {results[name]['bench_seconds']}s", flush=True)
    add_ratios(results)
    (HERE / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (HERE / "results.md").write_text(render(results))
    write_headline(HERE.parent / "README.md", results)
    print((HERE / "results.md").read_text())
    return 0


HAPROXY_CELLS = ("f_monitored_haproxy", "g_monitoring_off_haproxy", "c2_plain_fastapi")
HEAD_START, HEAD_END = "<!-- bench:headline (written by make bench; do not edit) -->", "<!-- /bench:headline -->"


def write_headline(readme: Path, r: dict) -> None:
    """Replace the README's headline table (between the markers) with one generated from these results."""
    text = readme.read_text()
    if HEAD_START not in text or HEAD_END not in text:
        print(f"warning: {readme} has no headline markers; headline not written", file=sys.stderr)
        return
    before, rest = text.split(HEAD_START, 1)
    after = rest.split(HEAD_END, 1)[1]
    readme.write_text(before + HEAD_START + "\n" + "\n".join(headline(r)) + "\n" + HEAD_END + after)


def _rate(k: int, n: int) -> str:
    lo, hi = common.wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.1f} % (95 % CI {100 * lo:.1f}–{100 * hi:.1f} %)" if n else "no windows"


def _cpu_cause(x: dict, y: dict) -> str:
    """The measured cause beside a missed throughput ratio: CPU milliseconds per answered request, by process
    (the four busiest), in each of the two cells compared (bench/serving.py measures them during the cell)."""
    if "cpu_ms_per_request" not in x or "cpu_ms_per_request" not in y:
        return ""
    side = lambda cell: ", ".join(f"{k} {v:.1f}" for k, v in list(cell["cpu_ms_per_request"].items())[:4])  # noqa: E731
    return (f"; CPU ms per request, by process (both cores: {x.get('cores_busy', '?')} vs {y.get('cores_busy', '?')} busy): "
            f"{side(x)} vs {side(y)}")


def _ratio(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def headline(r: dict) -> list[str]:
    """The README's headline: every figure from results.json, beside its baseline or target, with a verdict."""
    m = r.get("machine") or {}
    rerun = r.get("rerun") or {}
    lines = [f"Run {r.get('started')} on {m.get('cpus')} CPUs, {m.get('memory_gib')} GiB"
             + (" (partial rerun: " + ", ".join(f"{k} at {v}" for k, v in rerun.items()) + "; the other sections are from the run above)"
                if rerun else "") + ".", "",
             "| what | measured | baseline or target | verdict |", "|---|---|---|---|"]
    def row(what: str, measured: str, target: str, ok: bool | None) -> None:
        cell = lambda v: str(v).splitlines()[0].replace("|", "\\|") if str(v) else ""  # noqa: E731
        lines.append(f"| {cell(what)} | {cell(measured)} | {cell(target)} | {_verdict(ok)} |")

    dt = r.get("detection") or {}
    if "target" in dt:
        t = dt["target"]
        window = dt["window"]
        shipped = [dt["digits"][k] for k in t["default_detectors"] if k in dt["digits"]]
        sev3 = sorted(c for c in shipped[0] if c.rsplit(":", 1)[-1].isdigit() and int(c.rsplit(":", 1)[-1]) >= 3)
        first = [c for c in sev3 if min((d[c]["median_delay_rows"] or float("inf")) for d in shipped) <= window]
        row(f"detection, shipped set ({' + '.join(t['default_detectors'])}), onset on a window boundary",
            f"{len(first)} of {len(sev3)} corruption:severity cells (severity >= 3) flagged in the first window "
            f"(median over {dt['streams']} streams, by at least one detector of the set)", "every cell, within one window",
            len(first) == len(sev3))
        comb = dt.get("false_alarms_combined")
        if comb:
            split = (f"p_val {comb['p_val']} split over the set ({comb['p_val_split']})" if comb.get("p_val_split") == "bonferroni"
                     else f"each detector at p_val {comb['p_val']}") if "p_val" in comb else "each detector at p_val 0.01"
            row(f"false alarms, shipped set (OR, as the monitor flags; {split}), exchangeable clean windows",
                _rate(comb["flagged"], comb["windows"]), "<= 1 %, upper 95 % bound <= 2 %",
                comb["rate"] <= 0.01 and comb["ci95"][1] <= 0.02)
        ro = dt.get("delay_random_onset") or {}
        for col in [c for c in ro if c.startswith("noise:3")][:1] or list(ro)[:1]:
            v = ro[col]
            row(f"delay, onset at a random offset in a window ({col})",
                f"median {v['median_rows']:.0f} rows, p90 {v['p90_rows']:.0f} rows ({v['detected']} detected)"
                if v["median_rows"] is not None else f"not detected ({v['detected']})", "within one window after the onset's window", None)
    for kind, v in ((r.get("online") or {}).get("detectors") or {}).items():
        ert = v["ert"]
        row(f"online detector {kind} (ert {ert}): false alarms on clean rows",
            f"{v['false_alarms']} in {r['online']['clean_rows']:,} rows = {v['false_alarms_per_ert']:.2f} per {ert} rows "
            f"(95 % CI {v['false_alarms_per_ert_ci95'][0]:.2f}–{v['false_alarms_per_ert_ci95'][1]:.2f})",
            f"<= 1 per {ert} rows (its configured expected run time)", v["false_alarms_per_ert_ci95"][0] <= 1.0)
        if v.get("ties") and v["false_alarms_per_ert_ci95"][0] > 1.0:
            t = v["ties"]
            jit = t["false_alarms_jittered"] * ert / r["online"]["clean_rows"]
            row(f"... the {kind} miss, ties tested as its cause", f"the pixels take {t['distinct_values_per_feature_median']:.0f} "
                f"values; with ties broken (+-0.5 jitter) the same rows gave {t['false_alarms_jittered']} alarms = {jit:.2f} per "
                f"{ert} rows: " + ("ties explain the miss" if jit <= 1.3 else "ties are not the whole cause; not isolated further "
                                   "(suspects: the threshold quantile 1/(ert x features) estimated from ~1.2/beta simulated "
                                   "streams, and a clean stream resampled from 400 images)"),
                "use mmd_online on many or discrete features", None)
        d = v["delay"].get("noise:3")
        if d:
            row(f"online detector {kind}: delay after the onset (noise:3)",
                f"median {d['median_rows']:.0f} rows, p90 {d['p90_rows']:.0f} rows ({d['detected']} detected)"
                if d["median_rows"] is not None else f"not detected ({d['detected']})", "(no target: beside the 500-row windows)", None)
    tb = r.get("tabular") or {}
    if "cells" in tb:
        strongest = {c["shift"]: c for c in tb["cells"]}  # the last level of each shift is its strongest
        for what, c in strongest.items():
            row(f"detection on a table of your own: {what} {c['from']:.2f} -> {c['to']:.2f} ({c['detector']})",
                _rate(c["detected"], c["streams"]) + " of windows flagged, the first after the onset",
                "flagged in the first window", c["detected"] / c["streams"] >= 0.9)
        fa = tb["false_alarms"]
        row("false alarms on a table of your own (TabularDrift + missing rate, OR)", _rate(fa["flagged"], fa["windows"]),
            "<= 1 %, upper 95 % bound <= 2 %", fa["flagged"] / fa["windows"] <= 0.01 and common.wilson(fa["flagged"], fa["windows"])[1] <= 0.02)
    loop = r.get("loop") or {}
    for what, cell, target in (("shipped config (`demo --as-shipped`: configs/digits.yaml unchanged, every drifted row at 60/s)",
                                loop.get("shipped"), True),
                               ("demo's overrides (`demo --quick`: 2 trials x 8 epochs, min_labelled_rows 600, cooldown 60 s, "
                                "first drifted window unpaced)", loop, False)):
        lp = (cell or {}).get("summary")
        if lp is None:
            if cell and cell.get("error"):
                row(f"onset -> new champion answering, {what}", f"failed: {cell['error']}", "<= 120 s" if target else "-", False if target else None)
            continue
        secs = lp.get("seconds_onset_to_swap")
        measured = "no swap happened" if not secs else (f"{secs:.1f} s; drifted accuracy {lp['accuracy_drifted_before']:.3f} -> "
                                                         f"{lp['accuracy_drifted_after']:.3f}, {lp['failed_requests']} failed requests")
        if secs and target and secs > 120:
            slow = max((cell.get("onset_to_swap_by_stage_s") or {}).items(), key=lambda kv: kv[1] if not kv[0].startswith("total") else -1, default=None)
            measured += f"; the longest stage: {slow[0]} {slow[1]:.1f} s" if slow else ""
        row(f"onset -> new champion answering, {what}", measured, "<= 120 s" if target else "(beside it; no target)",
            (bool(secs) and secs <= 120) if target else None)
    sv = r.get("serving") or {}
    for c in sv.get("cells", []):
        if c["connections"] == 16:
            def cmp(what: str, x: str, y: str, ratio_key: str, target: float, extra: str = "", ok: bool = True) -> None:
                met = (c[ratio_key] or 0) >= target and ok
                row(what.format(batch=c["batch"]), f"{c[x]['rps']:.0f} vs {c[y]['rps']:.0f} req/s = {_ratio(c[ratio_key])}{extra}"
                    + ("" if met else _cpu_cause(c[x], c[y])), f">= {target}" + (", every answer a 200" if extra else ""), met)

            cmp("serving, monitored / monitor off, batch {batch}, 16 conns", "a_monitored", "b_monitoring_off",
                "throughput_ratio_a_over_b", 0.95)
            cmp("serving, driftloop (Serve proxy, default) / plain FastAPI, batch {batch}, 16 conns", "a_monitored",
                "c_plain_fastapi", "throughput_ratio_a_over_c", 1.0)
            if "e_monitored_direct" in c:
                cmp("serving, driftloop through direct ingress (opt-in) / plain FastAPI, batch {batch}, 16 conns",
                    "e_monitored_direct", "c_plain_fastapi", "throughput_ratio_e_over_c", 1.0)
            if all(k in c for k in HAPROXY_CELLS):
                f, g = c["f_monitored_haproxy"], c["g_monitoring_off_haproxy"]
                cmp("serving through HAProxy (`--ingress haproxy`, production), monitored / monitor off, batch {batch}, 16 conns",
                    "f_monitored_haproxy", "g_monitoring_off_haproxy", "throughput_ratio_f_over_g", 0.95)
                cmp("serving, driftloop through HAProxy (`--ingress haproxy`, production) / plain FastAPI, batch {batch}, 16 conns",
                    "f_monitored_haproxy", "c2_plain_fastapi", "throughput_ratio_f_over_c2", 1.0,
                    f"; {f['errors']} non-200 of {f.get('requests', '?')}", f["errors"] == 0 and g["errors"] == 0)
    if sv.get("haproxy_error"):
        row("serving through HAProxy (`--ingress haproxy`)", f"failed: {sv['haproxy_error']}", "runs", False)
    elif "haproxy_listening" in sv:
        ls = sv["haproxy_listening"]
        row("HAProxy ingress listens on", ", ".join(ls) or "nothing found", "127.0.0.1 only",
            bool(ls) and all(a.startswith("127.0.0.1:") for a in ls))
    fp = r.get("footprint") or {}
    if "help_s_median" in fp:
        row("`driftloop --help`", f"{fp['help_s_median']:.2f} s", "<= 2 s", fp["help_s_median"] <= 2)
        di, stages = fp.get("drift_library_import") or {}, fp.get("monitor_init_stages_s") or {}
        cold = f"{fp['app_cold_start_s']:.1f} s"
        if fp["app_cold_start_s"] > 10 and stages:  # the measured cause: the monitor's constructor, by stage
            cold += (f"; the DriftMonitor's constructor takes {fp['monitor_init_s']:.1f} s (a replaced monitor answers "
                     f"{fp['monitor_cold_start_s']:.1f} s after its kill): " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items() if v >= 0.05))
            if di:
                cold += (f" (importing alibi-detect alone: {di['seconds']:.1f} s as the monitor does, transformers deferred and torch "
                         f"hidden; {di['plain']['seconds']:.1f} s plain)")
        row("whole app cold start (Predictor + DriftMonitor RUNNING)", cold, "<= 10 s", fp["app_cold_start_s"] <= 10)
        if "replica_cold_start_s" in fp:
            row("Predictor replica killed -> replacement answering", f"{fp['replica_cold_start_s']:.1f} s "
                f"(constructor {fp['replica_init_s']:.1f} s)", "<= 10 s", fp["replica_cold_start_s"] <= 10)
        for actor, mib in fp["rss_mib"].items():
            measured = f"{mib:.0f} MiB"
            if actor == "DriftMonitor" and mib * 1.048576 > 600 and di:
                measured += (f"; importing alibi-detect adds {di['rss_added_mib']:.0f} MiB as the monitor does (transformers "
                             f"deferred, torch hidden; {di['plain']['rss_added_mib']:.0f} MiB plain) to the {di['rss_before_mib']:.0f} MiB "
                             f"of Ray + Serve + MLflow (its `cd` package imports every detector; new modules by package: "
                             + ", ".join(f"{k} {v}" for k, v in di["packages"].items()) + ")")
            row(f"resident memory, {actor}", measured, "<= 600 MB" if actor == "Predictor" else "Predictor's 600 MB",
                mib * 1.048576 <= 600)
    tr = r.get("training") or {}
    if "runs" in tr:
        row(f"training, {tr['epochs']} epochs, 2 workers vs 1", f"{tr['runs']['2_workers']['wall_s']:.1f} s vs "
            f"{tr['runs']['1_workers']['wall_s']:.1f} s ({tr['speedup_ratio_2_over_1_workers']:.2f}x)", "1 worker", None)
    bt = r.get("backtest") or {}
    if "rainfall" in bt and "strategies" in bt["rainfall"]:
        st = bt["rainfall"]["strategies"]
        d, p, s0 = st["driftloop"], st["periodic:365"], st["static"]
        t = bt["rainfall"]["target"]
        row("rainfall backtest, prequential accuracy (retrains)", f"driftloop {d['accuracy']:.4f} ({d['retrains']})",
            f"periodic:365 {p['accuracy']:.4f} ({p['retrains']}), static {s0['accuracy']:.4f}; >= periodic - 0.005 with <= half its retrains",
            t["accuracy_ge_periodic_minus_0.005"] and t["retrains_le_half_periodic"] and t["above_static"])
    lv = r.get("live") or bt.get("rainfall_live") or {}
    if lv:
        row("rainfall live over HTTP: retraining jobs", f"failed: {lv['error']}" if "error" in lv else f"{lv['retrain_jobs']} "
            f"({lv['succeeded']} succeeded) over {lv['rows']} rows", f"backtest's {lv.get('backtest_retrains', '?')} ± 1",
            False if "error" in lv else lv["within_1"])
    dp = bt.get("digits_phases") or {}
    if "strategies" in dp:
        e = dp["strategies"]["driftloop"]
        for ph, v in (e.get("phases") or {}).items():
            if not ph.startswith("clean"):
                acc = v.get("accuracy_after_swap")
                flagged, windows = v["flagged_after_swap"], v["windows_after_swap"]
                row(f"digits phases, {ph}: after its swap", f"accuracy {'-' if acc is None else f'{acc:.3f}'}; {flagged} of {windows} "
                    f"later windows flagged; {v['retrains']} retrain(s)", ">= 0.85; <= 10 % flagged; <= 1 retrain",
                    acc is not None and acc >= 0.85 and flagged <= 0.1 * windows and v["retrains"] <= 1)
    sk = r.get("soak") or {}
    for name, tg in (sk.get("targets") or {}).items():
        measured = tg["measured"]
        lat = sk.get("latency") or {}
        probe = lat.get("end_probe")
        if name == "latency" and not tg["pass"] and probe:
            measured += (f"; the end probe began right after a maintenance pass ({probe['pass_seconds']} s; "
                         f"{probe['passes_during_probe']} began during it)")
            cpu0, cpu1 = ((lat.get(k) or {}).get("predict", {}).get("cpu") for k in ("start", "end"))
            if cpu0 and cpu1:
                top = lambda c: ", ".join(f"{k} {v:.2f}" for k, v in list(c["by_process"].items())[:3])  # noqa: E731
                per = lambda c: ", ".join(f"{k} {v}" for k, v in (c.get("cpu_ms_per_request") or {}).items())  # noqa: E731
                measured += (f"; CPU during the /predict probe {cpu0['cores_busy']} -> {cpu1['cores_busy']} cores busy "
                             f"(busiest at the start: {top(cpu0)}; at the end: {top(cpu1)}); CPU ms per request: {per(cpu0)} "
                             f"-> {per(cpu1)}")
            h0, h1 = ((lat.get(k) or {}).get("host_loop_ms") for k in ("start", "end"))
            if h0 and h1:
                measured += f"; a fixed Python loop beside each probe took {h0} -> {h1} ms ({h1 / h0:.2f}x: the host's own pace)"
        row(f"soak over HTTP, {name}", measured, tg["target"], tg["pass"])
    for name, sec in r.items():
        if isinstance(sec, dict) and "error" in sec:
            row(f"{name} section", f"failed: {sec['error']}", "runs", False)
    secs = {k: v["bench_seconds"] for k, v in r.items() if isinstance(v, dict) and "bench_seconds" in v}
    if secs:  # each section's own time; after a partial rerun they come from different runs
        total = sum(secs.values())
        measured = f"{total / 60:.0f} min" + (" (the sections' own times added, from the runs named above)" if rerun else "")
        if total > 1800:
            rain = ((r.get("backtest") or {}).get("rainfall") or {}).get("strategies") or {}
            retrains = sum(v.get("retrains", 0) for v in rain.values() if isinstance(v, dict))
            measured += "; the longest sections: " + ", ".join(
                f"{k} {v / 60:.1f} min" + (f" ({retrains} retrains, each the live path's train_and_gate: Ray Train, "
                                           f"registry, detectors)" if k == "backtest" and retrains else "")
                for k, v in sorted(secs.items(), key=lambda kv: -kv[1])[:3])
        row("`make bench`, every section", measured, "<= 30 min", total <= 1800)
    return lines


def add_ratios(r: dict) -> None:
    sv = r.get("serving", {})
    for cell in sv.get("cells", []):
        a, b, c = cell["a_monitored"], cell["b_monitoring_off"], cell["c_plain_fastapi"]
        cell["throughput_ratio_a_over_b"] = a["rps"] / b["rps"] if b["rps"] else None
        cell["p50_overhead_ms_a_minus_b"] = a["p50_ms"] - b["p50_ms"]
        cell["throughput_ratio_a_over_c"] = a["rps"] / c["rps"] if c["rps"] else None
        cell["throughput_ratio_a_over_d"] = a["rps"] / cell["d_in_process"]["rps"]
        if "e_monitored_direct" in cell:
            e = cell["e_monitored_direct"]
            cell["throughput_ratio_e_over_c"] = e["rps"] / c["rps"] if c["rps"] else None
            cell["throughput_ratio_e_over_a"] = e["rps"] / a["rps"] if a["rps"] else None
        if all(k in cell for k in HAPROXY_CELLS):
            f, g, c2 = cell["f_monitored_haproxy"], cell["g_monitoring_off_haproxy"], cell["c2_plain_fastapi"]
            cell["throughput_ratio_f_over_g"] = f["rps"] / g["rps"] if g["rps"] else None
            cell["throughput_ratio_f_over_c2"] = f["rps"] / c2["rps"] if c2["rps"] else None
    tr = r.get("training", {})
    if "runs" in tr:
        tr["speedup_ratio_2_over_1_workers"] = tr["runs"]["1_workers"]["wall_s"] / tr["runs"]["2_workers"]["wall_s"]
        sw = tr["sweeps"]
        tr["sweep_ratio_c2_over_c1_4_trials"] = sw["4_trials_c2"]["wall_s"] / sw["4_trials_c1"]["wall_s"]
    lp = r.get("loop", {})
    for cell in (lp, lp.get("shipped") or {}):
        if (cell.get("summary") or {}).get("seconds_onset_to_swap"):
            cell["onset_to_swap_ratio_to_120s_target"] = cell["summary"]["seconds_onset_to_swap"] / 120.0
    fp = r.get("footprint", {})
    if "help_s_median" in fp:
        fp["help_ratio_to_2s_target"] = fp["help_s_median"] / 2.0
        fp["cold_start_ratio_to_10s_target"] = fp["app_cold_start_s"] / 10.0
        if "replica_cold_start_s" in fp:
            fp["replica_cold_start_ratio_to_10s_target"] = fp["replica_cold_start_s"] / 10.0


def render(r: dict) -> str:
    m = r["machine"]
    out = ["# driftloop benchmarks", "",
           f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, Python {m['python']}, Ray {m['ray']}, torch {m['torch']} "
           f"({m['platform']}); run {r['started']}" + "".join(f"; {k} rerun {v}" for k, v in r.get("rerun", {}).items())
           + ". Every figure below was measured beside its baseline in the same run.", ""]
    sv = r.get("serving")
    if sv and "cells" in sv:
        out += ["## Serving (digits, requests/s and latency)", "", f"Settings: {sv['settings']}. {sv['duration_s']} s per cell. "
                "(a) and (b) are measured through Serve's proxy, the default ingress, on a cluster started with "
                "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (so that (e) can be measured in the same run; the proxy path is the "
                "same); (d) is the model's forward pass in this process, per call.", "",
                "| batch | conns | (a) monitored rps | (b) monitor off rps | (c) plain FastAPI rps | (d) in-process rps | a/b | a/c | a p50 ms | b p50 ms | c p50 ms | a p99 ms | a-b p50 ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sv["cells"]:
            a, b, cc, d = c["a_monitored"], c["b_monitoring_off"], c["c_plain_fastapi"], c["d_in_process"]
            out.append(f"| {c['batch']} | {c['connections']} | {a['rps']:.0f} | {b['rps']:.0f} | {cc['rps']:.0f} | {d['rps']:.0f} | "
                       f"{c['throughput_ratio_a_over_b']:.2f} | {c['throughput_ratio_a_over_c']:.2f} | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} | "
                       f"{cc['p50_ms']:.1f} | {a['p99_ms']:.1f} | {c['p50_overhead_ms_a_minus_b']:+.1f} |")
        out.append("")
        if all("e_monitored_direct" in c for c in sv["cells"]):
            out += ["The same monitored application through Serve's direct ingress (no proxy hop), beside (a) and (c):", "",
                    "| batch | conns | (e) monitored, direct rps | e/a | e/c | e p50 ms | e p99 ms |", "|---|---|---|---|---|---|---|"]
            for c in sv["cells"]:
                e = c["e_monitored_direct"]
                out.append(f"| {c['batch']} | {c['connections']} | {e['rps']:.0f} | {c['throughput_ratio_e_over_a']:.2f} | "
                           f"{c['throughput_ratio_e_over_c']:.2f} | {e['p50_ms']:.1f} | {e['p99_ms']:.1f} |")
            out.append("")
        if all(all(k in c for k in HAPROXY_CELLS) for c in sv["cells"]):
            out += ["The same applications through Serve's HAProxy ingress (`driftloop serve --ingress haproxy`), on a second "
                    f"local cluster, with plain FastAPI measured again beside them (c2). HAProxy listened on: "
                    f"{', '.join(sv.get('haproxy_listening') or ['nothing found'])}.", "",
                    "| batch | conns | (f) monitored, HAProxy rps | (g) monitor off, HAProxy rps | (c2) plain FastAPI rps | f/g | f/c2 | "
                    "f p50 ms | f p99 ms | f errors |", "|---|---|---|---|---|---|---|---|---|---|"]
            for c in sv["cells"]:
                f, g, c2 = c["f_monitored_haproxy"], c["g_monitoring_off_haproxy"], c["c2_plain_fastapi"]
                out.append(f"| {c['batch']} | {c['connections']} | {f['rps']:.0f} | {g['rps']:.0f} | {c2['rps']:.0f} | "
                           f"{_ratio(c['throughput_ratio_f_over_g'])} | {_ratio(c['throughput_ratio_f_over_c2'])} | "
                           f"{f['p50_ms']:.1f} | {f['p99_ms']:.1f} | {f['errors']} |")
            out.append("")
        if any("cpu_ms_per_request" in v for c in sv["cells"] for v in c.values() if isinstance(v, dict)):
            out += ["CPU per answered request during each cell, by process (ms; every process on the machine, the six "
                    "busiest; both cores = 2.0 busy):", "", "| batch | conns | cell | cores busy | CPU ms per request |", "|---|---|---|---|---|"]
            for c in sv["cells"]:
                for k, v in c.items():
                    if isinstance(v, dict) and "cpu_ms_per_request" in v:
                        out.append(f"| {c['batch']} | {c['connections']} | {k} | {v['cores_busy']} | "
                                   + ", ".join(f"{p} {ms:.1f}" for p, ms in list(v["cpu_ms_per_request"].items())[:6]) + " |")
            out.append("")
    elif sv:
        out += ["## Serving", "", f"error: {sv.get('error')}", ""]
    dt = r.get("detection")
    if dt and "digits" in dt:
        out += ["## Detection quality (digits)", "",
                f"Window {dt['window']} rows; median delay in rows after onset over seeded streams (onset at a window boundary, "
                f"so 500 = flagged in the first window); `-` = detected in fewer than half the streams within 4 windows. "
                + (f"Each detector alone tests at p_val {dt['p_val_each']:g}, its level inside the shipped set (p_val "
                   f"{dt['p_val']:g}, split: {dt['p_val_split']})." if "p_val_each" in dt else ""), ""]
        kinds = list(dt["digits"])
        cols = sorted(dt["digits"][kinds[0]])
        out += ["| corruption:severity | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for col in cols:
            cells = []
            for k in kinds:
                v = dt["digits"][k][col]
                cells.append(f"{v['median_delay_rows']:.0f} ({v['detected']})" if v["median_delay_rows"] else f"- ({v['detected']})")
            out.append(f"| {col} | " + " | ".join(cells) + " |")
        exch = dt.get("false_alarms_exchangeable", {})
        out += ["", "| false alarms on clean windows | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds),
                "| exchangeable: random split of the 1,017 unseen images into reference + 500-row window, detector refitted | "
                + " | ".join(f"{exch[k]['rate']:.3f} ({exch[k]['windows']})" if k in exch else "-" for k in kinds) + " |",
                "| fixed reference, windows resampled from the 497-image pool | "
                + " | ".join(f"{dt['false_alarms'][k]['rate']:.3f} ({dt['false_alarms'][k]['windows']})" for k in kinds) + " |",
                "", "The second row reuses one small pool for every window, so its windows are not independent draws: "
                "when that pool happens to differ from the reference, most windows flag together. The first row is the "
                "detectors' calibration (no shift by construction), which is what the <= 1% target measures.", "",
                f"Target (default set {dt['target']['default_detectors']}): every severity >= 3 within one window: "
                f"**{dt['target']['every_severity_ge3_within_one_window']}**; false-alarm rate (exchangeable) "
                f"{dt['target'].get('false_alarm_rate_default_max_exchangeable', float('nan')):.3f} (target <= 0.01; resampled pool "
                f"{dt['target']['false_alarm_rate_default_max']:.3f}).",
                ""]
        comb = dt.get("false_alarms_combined")
        if comb:
            out += [f"**What a user gets** — the monitor flags a window when any detector of its set fires: the shipped set "
                    f"{' + '.join(comb['detectors'])} (OR) flagged {comb['flagged']} of {comb['windows']} exchangeable clean windows = "
                    f"{comb['rate']:.3f} (95 % interval {comb['ci95'][0]:.3f}–{comb['ci95'][1]:.3f}; target <= 0.01, upper bound <= 0.02).", ""]
        ro = dt.get("delay_random_onset")
        if ro:
            out += ["Delay with the onset at a random offset inside a window (the monitor's windows are fixed 500-row blocks "
                    "from the start of serving), shipped set (OR), rows from onset to the end of the first flagged window, "
                    f"{dt['streams']} streams each:", "",
                    "| corruption:severity | median rows | p90 rows | detected |", "|---|---|---|---|"]
            for col, v in ro.items():
                med = "-" if v["median_rows"] is None else f"{v['median_rows']:.0f}"
                p90 = "-" if v["p90_rows"] is None else f"{v['p90_rows']:.0f}"
                out.append(f"| {col} | {med} | {p90} | {v['detected']} |")
            out.append("")
        out += [f"Rainfall, year-over-year windows after the 20 reference years ({dt['rainfall']['years']} years): fraction of years flagged "
                + ", ".join(f"{k} {v:.2f}" for k, v in dt["rainfall"]["flagged_fraction"].items()) + " (no ground-truth onset: the climate drifts gradually).",
                "", "\"Failing Loudly\" (Rabanser et al., 2019) found BBSD (KS on softmax outputs) the strongest shift detector across "
                "shifts; here BBSD and per-feature KS both flag every corruption at severity >= 3 in the first window — see the table for the weak severities.", ""]
    on = r.get("online")
    if on and "detectors" in on:
        onsets = list(next(iter(on["detectors"].values()))["delay"])
        out += ["## Online detectors (digits)", "",
                f"`window_sizes: {on['window_sizes']}`; mmd_online at the default `ert: {on['ert']}`, cvm_online at the largest "
                f"ert the spec accepts for 64 features (it tests each at 1/(ert x features)). Fed one row at a time through "
                f"the monitor's own update (an alarm resets the detector). False alarms: {on['clean_rows']:,} clean rows "
                f"drawn from images the model never trained on, the reference a random split of the same images. Delay: "
                f"{on['streams']} streams of {on['prefix_rows']} clean rows then the corruption; rows after the onset to the "
                f"first alarm, a miss when none within {on['max_rows_after_onset']}.", "",
                "| detector | ert | false alarms (per ert rows, 95 % CI) | mean run length | " +
                " | ".join(f"delay {c}: median / p90 (detected)" for c in onsets) + " | threshold set-up s | update ms/row |",
                "|---|---|---|---|" + "---|" * len(onsets) + "---|---|"]
        for kind, v in on["detectors"].items():
            delays = [f"{d['median_rows']:.0f} / {d['p90_rows']:.0f} ({d['detected']})" if d["median_rows"] is not None
                      else f"- ({d['detected']})" for d in v["delay"].values()]
            mrl = "-" if v["mean_run_length"] is None else f"{v['mean_run_length']:.0f}"
            out.append(f"| {kind} | {v['ert']} | {v['false_alarms']} = {v['false_alarms_per_ert']:.2f} "
                       f"({v['false_alarms_per_ert_ci95'][0]:.2f}–{v['false_alarms_per_ert_ci95'][1]:.2f}) | {mrl} | "
                       + " | ".join(delays) + f" | {v['fit_s']:.1f} | {v['update_ms_per_row']:.2f} |")
            if v.get("ties"):
                t = v["ties"]
                out.append(f"| {kind}, ties broken (+-0.5 jitter on reference and stream; the pixels take "
                           f"{t['distinct_values_per_feature_median']:.0f} values) | {v['ert']} | "
                           f"{t['false_alarms_jittered']} = {t['false_alarms_jittered'] * v['ert'] / on['clean_rows']:.2f} | "
                           + " | " * len(onsets) + " | | |")
        out += ["", "cvm_online simulates its thresholds for continuous features, per feature at 1/(ert x features); the row "
                "with ties broken tests whether the pixels' discrete values explain its false alarms. mmd_online is one "
                "multivariate test with thresholds bootstrapped from the reference itself.", ""]
    elif on:
        out += ["## Online detectors", "", f"error: {on.get('error')}", ""]
    fp = r.get("footprint")
    if fp and "help_s_median" in fp:
        out += ["## Footprint", "", "| figure | measured | target | ratio |", "|---|---|---|---|",
                f"| `driftloop --help` | {fp['help_s_median']:.2f} s (bare python start {fp['python_startup_s']:.2f} s) | <= 2 s | {fp['help_ratio_to_2s_target']:.2f} |",
                f"| import driftloop.cli | {fp['cli_import_s']:.2f} s | | |",
                f"| app cold start (Predictor + DriftMonitor RUNNING) | {fp['app_cold_start_s']:.1f} s | | |"]
        if "replica_cold_start_s" in fp:
            out += [f"| Predictor replica killed -> replacement answering | {fp['replica_cold_start_s']:.1f} s "
                    f"(of which its constructor {fp['replica_init_s']:.1f} s) | <= 10 s | {fp['replica_cold_start_ratio_to_10s_target']:.2f} |",
                    f"| DriftMonitor killed -> replacement answering | {fp['monitor_cold_start_s']:.1f} s "
                    f"(of which its constructor {fp['monitor_init_s']:.1f} s: {fp.get('monitor_init_stages_s')}) | | |"]
        if fp.get("drift_library_import"):
            di = fp["drift_library_import"]
            out += [f"| importing alibi-detect after Ray + Serve + MLflow, transformers deferred and torch hidden (as the monitor does) | {di['seconds']:.2f} s, "
                    f"+{di['rss_added_mib']:.0f} MiB (new modules by package: {di['packages']}) | plain: {di['plain']['seconds']:.2f} s, "
                    f"+{di['plain']['rss_added_mib']:.0f} MiB | |"]
        out += [f"| resident memory | {fp['rss_mib']} MiB | Predictor <= 600 MB | |", "", fp["note"], ""]
    tr = r.get("training")
    if tr and "runs" in tr:
        out += ["## Training and sweeps", "", f"{tr['epochs']} epochs per run; Ray start {tr['ray_start_s']:.1f} s.", "",
                "| what | wall s | baseline | ratio |", "|---|---|---|---|",
                f"| 1 run, 2 workers | {tr['runs']['2_workers']['wall_s']:.1f} | 1 worker {tr['runs']['1_workers']['wall_s']:.1f} | {tr['speedup_ratio_2_over_1_workers']:.2f}x speed-up |"]
        for k, v in tr["sweeps"].items():
            out.append(f"| sweep {k} | {v['wall_s']:.1f} | | |")
        out += [f"| sweep 4 trials, concurrency 2 vs 1 | | | {tr['sweep_ratio_c2_over_c1_4_trials']:.2f} (time ratio) |", "", tr["note"], ""]
    loop = r.get("loop") or {}
    for title, lp, note in (("driftloop demo --as-shipped: configs/digits.yaml unchanged, every drifted row at 60 rows/s", loop.get("shipped"),
                             "Target: <= 120 s onset to swap. The figure includes the policy's two flagged windows of three, the "
                             "300 labelled drifted rows (min_labelled_rows), at the replay's pace; the 120 s cooldown follows a trigger or a "
                             "swap, so it does not delay this first retraining."),
                            ("driftloop demo --quick: the demo's overrides, beside it", loop,
                             "The demo's overrides: 2 trials x 8 epochs, min_labelled_rows 600, cooldown 60 s, and the first drifted "
                             "window (the evaluation rows) sent unpaced. No target.")):
        if lp and "summary" in lp:
            out += [f"## Loop ({title})", "", "| figure | value |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in lp["summary"].items()]
            out += ["", "| onset -> swap, by stage | seconds |", "|---|---|"]
            out += [f"| {k} | {v:.1f} |" for k, v in lp.get("onset_to_swap_by_stage_s", {}).items()]
            out += ["", note, ""]
    tb = r.get("tabular")
    if tb and "cells" in tb:
        out += ["## Detection on a table of your own (categorical and missing-rate shifts)", "",
                f"Two numbers (one missing in {100 * tb['cells'][-1]['from']:.0f} % of rows), a 4-valued and a 30-valued "
                f"category; reference {tb['reference_rows']} rows, window {tb['window']} rows; the detectors `driftloop init` "
                f"writes ({', '.join(tb['detectors'])}). Windows flagged in the first window after the onset, over "
                f"{tb['streams']} seeded streams:", "", "| shift | from | to | detector | flagged |", "|---|---|---|---|---|"]
        out += [f"| {c['shift']} | {c['from']:.2f} | {c['to']:.2f} | {c['detector']} | {c['detected']}/{c['streams']} |"
                for c in tb["cells"]]
        fa = tb["false_alarms"]
        out += ["", f"False alarms on {fa['windows']} clean windows: {_rate(fa['flagged'], fa['windows'])} flagged by either "
                f"(" + ", ".join(f"{k} {fa[k]}" for k in tb["detectors"]) + ").", ""]
    out += _render_backtest(r.get("backtest"), r.get("live"))
    out += _render_soak(r.get("soak"))
    for name in ("serving", "detection", "online", "tabular", "footprint", "training", "loop", "backtest", "live", "soak"):
        if name in r and "error" in r[name]:
            out += [f"**{name} failed:** {r[name]['error']}", ""]
    return "\n".join(out)


def _render_soak(sk: dict | None) -> list[str]:
    """The soak section: start beside end for every figure, then the files per table, the totals and the verdicts."""
    if not sk or "totals" not in sk:
        return []
    t, st, lat, rd, mem, fl = sk["totals"], sk["settings"], sk["latency"], sk["reads"], sk["memory"], sk["files"]
    tg = sk.get("targets", {})
    verdict = lambda ok: "pass" if ok else "**miss**"  # noqa: E731
    num = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    phases = ", ".join(f"{p['phase']} at {p['at_rows']:,} rows" for p in sk.get("phases", [])) or "none"
    out = ["## Soak (runs for months)", "",
           f"The served digits app over HTTP ({st['transport']}, {st['concurrency']} clients): {t['predictions']:,} predictions "
           f"({st['rows_per_request']} rows per /predict, {t['rows_per_s']:.0f} rows/s) and {t['labels']:,} labels (one per "
           f"/feedback, {t['labels_per_s']:.1f}/s) in {t['soak_s']:.0f} s; drift phases: {phases}; {t['retrain_succeeded']} of "
           f"{t['retrain_jobs']} retraining jobs succeeded ({t['retrain_promoted']} promoted). Wall time {t['wall_s']:.0f} s "
           f"(set-up {t['setup_s']:.0f} s, waiting for jobs {t['job_wait_s']:.0f} s)"
           + (f"; **the soak hit its {st['soak_cap_s']:.0f} s cap**" if t.get("capped") else "") + ".", "",
           "Start = after the warm-up, end = after the soak (both with no retraining job running); memory: start = median "
           "of the soak's 2nd tenth, end = median of its last tenth.", "",
           "| figure | start | end | end/start | target | verdict |", "|---|---|---|---|---|---|"]
    for ep in ("predict", "feedback"):
        for q in ("p50", "p99"):
            ratio = lat.get(f"{ep}_{q}_ratio_end_over_start")
            out.append(f"| /{ep} {q} ms ({lat['start'][ep]['n']} sequential) | {num(lat['start'][ep][f'{q}_ms'], '{:.1f}')} | "
                       f"{num(lat['end'][ep][f'{q}_ms'], '{:.1f}')} | {num(ratio)} | <= {lat['target_ratio']:g}x | "
                       f"{verdict(ratio is not None and ratio <= lat['target_ratio'])} |")
    ep_ = lat.get("end_probe")
    if ep_:
        out.append(f"| end probe: taken right after a scheduled maintenance pass (that pass {num(ep_['pass_seconds'], '{:.1f}')} s; "
                   f"waited {ep_['waited_s']:.0f} s for it); passes begun during the probe: {ep_['passes_during_probe']} | | | | | |")
    lr, db = rd["labelled_rows"], rd["data_build"]
    ratio = lr["seconds_ratio_end_over_start"]
    out.append(f"| labelled rows read as a job does, s (rows) | {lr['start']['seconds']:.3f} ({lr['start']['rows']:,}) | "
               f"{lr['end']['seconds']:.3f} ({lr['end']['rows']:,}) | {num(ratio)} | <= {rd['target_ratio']:g}x | "
               f"{verdict(ratio is not None and ratio <= rd['target_ratio'])} |")
    bd = rd.get("build") or {}
    if bd.get("start") and bd.get("end"):
        ratio = bd["seconds_ratio_end_over_start"]
        out.append(f"| a retraining job's whole data build at the same new labels, s (training table rows) | "
                   f"{bd['start']['seconds']:.2f} ({bd['start']['table_rows']:,}) | {bd['end']['seconds']:.2f} ({bd['end']['table_rows']:,}) | "
                   f"{num(ratio)} | <= {rd['target_ratio']:g}x | {verdict(ratio is not None and ratio <= rd['target_ratio'])} |")
    first, last = db.get("first") or {}, db.get("last") or {}
    if first:
        rows = lambda r: "" if r.get("labelled_rows") is None else f" ({r['labelled_rows']:,} labels)"  # noqa: E731
        out.append(f"| the jobs' own data_build_s, first vs last of {db['jobs']} (each reads its own new labels; not a target) | "
                   f"{num(first.get('data_build_s'))}{rows(first)} | {num(last.get('data_build_s'))}{rows(last)} | "
                   f"{num(db['seconds_ratio_last_over_first'])} | - | - |")
    for name, a in mem["actors"].items():
        growth = a.get("growth_pct")
        out.append(f"| RSS MiB, {name} (max after warm-up {num(a.get('max_mib'), '{:.0f}')}) | {num(a.get('level_mib'), '{:.0f}')} | "
                   f"{num(a.get('end_mib'), '{:.0f}')} | {num(None if growth is None else 1 + growth / 100, '{:.3f}')} | "
                   f"<= +{mem['target_growth_pct']:g} % | {verdict(a.get('within_target'))} |")
    out += ["", f"Data files of the log tables (active in the current version / stored on disk); the monitor's scheduled "
            f"maintenance every {st['maintenance_every_s']:g} s ran {(fl.get('monitor_maintenance') or {}).get('runs', '?')} times"
            + (f" (last error: {fl['monitor_maintenance']['error']})" if (fl.get("monitor_maintenance") or {}).get("error") else "")
            + (f"; the final maintenance failed: {fl['final_maintain']['error']}" if "error" in (fl.get("final_maintain") or {}) else "")
            + ".", "",
            "| table | start | scheduled passes | most files a pass found | most a pass's compaction left | most when a pass ended (appends go on) | end, before maintenance | after final maintenance | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    pair = lambda c: "-" if not c or "active" not in c else f"{c['active']} / {c['stored']}"  # noqa: E731
    for kind, e in fl["tables"].items():
        ok = e.get("bounded") and e.get("small_after_maintain")
        out.append(f"| {kind} | {pair(e.get('start'))} | {e.get('passes', '-')} | {num(e.get('max_before_a_pass'), '{}')} | "
                   f"{num(e.get('max_after_a_pass'), '{}')} | {num(e.get('max_when_a_pass_ended'), '{}')} | {pair(e.get('end'))} | "
                   f"{pair(e.get('after_maintain'))} | "
                   f"{verdict(ok)}{' (' + e['error'] + ')' if e.get('error') else ''} |")
    out += ["", "| target | measured | verdict |", "|---|---|---|"]
    for name, v in tg.items():
        out.append(f"| {name}: {v['target']} | {v['measured'].replace('|', '/')} | {verdict(v['pass'])} |")
    return out + [""]


def _render_backtest(bt: dict | None, live: dict | None = None) -> list[str]:
    if not bt or "rainfall" not in bt:
        return []
    out = ["## The loop on real streams (`driftloop backtest`)", ""]
    for key, title in (("digits_phases", "Digits: clean 1,000 -> noise:3 3,000 -> clean 1,000 -> blur:3 3,000, labels at once"),
                       ("rainfall", "Rainfall: 20 years train the first champion, the next 30 are replayed (365-row blocks)")):
        b = bt[key]
        out += [f"{title} ({b['rows']} rows, backtest {b['wall_s']:.0f} s):", "",
                "| strategy | prequential accuracy | retrains | promoted | labels used | retraining s |", "|---|---|---|---|---|---|"]
        for name, e in b["strategies"].items():
            out.append(f"| {name} | {e['accuracy']:.4f} | {e['retrains']} | {e['promoted']} | {e['labels_used']} | {e['retrain_seconds']:.0f} |")
        out.append("")
        for name, e in b["strategies"].items():
            for ph, v in (e.get("phases") or {}).items():
                if name == "driftloop":
                    after = "-" if v["accuracy_after_swap"] is None else f"{v['accuracy_after_swap']:.3f}"
                    out.append(f"- {name}, phase {ph}: {v['retrains']} retrain(s), accuracy {v['accuracy']:.3f}, after its swap {after}; "
                               f"{v['flagged_after_swap']} of {v['windows_after_swap']} later windows flagged")
        out.append("")
    t = bt["rainfall"]["target"]
    out += [f"Rainfall target (driftloop >= periodic - 0.005 with <= half its retrains, and above static): accuracy minus periodic "
            f"{t['accuracy_minus_periodic']:+.4f} ({'met' if t['accuracy_ge_periodic_minus_0.005'] else 'missed'}); retrains <= half: "
            f"{'met' if t['retrains_le_half_periodic'] else 'missed'}; above static: {'met' if t['above_static'] else 'missed'}.", ""]
    lv = live or bt.get("rainfall_live") or {}
    if "error" in lv:
        out += [f"Live rainfall replay over HTTP: **failed** ({lv['error']}).", ""]
    elif lv:
        out += [f"Live: the same 30 years through the served app over HTTP with labels, block by block ({lv['rows']} rows, "
                f"{lv['wall_s']:.0f} s): {lv['retrain_jobs']} retraining jobs ({lv['succeeded']} succeeded) against the "
                f"backtest's {lv['backtest_retrains']}: difference {lv['difference']:+d} "
                f"({'within' if lv['within_1'] else 'outside'} the ±1 target).", ""]
    return out


if __name__ == "__main__":
    sys.exit(main())
