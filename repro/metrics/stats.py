"""How sure a number is: bootstrap intervals over a sample set, paired differences between two runs, and an interval
for Spearman's rho over a table's rows.

One rule for every run of every study (never chosen per row): a 95% bootstrap interval from `RESAMPLES` = 200
resamples drawn from a fixed seed. FIDs and their differences get the normal interval F +- 1.96 SE, SE the std of
the resamples, centred on the number as measured: a resample drawn with replacement repeats samples, which raises
its FID (FID-N is biased by ~1/N), so the resamples sit above the estimate -- for a set at FID 0.049 every one of
50 did -- and percentile or basic intervals would exclude the measured FID-N. The spread is what varies between
sample sets. Spearman's rho uses the percentile interval (bounded, no such bias).

- **Within a run** (`fid_interval`): N of the N generated feature vectors drawn with replacement, the reference
  statistics held fixed. It measures the noise of a finite sample set (FID-1K moves with which 1,000 images were
  drawn), not the noise of training; that is the seeds' std, reported beside it.
- **Paired** (`fid_difference`): the same resampled indices for both runs. The trainer and the sampler use common
  random numbers -- sample i of every run of a study starts from the same noise with the same label -- so most of
  each set's sampling noise cancels in the difference. A difference is *resolved* when its interval excludes 0.
- **Samples to resolve** (`samples_to_resolve`): the bootstrap std of a difference shrinks as 1/sqrt(N), so an
  observed difference d with std s at N samples needs about N (z s / d)^2 samples for its interval to exclude 0
  (the same formula with the seeds' std gives the seeds).
- **Over seeds** (`over_seeds`): a step's paired differences of several training seeds (each on the same sampling
  noise) are averaged; the interval is mean +- z s / sqrt(n), s their std, and `samples_to_resolve` with s gives
  the seeds. With one seed, the sample set's bootstrap interval is all there is, and it says nothing of training
  noise: the report says which of the two an interval is.
- **Spearman's rho** (`spearman_interval`): rows drawn with replacement; resamples whose ranks are constant have
  no rho and are left out (their count is returned).

Each resample's FID is the Frechet distance computed through the eigenvalues of R S R, R the reference
covariance's symmetric square root (computed once): tr sqrt(S S_r) = sum sqrt(eig(R S R)). It agrees with
clean-fid's `sqrtm` path to float64 rounding (tested), at a fraction of the cost.
"""

from __future__ import annotations

import math

import numpy as np

from repro.metrics.fid import Gaussian

RESAMPLES = 200
LEVEL = 0.95
SEED = 0


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class _Frechet:
    """FID of many feature sets against one reference Gaussian."""

    def __init__(self, reference: Gaussian):
        self.mu = np.asarray(reference.mu, dtype=np.float64)
        self.root = _psd_sqrt(np.asarray(reference.sigma, dtype=np.float64))
        self.trace = float(np.trace(reference.sigma))

    def __call__(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        inner = self.root @ sigma @ self.root
        eig = np.linalg.eigvalsh((inner + inner.T) / 2)
        root_trace = np.sqrt(np.clip(eig, 0, None)).sum()
        return float(((mu - self.mu) ** 2).sum() + np.trace(sigma) + self.trace - 2 * root_trace)


def _moments(features: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of the resample that takes row i counts[i] times (as np.cov of those rows)."""
    n = counts.sum()
    mu = counts @ features / n
    centred = features - mu
    return mu, (centred.T * counts) @ centred / (n - 1)


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) how often each of n items is drawn; the same seed gives the same draws (pairing)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx])


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def z_value(level: float = LEVEL) -> float:
    """The two-sided normal quantile of `level` (1.96 for 95%)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def _normal_interval(values: np.ndarray, estimate: float, level: float) -> tuple[float, float, float]:
    """(lo, hi, se): estimate +- z se, se the resamples' std."""
    se = float(values.std(ddof=1))
    return estimate - z_value(level) * se, estimate + z_value(level) * se, se


def fid_resamples(features: np.ndarray, reference: Gaussian | _Frechet, counts: np.ndarray) -> np.ndarray:
    """The FID of each resample (a row of `counts`); the last is the full set's when `counts` ends with ones."""
    f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    frechet = reference if isinstance(reference, _Frechet) else _Frechet(reference)  # the reference's root once
    return np.array([frechet(*_moments(f, c)) for c in counts])


def _with_full_set(counts: np.ndarray) -> np.ndarray:
    return np.vstack([counts, np.ones(counts.shape[1], dtype=counts.dtype)])


def fid_interval(features: np.ndarray, reference: Gaussian, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> dict:
    """The bootstrap interval of a sample set's FID: {fid, lo, hi, std, level, resamples, n, method}."""
    *values, estimate = fid_resamples(features, reference, _with_full_set(resample_counts(len(features), resamples,
                                                                                          seed)))
    lo, hi, se = _normal_interval(np.array(values), estimate, level)
    return {"fid": estimate, "lo": lo, "hi": hi, "std": se, "level": level, "resamples": resamples,
            "n": len(features),
            "method": f"FID +- z SE, SE of a bootstrap over the samples ({resamples} resamples, seed {seed})"}


def fid_difference(features: np.ndarray, base: np.ndarray, reference: Gaussian, resamples: int = RESAMPLES,
                   seed: int = SEED, level: float = LEVEL) -> dict:
    """FID(features) - FID(base), paired (sample i of both sets shares its noise and label), with its interval and
    whether it is resolved (the interval excludes 0)."""
    if len(features) != len(base):
        raise ValueError(f"a paired difference needs sample sets of one size, got {len(features)} and {len(base)}")
    counts = _with_full_set(resample_counts(len(features), resamples, seed))
    frechet = _Frechet(reference)
    *diffs, diff = fid_resamples(features, frechet, counts) - fid_resamples(base, frechet, counts)
    lo, hi, std = _normal_interval(np.array(diffs), diff, level)
    return {"diff": diff, "lo": lo, "hi": hi, "std": std, "level": level, "resamples": resamples,
            "n": len(features), "resolved": bool(lo > 0 or hi < 0),
            "samples_to_resolve": samples_to_resolve(diff, std, len(features), level)}


def samples_to_resolve(diff: float, std: float, n: int, level: float = LEVEL) -> int | None:
    """About how many samples (or seeds, given the seeds' std) make an interval of this difference exclude 0: the
    std shrinks as 1/sqrt(n). None when the difference is 0 (no number of samples resolves it)."""
    if diff == 0 or not math.isfinite(diff) or not math.isfinite(std):
        return None
    return max(n, math.ceil(n * (z_value(level) * std / abs(diff)) ** 2))


def spearman_interval(x, y, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict | None:
    """Spearman's rho of paired rows and its bootstrap interval over rows; None under 3 rows."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return None
    rho = float(spearmanr(x, y).statistic)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    values = []
    for row in idx:
        a, b = x[row], y[row]
        if np.ptp(a) == 0 or np.ptp(b) == 0:  # constant ranks: rho undefined
            continue
        values.append(spearmanr(a, b).statistic)
    if not values:
        return {"rho": rho, "lo": None, "hi": None, "level": level, "resamples": 0, "n": len(x)}
    lo, hi = _interval(np.asarray(values), level)
    return {"rho": rho, "lo": lo, "hi": hi, "level": level, "resamples": len(values), "n": len(x),
            "dropped": resamples - len(values)}


def over_seeds(diffs: list[dict], level: float = LEVEL) -> dict:
    """One step's paired differences (`fid_difference` of each training seed) folded: the mean, and an interval
    over seeds when there are several (else the one seed's interval over samples); resolved and how many seeds
    (or samples) would resolve it."""
    if not diffs:
        raise ValueError("no differences to fold")
    if len(diffs) == 1:
        d = diffs[0]
        return {**d, "seeds": 1, "over": "samples"}
    values = np.array([d["diff"] for d in diffs])
    mean, s = float(values.mean()), float(values.std(ddof=1))
    half = z_value(level) * s / math.sqrt(len(values))
    return {"diff": mean, "lo": mean - half, "hi": mean + half, "std": s, "level": level, "seeds": len(values),
            "n": diffs[0]["n"], "over": "seeds", "resolved": bool(abs(mean) > half),
            # s is one seed's spread, so its standard error at m seeds is s / sqrt(m): m = (z s / d)^2
            "seeds_to_resolve": samples_to_resolve(mean, s / math.sqrt(len(values)), len(values), level)}
