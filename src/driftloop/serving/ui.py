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
from pathlib import Path
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
    """The spec's drift settings the page draws with (a detector's own threshold in /drift wins over p_val), and
    the gate's metric (the page scales and signs the gate scores by it: accuracy, or an error where lower wins)."""
    from driftloop.scoring import LOWER_IS_BETTER

    d = spec.drift
    return {"p_val": d.p_val, "window": d.window, "history": d.history, "gate_metric": spec.gate_metric,
            "lower_is_better": spec.gate_metric in LOWER_IS_BETTER,
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

# the page itself (HTML, CSS and its script) is a file of the package, served as it is
PAGE = (Path(__file__).with_name("drift_page.html")).read_text(encoding="utf-8")
