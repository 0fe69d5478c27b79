"""DiMSUM (repro.models.dimsum): tiny forward / backward / guidance, zero output at init, the Haar transform, scan
orders, and the L/2 count against DiCo Table 1."""

import pytest
import torch

from repro import models
from repro.metrics import flops
from repro.models import dimsum, layers

TINY = dict(input_size=16, hidden_size=32, depth=2)


def _batch(n=2, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, size, size, generator=g), torch.tensor([10, 900][:n]), torch.tensor([3, 7][:n])


def test_tiny_forward_backward_cfg_and_kernels():
    torch.manual_seed(0)
    model = dimsum.DiMSUM(**TINY)
    assert (model.input_size, model.patch_size, model.in_channels, model.out_channels) == (16, 2, 4, 8)
    assert (model.num_classes, model.class_dropout_prob) == (1000, 0.1)
    x, t, y = _batch()
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16)
    assert torch.count_nonzero(out) == 0            # final Linear zero-initialised, as the source
    assert layers.kernels_used(model) == ["reference"]
    # Give the zeroed layers weights so that gradients reach the whole graph.
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.1)
        model.final_layer.linear.weight.normal_(std=0.1)
    out = model(x, t, y)
    assert out.abs().sum() > 0
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert model.blocks[0].freq_mamba.mixer.in_proj.weight.grad.abs().sum() > 0
    guided = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
    assert guided.shape == (2, 8, 16, 16) and torch.isfinite(guided).all()


def test_attention_block_runs_when_due():
    torch.manual_seed(0)
    model = dimsum.DiMSUM(**TINY, attn_every=1)
    assert dimsum.DiMSUM(**TINY).attn_block is None     # depth 2 < 4: never called, so not built
    calls = []
    model.attn_block.register_forward_hook(lambda *a: calls.append(1))
    x, t, y = _batch()
    assert model(x, t, y).shape == (2, 8, 16, 16)
    assert len(calls) == 2


def test_haar_dwt_is_invertible_and_orthonormal():
    f = dimsum._haar_filters()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    bands = dimsum.haar_dwt(x, f)
    assert bands.shape == (2, 12, 4, 4)
    torch.testing.assert_close(dimsum.haar_idwt(bands, f), x, rtol=0, atol=1e-14)
    torch.testing.assert_close(bands.square().sum(), x.square().sum())   # energy kept
    # ll is the 2x2 block sum / 2; hh the checkerboard difference / 2 (by hand).
    torch.testing.assert_close(bands[:, :3, 0, 0], x[:, :, :2, :2].sum((-1, -2)) / 2)
    hh = (x[:, :, 0, 0] - x[:, :, 0, 1] - x[:, :, 1, 0] + x[:, :, 1, 1]) / 2
    torch.testing.assert_close(bands[:, 9:, 0, 0], hh)
    tokens = torch.randn(2, 64, 6, dtype=torch.float64)
    back = dimsum.wavelet_grid(dimsum.wavelet_tokens(tokens, 8, f), 8, f)
    torch.testing.assert_close(back, tokens, rtol=0, atol=1e-14)


def test_wavelet_token_layout_matches_source_rearrange():
    # Token (h, p1, w, p2), feature c reads channel c * 16 + 4 p1 + p2 of the re-ordered level-2 bands.
    f = dimsum._haar_filters()
    x = torch.randn(1, 64, 4, dtype=torch.float64)
    grid = x.transpose(1, 2).reshape(1, 4, 8, 8)
    lv2 = dimsum.haar_dwt(dimsum.haar_dwt(grid, f), f) / 4
    blocks = lv2.chunk(16, dim=1)
    reordered = torch.cat([blocks[i % 4 * 4 + i // 4] for i in range(16)], dim=1)    # the source's indices
    tokens = dimsum.wavelet_tokens(x, 8, f)
    h, p1, w, p2, c = 1, 2, 0, 3, 3
    assert tokens[0, ((h * 4 + p1) * 2 + w) * 4 + p2, c] == reordered[0, c * 16 + 4 * p1 + p2, h, w]


def test_scan_orders_by_hand():
    assert dimsum.grid_order(2, transpose=True, reverse=False).tolist() == [0, 2, 1, 3]
    assert dimsum.grid_order(2, transpose=False, reverse=True).tolist() == [3, 2, 1, 0]
    # 4 x 4 grid, 2 x 2 windows: window by window, row- or column-first inside and across windows.
    assert dimsum.window_order(4, 2, False).tolist()[:8] == [0, 1, 4, 5, 2, 3, 6, 7]
    assert dimsum.window_order(4, 2, True).tolist()[:8] == [0, 4, 1, 5, 8, 12, 9, 13]
    model = dimsum.DiMSUM(**TINY)
    b1 = model.blocks[1]
    assert b1.spatial_mamba.order.tolist() == list(range(63, -1, -1))   # odd block: reversed raster
    assert b1.freq_mamba.order.tolist() == dimsum.window_order(8, 2, True).tolist()


def test_cond_proj_is_spent_but_unused():
    torch.manual_seed(0)
    mixer = dimsum.CondMambaMixer(8, 16)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 16)
    out = mixer(x, c)
    with torch.no_grad():
        mixer.cond_proj.weight.add_(1.0)
    torch.testing.assert_close(mixer(x, c), out)
    assert not any(p.requires_grad for p in mixer.cond_proj.parameters())


def test_full_preset_counts_calflops_convention():
    with torch.device("meta"), models._no_init():
        model = dimsum.DiMSUM(**dimsum.PRESETS["DiMSUM-L/2"])
    c = flops.count(model)
    published = dimsum.PUBLISHED["DiMSUM-L/2"]["gmacs_256"]
    assert c.gmacs == pytest.approx(published, rel=0.005)
    assert c.full_gmacs == pytest.approx(96.66, abs=0.01)
    assert c.params == 459_932_704
