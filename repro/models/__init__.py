"""Model registry: every preset of every family by name, built with `build(name, **overrides)`.

Presets are keyword dicts, so `build("DiC-XL", act="silu")` is `DiC(**{**PRESETS["DiC-XL"], "act": "silu"})`:
an override can never be swallowed, and an unknown switch or value is an error that lists the valid ones.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch.nn as nn

from repro.errors import did_you_mean

from . import dic, dico, diffit, diffussm, dig, dim, dimsum, dis, dit, dit_llama, pixart, uvit
from .layers import Denoiser


@dataclass(frozen=True)
class Family:
    name: str
    cls: type[Denoiser]
    presets: dict[str, dict]
    published: dict[str, dict]


FAMILIES = {
    "DiT": Family("DiT", dit.DiT, dit.PRESETS, dit.PUBLISHED),
    "DiC": Family("DiC", dic.DiC, dic.PRESETS, dic.PUBLISHED),
    "DiCo": Family("DiCo", dico.DiCo, dico.PRESETS, dico.PUBLISHED),
    "U-ViT": Family("U-ViT", uvit.UViT, uvit.PRESETS, uvit.PUBLISHED),
    # comparison systems of DiC's 400K table: counted and benched beside the papers' own models
    "PixArt-α": Family("PixArt-α", pixart.PixArt, pixart.PRESETS, pixart.PUBLISHED),
    "DiffiT": Family("DiffiT", diffit.DiffiT, diffit.PRESETS, diffit.PUBLISHED),
    "DiT-LLaMA": Family("DiT-LLaMA", dit_llama.DiTLlama, dit_llama.PRESETS, dit_llama.PUBLISHED),
    # DiCo Table 1's linear-attention and state-space rows (exact PyTorch mixers; fused kernels on CUDA if installed)
    "DiG": Family("DiG", dig.DiG, dig.PRESETS, dig.PUBLISHED),
    "DiS": Family("DiS", dis.DiS, dis.PRESETS, dis.PUBLISHED),
    "DiM": Family("DiM", dim.DiM, dim.PRESETS, dim.PUBLISHED),
    "DiffuSSM": Family("DiffuSSM", diffussm.DiffuSSM, diffussm.PRESETS, diffussm.PUBLISHED),
    "DiMSUM": Family("DiMSUM", dimsum.DiMSUM, dimsum.PRESETS, dimsum.PUBLISHED),
}

PRESETS: dict[str, dict] = {}
_FAMILY_OF: dict[str, Family] = {}
for _family in FAMILIES.values():
    for _name, _kw in _family.presets.items():
        assert _name not in PRESETS, f"duplicate preset name {_name}"
        PRESETS[_name] = _kw
        _FAMILY_OF[_name] = _family


def family(name: str) -> Family:
    """The family a preset belongs to; ValueError naming the valid presets if there is none."""
    if name not in _FAMILY_OF:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name, PRESETS)}; valid models: {', '.join(PRESETS)}")
    return _FAMILY_OF[name]


def switches(name: str) -> list[str]:
    """Keyword arguments a preset accepts as overrides."""
    return [p for p in inspect.signature(family(name).cls).parameters]


def build(name: str, **overrides) -> nn.Module:
    """Build preset `name` with keyword overrides; unknown names, switches and values raise ValueError."""
    fam = family(name)
    valid = switches(name)
    for key in overrides:
        if key not in valid:
            raise ValueError(f"{name}: unknown switch {key!r}{did_you_mean(key, valid)}; "
                             f"valid switches: {', '.join(valid)}")
    return fam.cls(**{**fam.presets[name], **overrides})


_INIT_FUNCTIONS = ("normal_", "trunc_normal_", "uniform_", "xavier_uniform_", "kaiming_uniform_", "zeros_", "ones_",
                   "constant_")


@contextlib.contextmanager
def _no_init():
    # Initialising meta tensors goes through torch's Python reference ops, whose first use costs about a second;
    # shapes are all that validation and counting need.
    saved = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS}
    try:
        for n in _INIT_FUNCTIONS:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_meta(name: str, **overrides) -> nn.Module:
    """`build` on the meta device without initialising weights: for validating configs and counting."""
    import torch

    with torch.device("meta"), _no_init():
        return build(name, **overrides)


def published(name: str) -> dict:
    """The counts the papers print for a preset (empty when they print none)."""
    return dict(family(name).published.get(name, {}))


__all__ = ["FAMILIES", "PRESETS", "Denoiser", "build", "build_meta", "family", "published", "switches"]
