"""DiT (Peebles & Xie, ICCV 2023): the transformer baseline of both papers, as in facebookresearch/DiT `models.py`.

One switch beyond DiT: `long_skips`, U-ViT-style long skip connections (concatenate, then Linear 2D -> D),
which DiCo's Table 4 row "DiT (iso.+skip)" adds to DiT-S/2 (`specs/dico.md` section 6: 5 skips reproduce
its 34.3M params and 6.44 GFLOPs).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (Attention, Denoiser, LabelEmbedder, Mlp, TimestepEmbedder, TokenFinalLayer, adaln_zero_,
                     check_input_size, dit_trunk_init_, frozen_pos_embed, gated, modulate, run_with_long_skips,
                     unpatchify)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x + g1 * attn(mod(LN x)); x + g2 * mlp(mod(LN x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gated(gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        return x + gated(gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class DiT(Denoiser):
    """Diffusion Transformer with adaLN-Zero conditioning and learned sigma.

    Args:
        input_size: latent side (32 for 256 px, 64 for 512 px); fixes the position table.
        patch_size: 2, 4 or 8 in the DiT paper.
        hidden_size, depth, num_heads, mlp_ratio: the DiT-S/B/L/XL sizes (see PRESETS).
        long_skips: k > 0 adds U-ViT-style long skips: blocks 0..k-1 push their output, the last k blocks
            each pop one (LIFO), concatenate it and fuse with a Linear 2D -> D before running. 0 = DiT.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1, long_skips: int = 0):
        super().__init__()
        check_input_size(input_size, patch_size, "DiT")
        if not 0 <= long_skips <= depth // 2:
            raise ValueError(f"long_skips={long_skips} must be in 0..{depth // 2} for depth {depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.num_classes, self.class_dropout_prob, self.long_skips = num_classes, class_dropout_prob, long_skips

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = frozen_pos_embed(hidden_size, grid)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.skip_linears = nn.ModuleList([nn.Linear(2 * hidden_size, hidden_size) for _ in range(long_skips)])
        self.final_layer = TokenFinalLayer(hidden_size, hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        dit_trunk_init_(self)
        adaln_zero_(self.blocks, self.final_layer)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, D)
        x = run_with_long_skips(self.blocks, self.skip_linears, x, c, cat_dim=-1)
        x = self.final_layer(x, c)                                           # (N, T, p*p*2C)
        return unpatchify(x, self.patch_size, self.out_channels)             # (N, 2C, H, W)


_SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6), "B": dict(depth=12, hidden_size=768, num_heads=12),
          "L": dict(depth=24, hidden_size=1024, num_heads=16), "XL": dict(depth=28, hidden_size=1152, num_heads=16)}

PRESETS = {f"DiT-{size}/{p}": dict(**dims, patch_size=p) for size, dims in _SIZES.items() for p in (2, 4, 8)}
# DiCo Table 4 "DiT (iso.+skip)": DiT-S/2 with 5 U-ViT-style long skips (inferred from its params and GFLOPs).
PRESETS["DiT-S/2-skip"] = dict(**_SIZES["S"], patch_size=2, long_skips=5)

# Published counts as printed ("GFLOPs" are GMACs; params in millions, DiCo counts trainable ones only).
PUBLISHED = {
    "DiT-S/2": dict(gmacs_256=6.06, params_m=32.9, source="DiCo Tables 1, 4"),
    "DiT-B/2": dict(gmacs_256=23.02, params_m=130.0, source="DiCo Table 1; DiT Table 1 (130M)"),
    "DiT-L/2": dict(gmacs_256=80.73, params_m=458.0, source="DiCo Table 1; DiT Table 1 (458M)"),
    "DiT-XL/2": dict(gmacs_256=118.66, gmacs_512=524.7, params_m=675.0, source="DiCo Tables 1, 2; DiT Table 1"),
    "DiT-S/2-skip": dict(gmacs_256=6.44, params_m=34.3, source="DiCo Table 4, DiT (iso.+skip)"),
}
