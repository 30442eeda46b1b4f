"""`driftloop status`: champion, drift history, retraining jobs and the lineage that links them."""

from __future__ import annotations

import json
from typing import Any

from driftloop.settings import get_settings


def model_status(name: str, url: str | None = None, events: int = 10) -> dict[str, Any]:
    from driftloop import registry
    from driftloop.errors import LoopError
    from driftloop.serving.logs import read_or_empty

    s = get_settings()
    versions = registry.list_versions(s, name)
    if not versions:
        raise LoopError(f"no registered versions of model {name!r}")
    champ = next((v for v in versions if v["champion"]), None)
    tags = registry.version_tags(s, name, champ["version"]) if champ else {}
    table_uri = tags.get("data.uri") or versions[-1]["data"].rsplit("@", 1)[0]
    ev = read_or_empty(f"{table_uri}_drift_events")
    recent = []
    if len(ev):
        for r in ev.sort_values("ts").tail(events).itertuples():
            recent.append({"event_id": r.event_id, "ts": float(r.ts), "model_version": int(r.model_version),
                           "window": int(r.window_index), "rows": int(r.rows), "is_drift": bool(r.is_drift),
                           "min_p_val": float(r.min_p_val), "drifted_features": json.loads(r.drifted_features)[:8],
                           "trigger": r.trigger})
    jobs_path = s.state_dir / f"retrain-{name}.json"
    jobs = json.loads(jobs_path.read_text()) if jobs_path.is_file() else {}
    lineage = [{"version": v["version"], "champion": v["champion"], "decision": v["decision"], "reason": v["reason"],
                "data": v["data"], "digest": v["digest"], "run_id": v["run_id"], "job_id": v["job_id"],
                "drift_event": v["drift_event"]} for v in versions]
    live = None
    if url:
        import httpx

        try:
            live = httpx.get(f"{url.rstrip('/')}/{name}/drift", timeout=10).json()
        except Exception as err:
            live = {"error": f"cannot reach {url}: {err}"}
    return {"model": name, "champion": champ["version"] if champ else None, "drift_events": recent,
            "retraining": jobs, "lineage": lineage, "live": live,
            "drift_events_table": f"{table_uri}_drift_events"}


def render(st: dict[str, Any]) -> str:
    out = [f"model {st['model']}: champion version {st['champion']}", "", "drift events (newest last):"]
    if not st["drift_events"]:
        out.append("  (none yet)")
    for e in st["drift_events"]:
        flag = "DRIFT" if e["is_drift"] else "ok   "
        feats = f" features {','.join(e['drifted_features'])}" if e["drifted_features"] else ""
        trig = f"  -> trigger: {e['trigger']}" if e["trigger"] else ""
        out.append(f"  {e['event_id']}  v{e['model_version']} window {e['window']:>3}  {flag} p={e['min_p_val']:.2e}{feats}{trig}")
    out += ["", "retraining jobs:"]
    cur = (st["retraining"] or {}).get("current")
    hist = (st["retraining"] or {}).get("history", [])
    if not cur and not hist:
        out.append("  (none)")
    for j in hist + ([cur] if cur and cur not in hist else []):
        out.append(f"  {j['submission_id']}  {j['status']:<9} attempt {j['attempt']}  event {j.get('event_id') or '-'}  reason: {j['reason']}")
    out += ["", "lineage (model version <- run <- data version <- drift event <- job):"]
    for v in st["lineage"]:
        star = "*" if v["champion"] else " "
        out.append(f" {star}v{v['version']:<3} {v['decision'] or '-':<9} run {v['run_id'][:8]}  data {v['data']} {v['digest']}"
                   f"  event {v['drift_event'] or '-'}  job {v['job_id'] or '-'}")
    if st.get("live"):
        lv = st["live"]
        if "error" in lv:
            out += ["", f"live: {lv['error']}"]
        else:
            out += ["", f"live: serving v{lv.get('model_version')}, {lv.get('samples')} rows seen, window fill "
                    f"{lv.get('window', {}).get('fill')}/{lv.get('window', {}).get('size')}, rolling accuracy {lv.get('rolling_accuracy')}"]
    return "\n".join(out)
