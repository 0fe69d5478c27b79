"""DiCo (Ai et al., NeurIPS 2025): a U-shaped ConvNet of DiT-style blocks whose attention is a Conv Module
(1x1 conv, depthwise conv, GELU, Compact Channel Attention, 1x1 conv), as in shallowdream204/DiCo `dico_models.py`.

The ablations of DiCo Tables 4 and 5 are named switches on the one `DiCo` class; defaults are the released DiCo.
What the paper leaves open, and what we assume (`specs/dico.md` section 6):
- "DiCo (iso.)": DiT-S/2's skeleton (2x2 patch embedding to 384 channels, a 16x16 map, DiT's final layer, no
  position embedding) with 13 DiCo blocks of width 384, FFN ratio 4 (33.65M params, 4.94 GMACs; printed
  33.7M / 5.67: the parameters match, the GMACs fall 0.73 G short, so part of the paper's layout is unknown).
  "iso.+skip" adds 5 U-ViT-style long skips (blocks 0-4 push, the last 5 pop, concat + 1x1 fuse).
- Rows marked ‡ in Table 5 swap a component and re-adjust depth to the printed parameter count; the adjustment
  is not given. We keep DiCo-S and change stage depths (PRESETS below) to land near the printed parameters;
  the GMACs then differ from the printed ones, so the paper's adjustment must have been another:
    w/o CCA  depths [6,5,4,5,4]: 33.00M, 4.55 G (printed 33.0M, 4.24)
    SE       depths [5,5,4,4,4]: 33.01M, 4.35 G (printed 32.9M, 4.25)
    self-attention [4,3,4,3,4]: 32.93M, 8.37 G with the attention matmuls, 4.93 G without (printed 33.0M, 4.23).
- SE (CCA -> SE module): two 1x1 convs with ReLU between, reduction 4 (not given in the paper).
- "Conv Module -> self-attention" (= "DiT (U-shape)" of Table 4): multi-head self-attention over the pixels of
  each stage, head dim 64, no position embedding (the conv stem and resampling convs remain).
- act applies to both activations of the block (Conv Module and FFN): Table 5 says only "GELU -> ReLU".
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (Attention, ChannelLayerNorm, ConvFinalLayer, Denoiser, LabelEmbedder, TimestepEmbedder,
                     TokenFinalLayer, check_choice, check_input_size, gated, modulate,
                     run_with_long_skips, unpatchify, xavier_flat_, xavier_init_, zero_)

ARCHS = ("isotropic", "isotropic_skip", "unet")
CHANNEL_ATTENTIONS = ("cca", "none", "se")
MIXERS = ("conv", "attention")
ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}  # exact (erf) GELU, as in [C]
DW_KERNELS = (3, 5, 7)
PAPER_ISO_SKIPS = 5


class ChannelAttention(nn.Module):
    """h * sigmoid(f(GAP(h))): CCA is one full 1x1 conv (no reduction, no hidden non-linearity); SE is two
    1x1 convs with ReLU between (the reference SE design)."""

    def __init__(self, dim: int, kind: str, se_reduction: int):
        super().__init__()
        if kind == "cca":
            self.fc = nn.Conv2d(dim, dim, 1)
        else:
            hidden = max(1, dim // se_reduction)
            self.fc = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * torch.sigmoid(self.fc(h.mean(dim=(2, 3), keepdim=True)))


class ConvModule(nn.Module):
    """1x1 conv -> depthwise kxk conv -> act -> channel attention -> 1x1 conv (DiCo Fig. 6c)."""

    def __init__(self, dim: int, dw_kernel: int, act: str, channel_attention: str, se_reduction: int):
        super().__init__()
        self.pw_in = nn.Conv2d(dim, dim, 1)
        self.dw = nn.Conv2d(dim, dim, dw_kernel, padding=dw_kernel // 2, groups=dim)
        self.act = ACTS[act]()
        self.ca = nn.Identity() if channel_attention == "none" else ChannelAttention(dim, channel_attention,
                                                                                     se_reduction)
        self.pw_out = nn.Conv2d(dim, dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pw_out(self.ca(self.act(self.dw(self.pw_in(h)))))


class MapAttention(nn.Module):
    """Self-attention over the pixels of an (N, C, H, W) map (the "Conv Module -> self-attention" ablation)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not divisible by attn_head_dim={head_dim}")
        self.attn = Attention(dim, dim // head_dim, qkv_bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        tokens = self.attn(h.flatten(2).transpose(1, 2))                     # (N, HW, C)
        return tokens.transpose(1, 2).reshape(n, c, hh, ww)


class DiCoBlock(nn.Module):
    """x + g1 * mixer(LN x * (1 + s1) + a1); x + g2 * FFN(LN x * (1 + s2) + a2), adaLN order a1, s1, g1, a2, s2, g2."""

    def __init__(self, dim: int, cond_dim: int, mlp_ratio: int, mixer: str, dw_kernel: int, act: str,
                 channel_attention: str, se_reduction: int, attn_head_dim: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        if mixer == "conv":
            self.mixer = ConvModule(dim, dw_kernel, act, channel_attention, se_reduction)
        else:
            self.mixer = MapAttention(dim, attn_head_dim)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = nn.Sequential(nn.Conv2d(dim, mlp_ratio * dim, 1), ACTS[act](), nn.Conv2d(mlp_ratio * dim, dim, 1))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gated(gate1, self.mixer(modulate(self.norm1(x), shift1, scale1)))
        return x + gated(gate2, self.ffn(modulate(self.norm2(x), shift2, scale2)))


class DiCo(Denoiser):
    """Conv diffusion U-Net of DiCo blocks; defaults reproduce the released DiCo-XL.

    Args:
        width: base width D; U-Net stage widths are D, 2D, 4D (middle), 2D, 2D (dec1 stays at 2D, as in [C]).
        depths: U-Net: blocks per stage [enc1, enc2, middle, dec2, dec1]; isotropic archs: a 1-tuple.
        mlp_ratio: FFN expansion r (2 for S-XL, 4 for H).
        arch: Table 4 rows: "unet" (DiCo), "isotropic" (DiT-S/2-like skeleton, patch 2, one resolution) or
            "isotropic_skip" (+ long skips).
        long_skips: isotropic_skip only; number of long skips (None = 5, the count that matches Table 4).
        channel_attention: Table 5: "cca" (DiCo), "none" (w/o CCA) or "se" (CCA -> SE module).
        se_reduction: SE's channel reduction (not given in the paper; 4 assumed).
        dw_kernel: depthwise kernel, 3 (DiCo), 5 or 7 (Table 5).
        act: "gelu" (DiCo) or "relu" (Table 5).
        mixer: "conv" (DiCo's Conv Module) or "attention" (Table 5 "Conv Module -> self-attention", which is
            Table 4's "DiT (U-shape)").
        attn_head_dim: head width for mixer="attention".
        patch_size: isotropic archs only: the patch embedding's size (2, as DiT-S/2).
    """

    def __init__(self, input_size: int = 32, in_channels: int = 4, width: int = 416,
                 depths: tuple[int, ...] = (9, 9, 10, 9, 9), mlp_ratio: int = 2, arch: str = "unet",
                 long_skips: int | None = None, channel_attention: str = "cca", se_reduction: int = 4,
                 dw_kernel: int = 3, act: str = "gelu", mixer: str = "conv", attn_head_dim: int = 64,
                 patch_size: int = 2, num_classes: int = 1000, class_dropout_prob: float = 0.1):
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("channel_attention", channel_attention, CHANNEL_ATTENTIONS)
        check_choice("dw_kernel", dw_kernel, DW_KERNELS)
        check_choice("act", act, tuple(ACTS))
        check_choice("mixer", mixer, MIXERS)
        depths = tuple(depths)
        if arch == "unet":
            if len(depths) != 5 or min(depths) < 1:
                raise ValueError(f"depths={depths}: the U-Net needs 5 positive stage depths")
            if width % 2:
                raise ValueError(f"width={width} must be even (the downsampling conv outputs D/2 channels)")
            if long_skips is not None or patch_size != 2:
                raise ValueError("long_skips and patch_size apply to the isotropic archs only")
            check_input_size(input_size, 4, "DiCo")
        else:
            if len(depths) != 1 or depths[0] < 1:
                raise ValueError(f"depths={depths}: {arch} takes one block count")
            if arch == "isotropic" and long_skips is not None:
                raise ValueError("long_skips applies to arch='isotropic_skip' only")
            check_input_size(input_size, patch_size, "DiCo")
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, 2 * in_channels
        self.arch, self.patch_size = arch, patch_size
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob

        def block(dim: int, cond_dim: int) -> DiCoBlock:
            return DiCoBlock(dim, cond_dim, mlp_ratio, mixer, dw_kernel, act, channel_attention, se_reduction,
                             attn_head_dim)

        if arch == "unet":
            d1, d2, d3 = width, 2 * width, 4 * width
            embed_widths = (d1, d2, d3)
            self.stem = nn.Conv2d(in_channels, d1, 3, padding=1)
            e1, e2, m, n2, n1 = depths
            self.enc1 = nn.ModuleList([block(d1, d1) for _ in range(e1)])
            self.down1 = nn.Sequential(nn.Conv2d(d1, d1 // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
            self.enc2 = nn.ModuleList([block(d2, d2) for _ in range(e2)])
            self.down2 = nn.Sequential(nn.Conv2d(d2, d2 // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
            self.mid = nn.ModuleList([block(d3, d3) for _ in range(m)])
            self.up2 = nn.Sequential(nn.Conv2d(d3, 2 * d3, 3, padding=1, bias=False), nn.PixelShuffle(2))
            self.fuse2 = nn.Conv2d(2 * d2, d2, 1)
            self.dec2 = nn.ModuleList([block(d2, d2) for _ in range(n2)])
            self.up1 = nn.Sequential(nn.Conv2d(d2, 4 * d1, 3, padding=1, bias=False), nn.PixelShuffle(2))
            self.fuse1 = nn.Conv2d(2 * d1, 2 * d1, 1)  # [C] keeps 2D channels here (no reduction)
            self.dec1 = nn.ModuleList([block(d2, d2) for _ in range(n1)])  # width 2D, condition c2 ([C])
            self.final_layer = ConvFinalLayer(d2, d2, self.out_channels)
        else:
            n = depths[0]
            k = (PAPER_ISO_SKIPS if long_skips is None else long_skips) if arch == "isotropic_skip" else 0
            if not 0 <= k <= n // 2:
                raise ValueError(f"long_skips={k} must be in 0..{n // 2} for {n} blocks")
            embed_widths = (width,)
            self.x_embedder = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
            self.blocks = nn.ModuleList([block(width, width) for _ in range(n)])
            self.skip_fuse = nn.ModuleList([nn.Conv2d(2 * width, width, 1) for _ in range(k)])
            self.final_layer = TokenFinalLayer(width, width, patch_size * patch_size * self.out_channels)
        self.t_embedders = nn.ModuleList([TimestepEmbedder(w) for w in embed_widths])
        self.y_embedders = nn.ModuleList([LabelEmbedder(num_classes, w, class_dropout_prob) for w in embed_widths])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        xavier_init_(self)
        xavier_flat_(self.stem if self.arch == "unet" else self.x_embedder)
        for emb in self.y_embedders:
            emb.init_weights()
        for emb in self.t_embedders:
            emb.init_weights()
        for m in self.modules():  # DiCo's block zero-init works in [C]: every block starts as the identity
            if isinstance(m, DiCoBlock):
                zero_(m.adaLN_modulation[-1])
        zero_(self.final_layer.adaLN_modulation[-1])
        zero_(self.final_layer.conv if self.arch == "unet" else self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = [te(t) + ye(y) for te, ye in zip(self.t_embedders, self.y_embedders, strict=True)]
        if self.arch == "unet":
            return self._unet(x, *c)
        return self._isotropic(x, c[0])

    def _unet(self, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)                                                     # (N, D, H, W)
        for blk in self.enc1:
            x = blk(x, c1)
        skip1 = x
        x = self.down1(x)                                                    # (N, 2D, H/2, W/2)
        for blk in self.enc2:
            x = blk(x, c2)
        skip2 = x
        x = self.down2(x)                                                    # (N, 4D, H/4, W/4)
        for blk in self.mid:
            x = blk(x, c3)
        x = self.fuse2(torch.cat([self.up2(x), skip2], dim=1))               # (N, 2D, H/2, W/2)
        for blk in self.dec2:
            x = blk(x, c2)
        x = self.fuse1(torch.cat([self.up1(x), skip1], dim=1))               # (N, 2D, H, W)
        for blk in self.dec1:
            x = blk(x, c2)
        return self.final_layer(x, c2)                                       # (N, 2*in, H, W)

    def _isotropic(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x)                                               # (N, W, H/p, W/p)
        x = run_with_long_skips(self.blocks, self.skip_fuse, x, c, cat_dim=1)
        x = self.final_layer(x.flatten(2).transpose(1, 2), c)                # (N, T, p*p*2C)
        return unpatchify(x, self.patch_size, self.out_channels)


PRESETS = {
    "DiCo-S": dict(width=128, depths=(5, 4, 4, 4, 4), mlp_ratio=2),
    "DiCo-B": dict(width=256, depths=(5, 4, 4, 4, 4), mlp_ratio=2),
    "DiCo-L": dict(width=352, depths=(9, 8, 9, 8, 9), mlp_ratio=2),
    "DiCo-XL": dict(width=416, depths=(9, 9, 10, 9, 9), mlp_ratio=2),
    "DiCo-H": dict(width=416, depths=(14, 12, 10, 12, 14), mlp_ratio=4),
}
_S = PRESETS["DiCo-S"]
_ISO = dict(width=384, depths=(13,), mlp_ratio=4)
PRESETS.update({
    # Table 4 (architecture), S scale
    "DiCo-S-iso": dict(_ISO, arch="isotropic"),
    "DiCo-S-isoskip": dict(_ISO, arch="isotropic_skip"),
    # Table 5 (components), S scale; ‡ rows re-adjust depths to the printed params (see module docstring)
    "DiCo-S-relu": dict(_S, act="relu"),
    "DiCo-S-dw5": dict(_S, dw_kernel=5),
    "DiCo-S-dw7": dict(_S, dw_kernel=7),
    "DiCo-S-noCCA": dict(_S, channel_attention="none", depths=(6, 5, 4, 5, 4)),
    "DiCo-S-SE": dict(_S, channel_attention="se", depths=(5, 5, 4, 4, 4)),
    "DiCo-S-attn": dict(_S, mixer="attention", depths=(4, 3, 4, 3, 4)),
})

# Published counts as printed (params in millions, trainable only; "GFLOPs" are GMACs).
PUBLISHED = {
    "DiCo-S": dict(gmacs_256=4.25, params_m=33.1, source="DiCo Tables 1, 6"),
    "DiCo-B": dict(gmacs_256=16.88, params_m=130.0, source="DiCo Tables 1, 6"),
    "DiCo-L": dict(gmacs_256=60.24, params_m=463.9, source="DiCo Tables 1, 6"),
    "DiCo-XL": dict(gmacs_256=87.30, gmacs_512=349.78, params_m=701.2,
                    source="DiCo Tables 1, 2, 6 (512: the released model gives 348.19; see specs/dico.md)"),
    "DiCo-H": dict(gmacs_256=194.15, params_m=1037.4, source="DiCo Tables 1, 6"),
    "DiCo-S-iso": dict(gmacs_256=5.67, params_m=33.7, source="DiCo Table 4, DiCo (iso.)"),
    "DiCo-S-isoskip": dict(gmacs_256=6.04, params_m=35.1, source="DiCo Table 4, DiCo (iso.+skip)"),
    "DiCo-S-relu": dict(gmacs_256=4.25, params_m=33.1, source="DiCo Table 5, GELU -> ReLU"),
    "DiCo-S-dw5": dict(gmacs_256=4.29, params_m=33.2, source="DiCo Table 5, DWC 3x3 -> 5x5"),
    "DiCo-S-dw7": dict(gmacs_256=4.34, params_m=33.4, source="DiCo Table 5, DWC 3x3 -> 7x7"),
    "DiCo-S-noCCA": dict(gmacs_256=4.24, params_m=33.0, source="DiCo Table 5, w/o CCA ‡"),
    "DiCo-S-SE": dict(gmacs_256=4.25, params_m=32.9, source="DiCo Table 5, CCA -> SE module ‡"),
    "DiCo-S-attn": dict(gmacs_256=4.23, params_m=33.0,
                        source="DiCo Table 5, Conv Module -> self-attention ‡ (= Table 4 DiT (U-shape))"),
}
