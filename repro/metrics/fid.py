"""The sample-quality numbers, computed from features the way the ADM evaluator computes them.

- FID: Fréchet distance of Gaussians fitted to two feature sets (clean-fid's `frechet_distance`: scipy `sqrtm`,
  a 1e-6 diagonal offset if the product is singular, imaginary parts must be ~0); the mean in the features' own
  float32 and the unbiased covariance (np.cov) in float64, as ADM and clean-fid fit them.
- sFID: the same distance on spatial features (ADM: the first 7 channels of Inception's `mixed_6/conv`, in TF's
  NHWC order).
- IS: exp(E_x KL(p(y|x) || p(y))) per split of **5,000** samples (the last split may be shorter), mean of the
  splits (ADM `compute_inception_score`; 10 splits at 50K). One difference: a probability of exactly 0 adds 0
  here, where ADM's `0 * log 0` makes the score NaN.
- Precision / recall: k = 3 nearest-neighbour manifolds (Kynkäänniemi et al. 2019, ADM `ManifoldEstimator`):
  a sample is precise if it lies inside the ball of some reference point whose radius is that point's distance
  to its 3rd nearest reference neighbour; recall swaps the roles. Two ways to compute the distances:
  - `adm` (ADM's `DistanceBlock`): |u|^2 - 2 u.v + |v|^2 in float16, over blocks of 10,000 x 10,000; a block with
    any non-finite value (float16 overflows at 65,504) is computed again in float32. The coarse float16 grid
    makes ties, and ADM's `<=` counts a tie as inside, so precision and recall come out 0.002-0.003 higher than
    in float32. Each op here is computed exactly and rounded once to float16 (float32 for the fallback); TF on a
    GPU sums in float32 before rounding, which can differ only where that sum's error crosses a float16 rounding
    boundary.
  - `float32`: the original k-NN code's float32 distances (torch-fidelity agrees).

Everything here works on feature arrays (precision/recall in torch, so it runs on the GPU when there is one);
extracting features is `repro.metrics.extractors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IS_SPLIT_SIZE = 5000   # ADM's split convention
PR_NEIGHBOURS = 3      # ADM's nhood_sizes=[3]
PR_MAX_REFERENCE = 10_000  # float32 mode: at most this many reference images (ADM's batches hold 10K)
PR_BLOCK = 10_000  # ADM's row_batch_size = col_batch_size: the float32 fallback is decided per block this size
PR_DISTANCES = ("adm", "float32")


@dataclass(frozen=True)
class Gaussian:
    """Mean and covariance of a feature set, and how many feature vectors they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None


def fit(features: np.ndarray) -> Gaussian:
    """Mean in the features' own dtype (float32 from an extractor, as ADM and clean-fid take it) and the unbiased
    covariance, which np.cov computes in float64."""
    f = np.asarray(features).reshape(len(features), -1)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a covariance, got {len(f)}")
    return Gaussian(f.mean(axis=0).astype(np.float64), np.cov(f, rowvar=False), len(f))


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


def _rounded_distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ADM's `_batch_pairwise_distances` with every op's result rounded to `dtype`: max(|u|^2 - 2 u.v + |v|^2, 0).

    `u`, `v` hold values already representable in `dtype`, as float64: products of two float16 (or the sums
    of a few thousand of them) are exact there, so one cast gives the correctly rounded result of each op."""
    square_u = (u * u).to(dtype).double()  # tf.square is its own op: each square is rounded before the sum
    square_v = (v * v).to(dtype).double()
    norm_u = square_u.sum(1).to(dtype)[:, None]
    norm_v = square_v.sum(1).to(dtype)[None, :]
    cross = (u @ v.T).to(dtype)
    # one op at a time, in `dtype`, in TF's order: (norm_u - 2 * uv) + norm_v
    return torch.clamp_min((norm_u - 2 * cross) + norm_v, 0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, distances: str) -> torch.Tensor:
    """Squared distances (float32) between the rows of u and v, one block (ADM computes 10K x 10K at a time)."""
    if distances == "float32":
        u, v = u.float(), v.float()
        return torch.clamp_min((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)
    d16 = _rounded_distances(u.half().double(), v.half().double(), torch.float16)
    if torch.isfinite(d16).all():
        return d16.float()
    return _rounded_distances(u.float().double(), v.float().double(), torch.float32)  # ADM's tf.cond fallback


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def manifold_radii(features: torch.Tensor, k: int, distances: str, block: int = PR_BLOCK) -> torch.Tensor:
    """Each point's squared distance to its k-th nearest point of the same set (index 0 is the point itself)."""
    out = []
    for rows in _blocks(len(features), block):
        nearest = None  # the k + 1 smallest so far: the same values as a partition of the whole row
        for cols in _blocks(len(features), block):
            d = pairwise_distances(features[rows], features[cols], distances)
            d = d if nearest is None else torch.cat([nearest, d], 1)
            nearest = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        out.append(nearest[:, k])
    return torch.cat(out)


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS, distances: str = "float32",
                     block: int = PR_BLOCK, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of `samples` against `reference` features.

    As ADM's `evaluate_pr`: reference rows against sample columns, both memberships from the same block."""
    if distances not in PR_DISTANCES:
        raise ValueError(f"precision/recall distances must be one of {', '.join(PR_DISTANCES)}, got {distances!r}")
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float32).reshape(len(reference), -1), device=device)
    gen = torch.as_tensor(np.asarray(samples, dtype=np.float32).reshape(len(samples), -1), device=device)
    if min(len(ref), len(gen)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per set")
    ref_radii = manifold_radii(ref, k, distances, block)
    gen_radii = manifold_radii(gen, k, distances, block)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)  # inside some sample's ball: recall
    gen_inside = torch.zeros(len(gen), dtype=torch.bool, device=device)  # inside some reference ball: precision
    for rows in _blocks(len(ref), block):
        for cols in _blocks(len(gen), block):
            d = pairwise_distances(ref[rows], gen[cols], distances)
            ref_inside[rows] |= (d <= gen_radii[None, cols]).any(1)
            gen_inside[cols] |= (d <= ref_radii[rows, None]).any(0)
    return float(gen_inside.double().mean()), float(ref_inside.double().mean())


def pr_reference_subset(n: int) -> np.ndarray:
    """float32 mode's reference images for precision/recall: all up to 10K, else a fixed random 10K."""
    if n <= PR_MAX_REFERENCE:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:PR_MAX_REFERENCE])
