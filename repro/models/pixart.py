"""PixArt-α (Chen et al., "PixArt-α: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis", ICLR 2024) made class-conditional, as in PixArt-alpha/PixArt-alpha `diffusion/model/nets/PixArt.py`
and `PixArt_blocks.py`. DiC's 400K table lists it as "PixArt-α-XL/2" (118.4 GFLOPs at 256) beside DiT-XL/2.

adaLN-single (paper section 2.3): DiT computes each block's six shifts, scales and gates with a block-specific MLP,
S(i) = f(i)(c + t); PixArt-α computes one S = f(t) with a single SiLU -> Linear(D, 6D) (`t_block`) shared by every
block, and block i uses S + E(i), E(i) a learnable (6, D) `scale_shift_table`. The final layer has its own (2, D)
table added to the embedder output directly (no Linear). Blocks are otherwise DiT's: LayerNorm without affine,
self-attention with qkv bias, GELU(tanh) MLP of ratio 4, sin-cos positions.

Where the label goes (our choice; the public code has no class-conditional PixArt): the repository only carries
DiT's unused `LabelEmbedder` and `FinalLayer` in `PixArt_blocks.py`, and its one model is the text-to-image one,
whose caption tokens enter through a cross-attention in every block. The paper writes DiT's modulation as
S(i) = f(i)(c + t), c the class embedding, and adaLN-single's as S = f(t), text entering by cross-attention; for
ImageNet we keep c + t as the input of the single f: the class embedding is added to the timestep embedding before
the shared `t_block`, and the sum also feeds the final layer's table. No cross-attention. The published count
settles it: this layout gives 118.44 GMACs (DiT-XL/2's 118.66 less 27 per-block adaLN Linears and the final one),
the printed 118.4, while a cross-attention to one label token per block would add about 19 GMACs (q and output
projections over 256 tokens in 28 blocks).

Departures and assumptions, all recorded here:
- the label table is DiT's (one extra null row, N(0, 0.02) init); PixArt has none to copy;
- no cross-attention, window attention, relative positions or drop path (the text-to-image parts, all off or
  absent for ImageNet 256); attention goes through `F.scaled_dot_product_attention`, where PixArt calls xFormers;
- the output has 2C channels (learned sigma), which is also PixArt's default (`pred_sigma=True`): not a departure;
- initialisation is PixArt's: xavier Linears, patch-embed weight xavier as a Linear with its bias left at PyTorch's
  default, t-MLP and `t_block` weights N(0, 0.02), tables N(0, 1/D), final Linear zero. Only the output is zero at
  init; unlike adaLN-Zero the blocks do not start as the identity, because the gates come from random tables.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (Attention, Denoiser, LabelEmbedder, Mlp, TimestepEmbedder, check_input_size, gated,
                     modulate, sincos_pos_embed_2d, unpatchify, xavier_init_, zero_)


class PixArtBlock(nn.Module):
    """DiT block whose modulation is the shared (N, 6D) vector plus this block's own (6, D) table."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh"))
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        n, dim = mod.shape[0], x.shape[-1]
        # The table is added, not multiplied: no MACs, which is where adaLN-single's saving over DiT comes from.
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod.view(n, 6, dim) + self.scale_shift_table[None]).unbind(1)
        x = x + gated(gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        return x + gated(gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class PixArtFinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by the condition plus a (2, D) table, then Linear per token."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (c[:, None] + self.scale_shift_table[None]).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))      # (N, T, out_features)


class PixArt(Denoiser):
    """Class-conditional PixArt-α: a DiT whose adaLN is computed once (`t_block`) and shared by all blocks.

    Args:
        input_size: latent side (32 for 256 px); fixes the position table.
        hidden_size, depth, num_heads, mlp_ratio: PixArt-α-XL/2 is DiT-XL/2's 1152, 28, 16, 4.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1):
        super().__init__()
        check_input_size(input_size, patch_size, "PixArt")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.hidden_size, self.num_classes, self.class_dropout_prob = hidden_size, num_classes, class_dropout_prob

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        grid = input_size // patch_size
        # A buffer, not a parameter, as in PixArt: the fixed table is not among its counted parameters.
        self.register_buffer("pos_embed", torch.zeros(1, grid * grid, hidden_size))
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(hidden_size, grid)[None])
        self.blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = PixArtFinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        xavier_init_(self)
        # PixArt re-initialises only the patch-embed weight (xavier on its (D, C*p*p) view); the conv bias keeps
        # PyTorch's default init because PixArt's xavier pass touches Linears only.
        self.x_embedder.reset_parameters()
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        self.t_embedder.init_weights()
        self.y_embedder.init_weights()
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        std = self.hidden_size ** -0.5                    # PixArt's torch.randn(.) / sqrt(D)
        for block in self.blocks:
            nn.init.normal_(block.scale_shift_table, std=std)
        nn.init.normal_(self.final_layer.scale_shift_table, std=std)
        zero_(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, D)
        mod = self.t_block(c)                                                # (N, 6D), once for all blocks
        for block in self.blocks:
            x = block(x, mod)
        x = self.final_layer(x, c)                                           # (N, T, p*p*2C)
        return unpatchify(x, self.patch_size, self.out_channels)             # (N, 2C, H, W)


PRESETS = {
    "PixArt-α-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}

# "GFLOPs" as printed are GMACs; DiC prints no parameter count for PixArt-α.
PUBLISHED = {
    "PixArt-α-XL/2": dict(gmacs_256=118.4, source="DiC poster, 400K table"),
}
