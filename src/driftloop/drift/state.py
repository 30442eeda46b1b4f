"""Durable monitor state: one .npz file (arrays + a JSON document), replaced atomically, never pickled; on the local
disk or, under an object-store data root, one object (Settings.state_root)."""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.settings import is_object_store, put_object, read_object

META = "__meta__"


def save(where: str | Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write meta + arrays to WHERE. A local file: a temp file in the same directory, fsync, rename. An object
    (s3://...): one PUT, which replaces the object whole. Either way a reader sees the old snapshot or the new
    one, never half of one; a store that fails raises."""
    buf = io.BytesIO()
    np.savez(buf, **{META: np.frombuffer(json.dumps(meta, default=float).encode(), dtype=np.uint8)}, **arrays)
    if is_object_store(where):
        put_object(str(where), buf.getvalue())
        return
    path = Path(str(where).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # one per write, even within a process
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(where: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The last snapshot at WHERE, or None when there is none (or what is there is not a snapshot: start afresh).
    An object store that does not answer raises: that is not "no snapshot", and starting afresh would forget
    a pending trigger."""
    if is_object_store(where):
        data = read_object(str(where))
        if data is None:
            return None
        source = io.BytesIO(data)
    else:
        source = Path(str(where).removeprefix("file://"))
        if not source.is_file():
            return None
    try:
        with np.load(source, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(META).tobytes().decode())
    except (OSError, ValueError, KeyError):
        return None
    return meta, arrays
