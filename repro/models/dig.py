"""DiG (Zhu et al., "DiG: Scalable and Efficient Diffusion Models with Gated Linear Attention", arXiv 2405.18428), as
in hustvl/DiG `models_dig.py` and `module_dig.py` (commit 8c1e73a). Its token mixer is a copy of
flash-linear-attention's `GatedLinearAttention` layer (GLA, Yang et al. 2023) calling fla's kernels, at the fla
commit DiG pins (sustcsonglin/flash-linear-attention 36743f3).
DiCo's Table 1 compares against it (GFLOPs and img/s).

The source's layout, kept here (the `*-bid-layer-dwconv-qdir` models, the only DiG presets without long skips):
- DiT's skeleton: patch embedding, fixed sin-cos positions, timestep + label embedders, adaLN-Zero blocks with
  non-affine LayerNorms (eps 1e-6), DiT's final layer, learned sigma;
- the block's mixer is GLA: bias-free q, k (D * expand_k = D/2) and v, output gate g (D * expand_v = D); a low-rank
  forget gate D -> 16 -> D/2 (bias on the second Linear), logsigmoid / 16; the recurrence
  S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(head_k) per head; a per-head RMSNorm (eps 1e-6,
  affine) times swish(g); a bias-free Linear back to D;
- the block's MLP is SwiGLU (GLA's `GLAMLP`): Linear D -> 2I (no bias), swish(a) * b, Linear I -> D (no bias), with
  I = int(8D/3) rounded up to a multiple of 256 (1024, 2048, 2816, 3072 for S, B, L, XL);
- the "spatial reorient & enhancement module" (SREM): after every block a 3x3 depthwise conv (with bias) over the
  token grid as the tokens stand, initialised to the identity; then the whole token sequence is reversed, and after
  every second block the grid is transposed as well, so blocks scan rows forward, rows backward, columns forward,
  columns backward, ...;
- init: xavier for every Linear except GLA's own (xavier with gain 2^-2.5), zero biases, identity depthwise convs,
  DiT's embedder init, zeroed adaLN and final layer.

Sizes from the source's presets: S/2 12 x 384 with 6 heads, B/2 12 x 768 with 12, L/2 24 x 1024 with 16,
XL/2 28 x 1152 with 18 heads (`DiG-XL/2-bid-layer-dwconv-qdir-head18`), expand_k 0.5, expand_v 1.

MAC counting convention (DiCo Table 1 prints torchprofile GMACs at batch 1). torchprofile traces with TorchScript,
and everything DiG runs through flash-linear-attention is a Triton kernel or a custom autograd Function, which the
trace records as an opaque `prim::PythonOp`: the GLA recurrence (`fused_chunk_gla`), the RMSNorm-swish gate
(`FusedRMSNormSwishGate`) and the SwiGLU product with the MLP's down projection (`swiglu_linear`). The printed
values count only what runs as plain torch ops: the patch embedding, embedders, adaLN, the GLA projections
(q, k, v, g, the low-rank gate, o), the MLP's up projection, the depthwise convs, the modulate/gate products and the
final layer. Here those three pieces run inside `layers.source_kernel` regions named after the source's kernels
("fla.fused_chunk_gla", "fla.FusedRMSNormSwishGate", "fla.swiglu_linear"), so `repro.metrics.flops.count(model).gmacs`
is the papers' convention: at 256 px S/2 4.288, B/2 17.053, L/2 61.603, XL/2 89.332 GMACs against the printed 4.30,
17.07, 61.66, 89.40 (-0.29%, -0.10%, -0.09%, -0.08%). The small remainder (0.01 to 0.07 G, about 3 x T x the SwiGLU
width per block in all four sizes) is not identified. Any other reading is far off: the SwiGLU down projection alone
is 1.21 / 4.83 / 17.72 / 25.37 G, and leaving out only the recurrence (counting the norm-gate and SwiGLU) would give
5.500 / 21.893 / 79.344 / 114.730 (+28%). `.full_gmacs` counts everything of our PyTorch forward, the chunked
reference GLA included, whose count depends on its chunk size: 5.732 / 22.357 / 80.580 / 116.352 at chunk 64.

Departures and assumptions, all recorded here:
- the GLA recurrence runs in flash-linear-attention's `chunk_gla` when `fla` is importable and the input is on CUDA
  (DiG calls `fused_chunk_gla`, which computes the same recurrence), and otherwise
  in `gla_chunked`, an exact chunked PyTorch implementation in float32 (float64 for float64 inputs, autocast off);
  each GLA module records which one ran in `.kernel`, and `layers.kernels_used(model)` collects them;
- the RMSNorm-swish gate and SwiGLU are plain torch ops (fla's fused Triton versions compute the same maths);
- tokens are put back into raster order before the final layer when the scan leaves them reversed or transposed.
  The presets' depths (12, 24, 28) bring them back by themselves, exactly as in the source; a depth the source does
  not use (e.g. the tests' depth 2) would otherwise hand the final layer a transposed token grid;
- the source's long-skip variants (`-skip`, `-skipzero`), its in-block conv option (`if_in_block_conv`) and its
  RMSNorm option (`if_rms_norm`) are left out: no paper table uses them;
- the source's `mlp_ratio` argument is ignored by it (GLA's config fixes the SwiGLU ratio at 4); here `mlp_ratio` is
  that ratio and defaults to 4;
- the patch embedding is the harness's Conv2d named `x_embedder` (timm's `PatchEmbed` names it `x_embedder.proj`);
  every other parameter keeps the source's name, so a DiG checkpoint loads after that one rename;
- the label table is the harness's `LabelEmbedder`: the model never drops labels itself (the trainer does).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Denoiser, LabelEmbedder, TimestepEmbedder, TokenFinalLayer, adaln_zero_, check_choice,
                     check_input_size, dit_trunk_init_, frozen_pos_embed, gated, modulate, source_kernel, unpatchify)

GATE_LOW_RANK = 16          # fla GatedLinearAttention's gate_low_rank_dim default, which DiG keeps
GATE_LOGIT_NORMALIZER = 16  # fla's gate_logit_normalizer default: log alpha = logsigmoid(x) / 16
NORM_EPS = 1e-6             # DiG passes rms_norm_eps=1e-6 to the GLA output norm
GLA_INIT_GAIN = 2 ** -2.5   # fla's xavier gain for GLA's own Linears
SUB_CHUNK = 16              # fla's sub-chunk size inside a chunk

# --------------------------------------------------------------------------------------------------------------
# The GLA recurrence: naive loop (ground truth), exact chunked reference, and flash-linear-attention's kernel
# --------------------------------------------------------------------------------------------------------------

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    # The reference promises float32 arithmetic, so an autocast region around the model must not reach it.
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def gla_recurrent_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None):
    """GLA one step at a time: S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    q, k, log_gate: (N, H, T, K); v: (N, H, T, V). Returns (o (N, H, T, V), final state (N, H, K, V)).
    """
    dt, out_dtype = _compute_dtype(q), v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g = (x.to(dt) for x in (q, k, v, log_gate))
    n, h, length, dk = q.shape
    state = q.new_zeros(n, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(length):
        state = g[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]   # (N, H, K, V)
        outs.append((scale * q[:, :, t, None, :]) @ state)                                     # (N, H, 1, V)
    return torch.cat(outs, dim=2).to(out_dtype), state


def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                scale: float | None = None, chunk_size: int = 64, initial_state: torch.Tensor | None = None):
    """GLA in chunks, exactly (same maths as `gla_recurrent_naive`), in float32 (float64 for float64 inputs).

    Within a chunk the decays are differences of cumulative log gates. Every exp is taken of a non-positive
    number, so strong gates underflow to exact zeros instead of overflowing: pairs inside one sub-chunk of 16 get
    their own decay per channel; a query sub-chunk and the earlier keys of its chunk are split at the sub-chunk's
    start (fla's `chunk_gla` does the same); across chunks a (K, V) state is carried. q, k, log_gate:
    (N, H, T, K); v: (N, H, T, V). Returns (o (N, H, T, V), final state (N, H, K, V)).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    sub = min(SUB_CHUNK, chunk_size)
    if chunk_size % sub:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of {SUB_CHUNK} (or at most {SUB_CHUNK})")
    dt, out_dtype = _compute_dtype(q), v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with _no_autocast(q.device):
        q, k, v, g = (x.to(dt) for x in (q, k, v, log_gate))
        n, h, length, dk = q.shape
        dv = v.shape[-1]
        pad = -length % chunk_size
        if pad:  # zero keys and unit decays at the end change neither earlier outputs nor the final state
            q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        nc, ns, c = (length + pad) // chunk_size, chunk_size // sub, chunk_size
        q = (q * scale).view(n, h, nc, ns, sub, dk)
        k = k.view(n, h, nc, ns, sub, dk)
        v = v.view(n, h, nc, ns, sub, dv)
        b = g.view(n, h, nc, c, dk).cumsum(-2).view(n, h, nc, ns, sub, dk)  # log decay since the chunk start
        neg_inf = torch.tensor(float("-inf"), dtype=dt, device=q.device)

        # pairs within a sub-chunk: decay exp(b_t - b_s) for s <= t
        causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()[..., None]
        decay = torch.where(causal, b.unsqueeze(-2) - b.unsqueeze(-3), neg_inf).exp()   # (.., ns, t, s, K)
        a_diag = (q.unsqueeze(-2) * decay * k.unsqueeze(-3)).sum(-1)                     # (.., ns, t, s)
        o = a_diag @ v                                                                   # (.., ns, sub, V)

        # query sub-chunk I against the keys of earlier sub-chunks, split at r_I = b just before I starts
        ends = b[..., -1, :]                                                             # (.., ns, K)
        r = torch.cat([torch.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], dim=-2)   # (.., ns, K)
        q_off = q * (b - r.unsqueeze(-2)).exp()                                          # (.., ns, sub, K)
        pos = torch.arange(c, device=q.device)
        earlier = (pos[None, :] < (torch.arange(ns, device=q.device) * sub)[:, None])[..., None]  # (ns, c, 1)
        b_all, k_all = b.view(n, h, nc, 1, c, dk), k.view(n, h, nc, 1, c, dk)
        k_off = k_all * torch.where(earlier, r.unsqueeze(-2) - b_all, neg_inf).exp()    # (.., ns, c, K)
        o = o + (q_off @ k_off.transpose(-1, -2)) @ v.view(n, h, nc, 1, c, dv)           # (.., ns, sub, V)

        # across chunks: the state entering chunk i, decayed to each query, plus the state update
        b_c = b.view(n, h, nc, c, dk)
        last = b_c[..., -1:, :]                                                          # (N, H, nc, 1, K)
        q_in = q.view(n, h, nc, c, dk) * b_c.exp()
        k_in = k.view(n, h, nc, c, dk) * (last - b_c).exp()
        v_c = v.view(n, h, nc, c, dv)
        state = q.new_zeros(n, h, dk, dv) if initial_state is None else initial_state.to(dt)
        carried = []
        for i in range(nc):
            carried.append(q_in[:, :, i] @ state)                                        # (N, H, c, V)
            state = last[:, :, i, 0, :, None].exp() * state + k_in[:, :, i].transpose(-1, -2) @ v_c[:, :, i]
        o = o.view(n, h, nc, c, dv) + torch.stack(carried, dim=2)
        o = o.reshape(n, h, nc * c, dv)[:, :, :length]
    return o.to(out_dtype), state


@functools.lru_cache(maxsize=1)
def _fla_chunk_gla():
    """(fla's `chunk_gla`, its layout "bhtk" or "bthk", whether it takes `head_first`), or None without fla."""
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        return None
    params = inspect.signature(chunk_gla).parameters
    # the fla DiG pins takes (B, H, T, K); later releases add `head_first` (False: (B, T, H, K)), then keep only that
    return chunk_gla, ("bthk" if "head_first" in params or "cu_seqlens" in params else "bhtk"), "head_first" in params


def fla_available() -> bool:
    return _fla_chunk_gla() is not None


def gla_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
            scale: float | None = None) -> torch.Tensor:
    """The recurrence through fla's fused Triton kernel; same arguments and layout as `gla_chunked`."""
    loaded = _fla_chunk_gla()
    if loaded is None:
        raise RuntimeError("flash-linear-attention (`fla`) is not installed")
    chunk_gla, layout, has_head_first = loaded
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if layout == "bhtk":
        return chunk_gla(q, k, v, log_gate, scale=scale)[0]
    args = [x.transpose(1, 2).contiguous() for x in (q, k, v, log_gate)]
    extra = dict(head_first=False) if has_head_first else {}
    return chunk_gla(*args, scale=scale, **extra)[0].transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------
# DiG
# --------------------------------------------------------------------------------------------------------------

KERNELS = ("auto", "reference", "fla")


class RMSNormSwishGate(nn.Module):
    """RMSNorm over the last axis (affine) times swish(gate): fla's `FusedRMSNormSwishGate`."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps) * F.silu(gate)


class GatedLinearAttention(nn.Module):
    """fla's `GatedLinearAttention` layer as DiG configures it (output gate on, no short conv, fused norm-gate).

    `kernel` names the recurrence implementation of the last forward: "reference" or "fla" (None before any).
    """

    def __init__(self, dim: int, num_heads: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 gla_kernel: str = "auto", chunk_size: int = 64):
        super().__init__()
        check_choice("gla_kernel", gla_kernel, KERNELS)
        self.key_dim, self.value_dim = int(dim * expand_k), int(dim * expand_v)
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key width {self.key_dim} and value width {self.value_dim} must be divisible by "
                             f"num_heads={num_heads}")
        self.num_heads, self.gla_kernel, self.chunk_size = num_heads, gla_kernel, chunk_size
        self.head_k, self.head_v = self.key_dim // num_heads, self.value_dim // num_heads
        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(dim, GATE_LOW_RANK, bias=False),
                                     nn.Linear(GATE_LOW_RANK, self.key_dim, bias=True))
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        self.g_norm_swish_gate = RMSNormSwishGate(self.head_v)
        self.kernel: str | None = None

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=GLA_INIT_GAIN)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _recurrence(self, q, k, v, log_gate):
        use_fla = self.gla_kernel == "fla" or (self.gla_kernel == "auto" and q.is_cuda and fla_available())
        if use_fla:
            if not q.is_cuda:
                raise RuntimeError("gla_kernel='fla' needs CUDA inputs")
            self.kernel = "fla"
            return gla_fla(q, k, v, log_gate, scale=self.head_k ** -0.5)
        self.kernel = "reference"
        return gla_chunked(q, k, v, log_gate, scale=self.head_k ** -0.5, chunk_size=self.chunk_size)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape

        def heads(t, d):  # (N, T, H*d) -> (N, H, T, d)
            return t.view(n, length, self.num_heads, d).transpose(1, 2)

        q, k = heads(self.q_proj(x), self.head_k), heads(self.k_proj(x), self.head_k)
        v = heads(self.v_proj(x), self.head_v)
        log_gate = heads(F.logsigmoid(self.gk_proj(x)) / GATE_LOGIT_NORMALIZER, self.head_k)
        with source_kernel("fla.fused_chunk_gla"):
            o = self._recurrence(q, k, v, log_gate).transpose(1, 2)                  # (N, T, H, head_v)
        g = self.g_proj(x).view(n, length, self.num_heads, self.head_v)
        with source_kernel("fla.FusedRMSNormSwishGate"):
            o = self.g_norm_swish_gate(o, g)
        return self.o_proj(o.reshape(n, length, self.value_dim))                    # (N, T, D)


def swiglu_hidden(dim: int, ratio: float) -> int:
    """GLA's `GLAMLP` width: int(dim * ratio * 2/3) rounded up to a multiple of 256."""
    return 256 * math.ceil(int(dim * ratio * 2 / 3) / 256)


class SwiGLU(nn.Module):
    """GLA's `GLAMLP`: one bias-free Linear to both halves, swish(a) * b, bias-free Linear back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, y = self.gate_proj(x).chunk(2, dim=-1)
        with source_kernel("fla.swiglu_linear"):
            return self.down_proj(F.silu(gate) * y)


class DiGBlock(nn.Module):
    """adaLN-Zero block with a GLA mixer and SwiGLU MLP, then (SREM) a depthwise conv over the token grid."""

    def __init__(self, dim: int, num_heads: int, expand_k: float, expand_v: float, mlp_ratio: float, grid: int,
                 dw_conv: bool, conv_kernel_size: int, gla_kernel: str, chunk_size: int):
        super().__init__()
        self.grid = grid
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = GatedLinearAttention(dim, num_heads, expand_k, expand_v, gla_kernel, chunk_size)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.dw_conv = (nn.Conv2d(dim, dim, conv_kernel_size, padding=conv_kernel_size // 2, groups=dim)
                        if dw_conv else None)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gated(gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + gated(gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))
        if self.dw_conv is not None:  # outside the residual, on the grid as the tokens currently stand
            n, length, dim = x.shape
            x = self.dw_conv(x.transpose(1, 2).reshape(n, dim, self.grid, self.grid)).flatten(2).transpose(1, 2)
        return x


def _transpose_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    n, length, dim = x.shape
    return x.view(n, grid, grid, dim).transpose(1, 2).reshape(n, length, dim)


class DiG(Denoiser):
    """Diffusion GLA transformer with adaLN-Zero conditioning and learned sigma.

    Args:
        input_size: latent side (32 for 256 px); fixes the position table and the conv grid.
        hidden_size, depth, num_heads: the DiG-S/B/L/XL sizes (see PRESETS).
        expand_k, expand_v: GLA key and value widths as fractions of hidden_size (fla's defaults, kept by DiG).
        mlp_ratio: SwiGLU ratio; the hidden width is int(hidden * mlp_ratio * 2/3) rounded up to 256.
        scan_directions: 4 = SREM's reorient (reverse the sequence after every block, transpose the grid after every
            second: the source's bid_mode="layer" with if_quad_dir); 2 = reverse only; 1 = raster every block.
        dw_conv: SREM's enhancement, a depthwise conv_kernel_size conv over the grid after every block.
        gla_kernel: "auto" (fla on CUDA when installed, else the PyTorch reference), "reference" or "fla".
        chunk_size: chunk length of the PyTorch reference recurrence (a multiple of 16, or at most 16).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 18, expand_k: float = 0.5, expand_v: float = 1.0,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, class_dropout_prob: float = 0.1,
                 scan_directions: int = 4, dw_conv: bool = True, conv_kernel_size: int = 3,
                 gla_kernel: str = "auto", chunk_size: int = 64):
        super().__init__()
        check_input_size(input_size, patch_size, "DiG")
        check_choice("scan_directions", scan_directions, (1, 2, 4))
        check_choice("gla_kernel", gla_kernel, KERNELS)
        if conv_kernel_size < 1 or conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be a positive odd number, got {conv_kernel_size}")
        if chunk_size < 1 or (chunk_size > SUB_CHUNK and chunk_size % SUB_CHUNK):
            raise ValueError(f"chunk_size={chunk_size} must be a multiple of {SUB_CHUNK} or at most {SUB_CHUNK}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.scan_directions = scan_directions

        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = frozen_pos_embed(hidden_size, self.grid)  # as DiT and DiG keep it
        self.blocks = nn.ModuleList([
            DiGBlock(hidden_size, num_heads, expand_k, expand_v, mlp_ratio, self.grid, dw_conv, conv_kernel_size,
                     gla_kernel, chunk_size) for _ in range(depth)])
        self.final_layer = TokenFinalLayer(hidden_size, hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        dit_trunk_init_(self)
        for block in self.blocks:
            block.attn.init_weights()
            if block.dw_conv is not None:
                # identity: delta at the kernel centre (built on the CPU so meta models skip real init)
                k = block.dw_conv.kernel_size[0]
                delta = torch.zeros(k * k, device="cpu")
                delta[k * k // 2] = 1
                with torch.no_grad():
                    block.dw_conv.weight.copy_(delta.view(1, 1, k, k).expand_as(block.dw_conv.weight))
                nn.init.zeros_(block.dw_conv.bias)
        adaln_zero_(self.blocks, self.final_layer)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, D)
        reversed_, transposed = False, False  # the stream's order against raster; the two moves commute
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if self.scan_directions >= 2:
                x, reversed_ = x.flip(1), not reversed_
            if self.scan_directions == 4 and i % 2 == 1:
                x, transposed = _transpose_grid(x, self.grid), not transposed
        if reversed_:
            x = x.flip(1)
        if transposed:
            x = _transpose_grid(x, self.grid)
        x = self.final_layer(x, c)                                           # (N, T, p*p*2C)
        return unpatchify(x, self.patch_size, self.out_channels)             # (N, 2C, H, W)


_SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6), "B": dict(depth=12, hidden_size=768, num_heads=12),
          "L": dict(depth=24, hidden_size=1024, num_heads=16), "XL": dict(depth=28, hidden_size=1152, num_heads=18)}

PRESETS = {f"DiG-{size}/2": dict(**dims, patch_size=2) for size, dims in _SIZES.items()}

# "GFLOPs" as printed are torchprofile GMACs at batch 1, i.e. `repro.metrics.flops.count(model).gmacs` (module
# docstring).
PUBLISHED = {
    "DiG-S/2": dict(gmacs_256=4.30, source="DiCo Table 1"),
    "DiG-B/2": dict(gmacs_256=17.07, source="DiCo Table 1"),
    "DiG-L/2": dict(gmacs_256=61.66, source="DiCo Table 1"),
    "DiG-XL/2": dict(gmacs_256=89.40, source="DiCo Table 1"),
}
