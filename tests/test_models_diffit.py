"""Latent DiffiT: a tiny model trains and guides, TMSA is W_s x + W_t c with a relative position bias, the output
starts at zero, and DiffiT-XL/2 counts the published GMACs."""

import pytest
import torch
from conftest import randomize_

from repro.metrics.flops import count
from repro.models import _no_init
from repro.models.diffit import PRESETS, PUBLISHED, DiffiT, relative_position_index


def _tiny(**overrides) -> DiffiT:
    torch.manual_seed(0)
    return DiffiT(**{**dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2),
                     **overrides})


def _inputs(n=2, size=16):
    return torch.randn(n, 4, size, size), torch.randint(0, 1000, (n,)), torch.randint(0, 1000, (n,))


def test_tiny_forward_backward_and_guidance():
    model = _tiny()
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16)
    # Random weights everywhere, or the zero final layer would starve every other parameter of gradient.
    randomize_(model)
    (model(x, t, y) - torch.randn(2, 8, 16, 16)).square().mean().backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
    assert guided.shape == (2, 8, 16, 16)
    assert torch.isfinite(guided).all()


def test_output_is_zero_at_init():
    # The public code zero-initialises the final Linear (its only zero init), so every output starts at 0.
    model = _tiny()
    assert torch.equal(model(*_inputs()), torch.zeros(2, 8, 16, 16))


def test_relative_position_index_is_swin_layout():
    index = relative_position_index(3)                                   # 9 tokens, a 5x5 table
    assert index.shape == (9, 9) and index.min() == 0 and index.max() == 24
    assert torch.all(index.diagonal() == 12)                             # zero offset sits at the table's centre
    # token 0 = (0, 0), token 5 = (1, 2): offset (-1, -2) -> (1, 0) after the shift -> 1 * 5 + 0
    assert index[0, 5] == 5 and index[5, 0] == (3 * 5 + 4)


def test_tmsa_is_spatial_plus_temporal_projection_with_position_bias():
    model = randomize_(_tiny(), std=0.2).double()
    attn = model.blocks[0].attn
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    t1, t2, y = torch.tensor([10, 700]), torch.tensor([900, 20]), torch.tensor([3, 5])
    c1 = model.t_embedder(t1) + model.y_embedder(y)
    c2 = model.t_embedder(t2) + model.y_embedder(y)

    with torch.no_grad():
        # Same tokens, another time step: the attention output changes.
        assert not torch.allclose(attn(x, c1), attn(x, c2), atol=1e-6)

        # q, k, v = W_s x + W_t c, computed by hand.
        q, k, v = attn.qkv_heads(x, c1)
        by_hand = x @ attn.qkv.weight.T + attn.qkv.bias + (c1 @ attn.qkv_temb.weight.T + attn.qkv_temb.bias)[:, None]
        heads = by_hand.reshape(2, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
        for got, want in zip((q, k, v), heads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

        # softmax(q k^T / sqrt(d) + B) v, then the output projection; B[h, i, j] looks up the (row, col) offset.
        rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
        dr = rows[:, None] - rows[None, :] + 7
        dc = cols[:, None] - cols[None, :] + 7
        bias = attn.relative_position_bias_table[dr * 15 + dc].permute(2, 0, 1)           # (heads, T, T)
        logits = heads[0] @ heads[1].transpose(-1, -2) / 16 ** 0.5 + bias
        mixed = (logits.softmax(-1) @ heads[2]).transpose(1, 2).reshape(2, 64, 32)
        torch.testing.assert_close(attn(x, c1), attn.proj(mixed), rtol=1e-10, atol=1e-10)


def test_xl2_gmacs_match_published():
    with torch.device("meta"), _no_init():
        model = DiffiT(**PRESETS["DiffiT-XL/2"])
    c = count(model)
    assert c.gmacs == pytest.approx(PUBLISHED["DiffiT-XL/2"]["gmacs_256"], rel=5e-3)
    assert c.params == 561_330_144                  # the paper's implied 561M (675M DiT-XL/2 less 16.88%)
