"""Latent DiffiT (Hatamizadeh et al., ECCV 2024, "DiffiT: Diffusion Vision Transformers for Image Generation"),
as in NVlabs/DiffiT `diffit/diffit.py`. It appears in DiC's 400K table as a GFLOPs reference.

Latent DiffiT is DiT without adaLN: an isotropic transformer on 2x2 patches of the SD-VAE latent with a fixed
sin-cos position table, whose only conditioning is the time-dependent self-attention (TMSA): q, k and v are each
W_s x + W_t c, a spatial projection of every token plus a temporal projection of the condition c = time embedding
+ label embedding (the label enters by addition, as in the paper's latent model), and the logits get a learned
relative position bias, softmax(q k^T / sqrt(d) + B) v. B is a Swin-style table with one entry per head and 2-D
offset, the window being the whole token grid (so the table's size follows `input_size`). Blocks are pre-norm
(LayerNorm without affine, eps 1e-6) with a GELU(tanh) MLP and no gates; the final layer is LayerNorm -> SiLU ->
Linear with the Linear zero-initialised, so the model's output is zero at init.

What the public code holds: the model definition and a sampling script only. The repository has no training
code, and `sample.py` imports modules it does not ship (`diffit.script_util`, `create_diffusion`). The image-space
(U-shaped) DiffiT is absent; `diffit/pos_emb.py` holds SwinV2-style continuous position-bias MLPs that the
latent model does not use (its bias is the plain learned table described above).

Departures from the public code, recorded here:
- guidance: at 256 px the public `forward_with_cfg` ramps the guidance scale with t (a power-cosine schedule,
  scale_pow 4); the harness's `Denoiser.forward_with_cfg` applies a constant scale, as for every other model.
- the relative position index is a non-persistent buffer (the public code saves it in the state dict), and the
  patch embedding is a bare Conv2d as in `dit.py` (`x_embedder.weight`, not timm's `x_embedder.proj.weight`).
  Other parameter names follow the public code (`qkv` = W_s, `qkv_temb` = W_t, `relative_position_bias_table`).
- labels are dropped for guidance by the trainer, not by the label embedder (as for every model here).

The output has 2C channels (learned sigma), as in the public code (`learn_sigma=True`), so this is no departure.

Depth 28 for "DiffiT-XL/2" is our assumption: the public `DiffiT` class defaults to depth 30 while its `Diffit`
constructor (the one `sample.py` builds) sets 28 with width 1152, 16 heads and patch 2. Depth 28 gives
118.51 GMACs at 256, the printed value (118.5); depth 30 would give 126.97. It also gives 561.3M parameters,
the paper's implied 561M (16.88% fewer than DiT-XL/2's 675M, 19.85% fewer than MDT's 700M). The public code
scales q by an explicit multiply, which torchprofile counts (+0.008 G, so 118.52 for the public code); SDPA's
internal scaling is not counted here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Denoiser, LabelEmbedder, Mlp, TimestepEmbedder, check_input_size, dit_trunk_init_,
                     frozen_pos_embed, unpatchify, zero_)


def relative_position_index(grid: int) -> torch.Tensor:
    """(T, T) index into a ((2g-1)^2)-row bias table for the T = g*g tokens of a row-major g x g grid."""
    coords = torch.arange(grid)
    hw = torch.stack(torch.meshgrid(coords, coords, indexing="ij")).flatten(1)   # (2, T): row, column
    offset = hw[:, :, None] - hw[:, None, :] + (grid - 1)                        # (2, T, T) in 0..2g-2
    return offset[0] * (2 * grid - 1) + offset[1]


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention: q, k, v = W_s x + W_t c, logits + relative position bias."""

    def __init__(self, dim: int, num_heads: int, grid: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)          # W_s
        self.qkv_temb = nn.Linear(dim, 3 * dim)     # W_t
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def qkv_heads(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, length, dim = x.shape
        # c is one vector per sample, so W_t c shifts every token's q, k and v alike: time acts on the attention
        # pattern itself, not only on the features as adaLN does.
        qkv = self.qkv(x) + self.qkv_temb(c).unsqueeze(1).to(x.dtype)
        qkv = qkv.reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)                                                  # each (N, heads, T, head_dim)

    def position_bias(self) -> torch.Tensor:
        length = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(length, length, self.num_heads)
        return bias.permute(2, 0, 1).unsqueeze(0)                             # (1, heads, T, T)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv_heads(x, c)
        # An additive float mask is exactly "+ B" on the scaled logits; SDPA keeps the counter's two matmuls.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias().to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))         # (N, T, D)


class DiffiTBlock(nn.Module):
    """x + TMSA(LN x, c); x + MLP(LN x): pre-norm, no adaLN and no gates."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, num_heads, grid)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh"))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), c)
        return x + self.mlp(self.norm2(x))


class DiffiTFinalLayer(nn.Module):
    """LayerNorm (no affine) -> SiLU -> Linear per token; unconditioned, unlike DiT's adaLN final layer."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(self.norm_final(x)))


class DiffiT(Denoiser):
    """Latent DiffiT: class-conditional isotropic transformer whose time and label act through TMSA only.

    Args:
        input_size: latent side (32 for 256 px, 64 for 512 px); fixes the position table and the bias table.
        patch_size: 2 in the paper.
        hidden_size, depth, num_heads, mlp_ratio: see PRESETS.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1):
        super().__init__()
        check_input_size(input_size, patch_size, "DiffiT")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob

        grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Frozen sin-cos table kept as a parameter, as the public code does (it counts in the parameter total).
        self.pos_embed = frozen_pos_embed(hidden_size, grid)
        self.blocks = nn.ModuleList([DiffiTBlock(hidden_size, num_heads, mlp_ratio, grid) for _ in range(depth)])
        self.final_layer = DiffiTFinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        dit_trunk_init_(self)
        for block in self.blocks:
            # The public code draws the table once at construction (timm trunc_normal_, std 0.02); its Linear-only
            # init pass leaves it as drawn.
            nn.init.trunc_normal_(block.attn.relative_position_bias_table, std=0.02)
        # The only zero init of the public code: with no adaLN gates, this is what makes the output start at zero.
        zero_(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, D), the "time token" of TMSA
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x)                                              # (N, T, p*p*2C)
        return unpatchify(x, self.patch_size, self.out_channels)             # (N, 2C, H, W)


PRESETS = {
    "DiffiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),   # depth assumed, see docstring
}

# Published counts as printed ("GFLOPs" are GMACs).
PUBLISHED = {
    "DiffiT-XL/2": dict(gmacs_256=118.5, source="DiC poster, 400K table"),
}
