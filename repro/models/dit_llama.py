"""DiT-LLaMA: DiT with LLaMA blocks, as in Alpha-VLLM/LLaMA2-Accessory `Large-DiT-ImageNet/models.py` (`DiT_Llama`,
the "Large-DiT" / L-DiT of its README, class-conditional ImageNet). DiC's 400K table lists "DiT-LLaMA*" at
118.6 GFLOPs, the star marking a size the paper leaves unspecified, matched to DiT-XL.

The source's layout, kept here: a patch embedding and no position table; each block is
x + g1 * attn(mod(RMSNorm x)), x + g2 * SwiGLU(mod(RMSNorm x)) with DiT's adaLN-Zero modulation (per-block
SiLU -> Linear(cond, 6D), zero-initialised); attention has bias-free wq/wk/wv/wo, optional qk-norm (a LayerNorm
over all heads of q and of k, before the head split) and 1-D rotary embeddings on q and k over the raster order of
the tokens (pairs of adjacent channels rotated, theta 10000); the SwiGLU hidden width is LLaMA's
int(2 * 4D / 3) rounded up to a multiple of 256; the timestep and label embedders and every adaLN input are
min(D, 1024) wide; the final layer is DiT's (LayerNorm without affine, adaLN, Linear), zero-initialised.

Size (our assumption): width 1152, depth 28, 16 heads, patch 2, qk-norm on, i.e. DiT-XL/2's shape with LLaMA blocks.
It gives 118.68 GMACs at 256 (649.2M params), within 0.1% of the printed 118.6: the SwiGLU hidden width comes out at
3072 = 8D/3, so the block Linears cost exactly DiT's 12 D^2 per token; the 1024-wide embedders and adaLN save
0.025 G and the SwiGLU product, the qk-norm affines and the rotary products add 0.047 G. The source's smallest preset
(`DiT_Llama_600M_patch2`: width 1536, depth 16, 32 heads) is the other candidate; it gives 119.42 GMACs (609.8M
params), 0.7% above the printed value, so we take the XL shape the star points to.

Departures and assumptions, all recorded here:
- qk-norm defaults on: the source's default is off, but its only released training script (`exps/..._qknorm.sh`)
  and the README's description of Large-DiT turn it on;
- no grouped-query attention (the source's `n_kv_heads` is never set in its presets), no tensor parallelism;
  attention goes through `F.scaled_dot_product_attention`, where the source calls flash-attention in bf16/fp16;
- RMSNorm is `nn.RMSNorm` (the source uses apex's fused one, same maths, eps 1e-5); neither is counted by
  torchprofile's rules, so it adds no MACs here either;
- the patch embedding is a Conv2d with kernel = stride = p, the same map as the source's Linear on (c, p, q)-ordered
  patches (same weights after a reshape, same MACs), initialised like it (xavier on the flat weight, zero bias);
- the output has 2C channels (learned sigma), which is also the source's default (`learn_sigma=True`);
- the label table is the harness's `LabelEmbedder`: the model never drops labels itself (the trainer does).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Denoiser, LabelEmbedder, TimestepEmbedder, TokenFinalLayer, adaln_zero_, check_input_size,
                     dit_trunk_init_, gated, modulate, unpatchify)

COND_WIDTH_CAP = 1024  # the source's embedders and adaLN inputs are min(D, 1024) wide


def rope_angles(length: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(length, head_dim/2) complex unit rotations e^{i pos w_k}, w_k = theta^(-2k/head_dim), as LLaMA's freqs_cis."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    # outer, not a broadcast mul: the source precomputes this table, so it must not show up in the MAC count
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of (N, T, heads, head_dim) by the (T, head_dim/2) rotations, in float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (N, T, heads, head_dim/2)
    return torch.view_as_real(pairs * rot[:, None]).flatten(-2).type_as(x)


class LlamaAttention(nn.Module):
    """Bias-free multi-head self-attention with optional qk-norm and rotary positions on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"width {dim} over num_heads={num_heads} must give an even head width (rotary pairs)")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        # eps 1e-5 and affine: nn.LayerNorm's defaults, which the source keeps
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        heads = (n, length, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(self.wq(x)).view(heads), rot)
        k = apply_rope(self.k_norm(self.wk(x)).view(heads), rot)
        v = self.wv(x).view(heads)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(n, length, dim))          # (N, T, D)


def swiglu_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA's FFN width for a nominal 4D: two thirds of it, optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTLlamaBlock(nn.Module):
    """LLaMA block (RMSNorm, rotary attention, SwiGLU) under DiT's adaLN-Zero modulation."""

    def __init__(self, dim: int, cond_dim: int, num_heads: int, ffn_hidden: int, qk_norm: bool, norm_eps: float):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attention = LlamaAttention(dim, num_heads, qk_norm)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.feed_forward = SwiGLU(dim, ffn_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gated(gate1, self.attention(modulate(self.attention_norm(x), shift1, scale1), rot))
        return x + gated(gate2, self.feed_forward(modulate(self.ffn_norm(x), shift2, scale2)))


class DiTLlama(Denoiser):
    """DiT with LLaMA blocks and 1-D rotary positions (no position table), adaLN-Zero, learned sigma.

    Args:
        hidden_size, depth, num_heads: width, blocks, heads (the source's dim, n_layers, n_heads).
        multiple_of, ffn_dim_multiplier: LLaMA's SwiGLU width rule (see `swiglu_hidden`).
        qk_norm: LayerNorm on q and k before the rotation (on in the source's released training script).
        norm_eps: RMSNorm epsilon (the source's 1e-5).
        rope_theta: rotary base.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, multiple_of: int = 256, ffn_dim_multiplier: float | None = None,
                 qk_norm: bool = True, norm_eps: float = 1e-5, rope_theta: float = 10000.0, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1):
        super().__init__()
        check_input_size(input_size, patch_size, "DiT-LLaMA")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.head_dim, self.rope_theta = hidden_size // num_heads, rope_theta
        cond_dim = min(hidden_size, COND_WIDTH_CAP)
        self.ffn_hidden = swiglu_hidden(hidden_size, multiple_of, ffn_dim_multiplier)

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(num_classes, cond_dim, class_dropout_prob)
        self.layers = nn.ModuleList([DiTLlamaBlock(hidden_size, cond_dim, num_heads, self.ffn_hidden, qk_norm, norm_eps)
                                     for _ in range(depth)])
        self.final_layer = TokenFinalLayer(hidden_size, cond_dim, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        dit_trunk_init_(self)
        adaln_zero_(self.layers, self.final_layer)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2)                    # (N, T, D), raster order
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, min(D, 1024))
        # Rebuilt per call rather than kept as a buffer, so that casting the model to bf16 cannot coarsen it.
        rot = rope_angles(x.shape[1], self.head_dim, self.rope_theta, x.device)  # (T, head_dim/2) complex
        for layer in self.layers:
            x = layer(x, c, rot)
        x = self.final_layer(x, c)                                           # (N, T, p*p*2C)
        return unpatchify(x, self.patch_size, self.out_channels)             # (N, 2C, H, W)


PRESETS = {
    "DiT-LLaMA-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),  # assumed, see module docstring
}

# "GFLOPs" as printed are GMACs; DiC prints no parameter count for DiT-LLaMA*.
PUBLISHED = {
    "DiT-LLaMA-XL/2": dict(gmacs_256=118.6, source="DiC poster, 400K table (DiT-LLaMA*)"),
}
