import numpy as np
import pytest

from driftloop.data import examples


@pytest.fixture(scope="module")
def digits():
    return examples.builtin("digits")


def test_digits_split_and_rainfall_order(digits):
    assert len(digits.reference) == examples.DIGITS_REFERENCE_ROWS
    assert len(digits.reference) + len(digits.pool) == 1797
    rain = examples.builtin("rainfall")
    assert len(rain.frame) == 18159 and rain.frame["day"].is_monotonic_increasing
    assert set(rain.frame["rain"].unique()) == {0, 1}


@pytest.mark.parametrize("kind", examples.CORRUPTIONS)
def test_severity_zero_is_identity_and_higher_moves_further(digits, kind):
    x = digits.pool[examples.DIGITS_FEATURES].to_numpy()
    assert np.array_equal(examples.corrupt(x, kind, 0), x)
    dist = [np.abs(examples.corrupt(x, kind, s, seed=3) - x).mean() for s in range(6)]
    assert dist[0] == 0
    assert all(b > a for a, b in zip(dist, dist[1:])), dist
    out = examples.corrupt(x, kind, 5)
    assert out.min() >= 0 and out.max() <= 16 and out.shape == x.shape


def test_stream_has_known_onset(digits):
    s = examples.digits_stream(digits.pool, 600, onset=400, kind="noise", severity=3, seed=1)
    clean = examples.digits_stream(digits.pool, 600, onset=None, seed=1)
    x, c = s[examples.DIGITS_FEATURES].to_numpy(), clean[examples.DIGITS_FEATURES].to_numpy()
    assert np.array_equal(x[:400], c[:400])
    assert (np.abs(x[400:] - c[400:]).sum(axis=1) > 0).all()
    assert np.array_equal(s["digit"], clean["digit"])


def test_unknown_corruption_and_severity(digits):
    x = digits.pool[examples.DIGITS_FEATURES].to_numpy()[:3]
    with pytest.raises(ValueError, match="unknown corruption"):
        examples.corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity must be 0..5"):
        examples.corrupt(x, "noise", 6)
