"""Traffic replay: real HTTP requests from the built-in examples, optionally with ground-truth labels."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from driftloop.data import examples
from driftloop.features import json_value
from driftloop.serving.validation import MAX_LABELS_PER_REQUEST


class ScenarioError(ValueError):
    """A scenario string that cannot be parsed."""


def parse_scenario(s: str) -> tuple[str, int]:
    """'clean' | 'corrupt:KIND:SEVERITY' -> (kind, severity); 'clean' is ('noise', 0)."""
    if s == "clean":
        return "noise", 0
    parts = s.split(":")
    if len(parts) != 3 or parts[0] != "corrupt":
        raise ScenarioError(f"scenario {s!r}: use 'clean' or 'corrupt:KIND:SEVERITY' (KIND one of {', '.join(examples.CORRUPTIONS)})")
    if parts[1] not in examples.CORRUPTIONS:
        raise ScenarioError(f"scenario {s!r}: unknown corruption {parts[1]!r} (one of {', '.join(examples.CORRUPTIONS)})")
    try:
        sev = int(parts[2])
    except ValueError:
        raise ScenarioError(f"scenario {s!r}: severity must be an integer 0..5") from None
    if not 0 <= sev <= 5:
        raise ScenarioError(f"scenario {s!r}: severity must be 0..5")
    return parts[1], sev


def traffic(app: str, scenario: str, rows: int, seed: int = 0, offset: int = 0) -> tuple[pd.DataFrame, list[str], str]:
    """The rows to send: digits from the held-out pool (corrupted per scenario), or rainfall in time order."""
    if app.startswith("rainfall"):
        if scenario != "clean":
            raise ScenarioError("rainfall replays its real, time-ordered history: use --scenario clean")
        ex = examples.builtin("rainfall")
        pool = ex.pool.iloc[offset : offset + rows]
        return pool.reset_index(drop=True), examples.RAINFALL_FEATURES, "rain"
    kind, sev = parse_scenario(scenario)
    ex = examples.builtin("digits")
    df = examples.digits_stream(ex.pool, rows, onset=0 if sev else None, kind=kind, severity=sev, seed=seed)
    return df, examples.DIGITS_FEATURES, "digit"


@dataclass
class ReplayReport:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    correct: int = 0
    abs_error: float = 0.0  # regression: the sum of |prediction - label| over the answered rows
    regression: bool = False
    labelled: int = 0
    versions: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    responses: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.ok if self.ok else float("nan")

    @property
    def mae(self) -> float:
        return self.abs_error / self.ok if self.ok else float("nan")

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        score = {"mae": round(self.mae, 4)} if self.regression else {"accuracy": round(self.accuracy, 4)}
        return {"sent": self.sent, "ok": self.ok, "failed": self.failed, **score,
                "labelled": self.labelled, "model_versions": {str(k): v for k, v in sorted(self.versions.items())},
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "rps": round(self.sent / self.seconds, 1) if self.seconds else 0.0,
                "status": {str(k): v for k, v in sorted(self.status_counts.items())}}


def _plain(label, regression: bool = False):
    """A label as JSON carries it: an int for integer classes (numpy's included), the string itself for names, a
    float for a regression target."""
    label = label.item() if hasattr(label, "item") else label
    return label if isinstance(label, str) else float(label) if regression else int(label)


async def replay_async(
    url: str, app: str, df: pd.DataFrame, features: list[str], label: str, rps: float, labels: bool = False,
    concurrency: int = 16, headers: dict[str, str] | None = None, on_response: Callable[[int, dict], None] | None = None,
    keep_responses: bool = False, timeout: float = 30.0, batch: int = 1, label_delay: int = 0, regression: bool = False,
) -> ReplayReport:
    """Send the rows in order at a paced rate (rows per second; open loop, bounded in count and time), `batch`
    rows per `/predict` request (one row: `{"row": …}`, more: `{"rows": […]}`). Counts are per row; with
    `labels`, each row's ground truth goes to `/feedback` under its own id, at once or, with `label_delay` N,
    once row i + N has been answered (as labels arrive later in production; the rest at the end). With `regression`
    the labels are numbers and the report gives the mean absolute error instead of accuracy."""
    import httpx

    if batch < 1:
        raise ValueError("batch must be >= 1")
    rep = ReplayReport(regression=regression)
    base = f"{url.rstrip('/')}/{app.strip('/')}"
    sem = asyncio.Semaphore(concurrency)
    numeric = all(pd.api.types.is_numeric_dtype(df[f]) and not pd.api.types.is_bool_dtype(df[f]) for f in features)
    # a file's own values: numbers, category names, and null where a value is missing
    xs = df[features].to_numpy(dtype=float) if numeric else df[features].to_numpy(dtype=object)
    ys = df[label].to_numpy() if label in df.columns else None
    t0 = time.monotonic()

    waiting: dict[int, str] = {}  # answered rows whose label is not sent yet (label_delay)

    async def label(client: httpx.AsyncClient, due: list[tuple[int, str]]) -> None:
        """The labels now due: one request for one, else batches of up to MAX_LABELS_PER_REQUEST (each label
        gets its own status; a 200 counts, a repeat of the same label included)."""
        if len(due) == 1:
            (i, rid), = due
            fr = await client.post(f"{base}/feedback", json={"request_id": rid, "label": _plain(ys[i], regression)})
            rep.labelled += int(fr.status_code == 200)
            return
        for at in range(0, len(due), MAX_LABELS_PER_REQUEST):
            part = due[at:at + MAX_LABELS_PER_REQUEST]
            fr = await client.post(f"{base}/feedback", json={"labels": [
                {"request_id": rid, "label": _plain(ys[i], regression)} for i, rid in part]})
            if fr.status_code == 200:
                rep.labelled += sum(1 for r in fr.json()["results"] if r["status"] == 200)

    async def one(client: httpx.AsyncClient, idx: range) -> None:
        async with sem:
            rows = [{f: (float(v) if numeric and v == v else json_value(v)) for f, v in zip(features, xs[i])} for i in idx]
            body = {"row": rows[0]} if batch == 1 else {"rows": rows}
            start = time.monotonic()
            try:
                r = await client.post(f"{base}/predict", json=body, headers=headers)
                code = r.status_code
                data = r.json() if code == 200 else {}
            except Exception:
                code, data = 599, {}
            rep.latencies_ms.append((time.monotonic() - start) * 1000)
            rep.status_counts[code] = rep.status_counts.get(code, 0) + len(idx)
            if code != 200:
                rep.failed += len(idx)
                return
            rep.ok += len(idx)
            v = int(data["model_version"])
            rep.versions[v] = rep.versions.get(v, 0) + len(idx)
            due: list[tuple[int, str]] = []
            for j, i in enumerate(idx):
                pred = data["predictions"][j]["prediction"]
                if keep_responses:
                    rep.responses.append({"i": i, "t": time.monotonic() - t0, "version": v, "prediction": pred})
                if ys is not None:
                    if regression:
                        rep.abs_error += abs(float(pred) - float(ys[i]))
                    else:
                        rep.correct += int(pred == _plain(ys[i]))
                    if labels:
                        rid = data["request_id"] if batch == 1 else data["predictions"][j]["id"]
                        waiting[i] = rid
                        # taken out at once: another answer's task must not send them too
                        due += [(k, waiting.pop(k)) for k in sorted(k for k in waiting if k <= i - label_delay)]
                if on_response:
                    on_response(i, data if batch == 1 else {**data, "request_id": data["predictions"][j]["id"],
                                                           "predictions": [data["predictions"][j]]})
            if due:  # a batch's labels as one request, as a labelling service would send them
                await label(client, due)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = []
        for first in range(0, len(df), batch):
            due = t0 + first / rps if rps > 0 else t0
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            idx = range(first, min(len(df), first + batch))
            tasks.append(asyncio.create_task(one(client, idx)))
            rep.sent += len(idx)
        await asyncio.gather(*tasks)
        if waiting:  # the stream ended: the labels still owed
            await label(client, [(k, waiting.pop(k)) for k in sorted(waiting)])
    rep.seconds = time.monotonic() - t0
    return rep


def replay(url: str, app: str, scenario: str, rows: int, rps: float, labels: bool = False, seed: int = 0, **kw) -> ReplayReport:
    df, features, label = traffic(app, scenario, rows, seed)
    return asyncio.run(replay_async(url, app, df, features, label, rps, labels, **kw))
