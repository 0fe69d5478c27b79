"""Intervals and paired differences (repro.metrics.stats) against a direct computation."""

import numpy as np
import pytest
from scipy.stats import rankdata

from repro.metrics.fid import fit, frechet_distance
from repro.metrics.stats import (fid_difference, fid_interval, fid_resamples, resample_counts, samples_to_resolve,
                                 spearman_interval)


MIX = np.random.default_rng(0).normal(size=(8, 8)) / np.sqrt(8)  # one distribution; seeds draw sample sets


def _features(seed: int, n: int = 300, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)) @ MIX + shift


REFERENCE = fit(_features(99, n=2000))


def _direct_resamples(features: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Each resample as rows drawn by index, fitted and scored by clean-fid's sqrtm path."""
    idx = np.random.default_rng(seed).integers(0, len(features), size=(resamples, len(features)))
    return np.array([frechet_distance(fit(features[row]), REFERENCE) for row in idx])


def test_resampled_fids_equal_clean_fid_on_the_drawn_rows():
    x = _features(1)
    ours = fid_resamples(x, REFERENCE, resample_counts(len(x), 20, seed=5))
    np.testing.assert_allclose(ours, _direct_resamples(x, 20, seed=5), rtol=1e-9, atol=1e-9)
    # the full set (every row once) is the FID the record reports
    np.testing.assert_allclose(fid_resamples(x, REFERENCE, np.ones((1, len(x)), dtype=int))[0],
                               frechet_distance(fit(x), REFERENCE), rtol=1e-9)


def test_fid_interval_from_the_spread_of_the_direct_resamples():
    x = _features(2)
    iv = fid_interval(x, REFERENCE, resamples=50, seed=3)
    direct = _direct_resamples(x, 50, seed=3)
    fid = frechet_distance(fit(x), REFERENCE)
    assert iv["fid"] == pytest.approx(fid, rel=1e-9)
    se = direct.std(ddof=1)
    assert iv["std"] == pytest.approx(se, rel=1e-9)
    assert iv["lo"] == pytest.approx(fid - 1.959964 * se, rel=1e-6)
    assert iv["hi"] == pytest.approx(fid + 1.959964 * se, rel=1e-6) and iv["n"] == 300
    # why not a percentile interval: resampling repeats samples and raises FID above the estimate
    assert np.percentile(direct, 2.5) > fid


def test_paired_difference_is_resolved_only_when_larger_than_its_noise():
    base = _features(3)
    far = fid_difference(_features(4, shift=0.5), base, REFERENCE, resamples=100)
    assert far["resolved"] and far["lo"] > 0 and far["diff"] > 0
    near = fid_difference(_features(4, shift=0.005), base, REFERENCE, resamples=100)
    assert not near["resolved"] and near["lo"] < 0 < near["hi"]
    assert near["samples_to_resolve"] > 300 and far["samples_to_resolve"] == 300  # far: resolved at n already
    # paired: the same draws for both sets, so the difference of each resample, not of independent ones
    counts = resample_counts(300, 100)
    direct = fid_resamples(_features(4, shift=0.5), REFERENCE, counts) - fid_resamples(base, REFERENCE, counts)
    assert far["std"] == pytest.approx(direct.std(ddof=1), rel=1e-9)
    assert far["lo"] == pytest.approx(far["diff"] - 1.959964 * direct.std(ddof=1), rel=1e-6)
    with pytest.raises(ValueError, match="one size"):
        fid_difference(base[:10], base, REFERENCE)


def test_samples_to_resolve_scales_with_the_squared_noise_to_signal():
    assert samples_to_resolve(1.0, 1.0, 1000) == 3842  # 1000 * 1.96^2
    assert samples_to_resolve(2.0, 1.0, 1000) == 1000  # already resolved: no fewer than measured
    assert samples_to_resolve(0.0, 1.0, 1000) is None


def test_spearman_interval_against_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=9)
    y = x + rng.normal(scale=0.7, size=9)
    iv = spearman_interval(x, y, resamples=100, seed=1)

    def rho(a, b):
        return np.corrcoef(rankdata(a), rankdata(b))[0, 1]

    assert iv["rho"] == pytest.approx(rho(x, y))
    idx = np.random.default_rng(1).integers(0, 9, size=(100, 9))
    direct = [rho(x[r], y[r]) for r in idx if np.ptp(x[r]) and np.ptp(y[r])]
    assert iv["resamples"] == len(direct)
    assert iv["lo"] == pytest.approx(np.percentile(direct, 2.5))
    assert iv["hi"] == pytest.approx(np.percentile(direct, 97.5))
    assert spearman_interval(x[:2], y[:2]) is None
