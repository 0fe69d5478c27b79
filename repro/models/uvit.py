"""U-ViT (Bao et al., CVPR 2023), as in baofff/U-ViT `libs/uvit.py`: every input is a token (time, label,
patches), with long skips between the shallow and deep halves. It appears in DiC's tables as a throughput and
GFLOPs reference only (DiC never trains it), so this file serves counts and `repro bench`.

Departures from U-ViT, both recorded here:
- the output has 2C channels (learned sigma), like every model in the harness; U-ViT predicts C. This adds a
  few MMACs to the decoder Linear and the final 3x3 conv (+0.01 G at 256).
- "U-ViT-XL" of DiC's 400K table (113.0 GFLOPs) is not a configuration of the U-ViT paper. Width 1024, 16 heads,
  depth 30 (15 in, 1 middle, 15 out), patch 2 is our assumption: it gives 113.0 GMACs at 256, the printed value.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (Attention, Denoiser, LabelEmbedder, Mlp, check_input_size, timestep_embedding,
                     unpatchify)


class UViTBlock(nn.Module):
    """Pre-norm transformer block; a deep-half block first fuses its long skip: Linear(cat[x, skip])."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), nn.GELU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(Denoiser):
    """U-ViT for class-conditional latent diffusion (time and label enter as tokens, no adaLN).

    Args:
        depth: blocks in the two halves together (depth // 2 in, one middle block, depth // 2 out).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, embed_dim: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1):
        super().__init__()
        check_input_size(input_size, patch_size, "U-ViT")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.embed_dim, self.num_classes, self.class_dropout_prob = embed_dim, num_classes, class_dropout_prob
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.label_emb = LabelEmbedder(num_classes, embed_dim, class_dropout_prob)
        self.extras = 2  # time token and label token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (input_size // patch_size) ** 2, embed_dim))
        self.in_blocks = nn.ModuleList([UViTBlock(embed_dim, num_heads, mlp_ratio, False) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(embed_dim, num_heads, mlp_ratio, False)
        self.out_blocks = nn.ModuleList([UViTBlock(embed_dim, num_heads, mlp_ratio, True) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * self.out_channels)
        self.final_layer = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # PyTorch's default init for the patch and final convs and the label table's N(0, 1) are U-ViT's own.

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                   # (N, T, D)
        time_token = timestep_embedding(t, self.embed_dim)[:, None].to(x.dtype)  # (N, 1, D), no MLP (ImageNet)
        label_token = self.label_emb(y)[:, None]                              # (N, 1, D)
        x = torch.cat([label_token, time_token, x], dim=1) + self.pos_embed  # (N, 2+T, D)
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]                  # (N, T, p*p*2C)
        return self.final_layer(unpatchify(x, self.patch_size, self.out_channels))


PRESETS = {
    "U-ViT-L/2": dict(embed_dim=1024, depth=20, num_heads=16, patch_size=2),
    "U-ViT-XL": dict(embed_dim=1024, depth=30, num_heads=16, patch_size=2),   # assumed, see module docstring
    "U-ViT-H/2": dict(embed_dim=1152, depth=28, num_heads=16, patch_size=2),
    # DiCo Table 2 (512 px): patch 4 keeps the 256-token sequence of the /2 models at 256 px
    "U-ViT-L/4": dict(embed_dim=1024, depth=20, num_heads=16, patch_size=4),
    "U-ViT-H/4": dict(embed_dim=1152, depth=28, num_heads=16, patch_size=4),
}

PUBLISHED = {
    "U-ViT-XL": dict(gmacs_256=113.0, source="DiC poster, 400K table (U-ViT-XL)"),
    "U-ViT-H/2": dict(gmacs_256=133.25, source="DiCo Table 1 (DiC Fig. 1 prints 133.5)"),
    "U-ViT-L/4": dict(gmacs_512=76.52, source="DiCo Table 2"),
    "U-ViT-H/4": dict(gmacs_512=133.27, source="DiCo Table 2"),
}
