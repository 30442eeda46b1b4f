"""Training: one Ray Train V2 `TorchTrainer` run of the spec's model on one pinned data version."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.config import Spec
from driftloop.data.tables import DataVersion

HYPERPARAMS = ("lr", "hidden", "dropout", "batch_size", "weight_decay", "epochs")
# what a trial reports per epoch (a classifier's accuracy, a regressor's errors), mirrored into MLflow
METRICS = ("train_loss", "val_accuracy", "test_accuracy", "val_rmse", "test_rmse", "val_mae", "test_mae")


@dataclass
class Splits:
    """Deterministic train/validation/test split of one data version."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def split_frame(df, spec: Spec) -> Splits:
    """Seeded split of a table snapshot; the same version and seed always give the same rows."""
    ds = spec.dataset
    from driftloop.features import encode_frame

    x = encode_frame(df, ds)
    y = df[ds.label].to_numpy(dtype=object if ds.string_labels else np.float64 if ds.regression else np.int64)
    order = np.random.default_rng(ds.seed).permutation(len(df))
    n_train = int(round(ds.split[0] * len(df)))
    n_val = int(round(ds.split[1] * len(df)))
    tr, va, te = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return Splits(x[tr], y[tr], x[va], y[va], x[te], y[te])


def load_splits(spec: Spec, dv: DataVersion, tail_rows: int | None = None) -> Splits:
    """The seeded split of a data version, or of its newest `tail_rows` rows (a retrain's training window)."""
    from driftloop.data import tables

    df = tables.read(dv.uri, dv.version, columns=spec.dataset.features + [spec.dataset.label], ordered=True)
    return split_frame(df.tail(tail_rows).reset_index(drop=True) if tail_rows else df, spec)


def default_hparams(spec: Spec) -> dict[str, Any]:
    t, m = spec.training, spec.model
    return {"lr": t.lr, "hidden": list(m.hidden), "dropout": m.dropout, "batch_size": t.batch_size,
            "weight_decay": t.weight_decay, "epochs": t.epochs}


def decode_hparams(spec: Spec, config: dict[str, Any]) -> dict[str, Any]:
    """Sweep-sampled values over the spec's defaults; choices of lists travel JSON-encoded."""
    hp = default_hparams(spec)
    for k in HYPERPARAMS:
        if k in config:
            v = config[k]
            hp[k] = json.loads(v) if isinstance(v, str) else v
    hp["hidden"] = [int(h) for h in (hp["hidden"] if isinstance(hp["hidden"], list) else [hp["hidden"]])]
    hp["batch_size"], hp["epochs"] = int(hp["batch_size"]), int(hp["epochs"])
    return hp


def class_index(y: np.ndarray, classes: list) -> np.ndarray:
    """Each label's position in the spec's classes (integers or names)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[v.item() if hasattr(v, "item") else v] for v in y], dtype=np.int64)


def with_fill(state: dict, n_features: int) -> dict:
    """A checkpoint written before models carried fill values (missing-value imputation) loads with zeros: such a
    model never saw a missing value."""
    import torch

    return state if "fill" in state else {**state, "fill": torch.zeros(n_features)}


TRAIN_POLL_S = "0.25"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Train worker: DDP over a sharded loader, one report (metrics + checkpoint) per epoch."""
    import ray.train
    import torch
    import torch.nn.functional as F
    from ray.train.torch import prepare_data_loader, prepare_model
    from torch.utils.data import DataLoader, TensorDataset

    from driftloop.model import Outputs, predict_outputs, scores, spec_model

    torch.set_num_threads(1)
    spec = Spec.model_validate(config["spec"])
    hp = config["hp"]
    dv = DataVersion(**config["data"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    splits = load_splits(spec, dv, config.get("tail_rows"))
    torch.manual_seed(spec.training.seed)

    model = spec_model(spec, hp["hidden"], hp["dropout"])
    model.set_standardisation(splits.x_train)
    if spec.regression:
        model.set_target_standardisation(splits.y_train)
    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("init_checkpoint"):
        ckpt = ray.train.Checkpoint(config["init_checkpoint"])
        resume_epochs = False
    else:
        resume_epochs = True
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "model.pt", weights_only=True)
            model.load_state_dict(with_fill(state["model"], spec.n_features))
            if resume_epochs:
                start_epoch = int(state["epoch"]) + 1

    ddp_model = prepare_model(model)
    if spec.regression:  # the standardised label: mean squared error weighs every scale alike
        mean, std = (float(v) for v in model.target)
        y_train = ((splits.y_train - mean) / std).astype(np.float32)
    else:
        y_train = class_index(splits.y_train, spec.dataset.classes)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(splits.x_train), torch.from_numpy(y_train)),
        batch_size=hp["batch_size"], shuffle=True, generator=torch.Generator().manual_seed(spec.training.seed),
    )
    loader = prepare_data_loader(loader)
    opt = torch.optim.Adam(ddp_model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])

    for epoch in range(start_epoch, hp["epochs"]):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        ddp_model.train()
        total, n = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad()
            out = ddp_model(xb)
            loss = F.mse_loss(out[:, 0], yb) if spec.regression else F.cross_entropy(out, yb)
            loss.backward()
            opt.step()
            total += float(loss) * len(yb)
            n += len(yb)
        plain = model  # prepare_model wraps in DDP; `model` still holds the shared parameters
        proba_model = Outputs(plain).eval()
        metrics = {"epoch": epoch, "train_loss": total / max(n, 1), "resumed_from_epoch": start_epoch}
        for split, x, y in (("val", splits.x_val, splits.y_val), ("test", splits.x_test, splits.y_test)):
            metrics.update({f"{split}_{k}": v for k, v in scores(predict_outputs(proba_model, x), y, spec).items()})
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            last = epoch == hp["epochs"] - 1
            if rank == 0 and (last or (epoch + 1) % spec.training.checkpoint_every == 0):
                torch.save({"model": plain.state_dict(), "epoch": epoch, "hp": hp}, Path(tmp) / "model.pt")
                (Path(tmp) / "hp.json").write_text(json.dumps(hp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def make_trainer(
    spec: Spec,
    dv: DataVersion,
    hp: dict[str, Any],
    name: str,
    storage_path: str,
    callbacks: list | None = None,
    extra: dict[str, Any] | None = None,
):
    """A TorchTrainer with fractional-CPU workers, per-epoch checkpoints and worker-failure retries."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Train V2 hands each ray.train.report to its controller through a one-slot queue that the controller drains
    # when it polls the workers, every 2 s by default: every epoch after the first waited up to 2 s for it (a
    # small model's epoch takes ~0.05 s). Polling every 0.25 s costs a few actor calls a second and cut an
    # 8-epoch, 2-worker run from 38 s to 23 s here. Train propagates the variable from the process that calls fit().
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    # Train V2 starts a preemption-watcher actor per run, which polls Ray for node drains (spot reclaims): one more
    # process to start beside the worker group's. On one machine nothing is drained, and its start-up competed with
    # the first epochs: an 8-epoch, 2-worker run took 19-21 s with it and 15.6-16.2 s without. Off unless you set
    # RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 (cluster.yaml and the KubeRay manifests do, for spot nodes).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    t = spec.training
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "data": dv.as_dict(), "hp": hp, **(extra or {})},
        torch_config=TorchConfig(backend="gloo" if not t.use_gpu else "nccl"),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def load_checkpoint_model(spec: Spec, checkpoint_dir: str | Path):
    """Rebuild the trained classifier (eval mode) from a Train checkpoint directory (weights only, no pickle)."""
    import torch

    from driftloop.model import spec_model

    state = torch.load(Path(checkpoint_dir) / "model.pt", weights_only=True)
    hp = state["hp"]
    model = spec_model(spec, hp["hidden"], hp["dropout"])
    model.load_state_dict(with_fill(state["model"], spec.n_features))
    return model.eval(), hp, int(state["epoch"])
