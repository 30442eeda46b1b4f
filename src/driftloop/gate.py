"""From a trained checkpoint to a gated model version: evaluate it, fit its drift detectors on reference rows it
never trained on, register model + detectors as one version, and let the gate decide on the alias (`decide`: the
rule; registry.gate_and_promote: the scoring and the alias move). The sweep, a
retraining job and the backtest all end here, so a model version means the same thing whichever made it."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.config import Spec
from driftloop.data.tables import DataVersion
from driftloop.settings import Settings


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_score: float
    champion_score: float | None


def decide(challenger: float, champion: float | None, min_improvement: float, tie_promotes: bool = False,
           metric: str = "accuracy") -> Decision:
    """Promote the first version; otherwise only a challenger that beats the champion by the margin (higher accuracy,
    or lower rmse / mae).

    With a margin of 0 a tie is refused: replacing a model costs a swap and buys nothing. Unless the challenger
    carries the drift reference of the regime now served (`tie_promotes`): then the swap buys detectors that stop
    flagging traffic both models handle equally well.
    """
    from driftloop.scoring import LOWER_IS_BETTER

    if champion is None:
        return Decision(True, "first version", challenger, None)
    if np.isnan(challenger):
        return Decision(False, "challenger score is NaN", challenger, champion)
    gain = champion - challenger if metric in LOWER_IS_BETTER else challenger - champion
    ok = gain >= min_improvement if (min_improvement > 0 or tie_promotes) else gain > min_improvement
    verdict = ("ties (and carries the current regime's drift reference)" if ok and gain == 0 else "beats") if ok else "does not beat"
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    return Decision(ok, f"{verdict} champion on {metric}: {challenger:.4f} vs {champion:.4f} ({better} is better; gain "
                        f"{gain:+.4f}, needs {min_improvement:+.4f})", challenger, champion)


def register_and_gate(spec: Spec, settings: Settings, dv: DataVersion, checkpoint_dir: Path, run_id: str,
                    extra_tags: dict[str, str] | None = None, x_eval: np.ndarray | None = None,
                    y_eval: np.ndarray | None = None, eval_label: str | None = None,
                    reference=None, tail_rows: int | None = None) -> dict[str, Any]:
    """From a trained checkpoint: evaluate, fit detectors on unseen reference rows, register, gate.

    `reference` (a drift.reference.Reference) replaces the table's held-out splits as the detectors'
    reference: a retrain for a new regime passes the newest served rows of that regime.
    """
    from driftloop import registry
    from driftloop.drift.detectors import fit_detectors
    from driftloop.drift.reference import Reference
    from driftloop.model import Outputs, predict_outputs, scores
    from driftloop.train import load_checkpoint_model, load_splits

    classifier, hp, epoch = load_checkpoint_model(spec, checkpoint_dir)
    splits = load_splits(spec, dv, tail_rows)
    proba_model = Outputs(classifier).eval()
    metrics = {f"{split}_{k}": v for split, x, y in (("test", splits.x_test, splits.y_test), ("val", splits.x_val, splits.y_val))
               for k, v in scores(predict_outputs(proba_model, x), y, spec).items()}
    c = registry.client(settings)
    for k, v in metrics.items():
        c.log_metric(run_id, k, v)
    # The detectors' reference is data the model never trained on (by default validation + test), so that
    # traffic like it looks like the reference to output-based tests such as BBSD.
    recent_reference = reference is not None and reference.x is not None
    if reference is None or reference.x is None:
        why = f" ({reference.source})" if reference is not None else ""
        reference = Reference(np.concatenate([splits.x_val, splits.x_test]), f"{dv.uri}@v{dv.version} validation + test splits{why}")
    x_ref = reference.x
    with tempfile.TemporaryDirectory() as tmp:
        det_dir = fit_detectors(spec.drift, x_ref, predict_outputs(proba_model, x_ref), spec.dataset.features,
                                Path(tmp) / "detectors", seed=spec.dataset.seed,
                                cardinalities=spec.dataset.cardinalities, imputed=spec.dataset.imputed)
        tags = {"hparams": json.dumps(hp), "reference.source": reference.source[:250],
                "reference.rows": str(min(len(x_ref), spec.drift.reference_rows)), **(extra_tags or {})}
        bundle = registry.register_bundle(settings, spec, classifier, det_dir, dv, run_id, metrics, tags)
    if x_eval is None:
        x_eval, y_eval, eval_label = splits.x_test, splits.y_test, f"{dv.uri}@v{dv.version} test split"
    decision = registry.gate_and_promote(settings, spec, bundle.version, x_eval, y_eval, eval_label, recent_reference)
    return {"version": bundle.version, "promoted": decision.promote, "reason": decision.reason, "metrics": metrics,
            "challenger_score": decision.challenger_score, "champion_score": decision.champion_score}
