"""The attention mixers of DiCo Table 5's ablations, each faithful to its source, all on (N, C, H, W) maps.
Every line is ours; the sources were read (commits: Restormer df766d55, Swin-Transformer f82860bf, FLatten-Transformer
abdb115f, Agent-Attention 207ce3eb), and each module, given the same weights, equals its source class to 4.4e-16
in float64 (checked outside the test suite; tests/test_attention_mixers.py checks each against a direct computation).
Counting: every source writes its attention as explicit matmuls, which torchprofile 0.0.4 counts, so nothing here
is filed under a source kernel.

ChannelSelfAttention, the "CCA -> channel self-attention" row: Restormer's MDTA (Multi-Dconv Head Transposed
Attention; Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image Restoration", CVPR 2022),
as in swz30/Restormer `basicsr/models/archs/restormer_arch.py`, class `Attention`:
- qkv 1x1 conv (C -> 3C), then a depthwise 3x3 conv on all 3C channels, split into q, k, v;
- per head, q and k of shape (C/heads, H*W) are L2-normalised along the pixel axis (F.normalize, eps 1e-12);
- attention is the (C/heads x C/heads) map softmax(q k^T * temperature): a learnable per-head temperature of
  shape (heads, 1, 1) initialised to 1, no 1/sqrt(d) scale; out = attn v, then a project_out 1x1 conv;
- bias=False by default: Restormer's model builds every MDTA with its `bias=False` default.
Our choice: heads = C // head_dim with head_dim 64 (Restormer picks head counts per level instead, 1/2/4/8).
Parameter names follow the source (qkv, qkv_dwconv, project_out, temperature).

WindowAttention, the "Conv Module -> window attention" row: Swin's W-MSA / SW-MSA (Liu et al., "Swin
Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021), as in microsoft/Swin-Transformer
`models/swin_transformer.py` (WindowAttention, window_partition, window_reverse, and SwinTransformerBlock's
cyclic shift and attention mask):
- qkv Linear(C, 3C, bias=qkv_bias, True by default as in Swin), proj Linear(C, C), scale head_dim ** -0.5
  applied to q before q @ k^T, explicit matmuls (so the MAC counter sees them as torchprofile sees Swin's);
- a learned relative position bias (kept): a ((2w-1)^2, heads) table, trunc_normal std .02 as Swin initialises
  it, indexed by (dy + w-1) * (2w-1) + (dx + w-1) for the in-window offset (dy, dx);
- shifted windows: roll the map by -w//2 on both axes, attend within windows, roll back; pairs of tokens from
  different regions of the rolled map get -100 added to their logits (Swin's mask, not -inf). The caller passes
  shift=True for odd block indices, so shifted windows come in alternate blocks as in Swin's BasicLayer.
- Swin's small-map rule: if resolution <= window_size the window becomes the whole map and there is no shift.
Our choices: head_dim 64 and window 8 (Swin's own defaults are window 7 and head dim 32: embed_dim 96 with 3
heads at the first stage); square maps only; a resolution above the window that the window does not divide is
refused at construction (Swin's window_partition assumes divisibility and pads nothing), so pick a window that
divides every stage's map.
Parameter names follow the source (qkv, proj, relative_position_bias_table); relative_position_index and
attn_mask are non-persistent buffers (Swin keeps them in the state dict).

FocusedLinearAttention: FLatten Transformer (Han et al., "FLatten Transformer: Vision Transformer using Focused
Linear Attention", ICCV 2023), LeapLabTHU/FLatten-Transformer `models/flatten_pvt.py`, class
`FocusedLinearAttention`. That repo has no DeiT model; the PVT class is its global variant: every query sees every
token of the map, and with the repo's default `MODEL.LA.PVT_LA_SR_RATIOS = 1111` no spatial reduction is used (sr=1,
the path taken here; the `sr` conv/LayerNorm and the interpolation of v are dropped). `models/flatten_swin.py`
computes the same formulas inside each window with one fused `qkv` Linear and a window-sized positional encoding
(and ignores the shift mask); `flatten_pvt_v2.py` equals the PVT class plus an in-module Conv2d init.
  - q = Linear(C, C), (k, v) = Linear(C, 2C); k += positional_encoding (1, HW, C), zero-initialised as in the source
    (the PVT model's init never touches it); phi(x) = (ReLU(x) + 1e-6) / softplus(scale), scale (1, 1, C) zero-init;
    focusing f_p(x) = x**p / ||x**p|| * ||x|| with p = focusing_factor = 3 (config default), where the norms run over
    all C channels before the head split, as in the source.
  - per head: out = q (k^T n^-1/2)(v n^-1/2) * z, z = 1 / (q . mean_j k_j + 1e-6), i.e.
    sum_j (q.k_j) v_j / (sum_j q.k_j + n * 1e-6) with n = HW.
  - rank restoration: out += DWC(v), one depthwise Conv2d(head_dim, head_dim, 5, groups=head_dim) whose weights are
    shared by all heads (the source folds heads into the batch); kernel_size = 5 (config default); then proj.
FocusedLinearAttention's source defaults are focusing_factor=3 and kernel_size=5.

AgentAttention: Agent Attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention",
ECCV 2024), LeapLabTHU/Agent-Attention `agent_transformer/models/agent_pvt.py`, class `AgentAttention`, with
sr_ratio = 1 (the repo's default `MODEL.AGENT.PVT_LA_SR_RATIOS = 1111`). The DeiT class (`agent_deit.py`) is the
same computation plus a class token (its ac_bias/ca_bias, the cls row skipped by pooling and the DWC) and one fused
qkv Linear; a DiCo map has no class token, so the PVT class is the faithful fit.
  - q = Linear(C, C), (k, v) = Linear(C, 2C); agents A = AdaptiveAvgPool2d(sqrt(agent_num)) of the q map,
    agent_num = 49 = 7x7 (the repo's DeiT default and PVT's last two stages).
  - agent aggregation, per head: V_A = softmax(A * d^-1/2 @ k^T + B1) v with
    B1 = bilinear(an_bias (heads, A, 7, 7) -> (H, W)) + ah_bias (.., A, H, 1) + aw_bias (.., A, 1, W).
  - agent broadcast: out = softmax(q * d^-1/2 @ A^T + B2) V_A with
    B2 = bilinear(na_bias (heads, A, 7, 7) -> (H, W))^T + ha_bias (.., H, 1, A) + wa_bias (.., 1, W, A).
  - out += DWC(v) (depthwise Conv2d(C, C, 3, padding 1, groups C)), then proj. Scale head_dim**-0.5.
  - the six biases are trunc_normal_(std=.02) as in the source; the 7x7 an/na tables are interpolated
    (bilinear, align_corners=False: F.interpolate's default in the source) to this map's H x W.

Both: head_dim = 64 as the DiCo caller passes (num_heads = dim // head_dim), qkv_bias=True (the PVT presets' value).
Departures: no attention/projection dropout (0 in the sources' runs); the sources' `.repeat(b, ...)` of the biases is
a broadcast here (same values, no counted op); Linear/Conv2d weights keep PyTorch's init, because the DiCo model's
own init (layers.xavier_init_) rewrites them, as the PVT models' trunc_normal_ model-level init did in the sources.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _heads(dim: int, head_dim: int) -> int:
    if dim % head_dim:
        raise ValueError(f"width {dim} is not divisible by head_dim={head_dim}")
    return dim // head_dim


def _tokens(h: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, HW, C), refusing any map but the resolution the position parameters were sized for."""
    if h.dim() != 4 or h.shape[-2:] != (resolution, resolution):
        raise ValueError(f"expected an (N, C, {resolution}, {resolution}) map, got shape {tuple(h.shape)}")
    return h.flatten(2).transpose(1, 2)


class ChannelSelfAttention(nn.Module):
    """Restormer's MDTA: attention across channels (a C/heads x C/heads map per head), so cost is linear in H*W."""

    def __init__(self, dim: int, head_dim: int = 64, bias: bool = False):
        super().__init__()
        self.num_heads = _heads(dim, head_dim)
        self.temperature = nn.Parameter(torch.ones(self.num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        # Channel index = head * (C/heads) + d, as Restormer's 'b (head c) h w -> b head c (h w)'.
        q, k, v = (t.reshape(n, self.num_heads, c // self.num_heads, hh * ww)
                   for t in self.qkv_dwconv(self.qkv(h)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(n, c, hh, ww))


def _relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) row of the bias table for each pair of row-major tokens of a window, as Swin indexes it."""
    coords = torch.arange(window, device="cpu")
    yx = torch.stack(torch.meshgrid(coords, coords, indexing="ij")).flatten(1)      # (2, T): row, column
    offset = yx[:, :, None] - yx[:, None, :] + (window - 1)                          # (2, T, T) in 0..2w-2
    return offset[0] * (2 * window - 1) + offset[1]


def _shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """(windows, T, T) logits offset of SW-MSA: -100 between tokens of different regions of the rolled map."""
    # Along each axis the rolled map has three regions: [0, R-w), [R-w, R-s), [R-s, R); only the last window
    # row/column mixes pixels that were not neighbours before the roll.
    pos = torch.arange(resolution, device="cpu")
    axis = (pos >= resolution - window).long() + (pos >= resolution - shift).long()
    label = axis[:, None] * 3 + axis[None, :]                                        # (R, R) region ids
    g = resolution // window
    label = label.reshape(g, window, g, window).permute(0, 2, 1, 3).reshape(g * g, window * window)
    differs = label[:, None, :] != label[:, :, None]
    return torch.zeros(differs.shape, device="cpu").masked_fill(differs, -100.0)


class WindowAttention(nn.Module):
    """Swin's window attention with relative position bias over an (N, C, R, R) map; shift=True gives SW-MSA."""

    def __init__(self, dim: int, head_dim: int, resolution: int, window_size: int = 8, shift: bool = False,
                 qkv_bias: bool = True):
        super().__init__()
        heads = _heads(dim, head_dim)
        if resolution <= window_size:        # Swin: the window becomes the whole map, and a shift would be a no-op
            window_size, shift_size = resolution, 0
        elif resolution % window_size:
            raise ValueError(f"window_size={window_size} does not divide the {resolution}x{resolution} map; choose a "
                             "window that divides every stage's map (or a resolution that is a multiple of it)")
        else:
            shift_size = window_size // 2 if shift else 0
        self.num_heads = heads
        self.resolution = resolution
        self.window_size = window_size
        self.shift_size = shift_size
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # Built on the CPU, then moved to wherever the parameters were made (meta included): no op here depends
        # on a buffer's data, and the values are right wherever the module is later moved.
        device = self.qkv.weight.device
        self.register_buffer("relative_position_index", _relative_position_index(window_size).to(device),
                             persistent=False)
        mask = _shift_mask(resolution, window_size, shift_size).to(device) if shift_size else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, resolution={self.resolution}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        r, w, s = self.resolution, self.window_size, self.shift_size
        if hh != r or ww != r:
            raise ValueError(f"WindowAttention was built for a {r}x{r} map, got {hh}x{ww}")
        g, t, heads = r // w, w * w, self.num_heads
        x = h.permute(0, 2, 3, 1)                                                        # (N, R, R, C)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        # window_partition: (N * windows, T, C), windows row-major, tokens row-major within a window.
        x = x.reshape(n, g, w, g, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n * g * g, t, c)
        q, k, v = self.qkv(x).reshape(n * g * g, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)                                    # (N * windows, heads, T, T)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(t, t, heads)
        attn = attn + bias.permute(2, 0, 1)
        if self.attn_mask is not None:
            mask = self.attn_mask.to(attn.dtype)[:, None]                              # (windows, 1, T, T)
            attn = (attn.view(n, g * g, heads, t, t) + mask).view(n * g * g, heads, t, t)
        x = self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(n * g * g, t, c))
        # window_reverse, then undo the roll.
        x = x.view(n, g, g, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, r, r, c)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x.permute(0, 3, 1, 2).contiguous()


class FocusedLinearAttention(nn.Module):
    """FLatten's focused linear attention (global PVT variant, sr=1) over the HW pixels of a map."""

    def __init__(self, dim: int, head_dim: int, resolution: int, focusing_factor: int = 3, kernel_size: int = 5,
                 qkv_bias: bool = True):
        super().__init__()
        self.num_heads = _heads(dim, head_dim)
        self.resolution = resolution
        self.focusing_factor = focusing_factor
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # head_dim channels, not dim: the source runs one kernel set over every head (heads folded into the batch)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, resolution * resolution, dim))

    def _focus(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = (F.relu(x) + 1e-6) / scale               # eps keeps the norms below away from 0
        norm = x.norm(dim=-1, keepdim=True)          # over all C channels, before the head split, as in the source
        x = x ** self.focusing_factor
        return x / x.norm(dim=-1, keepdim=True) * norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = _tokens(h, self.resolution)
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x)
        k, v = self.kv(x).reshape(b, n, 2, c).unbind(2)
        k = k + self.positional_encoding
        scale = F.softplus(self.scale)
        q, k = self._focus(q, scale), self._focus(k, scale)

        q = q.reshape(b, n, heads, -1).transpose(1, 2)                        # (N, heads, HW, d)
        k = k.reshape(b, n, heads, -1).transpose(1, 2)
        v = v.reshape(b, n, heads, -1).transpose(1, 2)
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        # both factors carry n^-1/2, as the source does, so the (d x d) sum stays O(1) in n
        kv = (k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
        x = (q @ kv * z).transpose(1, 2).reshape(b, n, c)

        v_map = v.reshape(b * heads, self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = x + self.dwc(v_map).reshape(b, c, n).transpose(1, 2)
        return self.proj(x).transpose(1, 2).reshape(h.shape)


class AgentAttention(nn.Module):
    """Agent attention (global PVT variant, sr=1): agent_num pooled query tokens gather from all keys, then every
    query reads from the agents, both softmax attentions with the source's agent position biases."""

    def __init__(self, dim: int, head_dim: int, resolution: int, agent_num: int = 49, qkv_bias: bool = True):
        super().__init__()
        heads = self.num_heads = _heads(dim, head_dim)
        pool = math.isqrt(agent_num)
        if agent_num < 1 or pool * pool != agent_num:
            raise ValueError(f"agent_num={agent_num} is not a perfect square (agents are a square pooling grid)")
        self.resolution = resolution
        self.agent_num = agent_num
        self.pool_size = pool
        self.scale = head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        r = resolution
        # 7x7 tables are the source's fixed size, resampled to the map; the row/column terms are sized to it
        self.an_bias = nn.Parameter(torch.zeros(heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, heads, agent_num, r, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, heads, agent_num, 1, r))
        self.ha_bias = nn.Parameter(torch.zeros(1, heads, r, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, heads, 1, r, agent_num))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = _tokens(h, self.resolution)
        b, n, c = x.shape
        heads, a, r = self.num_heads, self.agent_num, self.resolution
        q = self.q(x)
        k, v = self.kv(x).reshape(b, n, 2, c).unbind(2)
        agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(b, c, r, r), self.pool_size)
        agents = agents.reshape(b, heads, -1, a).transpose(-2, -1)             # (N, heads, A, d)
        q = q.reshape(b, n, heads, -1).transpose(1, 2)                         # (N, heads, HW, d)
        k = k.reshape(b, n, heads, -1).transpose(1, 2)
        v = v.reshape(b, n, heads, -1).transpose(1, 2)

        an = F.interpolate(self.an_bias, size=(r, r), mode="bilinear", align_corners=False).reshape(1, heads, a, n)
        an = an + (self.ah_bias + self.aw_bias).reshape(1, heads, a, n)
        agent_v = torch.softmax((agents * self.scale) @ k.transpose(-2, -1) + an, dim=-1) @ v   # (N, heads, A, d)

        na = F.interpolate(self.na_bias, size=(r, r), mode="bilinear", align_corners=False).reshape(1, heads, a, n)
        na = na.transpose(-2, -1) + (self.ha_bias + self.wa_bias).reshape(1, heads, n, a)
        x = torch.softmax((q * self.scale) @ agents.transpose(-2, -1) + na, dim=-1) @ agent_v
        x = x.transpose(1, 2).reshape(b, n, c)

        v_map = v.transpose(1, 2).reshape(b, r, r, c).permute(0, 3, 1, 2)
        x = x + self.dwc(v_map).flatten(2).transpose(1, 2)
        return self.proj(x).transpose(1, 2).reshape(h.shape)
