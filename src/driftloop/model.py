"""The spec's torch model: an MLP that carries its own input preparation (imputation of missing values,
standardisation, one-hot or embedded categories), so it takes the feature matrix of driftloop.features as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from driftloop.scoring import LOWER_IS_BETTER, label_score, predictions, scores  # noqa: F401 (their former home)


def embedding_width(k: int) -> int:
    """fastai's rule of thumb for a categorical embedding's width, capped at 16."""
    return int(min(16, round(1.6 * k ** 0.56)))


class MLPClassifier(nn.Module):
    """Feature matrix in, class logits out (or, with `regression`, the standardised predicted value: Outputs scales
    it back with the `target` buffer, the training labels' mean and std). Fill values, mean/std and the category
    layout are buffers and modules, so the exported model is self-contained. `cardinalities[j]` is 0 for a numeric
    column, else its number of categories: up to EMBED_ABOVE they are one-hot coded (an unseen code, -1, is all
    zeros), above it embedded."""

    def __init__(self, n_features: int, n_classes: int, hidden: list[int], dropout: float = 0.0,
                 cardinalities: list[int] | None = None, regression: bool = False):
        from driftloop.config import EMBED_ABOVE

        super().__init__()
        # the constructor's arguments: with the state dict they rebuild the model (registry.load_model's fast path)
        self.arch = {"n_features": n_features, "n_classes": n_classes, "hidden": [int(h) for h in hidden],
                     "dropout": float(dropout), "cardinalities": [int(k) for k in cardinalities or []] or None,
                     "regression": bool(regression)}
        self.regression = regression
        if regression:  # only then: a classifier's checkpoint keeps the keys it always had
            self.register_buffer("target", torch.tensor([0.0, 1.0]))
        card = list(cardinalities or [0] * n_features)
        self.cardinalities = card
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("fill", torch.zeros(n_features))
        self.numeric = [j for j, k in enumerate(card) if k == 0]
        self.onehot = [(j, k) for j, k in enumerate(card) if 0 < k <= EMBED_ABOVE]
        embedded = [(j, k) for j, k in enumerate(card) if k > EMBED_ABOVE]
        self.embedded = [j for j, _ in embedded]
        self.embeddings = nn.ModuleList(nn.Embedding(k + 1, embedding_width(k)) for _, k in embedded)  # 0: unseen
        self.plain = not (self.onehot or self.embedded)
        layers: list[nn.Module] = []
        width = len(self.numeric) + sum(k for _, k in self.onehot) + sum(embedding_width(k) for _, k in embedded)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def set_standardisation(self, x: np.ndarray) -> None:
        """Fit the fill values (median of a number, most frequent code of a category; 0 where a column has no value)
        and mean/std (of the filled numbers; constant columns get std 1) on training features."""
        from driftloop.features import fill_values

        x = np.asarray(x, dtype=np.float64)
        fill = fill_values(x, self.cardinalities)
        categorical = [j for j, k in enumerate(self.cardinalities) if k]
        filled = np.where(np.isnan(x), fill, x)
        mean, std = filled.mean(axis=0), filled.std(axis=0)
        std[std < 1e-6] = 1.0
        for j in categorical:
            mean[j], std[j] = 0.0, 1.0
        self.fill.copy_(torch.as_tensor(fill, dtype=torch.float32))
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def set_target_standardisation(self, y: np.ndarray) -> None:
        """Regression learns the label standardised (any scale trains alike); `target` holds its mean and std."""
        y = np.asarray(y, dtype=np.float64)
        std = float(y.std()) if len(y) else 1.0
        self.target.copy_(torch.tensor([float(y.mean()) if len(y) else 0.0, std if std > 1e-12 else 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), self.fill, x)
        z = (x - self.mean) / self.std
        if self.plain:
            return self.net(z)
        parts = [z[:, self.numeric]] if self.numeric else []
        for j, k in self.onehot:
            parts.append((x[:, j : j + 1] == torch.arange(k, dtype=x.dtype, device=x.device)).to(x.dtype))
        for j, emb in zip(self.embedded, self.embeddings):
            parts.append(emb((x[:, j] + 1).clamp(0, emb.num_embeddings - 1).long()))
        return self.net(torch.cat(parts, dim=1))


class Outputs(nn.Module):
    """What gets registered: raw features in; class probabilities out, or (regression) the predicted value, one
    column in the label's units."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.classifier(x)
        if getattr(self.classifier, "regression", False):
            return z * self.classifier.target[1] + self.classifier.target[0]
        return torch.softmax(z, dim=-1)


def build_model(n_features: int, n_classes: int, hidden: list[int], dropout: float,
                cardinalities: list[int] | None = None, regression: bool = False) -> MLPClassifier:
    return MLPClassifier(n_features, n_classes, list(hidden), float(dropout), cardinalities, regression)


def spec_model(spec, hidden: list[int], dropout: float) -> MLPClassifier:
    """The spec's model (task, features, categories) with these hyperparameters, untrained."""
    return build_model(spec.n_features, spec.n_classes, hidden, dropout, spec.dataset.cardinalities, spec.regression)


def save_weights(classifier: MLPClassifier, file: Path) -> None:
    """FILE: the classifier's state dict and constructor arguments (tensors and plain values only)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": classifier.arch, "state": classifier.state_dict()}, file)


def load_weights(file: Path) -> Outputs:
    """The registered model (an Outputs in eval mode) from save_weights' FILE, read with torch.load(weights_only=True)."""
    saved = torch.load(file, weights_only=True)
    model = MLPClassifier(**saved["arch"])
    model.load_state_dict(saved["state"])
    return Outputs(model).eval()


@torch.no_grad()
def predict_outputs(model: nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The outputs of a model in eval mode (an Outputs: class probabilities, or the predicted value) for raw rows."""
    out = [model(torch.as_tensor(np.asarray(x[i : i + batch], dtype=np.float32))).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
