"""The Ray Serve application of one model: a Predictor ingress (FastAPI) and its DriftMonitor.

The registry is the source of truth: replicas poll the `champion` alias and swap model (and the
monitor its detectors, with fresh windows) in place when it moves, so a promotion by any path —
`driftloop promote`, `rollback`, a retraining job — reaches apps started by `serve run` or
`serve deploy` without a redeploy and without a failed request.
"""

from pathlib import Path
from typing import Any

from driftloop.config import load_spec
from driftloop.serving.common import KNOWN_IDS
from driftloop.serving.ingress import Predictor
from driftloop.serving.monitor import DriftMonitor

__all__ = ["DriftMonitor", "KNOWN_IDS", "Predictor", "build"]


def _resolve(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    alt = Path(__file__).resolve().parents[3] / path  # the project root, for `serve deploy` from elsewhere
    return alt if alt.is_file() else p


def build(args: dict[str, Any]):
    """Serve application builder (`import_path: driftloop.serving.app:build`, args: {spec: configs/x.yaml})."""
    spec = load_spec(_resolve(str(args["spec"])))
    monitoring = bool(args.get("monitoring", True))
    d = spec.model_dump(mode="json")
    return Predictor.bind(DriftMonitor.bind(d), d, monitoring, int(args.get("max_batch_rows", 256)),
                          args.get("feedback_rate"), args.get("feedback_burst"))
