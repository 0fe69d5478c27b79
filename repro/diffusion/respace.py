"""Timestep respacing as in DiT's `respace.py` (from ADM): sample on a subset of the training chain.

The kept steps t_0 < t_1 < ... define a shorter Markov chain with the same marginals at the kept steps,
beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}; the model is always called with the original index t_i
(`specs/protocol.md` section 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .gaussian import GaussianDiffusion


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"timestep respacing {spec!r}: {why}")


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """The kept indices of a `num_timesteps` chain for a respacing spec: "250", "25,25,50" or "ddim50".

    "N" / "a,b,c": the chain is cut into equal sections (the remainder to the first ones) and section i keeps
    count_i steps evenly strided over it, both ends included. "ddimN": the integer stride k with
    len(range(0, num_timesteps, k)) == N, keeping {0, k, 2k, ...}.
    """
    if not isinstance(section_counts, str):
        raise ValueError(f"timestep respacing must be a string such as '250', '25,25,50' or 'ddim50', "
                         f"got {section_counts!r}")
    spec = section_counts
    if spec.startswith("ddim"):
        digits = spec[len("ddim"):]
        if not digits.isdecimal() or int(digits) < 1:
            raise _bad(spec, "'ddimN' needs a positive integer N")
        want = int(digits)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return set(range(0, num_timesteps, stride))
        raise _bad(spec, f"no integer stride gives exactly {want} steps out of {num_timesteps}")

    pieces = spec.split(",")
    if not all(p.strip().isdecimal() for p in pieces):
        raise _bad(spec, "expected 'ddimN' or comma-separated positive integers")
    counts = [int(p) for p in pieces]
    if len(counts) > num_timesteps:
        raise _bad(spec, f"{len(counts)} sections but only {num_timesteps} timesteps")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise _bad(spec, f"section {i} has {size} steps and cannot keep {count}")
        # ADM accumulates the fractional stride and rounds with Python's round (half to even); kept as is so
        # the kept set equals DiT's for every spec (for one section this is round(i * (size-1) / (count-1))).
        stride = (size - 1) / (count - 1) if count > 1 else 1
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of the chain defined by `betas`."""

    def __init__(self, use_timesteps: Iterable[int], betas: torch.Tensor | Sequence[float], learn_sigma: bool = True):
        base = GaussianDiffusion(betas, learn_sigma=learn_sigma)
        kept = sorted(set(int(t) for t in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{base.num_timesteps - 1}")
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(kept)
        abar = base.alphas_cumprod[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])   # abar = 1 before the first step
        self.timestep_map = torch.tensor(kept, dtype=torch.long)             # spaced index -> original index
        self._timestep_map_on: dict[torch.device, torch.Tensor] = {}
        super().__init__(1.0 - abar / abar_prev, learn_sigma=learn_sigma)

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        table = self._timestep_map_on.get(t.device)
        if table is None:
            table = self._timestep_map_on[t.device] = self.timestep_map.to(t.device)
        return table[t]                                                      # (N,) original indices, long
