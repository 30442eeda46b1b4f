"""Signed request ids: /feedback tells an id that /predict issued from a forged or expired one without a lookup.

An id is `<model version>.<issue time, ms, base36>.<rows, base36>.<random hex>.<HMAC-SHA256, truncated>`; the
rows of a batch are labelled as `<id>-<i>` (the row count is signed, so `i` is checked). The key is one secret
per Serve application, shared by every Predictor replica and the DriftMonitor.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from driftloop.invalid_input import InvalidInput
from driftloop.settings import is_object_store, put_object, read_object

ID_SECRET_ENV = "DRIFTLOOP_ID_SECRET"
ID_MAX_AGE_ENV = "DRIFTLOOP_ID_MAX_AGE_S"
DEFAULT_MAX_AGE_S = 30 * 86400.0  # labels arrive days later, not months: a spec-independent default
CLOCK_SKEW_S = 300.0  # replicas' clocks may disagree a little; an id "from the future" beyond this is refused
MAC_HEX = 32  # 128 bits of the HMAC: forging one online is hopeless
MIN_SECRET_BYTES = 16
# version.issued-ms.rows.random.mac, and `-<i>` for a row of a batch
REQUEST_ID = re.compile(r"(\d{1,9})\.([0-9a-z]{1,10})\.([0-9a-z]{1,4})\.([0-9a-f]{16})\.([0-9a-f]{32})(?:-(0|[1-9]\d{0,5}))?")


@dataclass(frozen=True)
class RequestId:
    """What a verified id says: which row of which request, served by which model version, when."""

    request_id: str
    version: int
    issued_at: float
    rows: int
    row: int | None


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _mac(secret: bytes, signed: str) -> str:
    return hmac.new(secret, signed.encode(), hashlib.sha256).hexdigest()[:MAC_HEX]


def issue(secret: bytes, version: int, rows: int, now: float | None = None) -> str:
    """A fresh request id for `rows` rows served by `version`, signed so /feedback can check it for free."""
    ms = int((time.time() if now is None else now) * 1000)
    signed = f"{int(version)}.{_b36(ms)}.{_b36(int(rows))}.{secrets.token_hex(8)}"
    return f"{signed}.{_mac(secret, signed)}"


def row_ids(request_id: str, rows: int) -> list[str]:
    """The ids of a request's rows: the request id itself for one row, `<id>-<i>` for a batch."""
    return [request_id] if rows == 1 else [f"{request_id}-{i}" for i in range(rows)]


def max_age_s() -> float:
    """How long after /predict a label is accepted (DRIFTLOOP_ID_MAX_AGE_S, default 30 days)."""
    try:
        value = float(os.environ.get(ID_MAX_AGE_ENV, DEFAULT_MAX_AGE_S))
    except ValueError:
        return DEFAULT_MAX_AGE_S
    return value if value > 0 else DEFAULT_MAX_AGE_S


def verify(secret: bytes, rid: str, now: float | None = None, max_age: float | None = None) -> RequestId:
    """Check an id's signature, row index and age; raises InvalidInput (422 forged, 410 expired) at once."""
    m = REQUEST_ID.fullmatch(rid) if isinstance(rid, str) else None
    if m is None:
        raise InvalidInput("request_id: not an id issued by /predict")
    version, ts36, rows36, rand, mac, row = m.groups()
    if not hmac.compare_digest(mac, _mac(secret, f"{version}.{ts36}.{rows36}.{rand}")):
        raise InvalidInput("request_id: not an id issued by /predict (signature does not match)")
    rows, index = int(rows36, 36), None if row is None else int(row)
    if rows > 1 and index is None:
        raise InvalidInput(f"request_id: names a batch of {rows} rows; label each row by its id ({rid}-<i> from 'predictions')")
    if rows <= 1 and index is not None:
        raise InvalidInput("request_id: not an id issued by /predict (a one-row request has no row index)")
    if index is not None and index >= rows:
        raise InvalidInput(f"request_id: row {index} does not exist in a batch of {rows} rows")
    issued = int(ts36, 36) / 1000
    now = time.time() if now is None else now
    limit = max_age_s() if max_age is None else max_age
    if now - issued > limit:
        raise InvalidInput(f"request_id: expired, issued {(now - issued) / 86400:.1f} days ago; labels are accepted "
                           f"for {limit / 86400:g} days after the prediction", 410)
    if issued - now > CLOCK_SKEW_S:
        raise InvalidInput("request_id: issued in the future (clock skew between replicas?)")
    return RequestId(rid, int(version), issued, rows, index)


def issued_at_unverified(rid: str) -> float | None:
    """The issue time an id carries, without checking its signature: only a hint for bounding a log read (ids in
    the feedback table were verified when their labels were accepted); None for anything that is not an id."""
    m = REQUEST_ID.fullmatch(rid) if isinstance(rid, str) else None
    return int(m.group(2), 36) / 1000 if m else None


def _key_name(app: str) -> str:
    return f"ids-{re.sub(r'[^A-Za-z0-9_.-]', '_', app)}.key"


def app_secret(state_root: str | Path, app: str) -> bytes:
    """The application's key: DRIFTLOOP_ID_SECRET, else `ids-<app>.key` under the state root. A local state folder:
    created once by whichever replica comes first. An object store (Settings.state_root on an s3:// data root, so
    replicas on every node share it): `driftloop serve` created it before deploying (`ensure_shared_secret`);
    replicas only read it, because two nodes cannot both create an object and agree on the winner."""
    if os.environ.get(ID_SECRET_ENV):
        return os.environ[ID_SECRET_ENV].encode()
    if is_object_store(state_root):
        where = f"{str(state_root).rstrip('/')}/{_key_name(app)}"
        raw = read_object(where)
        if raw is None:
            raise RuntimeError(f"request-id key {where} does not exist: deploy with `driftloop serve`, which creates it, "
                               f"or set {ID_SECRET_ENV} on every node")
        secret = raw.strip()
    else:
        path = Path(state_root) / _key_name(app)
        if not path.exists():
            _create_secret(path)
        where, secret = str(path), path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise RuntimeError(f"request-id key {where} is too short ({len(secret)} bytes); delete it or set {ID_SECRET_ENV}")
    return secret


def ensure_shared_secret(state_root: str, app: str) -> None:
    """Create APP's key under an object-store state root unless it is there (the one writer: `driftloop serve`,
    under its deploy lock), also when this process has DRIFTLOOP_ID_SECRET (the replicas may not); a store that
    does not answer raises."""
    if not is_object_store(state_root):
        return
    where = f"{state_root.rstrip('/')}/{_key_name(app)}"
    if read_object(where) is None:
        put_object(where, secrets.token_hex(32).encode())


def _create_secret(path: Path) -> None:
    """Write the key whole under a private name (O_EXCL), then link it into place: concurrent replicas
    all end up reading the one key that won the link, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another replica won: use its key
    finally:
        tmp.unlink(missing_ok=True)
