"""Pieces shared by every model family: condition embedders, `modulate`, norms and guidance.

DiT, DiC and DiCo inherit the same conditioning recipe from DiT (`specs/protocol.md` section 4): a 256-dim
sinusoid of the integer timestep through a two-layer MLP, plus a label table with one extra row (the null
class) used by classifier-free guidance. Keeping these here is what makes every arm of a comparison share
one implementation.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F

FREQ_DIM = 256  # width of the timestep sinusoid in DiT, DiC and DiCo

_SOURCE_KERNEL: ContextVar[str | None] = ContextVar("repro_source_kernel", default=None)


@contextlib.contextmanager
def source_kernel(name: str | None):
    """Marks ops that the family's own code runs inside one fused kernel (a Triton or CUDA extension behind a
    custom autograd Function: flash-linear-attention, mamba_ssm). torchprofile, with which the papers count,
    records such a call as one opaque node of 0 MACs, so their printed GFLOPs leave these ops out;
    `repro.metrics.flops.count` files them apart, and both conventions are reported. Nested regions belong to
    the outermost one (one kernel call); None marks nothing (a source that ran these ops in the open)."""
    token = _SOURCE_KERNEL.set(_SOURCE_KERNEL.get() or name)
    try:
        yield
    finally:
        _SOURCE_KERNEL.reset(token)


# torchprofile 0.0.4 (the papers' counter) has no handler for this traced op, so a model whose attention goes
# through F.scaled_dot_product_attention, as timm's `Attention` does since timm 0.9, is counted without QK^T and AV.
TORCHPROFILE_SDPA = "torchprofile: aten::scaled_dot_product_attention (no handler, 0 MACs)"


def in_source_kernel() -> str | None:
    """The fused kernel of the source whose ops run now, or None."""
    return _SOURCE_KERNEL.get()


def kernels_used(model: nn.Module) -> list[str]:
    """The token-mixer kernels the model's last forward ran ("reference" for the exact PyTorch implementations,
    "fla", "mamba_ssm" for fused ones); empty for models whose mixers have a single implementation."""
    return sorted({m.kernel for m in model.modules() if isinstance(getattr(m, "kernel", None), str)})


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """`model.to(memory_format=...)` for its 4-D tensors only. Module.to also converts 5-D tensors and raises on
    them for channels_last (Agent Attention's position biases are 5-D); only convolution weights need NHWC."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model._apply(lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 else t)


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, laid out [cos, sin] as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                               # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)           # (N, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep sinusoid -> Linear -> SiLU -> Linear (DiT's `TimestepEmbedder`)."""

    def __init__(self, hidden: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)  # a bf16 model gets bf16
        return self.mlp(freq)                                                # (N, hidden)

    def init_weights(self) -> None:
        # DiT: both MLP weights N(0, 0.02); biases stay as the caller left them (zeroed by the xavier pass).
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, index `num_classes`, for the null label of classifier-free guidance.

    Unlike DiT's embedder it never drops labels itself: the trainer replaces labels by the null class with the
    model's `class_dropout_prob`, drawn per global sample position so that a run gives the same batches on any
    number of processes. One draw feeds every table of DiC and DiCo, as in their code.
    """

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)                                       # (N, hidden)

    def init_weights(self) -> None:
        nn.init.normal_(self.embedding_table.weight, std=0.02)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, with (N, C) shift/scale broadcast over tokens or pixels."""
    return x * (1 + _bcast(scale, x)) + _bcast(shift, x)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (N, C) against tokens (N, T, C) or feature maps (N, C, H, W)
    return v.unsqueeze(1) if x.ndim == 3 else v[:, :, None, None]


def gated(gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """gate * h with an (N, C) gate broadcast like `modulate`."""
    return _bcast(gate, h) * h


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an (N, C, H, W) map (DiCo's block norm and the conv models' final norm)."""

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def dic_groups(channels: int) -> int:
    """DiC's group rule: min(32, channels // 4) (24 groups for the 96-channel layers of DiC-S)."""
    return max(1, min(32, channels // 4))


class GroupNorm(nn.GroupNorm):
    """GroupNorm with DiC's group count, its affine parameters cast to the input dtype (DiC's custom module)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(dic_groups(channels), channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear and Conv2d (the DiT/DiC/DiCo base init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def xavier_flat_(conv: nn.Conv2d) -> None:
    """Xavier-uniform on the weight viewed as (out, in*k*k), as DiT's patch embedding and the conv stems do."""
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def dit_trunk_init_(model: nn.Module) -> None:
    """DiT's initialisation of a transformer trunk, which DiG, DiffiT and DiT-LLaMA copy: xavier Linears, the patch
    conv xavier as a Linear, then the label table and the timestep MLP (in DiT's order: the draws follow it)."""
    xavier_init_(model)
    xavier_flat_(model.x_embedder)
    model.y_embedder.init_weights()
    model.t_embedder.init_weights()


def adaln_zero_(blocks, final_layer: nn.Module) -> None:
    """adaLN-Zero (DiT): every block's modulation Linear and the final layer's, and the output Linear, start at zero,
    so every block starts as the identity and the model's output is zero."""
    for block in blocks:
        zero_(block.adaLN_modulation[-1])
    zero_(final_layer.adaLN_modulation[-1])
    zero_(final_layer.linear)


def frozen_pos_embed(dim: int, grid: int) -> nn.Parameter:
    """DiT's fixed sin-cos table as a frozen parameter (so it counts in the parameter total, as in DiT's 675M)."""
    table = nn.Parameter(torch.zeros(1, grid * grid, dim), requires_grad=False)
    with torch.no_grad():
        table.copy_(sincos_pos_embed_2d(dim, grid)[None])
    return table


def zero_(module: nn.Module) -> None:
    for p in module.parameters():
        nn.init.zeros_(p)


class Denoiser(nn.Module):
    """Common interface: forward(x, t, y) -> (N, 2C, H, W) with learned sigma, and classifier-free guidance."""

    in_channels: int

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | str = 3) -> torch.Tensor:
        """Guided output for a batch of n conditional inputs: one forward on [x; x] with labels [y; null].

        guide_channels=3 is DiT's legacy (and the papers'): guidance on output channels 0-2 only, channel 3 and
        the variance channels taken from the conditional half. "all" guides every eps channel. DiT's own
        `forward_with_cfg` takes the doubled batch and returns both halves; this returns only the kept
        conditional half, which is identical for the samples that are kept.
        """
        if cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1, got {cfg_scale}")
        c = self.in_channels
        if guide_channels == "all":
            k = c
        elif isinstance(guide_channels, int) and not isinstance(guide_channels, bool) and 1 <= guide_channels <= c:
            k = guide_channels
        else:
            raise ValueError(f"guide_channels must be an int in 1..{c} or 'all', got {guide_channels!r}")
        if cfg_scale == 1:
            return self(x, t, y)
        if self.class_dropout_prob <= 0:
            raise ValueError("classifier-free guidance needs a model trained with label dropout "
                             "(class_dropout_prob > 0 gives the null class)")
        n = x.shape[0]
        null = torch.full_like(y, self.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))   # (2N, 2C, H, W)
        cond, uncond = out[:n], out[n:]
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)


def check_choice(name: str, value, choices) -> None:
    """Raise a ValueError naming a switch and its valid values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(repr(c) for c in choices)}")


class Attention(nn.Module):
    """Multi-head self-attention over tokens through F.scaled_dot_product_attention (the kernel is chosen by torch)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sdpa_unseen: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        # Where the source's own attention ran as one fused call that its counting tool cannot see, the region it
        # is filed under (see `source_kernel`); None where the source wrote out both matmuls, as DiT's timm did.
        self.sdpa_unseen = sdpa_unseen
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                               # (N, heads, T, head_dim)
        with source_kernel(self.sdpa_unseen):
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))           # (N, T, D)


class Mlp(nn.Module):
    """Linear -> activation -> Linear, named like timm's `Mlp` (fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (MAE / DiT `get_2d_sincos_pos_embed`), computed in float64."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64, device="cpu")  # computed on the CPU even for meta models
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")                   # numpy meshgrid(w, h) order
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device="cpu") / (dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]                          # (grid*grid, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(gw), one_axis(gh)], dim=1).float()            # (grid*grid, dim)


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) tokens in DiT's (p, q, c) order -> (N, C, H, W)."""
    n, length, _ = x.shape
    h = w = int(length ** 0.5)
    x = x.reshape(n, h, w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, h * patch, w * patch)


def check_input_size(input_size: int, divisor: int, model: str) -> None:
    if input_size <= 0 or input_size % divisor:
        raise ValueError(f"{model}: input_size={input_size} must be a positive multiple of {divisor}")


class TokenFinalLayer(nn.Module):
    """DiT's final layer: LayerNorm (no affine) -> modulate from SiLU(c) (shift first) -> Linear per token."""

    def __init__(self, dim: int, cond_dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))       # (N, T, out_features)


class ConvFinalLayer(nn.Module):
    """The conv models' final layer (DiC and DiCo): channel LayerNorm (no affine) -> modulate from SiLU(c),
    shift first -> 3x3 conv to the output channels."""

    def __init__(self, channels: int, cond_dim: int, out_channels: int):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.conv(modulate(self.norm(x), shift, scale))


def run_with_long_skips(blocks: nn.ModuleList, fuse: nn.ModuleList, x: torch.Tensor, c: torch.Tensor,
                        cat_dim: int) -> torch.Tensor:
    """Run `blocks` with U-ViT-style long skips: with k = len(fuse), blocks 0..k-1 push their outputs and each
    of the last k blocks first pops one (LIFO), concatenates it along `cat_dim` and fuses it back to width."""
    n, k, skips = len(blocks), len(fuse), []
    for i, block in enumerate(blocks):
        if i >= n - k:
            x = fuse[i - (n - k)](torch.cat([x, skips.pop()], dim=cat_dim))
        x = block(x, c)
        if i < k:
            skips.append(x)
    return x
