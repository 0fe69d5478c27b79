"""DiS (Fei et al., "Scalable Diffusion Models with State Space Backbone", arXiv 2402.05608), as in feizc/DiS
`models_dis.py` (`DisModel`) with the bidirectional Mamba of its vendored `mamba/mamba_ssm/modules/mamba_simple.py`
(Vision Mamba's "v2"). DiCo quotes DiS-H/2 in Tables 1 and 3 (throughput and FID only).

The source's layout, kept here:
- every input is a token, U-ViT style: [label, time, patches] + a learnable position table (zero at init, never
  re-drawn). The time token is a D-wide [cos, sin] sinusoid of t through Linear(D, 4D) -> SiLU -> Linear(4D, D);
  the label token is a table with one null row;
- blocks are Mamba's residual blocks (Add -> RMSNorm -> mixer, the mixer output and the running residual passed on
  separately); `depth` counts as in the source: depth // 2 blocks in, one middle block, depth // 2 out, so DiS-H/2's
  depth 48 runs 49 blocks. Each out block first fuses a long skip, Linear(2D -> D) on [previous mixer output, skip],
  the skips being the in blocks' mixer outputs (not the residual stream), popped last-in first-out;
- the mixer is bidirectional: one in_proj (D -> 4D) and out_proj (2D -> D) around two scans, the second over the
  flipped sequence with its own conv1d / x_proj / dt_proj / A / D; d_state 16, d_conv 4, expand 2,
  dt_rank ceil(D / 16); the two SiLU(z)-gated outputs are summed, not averaged;
- after the last block RMSNorm(residual + output), then DiT's final layer (LayerNorm without affine, shift and
  scale from SiLU -> Linear(D, 2D) of time token + label token, Linear to p*p*2C) on every token, the two
  condition tokens dropped afterwards; learned sigma, as ours;
- init is Mamba's (`ssm.mamba_init_`, n_layer = depth): Linear biases zero except dt_proj's, tables N(0, 0.02),
  out_proj weights scaled by 1/sqrt(depth); everything else PyTorch's default, the final Linear included, so the
  output is not zero at init.

Counting (see `ssm.py`): the source's fast path runs each direction in `mamba_inner_fn_no_out_proj`, opaque to
torchprofile (a `layers.source_kernel` region here); in_proj (a matmul) and out_proj (F.linear) stay visible. DiCo
prints no GFLOPs for DiS-H/2, so there is nothing to match: `repro.metrics.flops.count(model).gmacs`, the papers'
convention, gives 208.22 GMACs at 256 (827.96 at 512), and `.full_gmacs`, every multiply of the references,
231.13 (919.08); the source's slow path, where only the scan is opaque, would give 225.93 (898.38). 906.97M
parameters.

Departures, all recorded here:
- the label table never drops labels itself (the trainer does, `LabelEmbedder`); DiS drops inside the model;
- RMSNorm is `nn.RMSNorm` (eps 1e-5, as the source's fused Triton add+norm), the residual kept in the model dtype
  where the source keeps it in float32 (`residual_in_fp32`); drop path (rate 0.1 in the source's default) is left out;
- the scan and conv run in `ssm.MambaMixer` (`mamba_ssm` kernels on CUDA where installed, exact references
  elsewhere), with the same parameters and maths as `mamba_inner_fn_no_out_proj`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Denoiser, LabelEmbedder, TokenFinalLayer, check_input_size, timestep_embedding, unpatchify
from .ssm import MambaMixer, mamba_init_


class DiSBlock(nn.Module):
    """Mamba residual block: [skip fusion] -> residual += h -> h = mixer(RMSNorm(residual))."""

    def __init__(self, dim: int, skip: bool, d_state: int, d_conv: int, expand: int):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = MambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=True)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, skip: torch.Tensor | None = None):
        if self.skip_linear is not None:
            h = self.skip_linear(torch.cat([h, skip], dim=-1))
        residual = h if residual is None else residual + h
        return self.mixer(self.norm(residual)), residual


class DiS(Denoiser):
    """Diffusion State Space model: U-ViT's token layout and long skips around bidirectional Mamba blocks.

    Args:
        input_size: latent side (32 for 256 px, 64 for 512 px); fixes the position table.
        depth: the source's depth: depth // 2 in blocks, a middle block, depth // 2 out blocks.
        d_state, d_conv, expand: the Mamba mixer's (source defaults).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1536,
                 depth: int = 48, d_state: int = 16, d_conv: int = 4, expand: int = 2, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1):
        super().__init__()
        check_input_size(input_size, patch_size, "DiS")
        if depth < 2:
            raise ValueError(f"DiS: depth={depth} must be >= 2 (depth // 2 in and out blocks)")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.hidden_size, self.depth = hidden_size, depth
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(),
                                        nn.Linear(4 * hidden_size, hidden_size))
        self.label_emb = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.extras = 2  # label token, time token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (input_size // patch_size) ** 2, hidden_size))
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.in_blocks = nn.ModuleList([DiSBlock(hidden_size, False, **mixer) for _ in range(depth // 2)])
        self.mid_block = DiSBlock(hidden_size, False, **mixer)
        self.out_blocks = nn.ModuleList([DiSBlock(hidden_size, True, **mixer) for _ in range(depth // 2)])
        self.norm_f = nn.RMSNorm(hidden_size, eps=1e-5)
        self.final_layer = TokenFinalLayer(hidden_size, hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        mamba_init_(self, n_layer=self.depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                   # (N, T, D)
        time = self.time_embed(timestep_embedding(t, self.hidden_size).to(x.dtype))  # (N, D)
        label = self.label_emb(y)                                            # (N, D)
        h = torch.cat([label[:, None], time[:, None], x], dim=1) + self.pos_embed  # (N, 2+T, D)
        residual, skips = None, []
        for block in self.in_blocks:
            h, residual = block(h, residual)
            skips.append(h)
        h, residual = self.mid_block(h, residual)
        for block in self.out_blocks:
            h, residual = block(h, residual, skips.pop())
        h = self.final_layer(self.norm_f(residual + h), time + label)       # (N, 2+T, p*p*2C)
        return unpatchify(h[:, self.extras:], self.patch_size, self.out_channels)  # (N, 2C, H, W)


_SIZES = {"S": dict(hidden_size=368, depth=24), "B": dict(hidden_size=768, depth=24),
          "M": dict(hidden_size=768, depth=48), "L": dict(hidden_size=1024, depth=48),
          "H": dict(hidden_size=1536, depth=48)}

# `DiS_models` of models_dis.py: every size at patch 2 and 4.
PRESETS = {f"DiS-{size}/{p}": dict(**dims, patch_size=p) for size, dims in _SIZES.items() for p in (2, 4)}

# DiCo quotes DiS-H/2 (Tables 1 and 3: 33.95 and 8.59 img/s, FID 2.10 and 2.88) but prints no GFLOPs for it.
PUBLISHED = {
    "DiS-H/2": dict(source="DiCo Tables 1, 3 (throughput and FID only: no GFLOPs printed)"),
}
