"""DiM (Teng et al., "DiM: Diffusion Mamba for Efficient High-Resolution Image Synthesis", arXiv 2405.14224), as in
tyshiwo1/DiM-DiffusionMamba `mamba_attn_diff/models/mamba_2d.py` (`Mamba2DModel`), `attention.py`
(`BasicMambaBlock`), `adapter_attn4mamba.py` (`AdapterAttnForMamba`, the scan orders and padding tokens) and
`normalization.py`, configured by `configs/imagenet256_H_DiM.py` and `configs/imagenet512_H_DiM_ft.py`. DiCo quotes
DiM-H in Tables 1 and 3 (210 and 708 GFLOPs).

The source's layout (the released configs' switches resolved), kept here:
- tokens [time, label, patches] + a learnable position table (zero at init): the time token is the raw D-wide
  [cos, sin] sinusoid of t (no MLP), the label token a table with one null row;
- the patch tokens go through a depthwise 3x3 conv ("first smoother") on their G x G grid, then the grid is padded
  to (G + p) x (G + p) with p = d_conv = 3 learnable padding tokens: at 256 px ("lateral") pad token j fills column
  G + j and pad token i fills row G + i; in the 512-px fine-tune ("rho_pad") the pad cells, in raster order, take
  the p tokens in turn. p more learnable tokens sit between the label token and the grid ("dec_split"), so a
  256-px sequence is 2 + 3 + 19 * 19 = 366 tokens and a 512-px one 2 + 3 + 35 * 35 = 1230;
- 49 blocks, each x + (1 + gate) * Mamba(RMSNorm(x) * (1 + scale) + shift), shift / scale / gate being the block's
  own (3, D) table plus one shared SiLU -> Linear(D, 3D) of c = MLP(256-sinusoid of t) + label table (PixArt's
  adaLN-single; a second label table, separate from the token's). The Mamba is v1 (d_state 16, d_conv 3,
  expand 2, dt_rank ceil(D / 16)), no feed-forward;
- each block scans the grid in its own order: raster, reversed raster, column-major, reversed column-major, cycled
  forward over blocks 1..24 and backward over blocks 25..47, block 0 and block 48 raster. The time, label and
  dec_split tokens always lead, unpermuted. The source keeps the whole residual stream permuted and re-orders it
  between blocks; every operation but the scan is per token, so we keep the raster order and permute only around
  the mixer, which is the same map (the long skips meet streams in equal orders in the source, checked for every
  odd depth from 3 to 99);
- long skips U-ViT style: blocks 1..24 push the stream, blocks 25..48 pop one and replace the stream with
  Linear(stream) + Linear(skip) (two D -> D Linears; a Linear(2D -> D) on the concatenation when D <= 512);
- after the last block the padding is dropped, a second depthwise 3x3 conv ("last smoother") runs on the G x G grid,
  then RMSNorm, shift and scale from SiLU -> Linear(D, 2D) of (time token + label token), Linear to p*p*out;
- init: Mamba's (`ssm.mamba_init_`, n_layer = 49), then normal draws for the adaLN-single timestep MLP weights
  (std 0.02), the block tables (std 1/sqrt(D)) and the padding tokens (std 0.02); the rest PyTorch's defaults.
  Nothing is zero-initialised, so the output is not zero at init.

Counting: the source's Mamba runs `mamba_inner_fn` (its fast path, taken when causal_conv1d is installed), one
autograd Function covering conv1d, x_proj, dt_proj, the scan and out_proj, which torchprofile's trace sees as an
opaque node (a `layers.source_kernel` region here); of each mixer it counts only in_proj. That the printed GFLOPs
count this way is our inference (DiCo quotes DiM's own numbers): `repro.metrics.flops.count(model).gmacs`, the
papers' convention, gives 210.79 GMACs at 256, the printed 210 (+0.38%), and 708.38 at 512, the printed 708
(+0.05%); the 49 in_projs make 169.25 / 568.78 of it and the 24 skip pairs 41.45 / 139.29. Leaving out only the scan
(the source's slow path) would give 307.92 / 1034.80, and `.full_gmacs`, every multiply, is 311.61 / 1047.20, so
the printed values leave out out_proj, x_proj, dt_proj and the conv as well as the scan.

Departures, all recorded here:
- the output has 2C channels (learned sigma); the source predicts C (`learned_sigma = False`). +6.3 MMACs at 256;
- `pad_layout` None picks the released configs' layout: "lateral" below latent 64 (256 px), "rho_pad" from 64 on
  (the 512-px fine-tune, whose position table the source interpolates from the 256 one; ours is its own);
- the label tables never drop labels themselves (the trainer does, `LabelEmbedder`);
- RMSNorm is `nn.RMSNorm` (eps 1e-5, as the source's fused Triton add+norm), the residual kept in the model dtype
  where the source keeps it in float32; the scan and conv run in `ssm.MambaMixer` (`mamba_ssm` kernels on CUDA
  where installed, exact references elsewhere), the same parameters and maths as `mamba_inner_fn`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Denoiser, LabelEmbedder, TimestepEmbedder, check_choice, check_input_size, gated, modulate,
                     timestep_embedding, unpatchify)
from .ssm import MambaMixer, mamba_init_

PAD_LAYOUTS = ("lateral", "rho_pad")
SPLIT_SKIP_ABOVE = 512   # the source fuses skips with two D -> D Linears above this width, one 2D -> D at or below


def scan_patterns(depth: int, n_patterns: int = 4) -> list[int]:
    """The grid order of each block (0 raster, 1 reversed raster, 2 column-major, 3 reversed column-major), the
    source's chain for encoder_start_blk_id 1: cycle forward up to the middle block, backward from it, 0 at the ends."""
    middle = 1 + (depth - 1) // 2
    k, out = 0, []
    for block in range(depth):
        if block == 0 or block == depth - 1:
            k = 0
        else:
            k = (k + 1) % n_patterns if block < middle else (k - 1) % n_patterns
        out.append(k)
    return out


def grid_order(pattern: int, side: int) -> list[int]:
    """Raster indices of a side x side grid in the order a block scans them."""
    raster = list(range(side * side))
    columns = [r * side + c for c in range(side) for r in range(side)]
    return [raster, raster[::-1], columns, columns[::-1]][pattern]


def padded_grid_layout(grid: int, pad: int, layout: str) -> tuple[list[int], list[int]]:
    """(fill, image): for each cell of the (grid + pad)^2 raster, its index into [grid^2 image tokens; pad tokens];
    and the raster positions of the image cells."""
    side = grid + pad
    fill: list[int] = []
    image: list[int] = []
    n_pads = 0
    for r in range(side):
        for c in range(side):
            if r < grid and c < grid:
                image.append(len(fill))
                fill.append(r * grid + c)
            else:
                j = (c - grid if r < grid else r - grid) if layout == "lateral" else n_pads % pad
                fill.append(grid * grid + j)
                n_pads += 1
    return fill, image


class DiMBlock(nn.Module):
    """[skip fusion] -> x + (1 + gate) * Mamba(modulate(RMSNorm x)), the grid scanned in `order`."""

    def __init__(self, dim: int, skip: bool, d_state: int, d_conv: int, expand: int):
        super().__init__()
        if not skip:
            self.skip_linear = None
        elif dim <= SPLIT_SKIP_ABOVE:
            self.skip_linear = nn.Linear(2 * dim, dim)
        else:
            self.skip_linear = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim)])
        self.norm1 = nn.RMSNorm(dim, eps=1e-5)
        self.attn1 = MambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.scale_shift_table = nn.Parameter(torch.empty(3, dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, order: torch.Tensor | None,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.skip_linear, nn.ModuleList):
            x = self.skip_linear[0](x) + self.skip_linear[1](skip)
        elif self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        n, dim = mod.shape[0], x.shape[-1]
        # The table is added, not multiplied (adaLN-single): no MACs.
        shift, scale, gate = (mod.view(n, 3, dim) + self.scale_shift_table[None]).unbind(1)
        h = modulate(self.norm1(x), shift, scale)
        if order is None:
            h = self.attn1(h)
        else:
            h = torch.empty_like(h).index_copy_(1, order, self.attn1(h.index_select(1, order)))
        return x + gated(1 + gate, h)


class DiM(Denoiser):
    """Diffusion Mamba with multi-directional scans, padding tokens, smoothing convs and adaLN-single.

    Args:
        input_size: latent side (32 for 256 px, 64 for 512 px); fixes the position table and the padded grid.
        depth: blocks, odd (one raster block, (depth - 1) // 2 pushing skips, as many popping them).
        d_conv: the Mamba conv width, also the number of padding tokens per row / column and of dec_split tokens.
        pad_layout: "lateral" or "rho_pad" (see the module docstring); None follows the released configs.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1536,
                 depth: int = 49, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 pad_layout: str | None = None, num_classes: int = 1000, class_dropout_prob: float = 0.1):
        super().__init__()
        check_input_size(input_size, patch_size, "DiM")
        if depth < 3 or depth % 2 == 0:
            raise ValueError(f"DiM: depth={depth} must be odd and >= 3 (the source asserts an odd depth)")
        if pad_layout is None:
            pad_layout = "rho_pad" if input_size >= 64 else "lateral"
        check_choice("pad_layout", pad_layout, PAD_LAYOUTS)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.hidden_size, self.depth, self.pad_layout = hidden_size, depth, pad_layout
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.grid, self.pad = input_size // patch_size, d_conv
        self.extras = 2  # time token, label token

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.label_emb = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)   # the label token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.grid ** 2, hidden_size))
        # adaLN-single: one modulation for every block, from timestep MLP + its own label table
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        smoother = dict(kernel_size=3, padding=1, groups=hidden_size)
        self.first_smoother = nn.Conv2d(hidden_size, hidden_size, **smoother)
        self.last_smoother = nn.Conv2d(hidden_size, hidden_size, **smoother)
        self.pad_token = nn.Parameter(torch.empty(1, hidden_size, self.pad))
        self.pad_token_dec_split = nn.Parameter(torch.empty(1, self.pad, hidden_size))

        self.n_skips = (depth - 1) // 2
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.blocks = nn.ModuleList([DiMBlock(hidden_size, i >= depth - self.n_skips, **mixer)
                                     for i in range(depth)])
        self.norm_out = nn.RMSNorm(hidden_size, eps=1e-5)
        self.proj_out_1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out_2 = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)

        side = self.grid + self.pad
        fill, image = padded_grid_layout(self.grid, self.pad, pad_layout)
        self.register_buffer("fill_index", torch.tensor(fill), persistent=False)
        self.register_buffer("image_index", torch.tensor(image), persistent=False)
        head = list(range(self.extras + self.pad))   # time, label and dec_split tokens lead every scan
        self.patterns = scan_patterns(depth)
        for k in sorted(set(self.patterns) - {0}):
            order = head + [len(head) + i for i in grid_order(k, side)]
            self.register_buffer(f"order_{k}", torch.tensor(order), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        mamba_init_(self, n_layer=self.depth)
        self.t_embedder.init_weights()
        for block in self.blocks:
            nn.init.normal_(block.scale_shift_table, std=self.hidden_size ** -0.5)
        nn.init.normal_(self.pad_token, std=0.02)
        nn.init.normal_(self.pad_token_dec_split, std=0.02)

    def _smooth(self, conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        n, length, dim = tokens.shape
        grid = tokens.transpose(1, 2).reshape(n, dim, self.grid, self.grid)
        return conv(grid).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.x_embedder(x).flatten(2).transpose(1, 2)                      # (N, G*G, D)
        time = timestep_embedding(t, self.hidden_size).to(x.dtype)             # (N, D), the raw sinusoid
        label = self.label_emb(y)                                              # (N, D)
        tokens = torch.cat([time[:, None], label[:, None], x], dim=1) + self.pos_embed
        grid = self._smooth(self.first_smoother, tokens[:, self.extras:])
        pads = self.pad_token.transpose(1, 2).expand(n, -1, -1)                # (N, p, D)
        grid = torch.cat([grid, pads], dim=1)[:, self.fill_index]              # (N, (G+p)^2, D)
        x = torch.cat([tokens[:, :self.extras], self.pad_token_dec_split.expand(n, -1, -1), grid], dim=1)

        mod = self.adaln_single(self.t_embedder(t) + self.y_embedder(y))       # (N, 3D)
        skips = []
        for i, (block, k) in enumerate(zip(self.blocks, self.patterns, strict=True)):
            skip = skips.pop() if block.skip_linear is not None else None
            x = block(x, mod, getattr(self, f"order_{k}") if k else None, skip)
            if 1 <= i <= self.n_skips:
                skips.append(x)

        grid = x[:, self.extras + self.pad:][:, self.image_index]              # (N, G*G, D)
        grid = self._smooth(self.last_smoother, grid)
        shift, scale = self.proj_out_1(F.silu(time + label)).chunk(2, dim=1)
        out = self.proj_out_2(modulate(self.norm_out(grid), shift, scale))     # (N, G*G, p*p*2C)
        return unpatchify(out, self.patch_size, self.out_channels)             # (N, 2C, H, W)


PRESETS = {
    "DiM-H": dict(hidden_size=1536, depth=49, patch_size=2),   # configs/imagenet256_H_DiM.py
    "DiM-L": dict(hidden_size=1024, depth=49, patch_size=2),   # configs/imagenet256_L_DiM.py
}

# "GFLOPs" are GMACs of the source's fast path (`repro.metrics.flops.count(model).gmacs`), see the module docstring.
PUBLISHED = {
    "DiM-H": dict(gmacs_256=210, gmacs_512=708, source="DiCo Tables 1, 3"),
}
