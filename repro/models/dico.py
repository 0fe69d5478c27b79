"""DiCo (Ai et al., NeurIPS 2025): a U-shaped ConvNet of DiT-style blocks whose attention is a Conv Module
(1x1 conv, depthwise conv, GELU, Compact Channel Attention, 1x1 conv), as in shallowdream204/DiCo `dico_models.py`.

The ablations of DiCo Tables 4 and 5 are named switches on the one `DiCo` class; defaults are the released DiCo.
What the paper leaves open, and what we assume (`specs/dico.md` section 6):
- "DiCo (iso.)": DiT-S/2's skeleton (2x2 patch embedding to 384 channels, a 16x16 map, DiT's final layer, no
  position embedding) with 13 DiCo blocks of width 384, FFN ratio 4 (33.65M params, 4.94 GMACs; printed
  33.7M / 5.67: the parameters match, the GMACs fall 0.73 G short, so part of the paper's layout is unknown).
  "iso.+skip" adds 5 U-ViT-style long skips (blocks 0-4 push, the last 5 pop, concat + 1x1 fuse).
- Rows marked ‡ in Table 5 swap a component and "re-adjust depth" to the printed parameters; the layout is not
  given. One rule, `readjusted_depths` below, picks every ‡ row's stage depths at DiCo-S's width: within ±0.3M of
  the printed params and 1% of the printed GMACs (torchprofile 0.0.4's count, `Counts.macs`), the fewest block moves
  from DiCo-S's [5,4,4,4,4] (tests/test_dico_table5.py checks each preset is the rule's answer). Params / GMACs
  (printed) / full GMACs:
    w/o CCA            [6,3,5,3,4]: 32.99M / 4.246 (33.0M / 4.24) / 4.246
    SE                 [4,4,4,5,4]: 32.80M / 4.247 (32.9M / 4.25) / 4.247
    channel self-attn. [2,2,4,3,2]: 32.93M / 4.287 (33.2M / 4.26) / 4.287
    self-attention     [5,4,4,4,2]: 33.16M / 4.254 (33.0M / 4.23) / 6.955
    window attention   [4,4,4,4,2]: 32.95M / 4.339 (33.0M / 4.34) / 4.339
    focused linear     [2,3,4,3,3]: 33.15M / 4.368 (32.9M / 4.33) / 4.368
    agent attention    [6,4,4,4,1]: 33.16M / 4.202 (33.3M / 4.24) / 4.202
  The rule has freedom (enc2 and dec2 cost the same), so a match says a layout exists, not that it is the
  paper's. It does decide one question: the self-attention row was counted without its attention matmuls. DiCo's
  code imports timm's `Attention`, which since timm 0.9 calls F.scaled_dot_product_attention, and torchprofile
  0.0.4 counts that call as 0 MACs (`layers.TORCHPROFILE_SDPA`). Counted in full, no layout within ±0.3M comes
  nearer 4.23 than 4.07 (-3.8%, one block left in enc1 and in dec1); counted as torchprofile 0.0.4 saw it, two
  moves give 4.254 (+0.6%). The earlier hand layout [4,3,4,3,4] counted 8.37 in full and 4.93 without.
  The other three attention mixers write their matmuls out in their sources (repro/models/attention_mixers.py),
  so torchprofile counted them and both conventions agree.
- SE (CCA -> SE module): two 1x1 convs with ReLU between, reduction 4 (not given in the paper).
- "Conv Module -> self-attention" (= "DiT (U-shape)" of Table 4): multi-head self-attention over the pixels of
  each stage, head dim 64, no position embedding (the conv stem and resampling convs remain).
- The other Table 5 mixers (attention_mixers.py): channel self-attention is Restormer's MDTA in CCA's place
  inside the Conv Module; window attention is Swin's, window 8 (at 256 px the stage maps are 32, 16 and 8, so
  16, 4 and 1 windows), shifted by 4 in every second block of a stage; focused linear attention is FLatten's
  (focusing factor 3, 5x5 rank-restoring DWC, a learned positional encoding per stage map); agent attention uses 49
  agents (7x7, pooled from the queries). Head dim 64 throughout. None of these hyper-parameters is in the paper.
- act applies to both activations of the block (Conv Module and FFN): Table 5 says only "GELU -> ReLU".
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention_mixers import AgentAttention, ChannelSelfAttention, FocusedLinearAttention, WindowAttention
from .layers import (TORCHPROFILE_SDPA, Attention, ChannelLayerNorm, ConvFinalLayer, Denoiser, LabelEmbedder,
                     TimestepEmbedder, TokenFinalLayer, check_choice, check_input_size, gated, modulate,
                     run_with_long_skips, unpatchify, xavier_flat_, xavier_init_, zero_)

ARCHS = ("isotropic", "isotropic_skip", "unet")
CHANNEL_ATTENTIONS = ("cca", "none", "se", "channel_sa")
MIXERS = ("conv", "attention", "window_attention", "focused_linear", "agent")
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

    def __init__(self, dim: int, dw_kernel: int, act: str, channel_attention: str, se_reduction: int,
                 head_dim: int):
        super().__init__()
        self.pw_in = nn.Conv2d(dim, dim, 1)
        self.dw = nn.Conv2d(dim, dim, dw_kernel, padding=dw_kernel // 2, groups=dim)
        self.act = ACTS[act]()
        if channel_attention == "none":
            self.ca = nn.Identity()
        elif channel_attention == "channel_sa":
            self.ca = ChannelSelfAttention(dim, head_dim)
        else:
            self.ca = ChannelAttention(dim, channel_attention, se_reduction)
        self.pw_out = nn.Conv2d(dim, dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pw_out(self.ca(self.act(self.dw(self.pw_in(h)))))


class MapAttention(nn.Module):
    """Self-attention over the pixels of an (N, C, H, W) map (the "Conv Module -> self-attention" ablation)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not divisible by attn_head_dim={head_dim}")
        self.attn = Attention(dim, dim // head_dim, qkv_bias=True, sdpa_unseen=TORCHPROFILE_SDPA)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        tokens = self.attn(h.flatten(2).transpose(1, 2))                     # (N, HW, C)
        return tokens.transpose(1, 2).reshape(n, c, hh, ww)


class DiCoBlock(nn.Module):
    """x + g1 * mixer(LN x * (1 + s1) + a1); x + g2 * FFN(LN x * (1 + s2) + a2), adaLN order a1, s1, g1, a2, s2, g2."""

    def __init__(self, dim: int, cond_dim: int, mlp_ratio: int, mixer: str, dw_kernel: int, act: str,
                 channel_attention: str, se_reduction: int, attn_head_dim: int, resolution: int, index: int,
                 window_size: int, agent_num: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        if mixer == "conv":
            self.mixer = ConvModule(dim, dw_kernel, act, channel_attention, se_reduction, attn_head_dim)
        elif mixer == "attention":
            self.mixer = MapAttention(dim, attn_head_dim)
        elif mixer == "window_attention":  # Swin: W-MSA, then SW-MSA, alternating within each stage
            self.mixer = WindowAttention(dim, attn_head_dim, resolution, window_size, shift=index % 2 == 1)
        elif mixer == "focused_linear":
            self.mixer = FocusedLinearAttention(dim, attn_head_dim, resolution)
        else:
            self.mixer = AgentAttention(dim, attn_head_dim, resolution, agent_num)
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
        channel_attention: Table 5: "cca" (DiCo), "none" (w/o CCA), "se" (CCA -> SE module) or "channel_sa"
            (CCA -> channel self-attention, Restormer's MDTA with heads of attn_head_dim channels).
        se_reduction: SE's channel reduction (not given in the paper; 4 assumed).
        dw_kernel: depthwise kernel, 3 (DiCo), 5 or 7 (Table 5).
        act: "gelu" (DiCo) or "relu" (Table 5).
        mixer: "conv" (DiCo's Conv Module) or Table 5's replacements of it: "attention" (self-attention, which
            is Table 4's "DiT (U-shape)"), "window_attention" (Swin), "focused_linear" (FLatten) or "agent"
            (Agent Attention); each attends over the pixels of its stage's map.
        attn_head_dim: head width of every attention mixer and of channel_sa.
        window_size: mixer="window_attention": the window side (a stage map no larger is one window).
        agent_num: mixer="agent": agent tokens, a square (pooled from the queries to sqrt x sqrt).
        patch_size: isotropic archs only: the patch embedding's size (2, as DiT-S/2).
    """

    def __init__(self, input_size: int = 32, in_channels: int = 4, width: int = 416,
                 depths: tuple[int, ...] = (9, 9, 10, 9, 9), mlp_ratio: int = 2, arch: str = "unet",
                 long_skips: int | None = None, channel_attention: str = "cca", se_reduction: int = 4,
                 dw_kernel: int = 3, act: str = "gelu", mixer: str = "conv", attn_head_dim: int = 64,
                 window_size: int = 8, agent_num: int = 49, patch_size: int = 2, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1):
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

        def stage(n: int, dim: int, resolution: int) -> nn.ModuleList:
            return nn.ModuleList([DiCoBlock(dim, dim, mlp_ratio, mixer, dw_kernel, act, channel_attention,
                                            se_reduction, attn_head_dim, resolution, i, window_size, agent_num)
                                  for i in range(n)])

        if arch == "unet":
            d1, d2, d3 = width, 2 * width, 4 * width
            embed_widths = (d1, d2, d3)
            self.stem = nn.Conv2d(in_channels, d1, 3, padding=1)
            e1, e2, m, n2, n1 = depths
            r1, r2, r3 = input_size, input_size // 2, input_size // 4
            self.enc1 = stage(e1, d1, r1)
            self.down1 = nn.Sequential(nn.Conv2d(d1, d1 // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
            self.enc2 = stage(e2, d2, r2)
            self.down2 = nn.Sequential(nn.Conv2d(d2, d2 // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
            self.mid = stage(m, d3, r3)
            self.up2 = nn.Sequential(nn.Conv2d(d3, 2 * d3, 3, padding=1, bias=False), nn.PixelShuffle(2))
            self.fuse2 = nn.Conv2d(2 * d2, d2, 1)
            self.dec2 = stage(n2, d2, r2)
            self.up1 = nn.Sequential(nn.Conv2d(d2, 4 * d1, 3, padding=1, bias=False), nn.PixelShuffle(2))
            self.fuse1 = nn.Conv2d(2 * d1, 2 * d1, 1)  # [C] keeps 2D channels here (no reduction)
            self.dec1 = stage(n1, d2, r1)  # width 2D, condition c2 ([C])
            self.final_layer = ConvFinalLayer(d2, d2, self.out_channels)
        else:
            n = depths[0]
            k = (PAPER_ISO_SKIPS if long_skips is None else long_skips) if arch == "isotropic_skip" else 0
            if not 0 <= k <= n // 2:
                raise ValueError(f"long_skips={k} must be in 0..{n // 2} for {n} blocks")
            embed_widths = (width,)
            self.x_embedder = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
            self.blocks = stage(n, width, input_size // patch_size)
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
    "DiCo-S-noCCA": dict(_S, channel_attention="none", depths=(6, 3, 5, 3, 4)),
    "DiCo-S-SE": dict(_S, channel_attention="se", depths=(4, 4, 4, 5, 4)),
    "DiCo-S-channelSA": dict(_S, channel_attention="channel_sa", depths=(2, 2, 4, 3, 2)),
    "DiCo-S-attn": dict(_S, mixer="attention", depths=(5, 4, 4, 4, 2)),
    "DiCo-S-window": dict(_S, mixer="window_attention", depths=(4, 4, 4, 4, 2)),
    "DiCo-S-focused": dict(_S, mixer="focused_linear", depths=(2, 3, 4, 3, 3)),
    "DiCo-S-agent": dict(_S, mixer="agent", depths=(6, 4, 4, 4, 1)),
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
    "DiCo-S-channelSA": dict(gmacs_256=4.26, params_m=33.2, source="DiCo Table 5, CCA -> channel self-attention ‡"),
    "DiCo-S-attn": dict(gmacs_256=4.23, params_m=33.0,
                        source="DiCo Table 5, Conv Module -> self-attention ‡ (= Table 4 DiT (U-shape))"),
    "DiCo-S-window": dict(gmacs_256=4.34, params_m=33.0, source="DiCo Table 5, Conv Module -> window attention ‡"),
    "DiCo-S-focused": dict(gmacs_256=4.33, params_m=32.9,
                           source="DiCo Table 5, Conv Module -> focused linear attention ‡"),
    "DiCo-S-agent": dict(gmacs_256=4.24, params_m=33.3, source="DiCo Table 5, Conv Module -> agent attention ‡"),
}


def depth_layouts(base: str = "DiCo-S", max_depth: int = 12, **overrides):
    """Every U-Net layout of 1..max_depth blocks per stage of preset `base` (with `overrides`), as
    (depths, trainable params, MACs in the papers' convention, full MACs). Params and MACs are affine in the
    depths, so six counts on the meta device give them all."""
    import itertools

    from repro import models
    from repro.metrics.flops import count

    n = len(PRESETS[base]["depths"])
    probes = [(1,) * n] + [tuple(2 if j == i else 1 for j in range(n)) for i in range(n)]
    costs = []
    for d in probes:
        c = count(models.build_meta(base, **{**overrides, "depths": d}))
        costs.append((c.trainable_params, c.macs, c.macs + c.source_kernel_macs))
    unit = [tuple(a - b for a, b in zip(c, costs[0], strict=True)) for c in costs[1:]]
    for d in itertools.product(range(1, max_depth + 1), repeat=n):
        yield (d, *(costs[0][j] + sum((k - 1) * u[j] for k, u in zip(d, unit, strict=True)) for j in range(3)))


def readjusted_depths(params_m: float, gmacs: float, base: str = "DiCo-S", max_depth: int = 12,
                      **switches) -> tuple[int, ...]:
    """Stage depths for one of Table 5's ‡ rows: one rule, applied to every ‡ row alike.

    The paper swaps a component and "re-adjusts depth" to its printed parameters without giving the layout. Among
    all layouts with 1..max_depth blocks per stage, keep those within ±0.3M of the printed params and within 1% of
    the printed GMACs (the papers' counting convention, `Counts.macs`); take the fewest block moves from `base`
    (sum of |Δdepth|, then sum of Δdepth², then the first in lexicographic order). Where no layout meets both, the
    GMACs condition gives way to the nearest GMACs.
    """
    base_depths = PRESETS[base]["depths"]
    candidates = []
    for d, params, macs, _ in depth_layouts(base, max_depth, **switches):
        if abs(params / 1e6 - params_m) > 0.3:
            continue
        g = macs / 1e9
        moves = [abs(k - b) for k, b in zip(d, base_depths, strict=True)]
        candidates.append((abs(g / gmacs - 1) > 0.01, sum(moves), sum(x * x for x in moves), d, abs(g - gmacs)))
    if not candidates:
        raise ValueError(f"no layout of 1..{max_depth} blocks per stage lands within 0.3M of {params_m}M")
    if all(c[0] for c in candidates):
        return min(candidates, key=lambda c: (c[4], c[1], c[2], c[3]))[3]
    return min(candidates)[3]
