"""Durable monitor state: one .npz file (arrays + a JSON document), replaced atomically, never pickled."""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

META = "__meta__"


def save(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write meta + arrays to PATH: a temp file in the same directory, fsync, rename — a reader sees the old
    snapshot or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **{META: np.frombuffer(json.dumps(meta, default=float).encode(), dtype=np.uint8)}, **arrays)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # one per write, even within a process
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The last snapshot at PATH, or None when there is none (or it cannot be read: start afresh)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(META).tobytes().decode())
    except (OSError, ValueError, KeyError):
        return None
    return meta, arrays
