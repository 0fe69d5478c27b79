"""The MAC counter follows torchprofile's rules on hand-countable modules."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny

from repro.metrics.flops import WINOGRAD_FACTOR, count
from repro.models.layers import TORCHPROFILE_SDPA, Attention


class Toy(nn.Module):
    """A module with one of each counted op; the `count` interface needs in_channels and (x, t, y)."""

    in_channels = 3

    def __init__(self, affine_norm=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)            # 8*8*8 outputs x 3*9
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)    # 8*8*8 outputs x 1*25
        self.lin = nn.Linear(8, 16)                          # 64 tokens x 8 x 16
        self.norm = nn.LayerNorm(16, elementwise_affine=affine_norm)

    def forward(self, x, t, y):
        h = self.dw(self.conv(x))                            # (1, 8, 8, 8)
        tokens = self.norm(self.lin(h.flatten(2).transpose(1, 2)))   # (1, 64, 16)
        q = k = v = tokens.view(1, 2, 64, 8)                 # 2 heads of 8
        a = F.scaled_dot_product_attention(q, k, v)          # QK^T: 2*64*64*8, AV: 2*64*64*8
        s = a.mean(dim=-1, keepdim=True)                     # 2*64 outputs
        return a * s                                         # 2*64*8 outputs


def test_counts_each_op_like_torchprofile():
    expected = (8 * 8 * 8 * 27 + 8 * 8 * 8 * 25 + 64 * 8 * 16 + 64 * 16
                + 2 * (2 * 64 * 64 * 8) + 2 * 64 + 2 * 64 * 8)
    c = count(Toy(), 8, device="cpu")
    assert c.macs == expected
    assert c.winograd_macs is None
    assert count(Toy(affine_norm=False), 8, device="cpu").macs == expected - 64 * 16  # LN without affine is free


def test_winograd_divides_only_in_block_convs():
    model = tiny("DiC-S").eval()
    c = count(model, 16, device="cpu")
    macs = []

    def record(conv, args, out):
        macs.append(out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])

    hooks = [conv.register_forward_hook(record) for conv in model.winograd_convs()]
    with torch.no_grad():
        model(torch.zeros(1, 4, 16, 16), torch.tensor([1]), torch.tensor([0]))
    for h in hooks:
        h.remove()
    in_block = sum(macs)
    assert len(macs) == 2 * len(model.dic_blocks()) and 0 < in_block < c.macs
    assert c.winograd_macs == round(c.macs - in_block + in_block / WINOGRAD_FACTOR)


def test_counting_on_meta_matches_counting_on_cpu():
    cpu = count(tiny("DiCo-S").eval(), 16, device="cpu")
    with torch.device("meta"):
        meta_model = tiny("DiCo-S")
    assert count(meta_model, 16).macs == cpu.macs
    assert count(meta_model, 16).params == cpu.params


def test_count_restores_training_mode():
    model = tiny("DiT-S/2").train()
    count(model, device="cpu")
    assert model.training


@pytest.mark.parametrize("name", ["DiT-S/2", "U-ViT-H/2"])
def test_attention_is_counted(name):
    # Attention matmuls scale with the square of the token count; convs and linears scale linearly.
    small = count(tiny(name, input_size=16), device="cpu").macs
    large = count(tiny(name, input_size=32), device="cpu").macs
    assert large > 4 * small


class TokenAttention(nn.Module):
    """One attention layer over the 64 pixels of an 8x8 map, its SDPA seen or not by the papers' counter."""

    in_channels = 16

    def __init__(self, sdpa_unseen):
        super().__init__()
        self.attn = Attention(16, 2, sdpa_unseen=sdpa_unseen)

    def forward(self, x, t, y):
        return self.attn(x.flatten(2).transpose(1, 2))


def test_sdpa_counts_as_torchprofile_0_0_4_saw_the_source():
    t, c = 64, 16
    linears = t * c * 3 * c + t * c * c                      # qkv and proj
    attention = 2 * (2 * t * t * (c // 2))                   # 2 heads x (QK^T + AV)
    seen = count(TokenAttention(None), 8, device="cpu")      # DiT's source wrote both matmuls out
    unseen = count(TokenAttention(TORCHPROFILE_SDPA), 8, device="cpu")   # timm >= 0.9 called SDPA
    assert (seen.macs, seen.source_kernel_macs) == (linears + attention, 0)
    assert (unseen.macs, unseen.source_kernel_macs) == (linears, attention)
    assert unseen.full_gmacs == seen.gmacs


def test_dico_self_attention_row_leaves_its_attention_matmuls_out_of_the_papers_count():
    model = tiny("DiCo-S-attn", input_size=16).eval()
    # every block attends over its stage's pixels: 2 x T^2 x C per block (QK^T and AV over all heads)
    stages = [(model.enc1, 16), (model.enc2, 8), (model.mid, 4), (model.dec2, 8), (model.dec1, 16)]
    by_hand = sum(len(blocks) * 2 * (side * side) ** 2 * blocks[0].ffn[-1].out_channels for blocks, side in stages)
    c = count(model, device="cpu")
    assert c.source_kernel_macs == by_hand
    grows = count(tiny("DiCo-S-attn", input_size=32), device="cpu")
    assert grows.macs < 4.5 * c.macs < grows.macs + grows.source_kernel_macs
