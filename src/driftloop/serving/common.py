"""What the Serve deployments of an application share: settings read from the environment, bearer tokens, one-line
errors, the request body limit, loading a champion, and the champion watcher both deployments poll."""

import asyncio
import hmac
import logging
import os
import time
import uuid
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from driftloop.serving.validation import InvalidInput, read_limited

log = logging.getLogger("ray.serve")
POLL_S = float(os.environ.get("DRIFTLOOP_POLL_S", "1.0"))
# Served rows travel predictor -> monitor in micro-batches, and monitor -> inference log (one Delta commit)
# in larger ones: fewer RPCs and commits per request is most of what monitoring costs a 2-core machine.
HANDOFF_S = float(os.environ.get("DRIFTLOOP_HANDOFF_S", "0.2"))
LOG_FLUSH_S = float(os.environ.get("DRIFTLOOP_LOG_FLUSH_S", "2.0"))
ADMIN_TOKEN_ENV = "DRIFTLOOP_ADMIN_TOKEN"
PREDICT_TOKEN_ENV = "DRIFTLOOP_PREDICT_TOKEN"
# Serve learns that a replica process died from that replica's next health check (Ray's default period is
# 10 s), so a crash went unnoticed for up to ~11 s before a replacement was started; a check is one cheap
# actor call, so check every 2 s.
HEALTH_CHECK_PERIOD_S = 2.0
NEW_DATA_CHECK_S = float(os.environ.get("DRIFTLOOP_NEW_DATA_CHECK_S", "10"))  # one read of the table's log per check
# Bounds of the monitor's memory: ids it answers /feedback for from memory (older ones are looked up in the inference
# log, filtered by id), and served rows held for the inference log while Delta writes fail (oldest dropped, counted).
KNOWN_IDS = int(os.environ.get("DRIFTLOOP_KNOWN_IDS", "50000"))
LOG_BUFFER_ROWS = int(os.environ.get("DRIFTLOOP_LOG_BUFFER_ROWS", "100000"))
# /feedback per client host and Predictor replica: a token bucket (labels/s, burst).
FEEDBACK_RATE = float(os.environ.get("DRIFTLOOP_FEEDBACK_RATE", "200"))
FEEDBACK_BURST = float(os.environ.get("DRIFTLOOP_FEEDBACK_BURST", "400"))
# A row reaches the monitor within a hand-off period of its id being issued; only that young an unknown id is
# worth waiting for. Labels of ids issued before the monitor started (plus a margin for a draining predecessor
# and clock skew) are looked up in the feedback table; later ones all went through this replica's memory.
FRESH_ID_S = 5.0
LABEL_COVER_MARGIN_S = 30.0


def _token(name: str) -> str | None:
    """A bearer token from NAME or from the file named by NAME_FILE; None when not configured."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path and Path(path).is_file():
        return Path(path).read_text().strip() or None
    return None


def _authorised(request: Request, expected: str | None) -> bool:
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _app_name() -> str:
    """The Serve application this replica belongs to ("default" outside Serve): it names the request-id key."""
    try:
        return serve.get_replica_context().app_name
    except Exception:
        return "default"


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body within MAX_BYTES: a declared length is checked up front, a chunked body as it streams in."""
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise InvalidInput("content-length: not a number", 400) from None
    if length > max_bytes:
        raise InvalidInput(f"body of {length} bytes exceeds the limit of {max_bytes} bytes", 413)
    return await read_limited(request.stream(), max_bytes)


def check_inputs(settings, name: str, version: int, digest: str, task: str | None = None) -> None:
    """Refuse to serve a version whose input layout (features, category lists) is not the spec's: its codes would
    mean other categories; or, with `task`, a version of the other task (a classifier's first probability is no
    predicted value). Versions registered before the digest (or the task tag) existed carry none and pass."""
    from driftloop import registry
    from driftloop.errors import LoopError

    tags = registry.client(settings).get_model_version(name, str(version)).tags or {}
    theirs = tags.get("inputs.digest")
    if theirs and theirs != digest:
        raise LoopError(f"model {name!r} v{version} was trained on other inputs than the spec names (its features or "
                        f"category lists changed since, digest {theirs} vs {digest}): serve it with the spec it was "
                        "trained with, or retrain on this one")
    if task and tags.get("task") and tags["task"] != task:
        raise LoopError(f"model {name!r} v{version} is a {tags['task']} model and the spec's task is {task}: serve it with "
                        "the spec it was trained with, or retrain on this one")


def _load_champion(settings, name: str, version: int, inputs: str | None = None, task: str | None = None):
    """Download and load a model version, off the event loop; the downloaded copy is deleted once loaded
    (the node's disk is only a cache, and a copy per replica start and swap would pile up). With `inputs` (the
    spec's input digest) and `task`, a version trained on another input layout or for another task is refused before
    it is downloaded."""
    import shutil

    from driftloop import registry

    if inputs is not None:
        check_inputs(settings, name, version, inputs, task)
    path = registry.download(settings, name, version, settings.home / "serving" / f"{name}-v{version}-{uuid.uuid4().hex[:6]}")
    try:
        return registry.load_model(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


class PollLoops:
    """The background loops of a deployment replica (`_poll_alias` and `_flush_loop`, defined by the class), started
    on the first request or the first health check, whichever comes first."""

    def _ensure_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_alias()), loop.create_task(self._flush_loop())]

    async def check_health(self) -> None:
        """Serve's periodic health check also starts the poll loops, so an app with no traffic yet still follows
        the champion alias, new data and retraining jobs."""
        self._ensure_tasks()


class ChampionWatcher:
    """The `champion` alias as a replica sees it, one for each Predictor and DriftMonitor replica (both poll it).
    A registry error is kept, with the time it started, for `/drift` and `/healthz` ("registry unreachable"),
    and raised: never read as "no champion"."""

    def __init__(self, settings, name: str):
        self.settings, self.name = settings, name
        self.error: dict | None = None

    def champion(self) -> int | None:
        """The champion's version; None only when the registry says there is none."""
        from driftloop import registry

        try:
            v = registry.champion_version(self.settings, self.name)
        except registry.RegistryUnavailable as err:
            self.error = {"error": str(err), "since": (self.error or {}).get("since", time.time())}
            raise
        self.error = None
        return v

    def moved(self, current: int | None) -> int | None:
        """The champion's version when it is not CURRENT, else None."""
        v = self.champion()
        return v if v is not None and v != current else None

