"""Delta Lake tables: every append is a new version, any version reads back exactly (time travel)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa

from driftloop.settings import is_object_store


class TableError(RuntimeError):
    """A table operation that failed; nothing was written."""


def store_error(err: BaseException) -> str:
    """A Delta/object-store error as one line: deltalake chains its causes over several lines ("A -> B", then
    "↳ C" ...); keep the first, the request that failed (it names the endpoint) and the root cause."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # it colours the arrows
    lines = [ln.strip().lstrip("↳").strip() for ln in plain.splitlines() if ln.strip()] or [type(err).__name__]
    request = next((ln.split(" in ")[0] for ln in lines[1:] if ln.startswith("Error performing")), None)
    parts = [lines[0], *([request] if request else []), *([lines[-1]] if len(lines) > 1 else [])]
    return ": ".join(dict.fromkeys(parts))[:400]


@dataclass(frozen=True)
class DataVersion:
    """A pinned, reproducible reference to a table snapshot: what a model version records."""

    uri: str
    version: int
    digest: str
    rows: int

    def as_dict(self) -> dict:
        return {"uri": self.uri, "version": self.version, "digest": self.digest, "rows": self.rows}


def _table(uri: str, version: int | None = None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, version=version)
    except TableNotFoundError:
        raise TableError(f"no Delta table at {uri}") from None
    except OSError as err:  # the store did not answer (an object store down, a mount gone): not "no table"
        raise TableError(f"cannot read {uri}: {store_error(err)}") from None
    except Exception as err:  # deltalake raises a generic error for a version that does not exist
        if version is not None and "version" in str(err).lower():
            raise TableError(f"{uri}: no version {version}") from None
        raise


def exists(uri: str) -> bool:
    """Whether a Delta table is at URI; a store that does not answer is an error, never "no table"."""
    from deltalake import DeltaTable

    try:
        return DeltaTable.is_deltatable(uri)
    except OSError as err:
        raise TableError(f"cannot read {uri}: {store_error(err)}") from None


def _check_writable(uri: str) -> None:
    """A local table whose directory (or log) cannot be written fails before any data file is written."""
    import os
    from pathlib import Path

    if is_object_store(uri):
        return  # object stores report their own permission errors
    root = Path(uri.removeprefix("file://"))
    for d in (root, root / "_delta_log"):
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            what = "the table directory" if d == root else "its _delta_log directory"
            raise TableError(f"cannot write to {uri}: permission denied ({what} is read-only)")


_PARTITIONS: dict[str, list[str]] = {}  # uri -> the partition columns of the existing table (read once per process)


def _partitioning(uri: str, wanted: list[str]) -> list[str] | None:
    """The partition columns to append with: the existing table's (a table written before partitioning stays
    unpartitioned), or `wanted` for a new table."""
    if uri not in _PARTITIONS:
        if not exists(uri):
            return wanted
        _PARTITIONS[uri] = list(_table(uri).metadata().partition_columns)
    return _PARTITIONS[uri]


def append(uri: str, df: pd.DataFrame, metadata: dict[str, str] | None = None, want_version: bool = True,
           partition_by: list[str] | None = None, configuration: dict[str, str] | None = None) -> int | None:
    """Append one batch atomically as a new version and return that version's number (if asked). `partition_by`
    and `configuration` (Delta table properties) apply when this append creates the table; a partition column
    the existing table does not have is dropped from the batch."""
    from deltalake import CommitProperties, write_deltalake

    if len(df) == 0:
        raise TableError("refusing to append an empty batch")
    _check_writable(uri)
    parts = _partitioning(uri, partition_by) if partition_by else None
    if partition_by and not parts:
        df = df.drop(columns=[c for c in partition_by if c in df.columns])
    table = pa.Table.from_pandas(df, preserve_index=False)
    try:
        write_deltalake(
            uri,
            table,
            mode="append",
            partition_by=parts or None,
            configuration=configuration,
            commit_properties=CommitProperties(custom_metadata=dict(metadata or {})),
        )
    except OSError as err:
        raise TableError(f"cannot write to {uri}: {store_error(err)}") from None
    except Exception as err:
        msg = store_error(err)
        if "permission denied" in msg.lower() or "read-only" in msg.lower():
            raise TableError(f"cannot write to {uri}: permission denied") from None
        if "schema" in msg.lower():
            raise TableError(f"{uri}: batch schema does not match the table: {msg}") from None
        raise TableError(f"cannot write to {uri}: {msg}") from None
    if not want_version:
        return None
    # The version we created is the newest one that carries our commit; under concurrent writers
    # another append may already be on top, so look it up by the unique batch id.
    batch_id = (metadata or {}).get("batch_id")
    dt = _table(uri)
    if batch_id:
        for h in dt.history(limit=50):
            if h.get("batch_id") == batch_id:
                return int(h["version"])
    return int(dt.version())


def ingested_since(uri: str, after_version: int) -> tuple[int, int]:
    """(rows appended by ingests after `after_version`, the newest version): production rows that retraining
    jobs add are not new data, so a refused challenger cannot make the table "grow" into another trigger."""
    dt = _table(uri)
    rows = sum(int(h.get("rows_appended") or 0) for h in dt.history()
               if int(h["version"]) > after_version and not str(h.get("source", "")).startswith("production:"))
    return rows, int(dt.version())


def read(uri: str, version: int | None = None, columns: list[str] | None = None,
         filters: list[tuple[str, str, Any]] | None = None, ordered: bool = False) -> pd.DataFrame:
    """Read a table at a version (latest when None); `filters` (e.g. `[("request_id", "=", rid)]`) are pushed
    down to the Parquet scan. Delta's own scan returns files in no promised order (newest first here), so
    `ordered=True` reads them in commit order: rows in the order they were appended (a training window's
    "newest N rows" depends on it)."""
    dt = _table(uri, version)
    try:
        return _read(dt, columns, filters, ordered)
    except FileNotFoundError:
        raise TableError(_vacuumed(uri, dt)) from None


def _vacuumed(uri: str, dt) -> str:
    """One line for a version whose data files retention or compaction removed (vacuumed)."""
    v = int(dt.version())
    latest = _table(uri)
    marks = [h for h in latest.history(limit=200) if h.get("driftloop.readable_from")]
    if marks:
        m = marks[0]
        when = datetime.fromtimestamp(m["timestamp"] / 1000, tz=timezone.utc).isoformat(timespec="seconds")
        return (f"{uri}: version {v} can no longer be read: retention and compaction removed its data files "
                f"(vacuumed {when}); the oldest readable version is {m['driftloop.readable_from']}")
    return f"{uri}: version {v} can no longer be read: some of its data files are gone from storage"


def _read(dt, columns, filters, ordered) -> pd.DataFrame:
    if not ordered or filters is not None:
        return dt.to_pandas(columns=columns, filters=filters)
    acts = _actions(dt)
    written = {p.rsplit("/", 1)[-1]: (t, p) for p, t in zip(acts["path"], acts["modification_time"])}
    frags = sorted(dt.to_pyarrow_dataset().get_fragments(), key=lambda f: written.get(f.path.rsplit("/", 1)[-1], (0, f.path)))
    if not frags:
        return dt.to_pandas(columns=columns)
    return pa.concat_tables([f.to_table(columns=columns) for f in frags]).to_pandas()


def _actions(dt) -> dict[str, list]:
    actions = dt.get_add_actions(flatten=True)
    return actions.to_pydict() if hasattr(actions, "to_pydict") else pa.table(actions).to_pydict()


def _digest_of(dt, actions: dict[str, list]) -> str:
    h = hashlib.sha256(dt.schema().to_json().encode())
    for path, size in sorted(zip(actions["path"], actions["size_bytes"])):
        h.update(f"{path}:{size}\n".encode())
    return "sha256:" + h.hexdigest()[:16]


def digest(uri: str, version: int | None = None) -> str:
    """A stable fingerprint of one version: its schema and the immutable data files it consists of."""
    dt = _table(uri, version)
    return _digest_of(dt, _actions(dt))


def data_version(uri: str, version: int | None = None) -> DataVersion:
    """Pin a table version (latest when None) with its digest and row count (one read of its log)."""
    dt = _table(uri, version)
    actions = _actions(dt)
    rows = sum(int(r) for r in actions["num_records"])
    return DataVersion(uri=uri, version=int(dt.version()), digest=_digest_of(dt, actions), rows=rows)


def columns(uri: str, version: int | None = None) -> list[str]:
    """Column names of a version, from its schema (no data read)."""
    return [f.name for f in _table(uri, version).schema().fields]


def versions(uri: str) -> list[dict]:
    """Every version of a table: number, commit time, rows in the snapshot, rows added, digest."""
    hist = sorted(_table(uri).history(), key=lambda r: r["version"])
    out = []
    dt = _table(uri, int(hist[0]["version"])) if hist else None
    for h in hist:
        v = int(h["version"])
        dt.load_as_version(v)  # one table object moved forward: each commit of the log is read once
        acts = _actions(dt)
        dv = DataVersion(uri, v, _digest_of(dt, acts), sum(int(r) for r in acts["num_records"]))
        ts = datetime.fromtimestamp(h["timestamp"] / 1000, tz=timezone.utc)
        metrics = h.get("operationMetrics") or {}
        out.append({
            "version": v,
            "timestamp": ts.isoformat(timespec="seconds"),
            "operation": h.get("operation"),
            "rows": dv.rows,
            "added": int(metrics.get("num_added_rows", 0) or 0),
            "digest": dv.digest,
            "source": h.get("source", ""),
        })
    return out
