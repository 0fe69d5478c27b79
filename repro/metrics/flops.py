"""Parameter and MAC counts the papers' way.

DiT, DiC and DiCo all print "GFLOPs" that are GMACs from `torchprofile.profile_macs` at batch 1 with t and y
(`specs/protocol.md` section 8), release 0.0.4: the only release from 2021-06-22 until 0.1.0 on 2026-03-10, after
every paper we reproduce. We reproduce its rules without its TorchScript trace, by watching the torch functions a
forward pass calls (so full-size models can be counted on the meta device):

- conv: output elements x (in_channels / groups) x kernel area; linear, matmul, mm, bmm, addmm: the product of
  the dims;
- scaled_dot_product_attention: the two matmuls, QK^T and AV (softmax free), where the source wrote them out as
  matmuls (DiT's timm 0.4-0.6 `Attention`). Where the source itself called F.scaled_dot_product_attention (timm's
  `Attention` since 0.9, which DiCo's code imports), torchprofile 0.0.4 counted 0: it has no handler for
  aten::scaled_dot_product_attention (0.1.0 added one that counts both matmuls). Models mark such calls
  (`layers.TORCHPROFILE_SDPA`), and the counter files them with the fused kernels below;
- elementwise mul: output elements; layer/group norm: output elements when affine, else 0; mean/avg-pool:
  output elements; additions, activations, softmax, embeddings: free.

Fused kernels of the comparison systems (DiG's flash-linear-attention, DiS's and DiM's mamba_ssm): torchprofile's
TorchScript trace records a custom autograd Function as one opaque node and counts it as 0 MACs, so the GFLOPs those
papers print leave out whatever runs inside one. Models mark those ops (`repro.models.layers.source_kernel`); the
counter files them apart: `Counts.macs` is the papers' convention (what torchprofile sees of the source), and
`Counts.full_gmacs` adds every op of our PyTorch forward, the exact reference kernels included.

Winograd GMACs (DiC only, `specs/dic.md` section 1): the MACs of the two 3x3 convs inside every basic block
divided by 2.25 (= 36/16, F(2x2, 3x3)) plus everything else at full count. The DiC authors confirm it is a
counting convention; no Winograd kernel is involved (DiC#11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from repro.models.layers import in_source_kernel

WINOGRAD_FACTOR = 2.25
COUNTING_TOOL = ("repro.metrics.flops (torchprofile 0.0.4 rules: conv, linear, matmul, mul, affine norms, means; "
                 "SDPA as the source ran it)")

_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm"}
_ADD_MATMUL = {"addmm"}  # torchprofile 0.0.4 has no rule for baddbmm (0.1.0 added one); none of our models calls it
_MUL = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_MEAN = {"mean", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d"}
_NORM_WEIGHT_ARG = {"layer_norm": 2, "group_norm": 2}


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


class _MacCounter(TorchFunctionMode):
    """Counts MACs of the torch functions called at the top level of a forward pass."""

    def __init__(self, winograd_weights: set[int]):
        super().__init__()
        self.winograd_weights = winograd_weights
        self.macs = 0
        self.source_kernel_macs = 0
        self.winograd_conv_macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        macs = self._macs(name, args, kwargs, out)
        if in_source_kernel():
            self.source_kernel_macs += macs
            return out
        self.macs += macs
        if name == "conv2d" and id(args[1]) in self.winograd_weights:
            self.winograd_conv_macs += macs
        return out

    @staticmethod
    def _macs(name: str, args, kwargs, out) -> int:
        if name in ("conv1d", "conv2d", "conv3d"):
            weight = args[1]
            return _numel(out.shape) * _numel(weight.shape[1:])
        if name == "linear":
            x, weight = args[0], args[1]
            return _numel(x.shape) * int(weight.shape[0])
        if name in _MATMUL:
            a, b = args[0], args[1]
            if name == "__rmatmul__":
                a, b = b, a
            return _numel(out.shape) * int(a.shape[-1])
        if name in _ADD_MATMUL:
            return _numel(out.shape) * int(args[1].shape[-1])
        if name == "scaled_dot_product_attention":
            q, k, v = args[0], args[1], args[2]
            lead = _numel(q.shape[:-2])
            return lead * q.shape[-2] * q.shape[-1] * k.shape[-2] + lead * q.shape[-2] * v.shape[-1] * v.shape[-2]
        if name in _MUL:
            return _numel(out.shape) if isinstance(out, torch.Tensor) else 0
        if name in _NORM_WEIGHT_ARG:
            i = _NORM_WEIGHT_ARG[name]
            weight = args[i] if len(args) > i else kwargs.get("weight")
            return _numel(out.shape) if weight is not None else 0
        if name in _MEAN:
            return _numel(out.shape)
        return 0


@dataclass(frozen=True)
class Counts:
    """Parameters and batch-1 MACs of one model at one input size."""

    params: int
    trainable_params: int
    macs: int  # the papers' convention: what torchprofile sees of the source (its fused kernels count 0)
    winograd_macs: int | None  # None where the model declares no Winograd-eligible convs
    source_kernel_macs: int = 0  # inside the source's fused kernels, as our reference implementations run them

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def full_gmacs(self) -> float:
        return (self.macs + self.source_kernel_macs) / 1e9

    @property
    def winograd_gmacs(self) -> float | None:
        return None if self.winograd_macs is None else self.winograd_macs / 1e9


def count(model: nn.Module, input_size: int | None = None, device: str | torch.device = "meta") -> Counts:
    """Count params and MACs of `model` for one (1, C, S, S) input with t and y at batch 1.

    S defaults to the model's `input_size`. `device` should be where the model's parameters live; "meta"
    counts without allocating anything.
    """
    input_size = input_size or model.input_size
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eligible = list(getattr(model, "winograd_convs", lambda: None)() or [])
    x = torch.zeros(1, model.in_channels, input_size, input_size, device=device)
    t = torch.full((1,), 500, dtype=torch.long, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    counter = _MacCounter({id(m.weight) for m in eligible})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x, t, y)
    finally:
        model.train(was_training)
    winograd = None
    if eligible:
        winograd = round(counter.macs - counter.winograd_conv_macs + counter.winograd_conv_macs / WINOGRAD_FACTOR)
    return Counts(params=params, trainable_params=trainable, macs=counter.macs, winograd_macs=winograd,
                  source_kernel_macs=counter.source_kernel_macs)


def preset_rows(names: list[str] | None = None, resolution: int = 256) -> list[dict]:
    """Counts of presets at a pixel resolution (latent = resolution / 8) beside the papers' printed values."""
    from repro import models

    if resolution % 8:
        raise ValueError(f"resolution={resolution} must be a multiple of 8 (the VAE's factor)")
    latent = resolution // 8
    rows = []
    for name in names or list(models.PRESETS):
        fam = models.family(name)
        model = models.build_meta(name, input_size=latent)
        c = count(model)
        paper = models.published(name)
        paper_gmacs = paper.get(f"gmacs_{resolution}")
        rows.append(dict(
            model=name, family=fam.name, resolution=resolution, params=c.params,
            trainable_params=c.trainable_params, gmacs=round(c.gmacs, 3),
            full_gmacs=round(c.full_gmacs, 3),
            winograd_gmacs=None if c.winograd_gmacs is None else round(c.winograd_gmacs, 3),
            paper_gmacs=paper_gmacs, paper_winograd_gmacs=paper.get(f"winograd_{resolution}"),
            paper_params_m=paper.get("params_m"),
            gmacs_delta_pct=None if paper_gmacs is None else round(100 * (c.gmacs / paper_gmacs - 1), 2),
            paper_source=paper.get("source"), counting_tool=COUNTING_TOOL,
            config={k: list(v) if isinstance(v, tuple) else v for k, v in models.PRESETS[name].items()}))
    return rows
