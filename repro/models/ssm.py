"""Mamba's selective state-space layer in plain PyTorch, for the Mamba-based comparison systems (DiS, DiM).

Semantics are those of state-spaces/mamba (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", 2023): `mamba_ssm/ops/selective_scan_interface.py` (`selective_scan_fn`, `selective_scan_ref`) and
`mamba_ssm/modules/mamba_simple.py` (`Mamba`). For u, delta of shape (N, E, L), A (E, S), input-dependent B and C
of shape (N, S, L), per channel e and state s:

    delta_t = softplus(delta_t + delta_bias)            (each optional)
    h_t     = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,   h_{-1} = 0
    y_t     = <C_t, h_t> + D u_t,   out_t = y_t * silu(z_t)   (D and z optional)

`selective_scan` computes this exactly (float32, or float64 for float64 inputs) and runs on any device, meta
included: sequentially over chunks of 64 steps, and inside a chunk by a log-depth prefix scan of the affine maps
h -> a h + b (only products of decays exp(delta A) <= 1 are formed, so nothing overflows). `causal_conv1d` is the
depthwise causal convolution of `causal_conv1d_fn`. `MambaMixer` is the Mamba v1 block (in_proj to 2E, causal
depthwise conv + SiLU, x_proj to dt_rank + 2S, dt_proj, the scan gated by SiLU(z), out_proj), optionally with the
bidirectional "v2" layout of Vision Mamba (hustvl/Vim, vendored by DiS): one in_proj and out_proj, and a second
conv / x_proj / dt_proj / A / D that scan the flipped sequence, the two gated outputs summed before out_proj.

Kernels: when `mamba_ssm` (with its compiled `selective_scan_cuda`) is importable and the input is on CUDA, the scan
runs in `selective_scan_fn`, and the conv in `causal_conv1d_fn` when `causal_conv1d` is importable too; otherwise
the references above run. Each mixer records what ran in `kernel` ("reference" or "mamba_ssm") at every forward;
`layers.kernels_used(model)` collects them. Both packages are imported lazily and never required.

Counting MACs: `repro.metrics.flops` watches the torch functions a forward calls. The papers count with torchprofile,
whose TorchScript trace records a custom autograd Function (every Mamba CUDA entry point) as one opaque node and
counts it as 0 MACs. The regions the source's fast path runs as such a node are marked with `layers.source_kernel`,
which `flops.count` files apart: `.gmacs` is the papers' convention, `.full_gmacs` adds every op of the references.
- For Mamba v1 (DiM) `mamba_ssm.mamba_inner_fn` covers everything after in_proj (conv, x_proj, dt_proj, scan,
  gating and out_proj); for Vim's v2 (DiS) each direction's `mamba_ssm.mamba_inner_fn_no_out_proj` covers conv,
  x_proj, dt_proj, scan and gating, and in_proj and out_proj stay visible.
- The scan itself runs in `mamba_ssm.selective_scan_fn`, nested in those regions, so it belongs to them (one kernel
  call). The source's slow path, where only `selective_scan_fn` is opaque, is no longer a counting option; as
  evidence it left out exactly the scan's multiplies (DiM-H 307.92 GMACs at 256, 1034.80 at 512; DiS-H/2 225.93,
  898.38), well above the printed DiM-H values.
Every multiply of the scan is counted in `full_gmacs`: the prefix products that place every h_{t-1} are bookkeeping
of the parallel evaluation and never counted (`_states_before` runs them unseen by every TorchFunctionMode), and the
step h_t = dA_t h_{t-1} + dBu_t is then taken in the open, so a counter sees exactly the sequential scan's multiplies:
4 per state and step (delta A, (delta u) B, dA h, C h) and 3 per step and channel (delta u, D u, the gate), i.e.
L * E * (4S + 3) per direction.

Limits, all recorded here: A is real and B, C are (N, S, L) (no complex A, no grouped (N, G, S, L) B/C, no returned
last state: neither DiS nor DiM uses them); "exact" is the recurrence above up to float rounding (the prefix scan
associates products differently from a step loop: 1e-15 apart in float64).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import source_kernel

CHUNK = 64


@functools.cache
def cuda_kernels():
    """(selective_scan_fn, causal_conv1d_fn or None), or None where mamba_ssm cannot run its scan."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        import selective_scan_cuda  # noqa: F401  (recent mamba_ssm builds may ship without it)
    except Exception:
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn


def _states_before(a: torch.Tensor, b: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """h_{t-1} for every step t of a chunk, where h_t = a_t h_{t-1} + b_t along dim -2 and `state` is the state
    before the chunk. Hillis-Steele prefix scan of the affine maps, log2(T) rounds."""
    # Hidden from every TorchFunctionMode, so `repro.metrics.flops` counts these ops nowhere, neither in `.macs` nor
    # in the source-kernel MACs: the prefix products are bookkeeping of the parallel evaluation, not multiplies of
    # the recurrence, whose step `selective_scan` takes in the open afterwards (L * E * (4S + 3) per direction, as the
    # sequential scan). Values are the same either way, and meta needs no hiding; only the count depends on it.
    with torch._C.DisableTorchFunction():
        if a.device.type == "meta":   # no values to scan; shapes are all a meta forward needs
            return torch.empty_like(b)
        steps, k = a.shape[-2], 1
        while k < steps:
            # (a_i, b_i) after (a_j, b_j), j < i: h -> a_i (a_j h + b_j) + b_i
            b = torch.cat([b[..., :k, :], torch.addcmul(b[..., k:, :], a[..., k:, :], b[..., :-k, :])], dim=-2)
            a = torch.cat([a[..., :k, :], a[..., k:, :] * a[..., :-k, :]], dim=-2)
            k *= 2
        inclusive = torch.addcmul(b, a, state.unsqueeze(-2))
        return torch.cat([state.unsqueeze(-2), inclusive[..., :-1, :]], dim=-2)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   chunk_size: int = CHUNK) -> torch.Tensor:
    """`selective_scan_fn` in PyTorch: u, delta, z (N, E, L); A (E, S) real; B, C (N, S, L); D, delta_bias (E,).
    Returns (N, E, L) in u's dtype; computed in float32 (float64 for float64 u)."""
    dtype_in = u.dtype
    f = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A, B, C = (v.to(f) for v in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    n, channels, length = u.shape
    du = delta * u                                                        # (N, E, L)
    # Chunks only bound the memory of the (N, E, T, S) intermediates; a meta tensor has none to bound.
    step = max(length, 1) if u.device.type == "meta" else chunk_size
    state = u.new_zeros(n, channels, A.shape[1])                         # (N, E, S)
    ys = []
    for start in range(0, length, step):
        span = slice(start, start + step)
        dA = torch.exp(delta[:, :, span, None] * A[:, None])             # (N, E, T, S)
        dBu = du[:, :, span, None] * B[:, None, :, span].transpose(-1, -2)
        h = dA * _states_before(dA, dBu, state) + dBu                    # the recurrence, one step per t
        ys.append((h * C[:, None, :, span].transpose(-1, -2)).sum(-1))   # (N, E, T)
        state = h[:, :, -1]
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype_in)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """`causal_conv1d_fn`: depthwise conv of x (N, E, L) with weight (E, K) where output t sees inputs t-K+1..t."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation={activation!r} is not valid; choose None, 'silu' or 'swish'")
    k = weight.shape[-1]
    # Left padding only, so exactly L outputs are computed (Mamba's Conv1d pads both sides and drops K-1).
    out = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0])
    return out if activation is None else F.silu(out)


class MambaMixer(nn.Module):
    """Mamba v1 block (`mamba_simple.Mamba`), optionally bidirectional as Vim's "v2" (DiS).

    Parameter names follow the sources (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj; the backward
    direction's carry a `_b` suffix). Initialisation is Mamba's: dt_proj weight U(+-dt_rank^-0.5 * dt_scale), dt_proj
    bias the inverse softplus of dt ~ logU(dt_min, dt_max) floored at dt_init_floor, A_log = log(1..S) for every
    channel (S4D-real), D = 1; the other layers keep PyTorch's defaults.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 bidirectional: bool = False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional = bidirectional
        self.use_kernels = True   # False forces the references even where mamba_ssm could run (for comparisons)
        self.kernel: str | None = None
        self._dt = (dt_min, dt_max, dt_scale, dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for suffix in ("", "_b") if bidirectional else ("",):
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                             bias=conv_bias)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            self._init_dt(dt_proj)
            A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + suffix, dt_proj)
            # `A_b_log` and `D_b` are Vim's names for the backward direction's A and D.
            setattr(self, "A_b_log" if suffix else "A_log", nn.Parameter(A_log))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _init_dt(self, dt_proj: nn.Linear) -> None:
        dt_min, dt_max, dt_scale, floor = self._dt
        bound = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)

    def dt_projections(self) -> list[nn.Linear]:
        """The dt projections, whose biases Mamba's model-level init must not zero (`_no_reinit`)."""
        return [self.dt_proj] + ([self.dt_proj_b] if self.bidirectional else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, D) -> (N, L, D)."""
        kernels = cuda_kernels() if (x.is_cuda and self.use_kernels) else None
        self.kernel = "reference" if kernels is None else "mamba_ssm"
        xz = self.in_proj(x).transpose(1, 2)                                   # (N, 2E, L)
        if not self.bidirectional:
            with source_kernel("mamba_ssm.mamba_inner_fn"):   # everything from here on, out_proj included
                y = self._scan(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, kernels)
                return self.out_proj(y.transpose(1, 2))
        with source_kernel("mamba_ssm.mamba_inner_fn_no_out_proj"):
            y = self._scan(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, kernels)
        xz_b = xz.flip(-1)
        with source_kernel("mamba_ssm.mamba_inner_fn_no_out_proj"):
            y_b = self._scan(xz_b, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, kernels)
        return self.out_proj((y + y_b.flip(-1)).transpose(1, 2))               # Vim v2: no averaging

    def _scan(self, xz, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, A_log: nn.Parameter,
              D: nn.Parameter, kernels) -> torch.Tensor:
        x, z = xz.chunk(2, dim=1)                                              # (N, E, L) each
        weight = conv.weight.squeeze(1)                                        # (E, K)
        if kernels is not None and kernels[1] is not None:
            x = kernels[1](x.contiguous(), weight, conv.bias, activation="silu")
        else:
            x = causal_conv1d(x, weight, conv.bias, activation="silu")
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight).transpose(1, 2)   # its bias enters the scan as delta_bias, in float32
        A = -torch.exp(A_log.float())                                          # (E, S)
        scan = selective_scan if kernels is None else kernels[0]
        with source_kernel("mamba_ssm.selective_scan_fn"):   # nested: the outer region's when there is one
            return scan(x.contiguous(), dt.contiguous(), A, B.transpose(1, 2).contiguous(),
                        C.transpose(1, 2).contiguous(), D.float(), z=z.contiguous(),
                        delta_bias=dt_proj.bias.float(), delta_softplus=True)


def mamba_init_(model: nn.Module, n_layer: int, initializer_range: float = 0.02) -> None:
    """Mamba's model-level init (`_init_weights` of mixer_seq_simple, copied by DiS and DiM): every Linear bias zero
    except the dt projections', every Embedding N(0, 0.02), and each mixer's out_proj weight re-drawn as PyTorch's
    default and divided by sqrt(n_layer) (GPT-2's residual scaling, one residual per block)."""
    keep = {id(p.bias) for m in model.modules() if isinstance(m, MambaMixer) for p in m.dt_projections()}
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None and id(m.bias) not in keep:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=initializer_range)
        if isinstance(m, MambaMixer):
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                m.out_proj.weight /= math.sqrt(n_layer)


__all__ = ["CHUNK", "MambaMixer", "causal_conv1d", "mamba_init_", "selective_scan"]
