"""DiC (Tian et al., CVPR 2025): a pure 3x3-conv hourglass U-Net denoiser, as in YuchuanTian/DiC `dic_models.py`.

Every step of the paper's roadmap (Fig. 1, `specs/dic.md` section 6) is a named switch on the one `DiC` class;
the defaults are the released DiC. Roadmap presets `DiC-XL-step1` .. `DiC-XL-step8` apply them cumulatively.

What the paper does not give, and what we assume (`specs/dic.md` section 6, "Proposed layouts (A)"):
- Steps 1-2 (isotropic): 42 blocks (step 1) or 40 blocks in 20 in/out pairs (step 2) at the DiC-XL base width 384,
  all at the latent resolution, with DiC's stem and head; chosen to match the printed 115.6 / 117.1 GFLOPs
  (we get 115.63 / 116.23). Step 2's long skips concatenate block i's output to the input of block 39-i and fuse
  it with a 1x1 conv (U-ViT style).
- Step 3 (dense U-Net): depths [6,6,8,6,6] at DiC-XL widths match the printed 115.2 GFLOPs (115.19).
- Shared embedding (steps 1-4): one timestep MLP + label table at width 2C (768 for XL), read by every block's
  condition Linear; the only simple choice consistent with the reported +14M (~2%) for stage-specific embeddings.
  Isotropic models have one width W and share at W. `shared_embed_width` overrides it.
- Block-start injection (steps 1-5) is [C]'s `blockconfig=1`: modulate the first GroupNorm, no modulation after.

Counting note: [C]'s gate-free blocks still multiply by a constant gate of 1, which torchprofile counts as one
MAC per output element. We skip that no-op, so steps 1-6 count 0.008-0.017 G below the spec's counts of [C]
(step 1: 115.617 vs 115.633); the gated steps 7-8 and DiC-S/B/XL/H match to the last printed digit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (ConvFinalLayer, Denoiser, GroupNorm, LabelEmbedder, TimestepEmbedder, check_choice,
                     check_input_size, gated, modulate, run_with_long_skips, xavier_flat_, xavier_init_,
                     zero_)

ARCHS = ("isotropic", "isotropic_skip", "hourglass")
COND_EMBEDS = ("shared", "stage")
INJECTS = ("block_start", "mid")
ACTS = {"silu": nn.SiLU, "gelu": nn.GELU}  # nn.GELU is the exact (erf) form, as in [C]
PAPER_SKIP_STRIDE = 3


class DiCBlock(nn.Module):
    """Two 3x3 convs with a residual, conditioned by (gate, scale, shift) from one Linear on SiLU(c).

    inject="mid":         h = conv1(act(GN(conv0(act(GN x))) * (1 + s) + b))      (DiC, ADM scale-shift position)
    inject="block_start": h = conv1(act(GN(conv0(act(GN x * (1 + s) + b)))))       (roadmap steps 1-5)
    output = g * h + r with g the raw gate (not tanh/sigmoid, not 1 + g) when gate=True, else h + r.
    r is x, or a 1x1 conv when the block takes a concatenated skip (Cin != Cout).
    """

    def __init__(self, cin: int, cout: int, cond_dim: int, inject: str, gate: bool, act: str):
        super().__init__()
        self.inject, self.gate = inject, gate
        self.norm0 = GroupNorm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = GroupNorm(cout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act = ACTS[act]()
        mod_channels = cout if inject == "mid" else cin
        # [C] chunk orders: gate, scale, shift with the gate (affinef=3); scale, shift without it (affinef=2).
        # The gate always has Cout channels; it differs from 3 equal chunks only for block_start + gate,
        # a combination outside the roadmap.
        self.split = ([cout] if gate else []) + [mod_channels, mod_channels]
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, sum(self.split)))
        self.residual = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.cond(c).split(self.split, dim=1)
        g, scale, shift = mods if self.gate else (None, *mods)
        r = self.residual(x)
        if self.inject == "mid":
            h = self.conv0(self.act(self.norm0(x)))
            h = self.act(modulate(self.norm1(h), shift, scale))
        else:
            h = self.conv0(self.act(modulate(self.norm0(x), shift, scale)))
            h = self.act(self.norm1(h))
        h = self.conv1(h)
        return (gated(g, h) if self.gate else h) + r


class DiC(Denoiser):
    """Pure 3x3-conv diffusion U-Net; defaults reproduce the released DiC-XL.

    Args:
        width: base width C; the hourglass levels are C, 2C, 4C (channel multipliers [1, 2, 4, 2, 1]).
        depths: hourglass: blocks per stage [enc1, enc2, middle, dec2, dec1] (enc == dec per level);
            isotropic archs: a 1-tuple, the number of blocks.
        arch: roadmap steps 1 / 2 / 3+: "isotropic" (a plain stack at one resolution), "isotropic_skip"
            (+ U-ViT-style long skips between the two halves), "hourglass" (3-level conv U-Net).
        skip_stride: hourglass only. Encoder block i of an N-block stage saves its output when
            (N-1-i) % s == 0 and decoder block j concatenates one when j % s == 0. 1 = dense U-Net (step 3),
            3 = DiC's sparse skips (step 4).
        cond_embed: "shared" (one t/y embedder read by every block, steps 1-4) or "stage" (one per level at
            the level's width, step 5+).
        shared_embed_width: width of the shared embedder; None = 2C for the hourglass, W for isotropic (A).
        inject: where the condition enters a block: "block_start" (steps 1-5) or "mid" (step 6+).
        gate: multiply the block output by a condition gate (step 7+).
        act: in-block activation, "silu" (steps 1-7) or "gelu" (step 8). SiLU stays SiLU before every
            condition Linear, in the timestep MLP and in the final layer.
        block_zero_init: zero every block's condition Linear. False reproduces [C], whose zero-init of these
            layers silently fails (`specs/dic.md` section 5); True is an explicit deviation.
    """

    def __init__(self, input_size: int = 32, in_channels: int = 4, width: int = 384,
                 depths: tuple[int, ...] = (7, 7, 8, 7, 7), arch: str = "hourglass",
                 skip_stride: int = PAPER_SKIP_STRIDE, cond_embed: str = "stage",
                 shared_embed_width: int | None = None, inject: str = "mid", gate: bool = True, act: str = "gelu",
                 num_classes: int = 1000, class_dropout_prob: float = 0.1, block_zero_init: bool = False):
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("cond_embed", cond_embed, COND_EMBEDS)
        check_choice("inject", inject, INJECTS)
        check_choice("act", act, tuple(ACTS))
        depths = tuple(depths)
        if arch == "hourglass":
            if len(depths) != 5 or depths[0] != depths[4] or depths[1] != depths[3] or min(depths) < 1:
                raise ValueError(f"depths={depths}: the hourglass needs 5 positive depths with enc1 == dec1 "
                                 f"and enc2 == dec2")
            if skip_stride < 1:
                raise ValueError(f"skip_stride={skip_stride} must be >= 1")
            if width % 2:
                raise ValueError(f"width={width} must be even (the downsampling conv outputs 2C/4 channels)")
            check_input_size(input_size, 4, "DiC")
        else:
            if len(depths) != 1 or depths[0] < 1 or (arch == "isotropic_skip" and depths[0] % 2):
                raise ValueError(f"depths={depths}: {arch} takes one block count"
                                 + (", even (two halves)" if arch == "isotropic_skip" else ""))
            if skip_stride != PAPER_SKIP_STRIDE:
                raise ValueError(f"skip_stride applies to arch='hourglass' only, not {arch!r}")
            check_input_size(input_size, 1, "DiC")
        if cond_embed == "stage" and shared_embed_width is not None:
            raise ValueError("shared_embed_width applies to cond_embed='shared' only")
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, 2 * in_channels
        self.arch, self.depths, self.skip_stride = arch, depths, skip_stride
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob

        levels = (width, 2 * width, 4 * width) if arch == "hourglass" else (width,)
        if cond_embed == "stage":
            embed_widths = levels
        else:
            default = 2 * width if arch == "hourglass" else width
            embed_widths = (shared_embed_width or default,)
        self.t_embedders = nn.ModuleList([TimestepEmbedder(w) for w in embed_widths])
        self.y_embedders = nn.ModuleList([LabelEmbedder(num_classes, w, class_dropout_prob) for w in embed_widths])
        # level k reads condition self.cond_index[k]
        self.cond_index = tuple(range(len(levels))) if cond_embed == "stage" else (0,) * len(levels)

        def block(cin: int, cout: int, level: int) -> DiCBlock:
            return DiCBlock(cin, cout, embed_widths[self.cond_index[level]], inject, gate, act)

        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        if arch == "hourglass":
            c1, c2, c3 = levels
            e1, e2, m, d2, d1 = depths
            s = skip_stride
            self.enc = nn.ModuleList([nn.ModuleList([block(c1, c1, 0) for _ in range(e1)]),
                                      nn.ModuleList([block(c2, c2, 1) for _ in range(e2)])])
            self.down = nn.ModuleList([nn.Sequential(nn.Conv2d(c1, c2 // 4, 3, padding=1, bias=False),
                                                     nn.PixelUnshuffle(2)),
                                       nn.Sequential(nn.Conv2d(c2, c3 // 4, 3, padding=1, bias=False),
                                                     nn.PixelUnshuffle(2))])
            self.mid = nn.ModuleList([block(c3, c3, 2) for _ in range(m)])
            self.up = nn.ModuleList([nn.Sequential(nn.Conv2d(c2, 4 * c1, 3, padding=1, bias=False),
                                                   nn.PixelShuffle(2)),
                                     nn.Sequential(nn.Conv2d(c3, 4 * c2, 3, padding=1, bias=False),
                                                   nn.PixelShuffle(2))])
            self.dec = nn.ModuleList([
                nn.ModuleList([block(2 * c1 if j % s == 0 else c1, c1, 0) for j in range(d1)]),
                nn.ModuleList([block(2 * c2 if j % s == 0 else c2, c2, 1) for j in range(d2)])])
        else:
            n = depths[0]
            self.blocks = nn.ModuleList([block(width, width, 0) for _ in range(n)])
            n_skips = n // 2 if arch == "isotropic_skip" else 0
            self.skip_fuse = nn.ModuleList([nn.Conv2d(2 * width, width, 1) for _ in range(n_skips)])
        self.head = nn.Conv2d(width, width, 3, padding=1)
        self.final_layer = ConvFinalLayer(width, embed_widths[self.cond_index[0]], self.out_channels)
        self.initialize_weights(block_zero_init)

    def initialize_weights(self, block_zero_init: bool) -> None:
        xavier_init_(self)
        xavier_flat_(self.stem)
        for emb in self.y_embedders:
            emb.init_weights()
        for emb in self.t_embedders:
            emb.init_weights()
        zero_(self.final_layer.adaLN_modulation[-1])
        zero_(self.final_layer.conv)
        if block_zero_init:
            for b in self.dic_blocks():
                zero_(b.cond[-1])

    def dic_blocks(self) -> list[DiCBlock]:
        return [m for m in self.modules() if isinstance(m, DiCBlock)]

    def winograd_convs(self) -> list[nn.Conv2d]:
        """The in-block 3x3 convs that DiC's Winograd GFLOPs divide by 2.25."""
        return [conv for b in self.dic_blocks() for conv in (b.conv0, b.conv1)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        conds = [te(t) + ye(y) for te, ye in zip(self.t_embedders, self.y_embedders, strict=True)]
        c = [conds[i] for i in self.cond_index]                              # per level: (N, C_level)
        x = self.stem(x)                                                     # (N, C, H, W)
        if self.arch == "hourglass":
            x = self._hourglass(x, c)
        else:
            x = run_with_long_skips(self.blocks, self.skip_fuse, x, c[0], cat_dim=1)
        return self.final_layer(self.head(x), c[0])                          # (N, 2*in, H, W)

    def _hourglass(self, x: torch.Tensor, c: list[torch.Tensor]) -> torch.Tensor:
        s, skips = self.skip_stride, []
        for level in (0, 1):
            stage = self.enc[level]
            for i, blk in enumerate(stage):
                x = blk(x, c[level])
                if (len(stage) - 1 - i) % s == 0:  # always includes the stage's last block
                    skips.append(x)
            x = self.down[level](x)                                          # (N, 2C_level, H/2, W/2)
        for blk in self.mid:
            x = blk(x, c[2])
        for level in (1, 0):
            x = self.up[level](x)                                            # (N, C_level, 2H, 2W)
            for j, blk in enumerate(self.dec[level]):
                if j % s == 0:
                    x = torch.cat([x, skips.pop()], dim=1)                   # (N, 2C_level, H, W)
                x = blk(x, c[level])
        assert not skips, "every saved skip must be consumed"
        return x

_DIC = dict(arch="hourglass", skip_stride=3, cond_embed="stage", inject="mid", gate=True, act="gelu")
PRESETS = {
    "DiC-S": dict(width=96, depths=(6, 6, 5, 6, 6), **_DIC),
    "DiC-B": dict(width=192, depths=(6, 6, 5, 6, 6), **_DIC),
    "DiC-XL": dict(width=384, depths=(7, 7, 8, 7, 7), **_DIC),
    "DiC-H": dict(width=384, depths=(14, 14, 10, 14, 14), **_DIC),
}

# The roadmap of DiC Fig. 1 at XL scale, each step = the previous one + one switch (layouts of 1-3 assumed).
_STEP1 = dict(width=384, depths=(42,), arch="isotropic", cond_embed="shared", inject="block_start", gate=False,
              act="silu")
ROADMAP = [
    ("Isotropic", _STEP1),
    ("Isotropic + Skip", dict(_STEP1, depths=(40,), arch="isotropic_skip")),
    ("Conv3x3 U-Net", dict(_STEP1, depths=(6, 6, 8, 6, 6), arch="hourglass", skip_stride=1)),
]
ROADMAP.append(("+ sparse skip", dict(ROADMAP[-1][1], depths=(7, 7, 8, 7, 7), skip_stride=3)))
ROADMAP.append(("+ stage-specific embeddings", dict(ROADMAP[-1][1], cond_embed="stage")))
ROADMAP.append(("+ mid-block injection", dict(ROADMAP[-1][1], inject="mid")))
ROADMAP.append(("+ conditional gating", dict(ROADMAP[-1][1], gate=True)))
ROADMAP.append(("+ GELU (DiC-XL)", dict(ROADMAP[-1][1], act="gelu")))
for _i, (_label, _kw) in enumerate(ROADMAP, start=1):
    PRESETS[f"DiC-XL-step{_i}"] = _kw

# Published counts as printed ("GFLOPs" are GMACs; Winograd in brackets in the papers).
PUBLISHED = {
    "DiC-S": dict(gmacs_256=5.9, source="DiCo Table 1"),
    "DiC-B": dict(gmacs_256=23.5, source="DiCo Table 1"),
    "DiC-XL": dict(gmacs_256=116.1, winograd_256=57.2, gmacs_512=464.3, winograd_512=228.7,
                   source="DiC poster tables (256: 400K table; 512: 3M table)"),
    "DiC-H": dict(gmacs_256=204.4, winograd_256=97.2, gmacs_512=817.2, winograd_512=388.4, params_m=1000.0,
                  source="DiC poster tables; DiCo Table 9 (1.0B)"),
    "DiC-XL-step1": dict(gmacs_256=115.6, source="DiC Fig. 1 (roadmap)"),
    "DiC-XL-step2": dict(gmacs_256=117.1, source="DiC Fig. 1 (roadmap)"),
    "DiC-XL-step3": dict(gmacs_256=115.2, source="DiC Fig. 1 (roadmap)"),
    "DiC-XL-step8": dict(gmacs_256=116.1, source="DiC Fig. 1 (roadmap)"),
}
