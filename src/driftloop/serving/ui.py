"""The live drift page of an application (`GET /{app}/ui`) and the registry side of it (`GET /{app}/ui/data`).

The page is one self-contained HTML document: inline CSS, inline hand-written JS, charts as inline SVG, and
requests only to its own application (`./drift`, `./ui/data`, relative to the page). `/ui/data` answers what
`/drift` does not carry: the champion history with gate scores and decisions, and the champion's lineage.
It fails closed: a registry error is a 503 with one line, never an empty history.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any, Callable

log = logging.getLogger("ray.serve")
CACHE_S = 2.0  # however many pages are open, one replica reads the registry at most once per CACHE_S
# The page may talk to its own origin only; everything it needs is inline.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# --- /ui/data -------------------------------------------------------------------------------------------------


def _score(s: Any) -> float | None:
    """A gate score tag ("" when there was none, "nan" for a NaN score) as a float; JSON has no NaN."""
    try:
        x = None if s in (None, "") else float(s)
    except (TypeError, ValueError):
        return None
    return x if x is not None and math.isfinite(x) else None


def _int(s: Any) -> int | None:
    try:
        return None if s in (None, "") else int(s)
    except (TypeError, ValueError):
        return None


def _data_ref(data: str) -> tuple[str, int | None]:
    """`<table uri>@v<N>` as `<table name>@vN` and N: the page names the table, never its full URI (bucket, host)."""
    uri, _, ver = (data or "").rpartition("@")
    name = uri.rstrip("/").rsplit("/", 1)[-1] if uri else ""
    n = _int(ver.removeprefix("v"))
    return (f"{name}@v{n}" if name and n is not None else name or ""), n


def drift_settings(spec) -> dict[str, Any]:
    """The spec's drift settings the page draws with (a detector's own threshold in /drift wins over p_val)."""
    d = spec.drift
    return {"p_val": d.p_val, "window": d.window, "history": d.history,
            "detectors": [{"name": f"{i}-{x.kind}", "kind": x.kind, "correction": x.correction} for i, x in enumerate(d.detectors)]}


def payload(model: str, versions: list[dict[str, Any]], champion_history: list[int], champion_tags: dict[str, str],
            drift: dict[str, Any], now: float) -> dict[str, Any]:
    """The /ui/data answer from registry rows (`registry.list_versions`), the champion history tag (alias moves,
    oldest first) and the champion's version tags. Pure: no MLflow."""
    ever = set(champion_history)
    rows = []
    for v in versions:
        data, data_version = _data_ref(v.get("data", ""))
        created = v.get("created")
        rows.append({
            "version": int(v["version"]), "champion": bool(v.get("champion")), "was_champion": int(v["version"]) in ever,
            "run_id": v.get("run_id") or "", "data": data, "data_version": data_version, "digest": v.get("digest") or "",
            "decision": v.get("decision") or "", "reason": v.get("reason") or "",
            "challenger_score": _score(v.get("challenger_score")), "champion_score": _score(v.get("champion_score")),
            "cause": v.get("cause") or "", "drift_event": v.get("drift_event") or "", "job_id": v.get("job_id") or "",
            "reference": v.get("reference") or "", "created": created / 1000 if isinstance(created, (int, float)) else None,
        })
    rows.sort(key=lambda r: r["version"])
    champ = next((r for r in rows if r["champion"]), None)
    lineage = None
    if champ is not None:
        t = champion_tags or {}
        lineage = {k: champ[k] for k in ("version", "run_id", "data", "digest", "cause", "drift_event", "job_id", "decision",
                                          "reason", "challenger_score", "champion_score", "reference", "created")}
        dv = _int(t.get("data.version"))
        lineage |= {"data_version": dv if dv is not None else champ["data_version"], "trigger": t.get("lineage.trigger", ""),
                    "champion_before": _int(t.get("lineage.champion_before"))}
    return {"model": model, "generated_at": now, "champion": champ["version"] if champ else None,
            "champion_history": [int(v) for v in champion_history], "versions": rows, "lineage": lineage, "drift": drift}


def read_payload(settings, spec) -> dict[str, Any]:
    """Read the registry (blocking: call it off the event loop) and assemble the /ui/data answer.
    Any registry failure raises RegistryUnavailable: never an empty history."""
    from driftloop import registry

    name = spec.name
    try:
        versions = registry.list_versions(settings, name)
        history: list[int] = []
        tags: dict[str, str] = {}
        if versions:
            history = registry.champion_history(settings, name)
            champ = next((v["version"] for v in versions if v["champion"]), None)
            tags = registry.version_tags(settings, name, champ) if champ is not None else {}
    except registry.RegistryUnavailable:
        raise
    except Exception as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise registry.RegistryUnavailable(f"model registry at {settings.tracking_uri} unavailable: {first}") from err
    return payload(name, versions, history, tags, drift_settings(spec), time.time())


def error_line(err: BaseException) -> str:
    """One line for a 503, with any user:password in a URI masked."""
    line = (str(err).splitlines() or [""])[0].strip() or type(err).__name__
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", line)[:300]


class CachedPayload:
    """The /ui/data answer of one replica, read off the event loop at most once per `ttl_s` however many pages
    poll it; concurrent requests wait for one read. An error is cached too (a registry that is down is not
    asked again by every open page) and answered as (503, {"error": line})."""

    def __init__(self, read: Callable[[], dict[str, Any]], ttl_s: float = CACHE_S, clock: Callable[[], float] = time.monotonic):
        self._read, self.ttl_s, self._clock = read, ttl_s, clock
        self._value: tuple[int, dict[str, Any]] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._value is not None and self._clock() - self._at < self.ttl_s

    async def get(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body)."""
        if self._fresh():
            return self._value
        async with self._lock:
            if not self._fresh():
                try:
                    value = (200, await asyncio.to_thread(self._read))
                except Exception as err:
                    value = (503, {"error": error_line(err)})
                    log.warning("/ui/data: %s", value[1]["error"])
                self._value, self._at = value, self._clock()
        return self._value


# --- /ui ------------------------------------------------------------------------------------------------------

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>driftloop</title>
<style>
:root { --fg:#1d2430; --muted:#667080; --bg:#f5f6f8; --card:#fff; --line:#dde1e7; --ok:#2f7d4f; --bad:#c0392b; --warn:#a86400; }
* { box-sizing:border-box; }
body { margin:0; font:13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg); background:var(--bg); }
header { display:flex; gap:18px; align-items:baseline; flex-wrap:wrap; padding:10px 18px; background:var(--card);
         border-bottom:1px solid var(--line); position:sticky; top:0; z-index:1; }
h1 { font-size:17px; margin:0; } h2 { font-size:14px; margin:0 0 8px; } h3 { font-size:13px; margin:4px 0; }
main { display:grid; grid-template-columns:repeat(auto-fill, minmax(540px, 1fr)); gap:14px; padding:14px 18px; }
section { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:12px; min-width:0; overflow-x:auto; }
section.wide { grid-column:1 / -1; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:3px 6px; border-bottom:1px solid var(--line); white-space:nowrap; vertical-align:top; }
th { color:var(--muted); font-weight:600; }
td.wrap { white-space:normal; min-width:200px; }
.mono { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12px; }
.muted { color:var(--muted); }
.drift, .FAILED, .refused { color:var(--bad); font-weight:600; }
.ok, .SUCCEEDED, .promoted { color:var(--ok); }
.RUNNING, .PENDING, .manual, .rollback { color:var(--warn); font-weight:600; }
.err { background:#fdecea; color:var(--bad); border:1px solid #f5c2bd; padding:6px 8px; border-radius:4px; margin:6px 0; }
#errors .err { margin:10px 18px 0; }
.det { margin-bottom:12px; }
.legend span { margin-right:12px; } .sw { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:4px; vertical-align:-1px; }
dl { display:grid; grid-template-columns:max-content 1fr; gap:3px 14px; margin:0; } dt { color:var(--muted); } dd { margin:0; }
svg { display:block; max-width:100%; } svg text { font-size:10px; fill:#667080; }
</style>
</head>
<body>
<header>
  <h1>driftloop &middot; <span id="model">&hellip;</span></h1>
  <span>champion <b id="champion" data-version="">&hellip;</b></span>
  <span>monitor uses <b id="serving" data-version="">&hellip;</b></span>
  <span id="window" class="muted"></span>
  <span id="updated" class="muted"></span>
</header>
<div id="errors"></div>
<main>
  <section id="detectors" class="wide"><h2>Detectors: &minus;log10 p per window (dashed: threshold)</h2><div class="body muted">waiting for /drift&hellip;</div></section>
  <section id="features"><h2>Per-feature attribution (features flagged in recent windows)</h2><div class="body muted">waiting&hellip;</div></section>
  <section id="accuracy"><h2>Rolling accuracy per model version</h2><div class="body muted">waiting&hellip;</div></section>
  <section id="drift-events" class="wide"><h2>Drift events (one per window; newest first)</h2><div class="body muted">waiting&hellip;</div></section>
  <section id="jobs" class="wide"><h2>Retraining jobs (Ray Jobs API, as the monitor last listed them)</h2><div class="body muted">waiting&hellip;</div></section>
  <section id="history" class="wide"><h2>Champion history and gate decisions (model registry)</h2><div class="body muted">waiting for /ui/data&hellip;</div></section>
  <section id="lineage"><h2>Current champion's lineage</h2><div class="body muted">waiting for /ui/data&hellip;</div></section>
</main>
<script>
"use strict";
/* Same origin only: /<app>/ui -> /<app>/drift and /<app>/ui/data. */
const base = location.pathname.replace(/\/ui\/?$/, "");
const REFRESH_MS = 2000, ACC_POINTS = 900;
const COLORS = ["#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#dc2626"];
const accSeries = {};  /* model version -> [[t, accuracy, labelled]], sampled while this page is open */
const pageOpened = Date.now() / 1000;
let drift = null, data = null, driftErr = null, dataErr = null;

function $(id) { return document.getElementById(id); }
function setBody(id, html) { $(id).querySelector(".body").className = "body"; $(id).querySelector(".body").innerHTML = html; }
function esc(s) { return String(s == null ? "" : s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"})[c]); }
function pad(n) { return String(n).padStart(2, "0"); }
function fmtTime(t) {
  if (t == null || t === "" || !isFinite(t)) return "-";
  const d = new Date(Number(t) * 1000);
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
}
function fmtClock(t) { const d = new Date(t * 1000); return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()); }
function fmtP(p) { return p == null ? "-" : (Number(p) === 0 ? "0" : Number(p).toExponential(2)); }
function fmtNum(x, d) { return x == null || x === "" || !isFinite(x) ? "-" : Number(x).toFixed(d); }
function nlog(p) { return -Math.log10(Math.max(Number(p), 1e-300)); }
function color(v) { return COLORS[Math.abs(Number(v)) % COLORS.length]; }
function errBox(msg, what) { return "<div class=\"err\" data-state=\"error\">" + esc(what) + ": " + esc(msg) + "</div>"; }
function short(s, n) { s = String(s || ""); return s.length > n ? s.slice(0, n) + "\u2026" : s; }

function ticks(a, b, n) {
  const step = Math.max(1, Math.ceil((b - a) / n)), out = [];
  for (let x = Math.ceil(a); x <= b; x += step) out.push([x, String(x)]);
  return out;
}

/* A small line/dot chart as an SVG string: o = {x:[a,b], y:[a,b], lines:[{pts,color,dash,title}], dots:[{x,y,color,fill,title}], xticks, fy, h} */
function svgChart(o) {
  const W = 620, H = o.h || 150, L = 46, R = 10, T = 8, B = 20;
  let [x0, x1] = o.x, [y0, y1] = o.y;
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y1 = y0 + 1; }
  const sx = x => (L + (Math.min(Math.max(x, x0), x1) - x0) / (x1 - x0) * (W - L - R)).toFixed(1);
  const sy = y => (T + (1 - (Math.min(Math.max(y, y0), y1) - y0) / (y1 - y0)) * (H - T - B)).toFixed(1);
  const fy = o.fy || (y => fmtNum(y, Math.abs(y1 - y0) < 5 ? 2 : 0));
  const out = ["<svg viewBox=\"0 0 " + W + " " + H + "\" width=\"" + W + "\" role=\"img\">"];
  out.push("<rect x=\"" + L + "\" y=\"" + T + "\" width=\"" + (W - L - R) + "\" height=\"" + (H - T - B) + "\" fill=\"none\" stroke=\"#dde1e7\"/>");
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    out.push("<line x1=\"" + L + "\" x2=\"" + (W - R) + "\" y1=\"" + sy(y) + "\" y2=\"" + sy(y) + "\" stroke=\"#eef0f3\"/>");
    out.push("<text x=\"" + (L - 4) + "\" y=\"" + (Number(sy(y)) + 3) + "\" text-anchor=\"end\">" + esc(fy(y)) + "</text>");
  }
  for (const [x, label] of (o.xticks || ticks(x0, x1, 8))) {
    if (x < x0 || x > x1) continue;
    out.push("<text x=\"" + sx(x) + "\" y=\"" + (H - 5) + "\" text-anchor=\"middle\">" + esc(label) + "</text>");
  }
  for (const l of (o.lines || [])) {
    if (!l.pts.length) continue;
    out.push("<polyline fill=\"none\" stroke=\"" + l.color + "\" stroke-width=\"" + (l.width || 1.5) + "\"" + (l.dash ? " stroke-dasharray=\"" + l.dash + "\"" : "")
      + " points=\"" + l.pts.map(p => sx(p[0]) + "," + sy(p[1])).join(" ") + "\"><title>" + esc(l.title || "") + "</title></polyline>");
  }
  for (const d of (o.dots || [])) {
    out.push("<circle cx=\"" + sx(d.x) + "\" cy=\"" + sy(d.y) + "\" r=\"" + (d.r || 3) + "\" fill=\"" + (d.fill || d.color) + "\" stroke=\"" + d.color + "\"><title>" + esc(d.title || "") + "</title></circle>");
  }
  out.push("</svg>");
  return out.join("");
}

/* ---- (1) detectors ---- */
function renderDetectors(d) {
  const wins = (d.recent || []).slice().reverse();  /* oldest first */
  const dets = d.detectors || [];
  if (!dets.length) return "<span class=\"muted\">no detectors loaded</span>";
  const specP = data && data.drift ? data.drift.p_val : null;
  const spec = {};
  for (const s of (data && data.drift ? data.drift.detectors : [])) spec[s.name] = s;
  let html = "";
  for (const det of dets) {
    const attrs = " class=\"det\" data-detector=\"" + esc(det.name) + "\" data-kind=\"" + esc(det.kind) + "\"";
    const title = "<h3>" + esc(det.name) + " <span class=\"muted\">" + esc(det.kind) + " on " + esc(det.input) + (det.online ? ", online" : "")
      + (spec[det.name] && !det.online ? ", " + esc(spec[det.name].correction) : "") + "</span></h3>";
    if (det.online) {
      const last = (d.online || {})[det.name];
      html += "<div" + attrs + " data-online=\"true\">" + title + (last
        ? "test statistic " + fmtNum(last.distance, 4) + " vs threshold " + fmtNum(last.threshold, 4) + " (t=" + esc(last.t) + ") <span class=\""
          + (last.is_drift ? "drift\">ALARM" : "ok\">ok") + "</span>"
        : "<span class=\"muted\">no update yet</span>") + "</div>";
      continue;
    }
    const pts = [];
    for (const w of wins) {
      const r = (w.detectors || []).find(x => x.name === det.name);
      if (r && r.p_val != null) pts.push({x: w.index, p: r.p_val, thr: r.threshold != null ? r.threshold : specP, drift: r.is_drift, t: w.ended_at,
                                          n: (r.drifted_features || []).length, ev: w.event_id});
    }
    if (!pts.length) { html += "<div" + attrs + ">" + title + "<span class=\"muted\">no window closed yet</span></div>"; continue; }
    const ys = pts.map(p => nlog(p.p)), thr = pts.filter(p => p.thr != null).map(p => [p.x, nlog(p.thr)]);
    const ymax = Math.max(1, ...ys, ...thr.map(t => t[1])) * 1.15;
    const x0 = pts[0].x, x1 = pts[pts.length - 1].x;
    const thrLine = thr.length === 1 ? [[x0 - 1, thr[0][1]], [x1 + 1, thr[0][1]]] : thr;
    const last = pts[pts.length - 1];
    html += "<div" + attrs + " data-windows=\"" + pts.length + "\" data-last-p=\"" + esc(last.p) + "\" data-threshold=\"" + esc(last.thr) + "\">" + title
      + svgChart({x: [x0, x1], y: [0, ymax], h: 140,
                  lines: [{pts: pts.map((p, i) => [p.x, ys[i]]), color: "#2563eb", title: det.name + ": -log10 p"},
                          {pts: thrLine, color: "#c0392b", dash: "4 3", width: 1.2, title: "threshold"}],
                  dots: pts.map((p, i) => ({x: p.x, y: ys[i], color: p.drift ? "#c0392b" : "#2563eb",
                                            title: "window " + p.x + " (" + fmtTime(p.t) + "): p=" + fmtP(p.p) + ", threshold " + fmtP(p.thr)
                                                   + (p.n ? ", " + p.n + " features flagged" : "") + ", event " + p.ev}))})
      + "<div class=\"muted\">last window " + last.x + ": p=" + fmtP(last.p) + " (&minus;log10 " + fmtNum(nlog(last.p), 2) + "), threshold " + fmtP(last.thr)
      + (specP != null ? " (spec p_val " + fmtP(specP) + ")" : "") + " &mdash; <span class=\"" + (last.drift ? "drift\">DRIFT" : "ok\">ok") + "</span></div></div>";
  }
  return html;
}

/* ---- (2) per-feature attribution ---- */
function renderFeatures(d) {
  const wins = (d.recent || []).slice().reverse();
  if (!wins.length) return "<span class=\"muted\">no window closed yet</span>";
  const feats = {};
  wins.forEach((w, i) => {
    for (const r of (w.detectors || [])) {
      for (const f of (r.drifted_features || [])) {
        const e = feats[f] || (feats[f] = {name: f, count: 0, cols: new Set(), dets: new Set(), last: null, minp: null});
        if (!e.cols.has(i)) e.count += 1;
        e.cols.add(i); e.dets.add(r.name); e.last = w.index;
        if (r.p_val != null && (e.minp == null || r.p_val < e.minp)) e.minp = r.p_val;
      }
    }
  });
  const rows = Object.values(feats).sort((a, b) => b.count - a.count || (a.minp ?? 1) - (b.minp ?? 1)).slice(0, 40);
  const n = wins.length;
  let html = "<div class=\"muted\">" + Object.keys(feats).length + " feature(s) flagged by a per-feature test in the last " + n
    + " window(s) (windows " + wins[0].index + "&ndash;" + wins[n - 1].index + "); cells: oldest &rarr; newest window</div>";
  if (!rows.length) return html;
  html += "<table><tr><th>feature</th><th>windows flagged</th><th>in windows</th><th>strongest window (detector min p)</th><th>last flagged</th><th>by</th></tr>";
  const cw = Math.max(4, Math.min(12, Math.floor(240 / n)));
  for (const e of rows) {
    let strip = "<svg width=\"" + (cw * n) + "\" height=\"12\" role=\"img\">";
    for (let i = 0; i < n; i++) strip += "<rect x=\"" + (i * cw) + "\" y=\"1\" width=\"" + (cw - 1) + "\" height=\"10\" fill=\"" + (e.cols.has(i) ? "#c0392b" : "#eef0f3") + "\"><title>window " + wins[i].index + "</title></rect>";
    strip += "</svg>";
    const bar = "<svg width=\"84\" height=\"12\" role=\"img\"><rect x=\"0\" y=\"1\" width=\"80\" height=\"10\" fill=\"#eef0f3\"/><rect x=\"0\" y=\"1\" width=\""
      + (80 * e.count / n).toFixed(1) + "\" height=\"10\" fill=\"#d97706\"/></svg>";
    html += "<tr data-feature=\"" + esc(e.name) + "\" data-count=\"" + e.count + "\"><td class=\"mono\">" + esc(e.name) + "</td><td>" + bar + " " + e.count + "/" + n
      + "</td><td>" + strip + "</td><td>" + fmtP(e.minp) + "</td><td>" + esc(e.last) + "</td><td class=\"muted\">" + esc([...e.dets].join(", ")) + "</td></tr>";
  }
  return html + "</table>";
}

/* ---- (3) rolling accuracy ---- */
function renderAccuracy(d) {
  const now = Date.now() / 1000, acc = d.rolling_accuracy || {};
  for (const [v, a] of Object.entries(acc)) {
    const s = accSeries[v] || (accSeries[v] = []);
    s.push([now, a.accuracy, a.labelled]);
    if (s.length > ACC_POINTS) s.splice(0, s.length - ACC_POINTS);
  }
  const versions = Object.keys(acc).sort((a, b) => Number(b) - Number(a));
  if (!versions.length) return "<span class=\"muted\">no labelled rows yet (POST /feedback)</span>";
  let html = "<table><tr><th>version</th><th>accuracy</th><th>labelled rows (rolling)</th></tr>";
  for (const v of versions) {
    html += "<tr data-version=\"" + esc(v) + "\" data-accuracy=\"" + esc(acc[v].accuracy) + "\"><td><span class=\"sw\" style=\"background:" + color(v) + "\"></span>v" + esc(v)
      + (Number(v) === d.model_version ? " (monitored)" : "") + "</td><td>" + fmtNum(acc[v].accuracy, 3) + "</td><td>" + esc(acc[v].labelled) + "</td></tr>";
  }
  html += "</table>";
  const all = Object.values(accSeries).flat();
  const t0 = Math.min(...all.map(p => p[0])), t1 = Math.max(...all.map(p => p[0]));
  const xt = [];
  for (let i = 0; i <= 4; i++) { const t = t0 + (t1 - t0) * i / 4; xt.push([t, fmtClock(t)]); }
  html += svgChart({x: [t0, t1], y: [0, 1], h: 130, xticks: t1 > t0 ? xt : [[t0, fmtClock(t0)]],
                    lines: Object.entries(accSeries).map(([v, s]) => ({pts: s.map(p => [p[0], p[1]]), color: color(v), title: "v" + v})),
                    dots: Object.entries(accSeries).map(([v, s]) => { const p = s[s.length - 1]; return {x: p[0], y: p[1], color: color(v), title: "v" + v + ": " + fmtNum(p[1], 3) + " over " + p[2] + " labels"}; })});
  return html + "<div class=\"muted\">sampled every " + (REFRESH_MS / 1000) + " s since this page opened (" + fmtTime(pageOpened) + ")</div>";
}

/* ---- (4) drift events ---- */
function driftEvents(d) {
  const seen = new Set(), out = [];
  for (const w of (d.recent || [])) {
    const ps = (w.detectors || []).map(r => r.p_val).filter(p => p != null);
    const feats = [...new Set((w.detectors || []).flatMap(r => r.drifted_features || []))];
    seen.add(w.event_id);
    out.push({id: w.event_id, index: w.index, version: w.model_version, t: w.ended_at, drift: w.is_drift, minp: ps.length ? Math.min(...ps) : null,
              feats: feats, trigger: w.trigger || "", rows: w.rows});
  }
  for (const e of (d.restored_history || [])) {
    if (seen.has(e.event_id)) continue;
    out.push({id: e.event_id, index: null, version: e.model_version, t: e.ts, drift: e.is_drift, minp: e.min_p_val, feats: [], trigger: "", restored: true});
  }
  return out.sort((a, b) => (b.t || 0) - (a.t || 0));
}

function renderEvents(d) {
  const evs = driftEvents(d);
  if (!evs.length) return "<span class=\"muted\">no drift events yet</span>";
  const flagged = evs.filter(e => e.drift).length;
  let html = "<div class=\"muted\">" + evs.length + " event(s), " + flagged + " with drift</div><table><tr><th>time</th><th>event id</th><th>window</th><th>model</th><th>verdict</th><th>min p</th><th>features flagged</th><th>trigger</th></tr>";
  for (const e of evs) {
    html += "<tr data-event-id=\"" + esc(e.id) + "\" data-drift=\"" + (e.drift ? "true" : "false") + "\" data-window=\"" + esc(e.index == null ? "" : e.index) + "\" data-version=\"" + esc(e.version) + "\">"
      + "<td>" + fmtTime(e.t) + "</td><td class=\"mono\">" + esc(e.id) + "</td><td>" + (e.index == null ? "<span class=\"muted\">" + (e.restored ? "earlier" : "-") + "</span>" : esc(e.index))
      + "</td><td>v" + esc(e.version) + "</td><td class=\"" + (e.drift ? "drift\">DRIFT" : "ok\">ok") + "</td><td>" + fmtP(e.minp) + "</td><td class=\"mono wrap\">"
      + esc(short(e.feats.join(", "), 120)) + "</td><td class=\"wrap\">" + esc(e.trigger) + "</td></tr>";
  }
  return html + "</table>";
}

/* ---- (5) retraining jobs ---- */
function renderJobs(d) {
  const rt = d.retraining || {}, pol = d.policy || {}, st = d.state || {};
  let html = "";
  if (rt.error) html += errBox(rt.error + " (since " + fmtTime(rt.since) + ", " + rt.attempts + " attempts in a row; next try " + fmtTime(rt.next_try_at) + ")", "retraining path FAILING");
  const rw = pol.recent_windows || [];
  html += "<div class=\"muted\">policy: drift in " + rw.filter(Boolean).length + " of the last " + rw.length + " window(s) (k=" + esc(pol.k) + ", m=" + esc(pol.m) + ")"
    + (pol.warming_up ? ", warming up" : "") + "; " + esc(pol.triggers) + " trigger(s); last trigger " + fmtTime(pol.last_trigger_at) + "; cooldown " + esc(pol.cooldown_s) + " s"
    + (pol.pending ? "; waiting for labels: " + esc(pol.pending) : "") + (st.pending_submit ? "; decided, not yet submitted: " + esc(st.pending_submit.reason) : "")
    + "; listed " + fmtTime(rt.listed_at) + "</div>";
  const seqs = (rt.current ? [rt.current] : []).concat((rt.history || []).slice().reverse());
  if (!seqs.length) return html + "<div class=\"muted\">no retraining job yet</div>";
  html += "<table><tr><th>submission id</th><th>status</th><th>attempt</th><th>triggered</th><th>submitted</th><th>finished</th><th>drift event</th><th>cause</th><th>reason</th><th>attempts</th></tr>";
  for (const j of seqs) {
    const note = j.next_retry_at ? "next attempt " + fmtTime(j.next_retry_at) : (j.message || "");
    const runs = (j.runs || []).map(r => "<div data-submission-id=\"" + esc(r.submission_id) + "\" data-status=\"" + esc(r.status) + "\"><span class=\"mono\">" + esc(r.submission_id)
      + "</span> <span class=\"" + esc(r.status) + "\">" + esc(r.status) + "</span></div>").join("");
    html += "<tr data-submission-id=\"" + esc(j.submission_id) + "\" data-base-id=\"" + esc(j.base_id) + "\" data-status=\"" + esc(j.status) + "\"" + (j === rt.current ? " data-current=\"true\"" : "") + ">"
      + "<td class=\"mono\">" + esc(j.submission_id) + "</td><td class=\"" + esc(j.status) + "\">" + esc(j.status) + (j.final ? "" : " &middot; in progress") + "</td><td>" + esc(j.attempt)
      + "</td><td>" + fmtTime(j.trigger_at) + "</td><td>" + fmtTime(j.submitted_at) + "</td><td>" + fmtTime(j.finished_at) + "</td><td class=\"mono\">" + esc(j.event_id || "-")
      + "</td><td>" + esc(j.cause || "-") + "</td><td class=\"wrap\">" + esc(j.reason) + (note ? "<div class=\"muted\">" + esc(note) + "</div>" : "") + "</td><td>" + runs + "</td></tr>";
  }
  return html + "</table>";
}

/* ---- (6) champion history ---- */
function renderHistory(u) {
  const vs = u.versions || [];
  if (!vs.length) return "<span class=\"muted\">no registered versions</span>";
  let html = "<p id=\"champion-history\" data-versions=\"" + esc((u.champion_history || []).join(",")) + "\">champions, oldest first: "
    + ((u.champion_history || []).map(v => "<b>v" + esc(v) + "</b>").join(" &rarr; ") || "<span class=\"muted\">none recorded</span>") + "</p>";
  const scored = vs.filter(v => v.challenger_score != null || v.champion_score != null);
  if (scored.length) {
    const all = scored.flatMap(v => [v.challenger_score, v.champion_score]).filter(x => x != null);
    const lo = Math.max(0, Math.min(...all) - 0.02), hi = Math.min(1, Math.max(...all) + 0.02);
    const dots = [];
    for (const v of scored) {
      if (v.champion_score != null) dots.push({x: v.version, y: v.champion_score, color: "#1d2430", fill: "#fff", r: 4, title: "v" + v.version + ": champion scored " + fmtNum(v.champion_score, 4)});
      if (v.challenger_score != null) dots.push({x: v.version, y: v.challenger_score, color: v.decision === "promoted" ? "#2f7d4f" : v.decision === "refused" ? "#c0392b" : "#667080",
                                                 title: "v" + v.version + " (" + v.decision + "): challenger scored " + fmtNum(v.challenger_score, 4)});
    }
    const x0 = vs[0].version, x1 = vs[vs.length - 1].version;
    html += svgChart({x: [x0, x1], y: [lo, hi], h: 130, fy: y => fmtNum(y, 3), xticks: vs.map(v => [v.version, "v" + v.version]), dots: dots})
      + "<div class=\"legend muted\"><span><span class=\"sw\" style=\"background:#2f7d4f\"></span>challenger promoted</span><span><span class=\"sw\" style=\"background:#c0392b\"></span>challenger refused</span>"
      + "<span><span class=\"sw\" style=\"background:#fff;border:1px solid #1d2430\"></span>champion it was gated against (same rows)</span></div>";
  }
  html += "<table><tr><th>version</th><th>decision</th><th>challenger</th><th>champion</th><th>gain</th><th>cause</th><th>drift event</th><th>job</th><th>run</th><th>data</th><th>registered</th><th>gate reason</th></tr>";
  for (const v of vs.slice().reverse()) {
    const gain = v.challenger_score != null && v.champion_score != null ? v.challenger_score - v.champion_score : null;
    html += "<tr data-version=\"" + esc(v.version) + "\" data-decision=\"" + esc(v.decision) + "\" data-champion=\"" + (v.champion ? "true" : "false") + "\" data-was-champion=\"" + (v.was_champion ? "true" : "false") + "\">"
      + "<td><b>v" + esc(v.version) + "</b>" + (v.champion ? " &#9733; champion" : (v.was_champion ? " <span class=\"muted\">(was champion)</span>" : "")) + "</td>"
      + "<td class=\"" + esc(v.decision) + "\">" + esc(v.decision || "-") + "</td><td>" + fmtNum(v.challenger_score, 4) + "</td><td>" + fmtNum(v.champion_score, 4) + "</td><td>"
      + (gain == null ? "-" : (gain >= 0 ? "+" : "") + gain.toFixed(4)) + "</td><td>" + esc(v.cause || "-") + "</td><td class=\"mono\">" + esc(v.drift_event || "-") + "</td><td class=\"mono\">"
      + esc(v.job_id || "-") + "</td><td class=\"mono\" title=\"" + esc(v.run_id) + "\">" + esc(short(v.run_id, 8)) + "</td><td class=\"mono\">" + esc(v.data || "-") + "</td><td>" + fmtTime(v.created)
      + "</td><td class=\"wrap\">" + esc(v.reason) + "</td></tr>";
  }
  return html + "</table>";
}

/* ---- (7) the champion's lineage ---- */
function renderLineage(u, d) {
  const l = u.lineage;
  if (!l) return "<span class=\"muted\">no champion</span>";
  const known = d ? driftEvents(d).find(e => e.id === l.drift_event) : null;
  const f = (k, label, v, mono) => "<dt>" + label + "</dt><dd data-field=\"" + k + "\"" + (mono ? " class=\"mono\"" : "") + ">" + v + "</dd>";
  return "<div class=\"mono\" data-field=\"chain\">v" + esc(l.version) + " &larr; run " + esc(short(l.run_id, 8)) + " &larr; " + esc(l.data || "-") + " &larr; "
    + (l.drift_event ? "event " + esc(l.drift_event) : esc(l.cause || "-")) + (l.job_id ? " &larr; job " + esc(l.job_id) : "") + "</div><dl>"
    + f("version", "version", "v" + esc(l.version), false)
    + f("run_id", "run", esc(l.run_id), true)
    + f("data", "data version", esc(l.data || "-") + (l.data_version != null ? " (table version " + esc(l.data_version) + ")" : "") + " <span class=\"muted\">" + esc(short(l.digest, 20)) + "</span>", true)
    + f("trigger", "trigger", esc(l.trigger || "-"), false)
    + f("cause", "cause", esc(l.cause || "-"), false)
    + f("drift_event", "drift event", esc(l.drift_event || "-") + (known ? " <span class=\"muted\">(window " + esc(known.index == null ? "earlier" : known.index) + ", " + fmtTime(known.t) + ")</span>" : ""), true)
    + f("job_id", "retraining job", esc(l.job_id || "-"), true)
    + f("champion_before", "replaced", l.champion_before != null ? "v" + esc(l.champion_before) : "-", false)
    + f("decision", "gate", esc(l.decision || "-") + " " + (l.challenger_score != null ? fmtNum(l.challenger_score, 4) + " vs " + fmtNum(l.champion_score, 4) : "") + "<div class=\"muted\">" + esc(l.reason) + "</div>", false)
    + f("reference", "drift reference", esc(l.reference || "-"), false)
    + f("created", "registered", fmtTime(l.created), false) + "</dl>";
}

function section(id, fn) {
  try { setBody(id, fn()); } catch (e) { setBody(id, errBox(String(e && e.message || e), "cannot draw this section")); }
}

function render() {
  const d = drift, u = data;
  $("model").textContent = (u && u.model) || (d && d.model) || "?";
  document.title = "driftloop \u00b7 " + ((u && u.model) || (d && d.model) || "");
  const champ = $("champion");
  if (u && !dataErr) {
    champ.textContent = u.champion != null ? "v" + u.champion : "none";
    champ.dataset.version = u.champion != null ? u.champion : "";
  } else if (dataErr) {
    champ.textContent = "unknown (registry unavailable)";
    champ.dataset.version = "";
  }
  const serving = $("serving");
  if (d && !driftErr) {
    serving.textContent = "v" + d.model_version + (u && !dataErr && u.champion != null && u.champion !== d.model_version ? " (swap pending)" : "");
    serving.dataset.version = d.model_version;
    $("window").textContent = "window " + d.window.fill + "/" + d.window.size + " \u00b7 " + d.window.index + " closed \u00b7 " + d.samples + " rows seen \u00b7 "
      + d.feedback + " labels \u00b7 " + d.dropped_rows + " rows sampled out";
  }
  $("updated").textContent = "updated " + fmtTime(Date.now() / 1000) + " (every " + (REFRESH_MS / 1000) + " s)";
  let errs = "";
  if (driftErr) errs += errBox(driftErr, "GET drift failed");
  if (d && !driftErr && d.registry && d.registry.error) errs += errBox(d.registry.error + " (since " + fmtTime(d.registry.since) + ")", "the monitor reports the registry unreachable");
  if (dataErr) errs += errBox(dataErr, "GET ui/data failed");
  $("errors").innerHTML = errs;
  if (d && !driftErr) {
    section("detectors", () => renderDetectors(d));
    section("features", () => renderFeatures(d));
    section("accuracy", () => renderAccuracy(d));
    section("drift-events", () => renderEvents(d));
    section("jobs", () => renderJobs(d));
  } else if (driftErr) {
    for (const id of ["detectors", "features", "accuracy", "drift-events", "jobs"]) setBody(id, errBox(driftErr, "GET drift failed"));
  }
  if (dataErr) {
    for (const id of ["history", "lineage"]) setBody(id, errBox(dataErr, "model registry unavailable; history not shown"));
  } else if (u) {
    section("history", () => renderHistory(u));
    section("lineage", () => renderLineage(u, d && !driftErr ? d : null));
  }
}

async function getJSON(path) {
  const r = await fetch(base + path, {cache: "no-store", credentials: "same-origin"});
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
  return body;
}

async function tick() {
  const [d, u] = await Promise.allSettled([getJSON("/drift"), getJSON("/ui/data")]);
  if (d.status === "fulfilled") { drift = d.value; driftErr = null; } else { driftErr = String(d.reason && d.reason.message || d.reason); }
  if (u.status === "fulfilled") { data = u.value; dataErr = null; } else { dataErr = String(u.reason && u.reason.message || u.reason); }
  try { render(); } catch (e) { $("errors").innerHTML = errBox(String(e && e.message || e), "page error"); }
  setTimeout(tick, REFRESH_MS);
}
tick();
</script>
</body>
</html>
"""
