"""MLflow tracking and registry: the model bundle (model + detectors), the promotion gate, aliases.

Every decision is recorded on the model version as tags: `gate.decision` (promoted, refused,
manual, rollback), both scores and the data version they were computed on.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.config import Spec
from driftloop.data.tables import DataVersion
from driftloop.errors import LoopError
from driftloop.features import input_digest
from driftloop.gate import Decision, decide
from driftloop.settings import Settings

CHAMPION = "champion"
HISTORY_TAG = "champion_history"        # legacy: one JSON list, read-modify-written (concurrent moves lost entries)
EVENT_PREFIX = HISTORY_TAG + "."        # one registered-model tag per alias move: `champion_history.<ms>-<hex>`
HISTORY_MAX = 50
ARCHIVED_TAG = "driftloop.archived"     # model-version tag: the ISO UTC time the version was archived
WEIGHTS = "weights/model.pt"            # a version's state dict and constructor arguments, beside its export archive


def configure(settings: Settings) -> None:
    """Point MLflow at the settings' tracking store (sqlite under DRIFTLOOP_HOME by default)."""
    import mlflow

    settings.ensure().ensure_tracking_store()
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)


def client(settings: Settings):
    from mlflow import MlflowClient

    configure(settings)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def experiment_id(settings: Settings, spec_name: str) -> str:
    """The experiment `driftloop-<model>`; local stores keep artifacts under DRIFTLOOP_HOME."""
    c = client(settings)
    name = f"driftloop-{spec_name}"
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not settings.tracking_uri.startswith(("http://", "https://", "databricks")):
        location = (settings.artifacts_dir / spec_name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def log_data_input(c, run_id: str, spec: Spec, dv: DataVersion, sample) -> None:
    """Record the data version as an MLflow dataset input (table URI, Delta version, digest)."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag

    ds = mlflow.data.from_pandas(sample, source=dv.uri, targets=spec.dataset.label,
                                 name=f"{spec.dataset.table}@v{dv.version}", digest=dv.digest.removeprefix("sha256:"))
    c.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])])
    for k, v in {"data.uri": dv.uri, "data.version": dv.version, "data.digest": dv.digest, "data.rows": dv.rows}.items():
        c.set_tag(run_id, k, str(v))


@dataclass
class Bundle:
    """A registered model version with where its model and detectors live."""

    name: str
    version: int
    run_id: str
    model_uri: str
    tags: dict[str, str]


def register_bundle(
    settings: Settings, spec: Spec, classifier, detectors_dir: Path, dv: DataVersion, run_id: str,
    metrics: dict[str, float], extra_tags: dict[str, str] | None = None,
) -> Bundle:
    """Log the model once (torch.export format) with its detectors as artifacts of the same model, and register it.
    Its weights go beside them (`weights/model.pt`: the state dict and the constructor's arguments, tensors and
    plain values only), which is what driftloop itself loads: see load_model."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from driftloop.model import Outputs, predict_outputs, save_weights

    configure(settings)
    c = client(settings)
    proba_model = Outputs(classifier).eval()
    example = np.zeros((2, spec.n_features), dtype=np.float32)
    signature = infer_signature(example, predict_outputs(proba_model, example))
    meta = {"features": spec.dataset.features, "classes": spec.dataset.classes, "label": spec.dataset.label,
            "data": dv.as_dict(), "spec": spec.model_dump(mode="json")}
    with mlflow.start_run(run_id=run_id):
        # validate_serving_input=False: MLflow would load the logged model back and predict the example; the gate
        # loads this version from the registry and scores it on the evaluation rows before anything serves it
        info = mlflow.pytorch.log_model(proba_model, name="model", input_example=example, signature=signature,
                                        metadata=meta, serialization_format="pt2", pip_requirements=[],
                                        validate_serving_input=False)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(detectors_dir, Path(tmp) / "detectors")
        save_weights(classifier, Path(tmp) / WEIGHTS)
        c.log_model_artifacts(info.model_id, tmp)
    tags = {
        "data.uri": dv.uri, "data.version": str(dv.version), "data.digest": dv.digest, "data.rows": str(dv.rows),
        "run_id": run_id, "git_commit": git_commit() or "", "features": json.dumps(spec.dataset.features),
        "classes": json.dumps(spec.dataset.classes), "inputs.digest": input_digest(spec.dataset), "task": spec.task,
        **{f"metric.{k}": f"{v:.6f}" for k, v in metrics.items()}, **(extra_tags or {}),
    }
    try:
        c.create_registered_model(spec.name)
    except Exception as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = c.create_model_version(spec.name, source=f"models:/{info.model_id}", run_id=run_id, tags=tags, model_id=info.model_id)
    _wait_ready(c, spec.name, mv.version)
    return Bundle(spec.name, int(mv.version), run_id, f"models:/{spec.name}/{mv.version}", tags)


def _wait_ready(c, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.2)
    raise LoopError(f"model {name} version {version} did not become READY")


class RegistryUnavailable(LoopError):
    """The registry answered with an error (or not at all): never read as "no champion yet"."""


def _is_absent(err: Exception) -> bool:
    """True only for MLflow's own "no such model / no such alias" answers."""
    code = getattr(err, "error_code", "")
    msg = str(err).lower()
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in msg)


def _unavailable(settings: Settings, err: Exception) -> RegistryUnavailable:
    first = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return RegistryUnavailable(f"model registry at {settings.tracking_uri} unavailable: {first}")


def champion_version(settings: Settings, name: str) -> int | None:
    """The version the `champion` alias points at; None only when the registry says there is none.

    Any other failure (MLflow unreachable, a database error) raises RegistryUnavailable: reading an error
    as "no champion" would let the gate promote an unvalidated challenger as the "first version".
    """
    try:
        return int(client(settings).get_model_version_by_alias(name, CHAMPION).version)
    except Exception as err:
        if _is_absent(err):
            return None
        raise _unavailable(settings, err) from err


def download(settings: Settings, name: str, version: int, dst: str | Path | None = None) -> Path:
    """Download a model version's artifacts (model + detectors) to a local folder."""
    import mlflow

    configure(settings)
    target = Path(dst or tempfile.mkdtemp(prefix=f"{name}-v{version}-"))
    target.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(target)))


def _load_version(settings: Settings, name: str, version: int):
    """A version's model in memory; its download is removed at once (the gate leaves no temporary copies)."""
    with tempfile.TemporaryDirectory(prefix=f"{name}-v{version}-") as tmp:
        return load_model(download(settings, name, version, tmp))


def load_model(path: str | Path):
    """Load a downloaded model: from its weights where the version has them (torch.load with weights_only: tensors
    and plain values, never arbitrary objects), else from its torch.export archive through MLflow (versions
    registered before the weights were logged). Both give the same outputs; loading an export archive imports
    torch's compiler stack (torch._dynamo), ~3 s of CPU per process, which every replica start, swap and gate paid."""
    if (Path(path) / WEIGHTS).is_file():
        from driftloop.model import load_weights

        return load_weights(Path(path) / WEIGHTS)
    import mlflow.pytorch

    return mlflow.pytorch.load_model(str(path))


# --- the promotion gate -----------------------------------------------------------------------


_clock = threading.Lock()
_last_ms = 0


def _event_key() -> str:
    """A fresh tag key; keys this process writes sort in the order it wrote them (the ms time never repeats)."""
    global _last_ms
    with _clock:
        _last_ms = max(int(time.time() * 1000), _last_ms + 1)
        ms = _last_ms
    return f"{EVENT_PREFIX}{ms:013d}-{secrets.token_hex(3)}"


def _replay(name: str, tags: dict[str, str]) -> list[int]:
    """The champion stack (oldest first): the legacy JSON list, then the alias-move events in key order."""
    try:
        stack = [int(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))][-HISTORY_MAX:]
    except (ValueError, TypeError) as err:
        raise LoopError(f"{name}: unreadable tag {HISTORY_TAG}={tags[HISTORY_TAG][:100]!r}") from err
    for key in sorted(k for k in tags if k.startswith(EVENT_PREFIX)):
        try:
            ev = json.loads(tags[key])
            v, op = int(ev["v"]), ev["op"]
        except (ValueError, TypeError, KeyError) as err:
            raise LoopError(f"{name}: unreadable champion history event {key}={tags[key][:100]!r}") from err
        if op == "rollback" and v in stack:  # back to v: drop everything after its last occurrence
            stack = stack[: len(stack) - stack[::-1].index(v)]
        elif op in ("promote", "manual", "rollback"):
            stack.append(v)
        else:
            raise LoopError(f"{name}: unknown op in champion history event {key}={tags[key][:100]!r}")
        stack = stack[-HISTORY_MAX:]
    return stack


def _history(c, name: str) -> list[int]:
    return _replay(name, c.get_registered_model(name).tags)


def champion_history(settings: Settings, name: str) -> list[int]:
    """The champions, oldest first (at most the last 50), as alias moves and rollbacks left them."""
    return _history(client(settings), name)


def _move_alias(c, name: str, version: int, op: str = "promote") -> None:
    """Move the alias, then append one event under a fresh key: nothing is read-modify-written."""
    c.set_registered_model_alias(name, CHAMPION, str(version))
    c.set_registered_model_tag(name, _event_key(), json.dumps({"v": int(version), "op": op}))


def record_decision(c, name: str, version: int, decision: str, reason: str, challenger: float | None,
                    champion: float | None, champion_version: int | None, data: str) -> None:
    tags = {"gate.decision": decision, "gate.reason": reason, "gate.data": data,
            "gate.challenger_score": "" if challenger is None else f"{challenger:.6f}",
            "gate.champion_score": "" if champion is None else f"{champion:.6f}",
            "gate.champion_version": "" if champion_version is None else str(champion_version),
            "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, v)


def gate_and_promote(settings: Settings, spec: Spec, version: int, x_eval: np.ndarray, y_eval: np.ndarray,
                     eval_label: str, tie_promotes: bool = False) -> Decision:
    """Score challenger and champion on the same evaluation rows; move the alias only if the gate passes."""
    from driftloop.model import predict_outputs, scores

    c = client(settings)
    metric = spec.gate_metric
    champ = champion_version(settings, spec.name)  # raises on a registry error: the gate refuses, never "first version"
    ch_score = scores(predict_outputs(_load_version(settings, spec.name, version), x_eval), y_eval, spec)[metric]
    champ_score = None
    if champ is not None and champ != version:
        champ_score = scores(predict_outputs(_load_version(settings, spec.name, champ), x_eval), y_eval, spec)[metric]
    d = decide(ch_score, champ_score, spec.retraining.gate.min_improvement, tie_promotes, metric)
    if d.promote:
        now = champion_version(settings, spec.name)
        if now != champ:  # promoted by someone else while we scored: our comparison is stale
            d = Decision(False, f"champion moved from {champ} to {now} during the gate", ch_score, champ_score)
        else:
            _move_alias(c, spec.name, version)
    record_decision(c, spec.name, version, "promoted" if d.promote else "refused", d.reason, ch_score, champ_score, champ, eval_label)
    return d


def promote(settings: Settings, name: str, version: int, reason: str = "manual", force: bool = False) -> None:
    """Force the champion alias onto a version (recorded as manual); an archived one only with `force` (it is
    unarchived: it serves again)."""
    c = client(settings)
    mv = c.get_model_version(name, str(version))  # raises for an unknown version
    archived = mv.tags.get(ARCHIVED_TAG)
    if archived and not force:
        raise LoopError(f"{name} version {version} is archived (on {archived}); promote it with force "
                        f"(`driftloop promote --force`) to serve it again")
    prev = champion_version(settings, name)
    _move_alias(c, name, version, "manual")
    if archived:
        c.delete_model_version_tag(name, str(version), ARCHIVED_TAG)
    record_decision(c, name, version, "manual", reason, None, None, prev, "")


def rollback(settings: Settings, name: str) -> int:
    """Move the champion back to the previous champion; returns the version now serving."""
    c = client(settings)
    hist = _history(c, name)
    current = champion_version(settings, name)
    previous = [v for v in hist if v != current]
    if not previous:
        raise LoopError(f"{name}: no previous champion to roll back to")
    target = previous[-1]
    _move_alias(c, name, target, "rollback")
    if c.get_model_version(name, str(target)).tags.get(ARCHIVED_TAG):  # serving again: no longer archived
        c.delete_model_version_tag(name, str(target), ARCHIVED_TAG)
    record_decision(c, name, target, "rollback", f"rolled back from version {current}", None, None, current, "")
    return target


def _all_versions(c, name: str) -> list:
    out, token = [], None
    while True:
        page = c.search_model_versions(f"name='{name}'", page_token=token)
        out += page
        token = page.token
        if not token:
            return out


def archive_old(settings: Settings, name: str, keep_versions: int, keep_champions: int, dry_run: bool = False) -> list[int]:
    """Tag as archived (`driftloop.archived`: the UTC time) the versions older than the newest `keep_versions` that are
    neither the champion, nor one of the last `keep_champions` distinct champions, nor under any other alias.

    Nothing is deleted (lineage stays). Returns the versions archived (that would be, with `dry_run`). A model the
    registry does not know has nothing to archive; any other registry error raises, never reads as "nothing to archive".
    """
    if keep_versions < 1 or keep_champions < 1:
        raise LoopError(f"keep_versions and keep_champions must be >= 1 (got {keep_versions}, {keep_champions})")
    c = client(settings)
    try:
        rm = c.get_registered_model(name)
    except Exception as err:
        if _is_absent(err):
            return []
        raise _unavailable(settings, err) from err
    recent: list[int] = []
    for v in reversed(_replay(name, rm.tags)):  # the most recent distinct champions
        if v not in recent and len(recent) < keep_champions:
            recent.append(v)
    keep = {*recent, *(int(v) for v in rm.aliases.values())}  # the champion and any other alias's version
    versions = sorted(_all_versions(c, name), key=lambda m: int(m.version))
    chosen = [int(mv.version) for mv in versions[:-keep_versions] if int(mv.version) not in keep and not mv.tags.get(ARCHIVED_TAG)]
    if not dry_run:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for v in chosen:
            c.set_model_version_tag(name, str(v), ARCHIVED_TAG, now)
    return chosen


def list_versions(settings: Settings, name: str) -> list[dict[str, Any]]:
    """Every version with its scores, data version, gate decision, whether it is champion and when it was archived."""
    c = client(settings)
    champ = champion_version(settings, name)
    rows = []
    for mv in sorted(_all_versions(c, name), key=lambda m: int(m.version)):
        t = mv.tags
        rows.append({
            "version": int(mv.version), "champion": int(mv.version) == champ,
            "test_accuracy": t.get("metric.test_accuracy", ""), "test_rmse": t.get("metric.test_rmse", ""), "data": f"{t.get('data.uri', '')}@v{t.get('data.version', '')}",
            "digest": t.get("data.digest", ""), "decision": t.get("gate.decision", ""), "reason": t.get("gate.reason", ""),
            "challenger_score": t.get("gate.challenger_score", ""), "champion_score": t.get("gate.champion_score", ""),
            "run_id": mv.run_id, "drift_event": t.get("lineage.drift_event", ""), "job_id": t.get("lineage.job_id", ""),
            "cause": t.get("lineage.cause", ""), "reference": t.get("reference.source", ""),
            "created": mv.creation_timestamp, "archived": t.get(ARCHIVED_TAG, ""),
        })
    return rows


def version_tags(settings: Settings, name: str, version: int) -> dict[str, str]:
    return dict(client(settings).get_model_version(name, str(version)).tags)
