"""The sample-quality numbers, computed from features the way the ADM evaluator computes them.

- FID: Fréchet distance of Gaussians fitted to two feature sets (clean-fid's `frechet_distance`: scipy `sqrtm`,
  a 1e-6 diagonal offset if the product is singular, imaginary parts must be ~0), statistics in float64 with the
  unbiased covariance (np.cov), as ADM and clean-fid do.
- sFID: the same distance on spatial features (ADM: the first 7 channels of Inception's `mixed_6/conv`).
- IS: exp(E_x KL(p(y|x) || p(y))) per split of **5,000** samples (the last split may be shorter), mean of the
  splits (ADM `compute_inception_score`; 10 splits at 50K).
- Precision / recall: k = 3 nearest-neighbour manifolds (Kynkäänniemi et al. 2019, ADM `ManifoldEstimator`):
  a sample is precise if it lies inside the ball of some reference point whose radius is that point's distance
  to its 3rd nearest reference neighbour; recall swaps the roles.

Everything here is numpy on feature arrays; extracting features is `repro.metrics.extractors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IS_SPLIT_SIZE = 5000   # ADM's split convention
PR_NEIGHBOURS = 3      # ADM's nhood_sizes=[3]
PR_MAX_REFERENCE = 10_000  # ADM uses a 10K-image reference batch for precision/recall


@dataclass(frozen=True)
class Gaussian:
    """Mean and covariance of a feature set, and how many feature vectors they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None


def fit(features: np.ndarray) -> Gaussian:
    """Mean and unbiased covariance, in float64 (what ADM and clean-fid fit)."""
    f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a covariance, got {len(f)}")
    return Gaussian(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """FID between two fitted Gaussians, through clean-fid's implementation."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape[0]} against {b.mu.shape[0]} (different extractors?)")
    return float(cleanfid_frechet(a.mu, a.sigma, b.mu, b.sigma))


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of class probabilities (N, classes): mean over splits of split_size."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"expected class probabilities of shape (N, classes), got {p.shape}")
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 is 0: a confident prediction has exact zeros, which ADM's float32 softmax never produces
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(float(np.exp(kl.sum(axis=1).mean())))
    return float(np.mean(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # ADM's batched form: |a|^2 - 2 a.b + |b|^2, clamped at 0 against rounding
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _radii(features: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Squared distance of every point to its k-th nearest other point of the same set."""
    out = np.empty(len(features))
    for i in range(0, len(features), batch):
        d = _squared_distances(features[i:i + batch], features)
        out[i:i + batch] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
    return out


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int) -> np.ndarray:
    """For each point: does it fall inside the ball of some centre?"""
    out = np.empty(len(points), dtype=bool)
    for i in range(0, len(points), batch):
        d = _squared_distances(points[i:i + batch], centres)
        out[i:i + batch] = (d <= radii[None, :]).any(axis=1)
    return out


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS,
                     batch: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of `samples` against `reference` features."""
    ref = np.asarray(reference, dtype=np.float32).reshape(len(reference), -1)
    gen = np.asarray(samples, dtype=np.float32).reshape(len(samples), -1)
    if min(len(ref), len(gen)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per set")
    precision = _inside(gen, ref, _radii(ref, k, batch), batch).mean()
    recall = _inside(ref, gen, _radii(gen, k, batch), batch).mean()
    return float(precision), float(recall)
