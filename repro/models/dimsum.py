"""DiMSUM (Phung et al., "DiMSUM: Diffusion Mamba -- A Scalable and Unified Spatial-Frequency Method for Image
Generation", NeurIPS 2024), as in VinAIResearch/DiMSUM `dimsum/models_dim.py` (`DiM`, `DiMBlockCombined`,
`DiMBlockRaw`, `WaveDiMBlock`, `DiTBlock`, `_init_weights`), `mamba/mamba_ssm/modules/mamba_simple.py` (`CondMamba`)
with its `selective_scan_interface.py` (`MambaInnerFnCond`) and `causal-conv1d/csrc` (`causal_conv1d_fwd_cond`),
`wavelet_layer.py` (`DWT_2D`, `IDWT_2D`), `attention_fusion.py` (`CrossAttentionFusion`), `scanning_orders.py`
(`local_scan`) and `mlp.py` (`GatedMLP`), configured as the released ImageNet-256 run (`scripts/train.sh`: DiM-L/2,
--block-type combined --bimamba-type none --cond-mamba --rms-norm --fused-add-norm --learnable-pe
--use-attn-every-k-layers 4 --label-dropout 0.15). DiCo Table 1 quotes DiMSUM-L/2 (84.49 GFLOPs, 59.13 img/s).

The source's layout, kept here (D = 1024, depth 16, patch 2, 256 tokens at 256 px):
- tokens: patch conv + a learnable position table initialised to the 2-D sin-cos table; c = MLP(t-sinusoid) + label;
- each block (pre-norm, Mamba's "add then norm" stream): residual += x (x itself at block 0); h = RMSNorm(residual);
  h is split in two D/2 halves: the spatial half gets x + gate * Mamba(modulate(x)) on the token grid, scanned
  raster, reversed, column-major or reversed column-major (block i: reverse when i is odd, column-major when
  i % 4 >= 2); the frequency half goes through a two-level Haar DWT, its 16 sub-bands laid out as 4 x 4 windows of
  tokens, gets the same gated Mamba scanned window by window (row- or, for odd blocks, column-first) and returns
  through the inverse DWT; the two halves are fused by cross attention (8 heads, q of one half on k, v of the other,
  both ways, then Linear(D, D)); h = h + fusion; h = h + gate * GatedMLP(modulate(RMSNorm(h))) (GELU-tanh, 4D wide,
  one Linear to 2 x 4D), shift / scale / gate from the block's SiLU -> Linear(D, 3D) of c; x = h;
- after blocks 4, 8, 12 and 16 one shared DiT block (LayerNorm without affine, 16-head attention, GatedMLP,
  adaLN with 6 chunks) runs on x (not on the residual stream): the source builds a single `attn_block` and reuses it;
- no final norm (`use_final_norm` off): DiT's final layer on x; the residual stream is dropped.
- Each Mamba is the source's `CondMamba` (d_state 16, d_conv 4, expand 2, dt_rank ceil(d/16)) with a
  `cond_proj` Linear(D, 2 * d) of c. Its fast path hands cond_proj(c) to `causal_conv1d_fwd_cond` as `init_states`,
  and that kernel uses it only as the output buffer and writes the conv result over it (`out = init_x`, the values
  start from the bias): the forward is plain Mamba's. We keep cond_proj (its parameters and the MACs the source
  spends on it) and compute it, but its output is unused, so its parameters are frozen (requires_grad False): a
  trainable layer outside the graph would stop DistributedDataParallel. This is a departure in training only (the
  source back-propagates the kernel's buffer into it).
- The frequency branch keeps the source's token layout exactly: the level-2 sub-bands are divided by 4 and
  re-ordered (block 4 * s2 + s1 -> 4 * s1 + s2), then read with `rearrange("b (c p1 p2) h w -> b (h p1 w p2) c")`,
  which puts the channel index outermost, so a token's D/2 features mix sub-bands and channels. That map is a fixed
  permutation, undone before the inverse DWT, so the branch is x + IDWT(P^-1(gate * Mamba(...)))-like and exactly
  invertible; we reproduce it so that the Mamba sees the source's sequences.
- The Haar DWT is the source's fixed depthwise stride-2 conv with the four 2 x 2 filters (+-1/2), one grouped conv
  here instead of four; the inverse is the matching grouped conv_transpose2d.
- init (`initialize_weights`, then Mamba's `_init_weights` with n_layer = depth): position table sin-cos, patch conv
  xavier on the flattened weight, label table and timestep MLP weights N(0, 0.02), each block's MLP adaLN Linear
  zero, the final layer's adaLN and output Linear zero (so the output is zero at init); then every Linear bias zero
  except the dt projections', and each Mamba's out_proj redrawn as PyTorch's default / sqrt(depth)
  (`ssm.mamba_init_`). The spatial / frequency adaLN and the shared DiT block's adaLN weights are not zeroed.

Counting. DiMSUM counts with calflops (`eval_toolbox/compute_flops.py`: `calculate_flops(model, kwargs={x, t, y})`,
printing flops / 2 / 1e9 as "GFLOPs", batch 1, learn_sigma off). calflops patches torch.nn.functional (linear,
conv1d/2d/3d, conv_transpose*, activations, batch/layer/group/instance norm, pooling, interpolate, softmax,
embedding) and torch.matmul / Tensor.matmul / mm / bmm / addmm / baddbmm / mul / add / einsum as functions; a
linear or conv is 2 x MACs, an activation, norm or explicit torch.add / torch.mul call its elements (so flops / 2 is
the linear and conv MACs plus half of those). It does not see: the `@` operator (Tensor.__matmul__ is not patched),
hence CondMamba's in_proj (`self.in_proj.weight @ ...`) and dt_proj (`delta_proj_weight @ ...` inside
`MambaInnerFnCond`); F.scaled_dot_product_attention (both attentions' QK^T and AV); CUDA extensions
(`causal_conv1d_fwd_cond`, `selective_scan_cuda.fwd`, the Triton RMSNorm); and its conv_transpose formula gives 0
for the IDWT's grouped filters (out_channels // groups = 0). It does see x_proj and out_proj (MambaInnerFnCond calls
F.linear), cond_proj and the DWT's conv2d. We mark what it does not see with `layers.source_kernel` regions (named
after what hides them), so `flops.count(model).gmacs` is DiMSUM's convention and `.full_gmacs` counts everything our
counter knows (conv_transpose2d is unknown to `repro.metrics.flops`, so the IDWT's 4 MACs per output element, 16.8
MMACs in all at 256 px, are in neither). Modulation and gating multiplies, which calflops cannot see (`*`), and the
halves of GELU / LayerNorm flops, which it adds, are left to the counter's own rules: they differ by < 0.1%.
With the source's L/2 layout `.gmacs` is 84.53 at 256 px against the printed 84.49 (+0.04%); `.full_gmacs` 96.66;
parameters 459.9M (426.3M trainable: the 32 frozen cond_proj hold 33.6M).

Departures, all recorded here:
- the output has 2C channels (learned sigma); the source predicts C (`learn_sigma` False): +4.2 MMACs;
- the label table never drops labels itself (the trainer does, `layers.LabelEmbedder`);
- RMSNorm is `nn.RMSNorm` (eps 1e-5, as the source's fused Triton add + norm), the residual stream kept in the model
  dtype where the source keeps it in float32 (`residual_in_fp32`); DropPath (0.1 in the config) is not built:
  it is the identity at inference and counting, and stochastic depth is a training switch we do not reproduce;
- cond_proj frozen (above); the shared DiT block is built only when it runs (depth >= attn_every), so tiny models
  carry no parameters outside the graph (the source always builds it);
- the scan and conv run as `ssm.selective_scan` / `ssm.causal_conv1d` (mamba_ssm's `selective_scan_fn` and
  causal_conv1d on CUDA where installed): the maths of `MambaInnerFnCond` without its kernel's buffer quirk.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Denoiser, LabelEmbedder, TimestepEmbedder, TokenFinalLayer, adaln_zero_, check_input_size, gated,
                     modulate, sincos_pos_embed_2d, source_kernel, unpatchify, xavier_flat_)
from .ssm import MambaMixer, cuda_kernels, causal_conv1d, mamba_init_, selective_scan

WAVELET_LEVELS = 2   # the source's num_wavelet_lv; its layout code supports exactly two levels
UNSEEN_MATMUL = "calflops: Tensor.__matmul__ (not patched)"
UNSEEN_SDPA = "calflops: F.scaled_dot_product_attention (not patched)"


def _haar_filters() -> torch.Tensor:
    # ll, lh, hl, hh as the source builds them from pywt's haar (1/sqrt 2)^2 = 1/2, written exactly so that the
    # transform is orthonormal to the last bit in float64.
    f = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [-0.5, -0.5]],
                      [[0.5, -0.5], [0.5, -0.5]], [[0.5, -0.5], [-0.5, 0.5]]], dtype=torch.float64, device="cpu")
    return f.unsqueeze(1)                                                       # (4, 1, 2, 2)


def haar_dwt(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2) laid out [ll | lh | hl | hh] (each C channels), as `DWT_2D`."""
    n, c, h, w = x.shape
    y = F.conv2d(x, filters.to(x.dtype).repeat(c, 1, 1, 1), stride=2, groups=c)   # channel-major (c, band)
    return y.view(n, c, 4, h // 2, w // 2).transpose(1, 2).reshape(n, 4 * c, h // 2, w // 2)


def haar_idwt(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Inverse of `haar_dwt`: (N, 4C, H, W) band-major -> (N, C, 2H, 2W), as `IDWT_2D`."""
    n, c4, h, w = x.shape
    c = c4 // 4
    x = x.view(n, 4, c, h, w).transpose(1, 2).reshape(n, c4, h, w)
    return F.conv_transpose2d(x, filters.to(x.dtype).repeat(c, 1, 1, 1), stride=2, groups=c)


def _swap_levels(x: torch.Tensor) -> torch.Tensor:
    # The source's `indices[i] = i % 4 * 4 + i // 4` over the 16 level-2 blocks: a 4 x 4 transpose (its own inverse).
    n, c16, h, w = x.shape
    return x.view(n, 4, 4, c16 // 16, h, w).transpose(1, 2).reshape(n, c16, h, w)


def wavelet_tokens(x: torch.Tensor, side: int, filters: torch.Tensor) -> torch.Tensor:
    """`WaveDiMBlock._dwt_fast`: (N, L, C) tokens of a side x side grid -> (N, L, C) two-level sub-band tokens."""
    n, length, c = x.shape
    grid = x.transpose(1, 2).reshape(n, c, side, side)
    bands = _swap_levels(haar_dwt(haar_dwt(grid, filters), filters) / 4)      # (N, 16C, side/4, side/4)
    q = side // 4
    # "b (c p1 p2) h w -> b (h p1 w p2) c": the channel index is read outermost, as in the source.
    return bands.view(n, c, 4, 4, q, q).permute(0, 4, 2, 5, 3, 1).reshape(n, length, c)


def wavelet_grid(x: torch.Tensor, side: int, filters: torch.Tensor) -> torch.Tensor:
    """`WaveDiMBlock._idwt_fast`, the inverse of `wavelet_tokens`."""
    n, length, c = x.shape
    q = side // 4
    bands = _swap_levels((x * 4).view(n, q, 4, q, 4, c).permute(0, 5, 2, 4, 1, 3).reshape(n, 16 * c, q, q))
    grid = haar_idwt(haar_idwt(bands, filters), filters)
    return grid.flatten(2).transpose(1, 2)


def window_order(side: int, window: int, column_first: bool) -> torch.Tensor:
    """Token indices in `local_scan` order: window by window, inside each window row- or column-first."""
    g = side // window
    idx = torch.arange(side * side, device="cpu").view(g, window, g, window)   # (Hg, w, Wg, w)
    return (idx.permute(2, 0, 3, 1) if column_first else idx.permute(0, 2, 1, 3)).reshape(-1)


def grid_order(side: int, transpose: bool, reverse: bool) -> torch.Tensor:
    """Token indices of `DiMBlockRaw`'s scan: raster or column-major, optionally reversed."""
    idx = torch.arange(side * side, device="cpu").view(side, side)
    idx = (idx.t() if transpose else idx).reshape(-1)
    return idx.flip(0) if reverse else idx


class CondMambaMixer(MambaMixer):
    """The source's `CondMamba` forward (its fused path), each op in or out of a `source_kernel` region by whether
    calflops sees it: in_proj and dt_proj run as `@`, the conv and scan in CUDA extensions; x_proj, out_proj and
    cond_proj as F.linear (counted)."""

    def __init__(self, d_model: int, d_cond: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.cond_proj = nn.Linear(d_cond, self.d_inner)
        self.cond_proj.requires_grad_(False)   # overwritten by the source's conv kernel: see the module docstring

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        kernels = cuda_kernels() if (x.is_cuda and self.use_kernels) else None
        self.kernel = "reference" if kernels is None else "mamba_ssm"
        self.cond_proj(c)   # spent by the source, never read back
        with source_kernel(UNSEEN_MATMUL):
            xz = self.in_proj(x).transpose(1, 2)                               # (N, 2E, L)
        u, z = xz.chunk(2, dim=1)
        weight = self.conv1d.weight.squeeze(1)
        with source_kernel("causal_conv1d_cuda.causal_conv1d_fwd_cond"):
            if kernels is not None and kernels[1] is not None:
                u = kernels[1](u.contiguous(), weight, self.conv1d.bias, activation="silu")
            else:
                u = causal_conv1d(u, weight, self.conv1d.bias, activation="silu")
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        with source_kernel(UNSEEN_MATMUL):
            dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)   # bias enters the scan as delta_bias
        scan = selective_scan if kernels is None else kernels[0]
        with source_kernel("selective_scan_cuda.fwd"):
            y = scan(u.contiguous(), dt.contiguous(), -torch.exp(self.A_log.float()), B.transpose(1, 2).contiguous(),
                     C.transpose(1, 2).contiguous(), self.D.float(), z=z.contiguous(),
                     delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2).to(x.dtype))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with source_kernel(UNSEEN_SDPA):
        return F.scaled_dot_product_attention(q, k, v)


class GatedMLP(nn.Module):
    """w12 -> (GELU-tanh(x1) * x2) -> w3, the source's `GatedMLP`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.gelu(x1, approximate="tanh") * x2)


class CrossAttentionFusion(nn.Module):
    """Each half queries the other (q1 on k2, v2 and q2 on k1, v1), heads of width (D/2)/heads, then Linear(D, D)."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        half = dim // 2
        if half % num_heads:
            raise ValueError(f"DiMSUM: half width {half} is not divisible by the fusion's {num_heads} heads")
        self.num_heads = num_heads
        self.qkv1 = nn.Linear(half, 3 * half)
        self.qkv2 = nn.Linear(half, 3 * half)
        self.proj = nn.Linear(dim, dim)

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, length, width = qkv.shape
        return qkv.view(n, length, 3, self.num_heads, width // (3 * self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        n, length, half = x1.shape
        q1, k1, v1 = self._split(self.qkv1(x1))
        q2, k2, v2 = self._split(self.qkv2(x2))
        x12 = _attention(q1, k2, v2).transpose(1, 2).reshape(n, length, half)
        x21 = _attention(q2, k1, v1).transpose(1, 2).reshape(n, length, half)
        return self.proj(torch.cat([x12, x21], dim=-1))


class ScanBranch(nn.Module):
    """x + gate * Mamba(modulate(x)) with the Mamba reading the tokens in `order` (the source's `DiMBlockRaw` and
    `WaveDiMBlock` bodies with an Identity norm). Every op but the scan is per token, so only the mixer's input and
    output are permuted."""

    def __init__(self, dim: int, cond_dim: int, order: torch.Tensor):
        super().__init__()
        self.mixer = CondMambaMixer(dim, cond_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim))
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        h = modulate(x, shift, scale).index_select(1, self.order)
        h = self.mixer(h, c).index_select(1, self.inverse)
        return x + gated(gate, h)


class CombinedBlock(nn.Module):
    """`DiMBlockCombined`: RMSNorm of the residual stream, spatial / wavelet Mamba halves, cross-attention fusion,
    gated MLP."""

    def __init__(self, dim: int, side: int, index: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"DiMSUM: hidden_size={dim} must be even (two halves)")
        reverse, transpose = index % 2 > 0, index % 4 >= 2
        self.side = side
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.spatial_mamba = ScanBranch(dim // 2, dim, grid_order(side, transpose, reverse))
        # WaveDiMBlock is built with reverse=False, transpose=<the block's reverse>; windows of side / 4 tokens.
        self.freq_mamba = ScanBranch(dim // 2, dim, window_order(side, side // 4, column_first=reverse))
        self.register_buffer("haar", _haar_filters().float(), persistent=False)
        self.proj = CrossAttentionFusion(dim)
        self.norm_2 = nn.RMSNorm(dim, eps=1e-5)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.mlp = GatedMLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x if residual is None else residual + x
        h = self.norm(residual)
        x1, x2 = h.chunk(2, dim=-1)
        x1 = self.spatial_mamba(x1, c)
        haar = self.haar.to(x2.dtype)
        x2 = wavelet_grid(self.freq_mamba(wavelet_tokens(x2, self.side, haar), c), self.side, haar)
        h = h + self.proj(x1, x2)
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        h = h + gated(gate, self.mlp(modulate(self.norm_2(h), shift, scale)))
        return h, residual


class AttentionBlock(nn.Module):
    """The source's `DiTBlock` (timm Attention, qkv bias, no qk-norm; GatedMLP; 6-chunk adaLN, not zeroed)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DiMSUM: hidden_size={dim} is not divisible by the attention's {num_heads} heads")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GatedMLP(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        n, length, dim = h.shape
        q, k, v = self.qkv(h).view(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        h = self.attn_proj(_attention(q, k, v).transpose(1, 2).reshape(n, length, dim))
        x = x + gated(gate_a, h)
        return x + gated(gate_m, self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class DiMSUM(Denoiser):
    """Diffusion Mamba with spatial and wavelet scans fused by cross attention, and a shared attention block.

    Args:
        input_size: latent side; the token grid (input_size / patch_size) must be a multiple of 4 (two DWT levels).
        depth: Mamba blocks; the shared attention block runs after every `attn_every`-th (<= 0: never).
        attn_heads: heads of the shared attention block (the source's 16).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1024,
                 depth: int = 16, attn_every: int = 4, attn_heads: int = 16, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1):
        super().__init__()
        check_input_size(input_size, patch_size, "DiMSUM")
        side = input_size // patch_size
        if side % (2 ** WAVELET_LEVELS):
            raise ValueError(f"DiMSUM: the token grid {side} x {side} must be a multiple of 4 (two Haar levels)")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.hidden_size, self.depth, self.attn_every = hidden_size, depth, attn_every
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, hidden_size))   # learnable (--learnable-pe)
        self.blocks = nn.ModuleList([CombinedBlock(hidden_size, side, i) for i in range(depth)])
        runs = attn_every > 0 and depth >= attn_every
        self.attn_block = AttentionBlock(hidden_size, attn_heads) if runs else None
        self.final_layer = TokenFinalLayer(hidden_size, hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.input_size // self.patch_size)[None])
        xavier_flat_(self.x_embedder)
        self.y_embedder.init_weights()
        self.t_embedder.init_weights()
        adaln_zero_(self.blocks, self.final_layer)
        mamba_init_(self, n_layer=self.depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y)                              # (N, D)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed       # (N, T, D)
        residual = None
        for i, block in enumerate(self.blocks):
            h, residual = block(h, residual, c)
            if self.attn_block is not None and (i + 1) % self.attn_every == 0:
                h = self.attn_block(h, c)
        return unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels)   # (N, 2C, H, W)


PRESETS = {
    # DiM_L_2 of models_dim.py with the ImageNet-256 switches of scripts/train.sh (label dropout 0.15 there).
    "DiMSUM-L/2": dict(patch_size=2, hidden_size=1024, depth=16, attn_every=4, attn_heads=16,
                       class_dropout_prob=0.15),
}

PUBLISHED = {"DiMSUM-L/2": dict(gmacs_256=84.49, source="DiCo Table 1")}
