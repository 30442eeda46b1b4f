"""The spec's torch model: an MLP that carries its own input standardisation, so it takes raw features."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MLPClassifier(nn.Module):
    """Raw features in, class logits out; mean/std are buffers so the exported model is self-contained."""

    def __init__(self, n_features: int, n_classes: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def set_standardisation(self, x: np.ndarray) -> None:
        """Fit mean/std on training features (constant columns get std 1)."""
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std < 1e-6] = 1.0
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class Probabilities(nn.Module):
    """What gets registered: raw features in, class probabilities out."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(x), dim=-1)


def build_model(n_features: int, n_classes: int, hidden: list[int], dropout: float) -> MLPClassifier:
    return MLPClassifier(n_features, n_classes, list(hidden), float(dropout))


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Class probabilities for raw feature rows from a model in eval mode that outputs probabilities."""
    out = [model(torch.as_tensor(np.asarray(x[i : i + batch], dtype=np.float32))).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def accuracy(proba: np.ndarray, y: np.ndarray, classes: list[int]) -> float:
    pred = np.asarray(classes)[proba.argmax(axis=1)]
    return float((pred == np.asarray(y)).mean()) if len(y) else float("nan")
