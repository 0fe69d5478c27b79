"""DiG: the GLA recurrence implementations against each other, a tiny model end to end, and the preset counts."""

import pytest
import torch
import torch.nn.functional as F

from repro.metrics.flops import _MacCounter, count
from repro.models import _no_init, dig
from repro.models.dig import (PRESETS, PUBLISHED, DiG, fla_available, gla_chunked, gla_fla, gla_recurrent_naive,
                              swiglu_hidden)
from repro.models.layers import in_source_kernel, kernels_used


def _inputs(length, strength, dtype=torch.float64, device="cpu", n=2, heads=3, dk=4, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(n, heads, length, dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(n, heads, length, dv, generator=g, dtype=dtype)
    # strong: log gates down to about -300 per step (decays underflow); weak: DiG's logsigmoid / 16, near 0
    logits = torch.randn(n, heads, length, dk, generator=g, dtype=dtype) * strength
    log_gate = F.logsigmoid(logits) if strength > 1 else F.logsigmoid(logits) / 16
    return tuple(x.to(device) for x in (q, k, v, log_gate))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 32, 64])
@pytest.mark.parametrize("strength", [0.5, 100.0], ids=["weak", "strong"])
def test_chunked_gla_equals_naive_loop(chunk_size, strength):
    q, k, v, g = _inputs(length=75, strength=strength)  # 75: no chunk size here divides it
    s0 = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    o_ref, s_ref = gla_recurrent_naive(q, k, v, g, initial_state=s0)
    o, s = gla_chunked(q, k, v, g, chunk_size=chunk_size, initial_state=s0)
    assert o.shape == (2, 3, 75, 6) and o.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_chunked_gla_gradients_equal_naive_loop():
    inputs = [x.requires_grad_() for x in _inputs(length=40, strength=0.5)]
    grads = []
    for fn in (gla_recurrent_naive, lambda *a: gla_chunked(*a, chunk_size=16)):
        out = fn(*inputs)[0]
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
                                         .sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunked_gla_float32_stays_finite_under_extreme_gates():
    q, k, v, _ = _inputs(length=130, strength=1.0, dtype=torch.float32)
    g = torch.full_like(q, -1000.0)  # every decay underflows: o_t = scale * q_t k_t^T v_t
    o, _ = gla_chunked(q, k, v, g, chunk_size=64)
    assert torch.isfinite(o).all()
    expected = ((q * k).sum(-1, keepdim=True) * v) * q.shape[-1] ** -0.5
    torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)


def test_chunked_gla_rejects_bad_chunk_size():
    q, k, v, g = _inputs(length=8, strength=0.5)
    with pytest.raises(ValueError, match="multiple of 16"):
        gla_chunked(q, k, v, g, chunk_size=24)


def _tiny(**kw):
    torch.manual_seed(0)
    return DiG(input_size=16, hidden_size=32, depth=2, num_heads=2, num_classes=10, **kw)


def test_tiny_dig_forward_backward_cfg_and_zero_init():
    model = _tiny()
    x, t, y = torch.randn(3, 4, 16, 16), torch.randint(0, 1000, (3,)), torch.randint(0, 10, (3,))
    out = model(x, t, y)
    assert out.shape == (3, 8, 16, 16)
    assert torch.count_nonzero(out) == 0  # the final layer is zero-initialised, as in DiG
    assert kernels_used(model) == ["reference"]
    # make every layer matter, then train one step's worth of gradient
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    out = model(x, t, y)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    guided = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
    assert guided.shape == (3, 8, 16, 16)
    torch.testing.assert_close(guided[:, 3:], out[:, 3:].detach(), rtol=1e-5, atol=1e-6)


def test_scan_order_is_restored_for_any_depth():
    # With identity blocks (adaLN-Zero, identity convs) the tokens reach the final layer as they left the embedder
    # only if the reversals and transposes are undone; a learned final layer then sees each token in place.
    for depth, directions in [(1, 2), (2, 4), (3, 4), (4, 4)]:
        torch.manual_seed(0)
        model = DiG(input_size=8, hidden_size=32, depth=depth, num_heads=2, num_classes=10,
                    scan_directions=directions)
        with torch.no_grad():
            model.final_layer.linear.weight.normal_(std=0.1)
        x = torch.randn(2, 4, 8, 8)
        t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
        shifted = model(x, t, y)
        model.scan_directions = 1  # no reordering at all: the reference
        torch.testing.assert_close(shifted, model(x, t, y))


def test_presets_follow_the_source():
    assert PRESETS["DiG-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=18, patch_size=2)
    assert [swiglu_hidden(d, 4) for d in (384, 768, 1024, 1152)] == [1024, 2048, 2816, 3072]
    with torch.device("meta"), _no_init():
        block = DiG(**PRESETS["DiG-XL/2"]).blocks[0]
    assert block.attn.q_proj.weight.shape == (576, 1152) and block.attn.v_proj.weight.shape == (1152, 1152)
    assert block.attn.head_k == 32 and block.attn.head_v == 64
    assert block.dw_conv.weight.shape == (1152, 1, 3, 3)


def test_dw_conv_starts_as_identity_and_gla_gain():
    model = _tiny()
    conv = model.blocks[0].dw_conv
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(conv(x), x)
    w = model.blocks[0].attn.q_proj.weight  # xavier with fla's gain 2^-2.5
    bound = 2 ** -2.5 * (6 / sum(w.shape)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound


# GMACs at 256 px in the module docstring: the papers' convention, leaving out only the recurrence, everything.
DOCUMENTED = {"DiG-S/2": (4.288, 5.500, 5.732), "DiG-B/2": (17.053, 21.893, 22.357),
              "DiG-L/2": (61.603, 79.344, 80.580), "DiG-XL/2": (89.332, 114.730, 116.352)}


def _recurrence_macs(attn, tokens: int) -> int:
    """MACs of the chunked reference recurrence of one GLA layer at batch 1, run by itself on meta tensors."""
    q = torch.empty(1, attn.num_heads, tokens, attn.head_k, device="meta")
    v = torch.empty(1, attn.num_heads, tokens, attn.head_v, device="meta")
    counter = _MacCounter(set())
    with torch.no_grad(), counter:
        gla_chunked(q, q, v, q, scale=attn.head_k ** -0.5, chunk_size=attn.chunk_size)
    return counter.macs + counter.source_kernel_macs


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_gmacs_match_published_as_the_papers_count(name):
    with torch.device("meta"), _no_init():
        model = DiG(**PRESETS[name])
    c = count(model)
    assert c.gmacs == pytest.approx(PUBLISHED[name]["gmacs_256"], rel=0.005)
    # the fla kernels' pieces are exactly what the printed values leave out: per block the SwiGLU product and down
    # projection (swiglu_linear), the gate product of the norm (FusedRMSNormSwishGate) and the recurrence
    block, tokens, dim = model.blocks[0], model.grid ** 2, model.pos_embed.shape[-1]
    hidden = block.mlp.down_proj.in_features
    fused_pieces = tokens * (hidden * dim + hidden) + tokens * block.attn.value_dim
    recurrence = _recurrence_macs(block.attn, tokens)
    assert recurrence > 0
    assert c.source_kernel_macs == len(model.blocks) * (fused_pieces + recurrence)
    # leaving out only the recurrence would already be far off the printed values
    no_core = c.macs + len(model.blocks) * fused_pieces
    assert no_core > 1.2 * c.macs
    assert (c.gmacs, no_core / 1e9, c.full_gmacs) == pytest.approx(DOCUMENTED[name], abs=1e-3)
    assert kernels_used(model) == ["reference"]


def test_counting_leaves_no_region_active_and_outputs_unchanged(monkeypatch):
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        before = model(x, t, y)
    assert kernels_used(model) == ["reference"]
    c = count(model, device="cpu")
    assert in_source_kernel() is None
    assert c.macs > 0 and c.source_kernel_macs > 0
    assert count(model, device="cpu") == c
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), before, rtol=0, atol=0)
    # the recurrence runs in fused_chunk_gla's region, which ends even when the recurrence raises
    seen = []

    def failing(*args, **kwargs):
        seen.append(in_source_kernel())
        raise RuntimeError("inside the kernel")

    monkeypatch.setattr(dig, "gla_chunked", failing)
    with pytest.raises(RuntimeError, match="inside the kernel"):
        model(x, t, y)
    assert seen == ["fla.fused_chunk_gla"] and in_source_kernel() is None


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and flash-linear-attention")
def test_fla_kernel_matches_reference():
    q, k, v, g = _inputs(length=256, strength=0.5, dtype=torch.float32, device="cuda", n=2, heads=4, dk=32, dv=64)
    o_fla = gla_fla(q, k, v, g)
    o_ref, _ = gla_chunked(q, k, v, g)
    torch.testing.assert_close(o_fla, o_ref, rtol=2e-3, atol=2e-3)
    model = _tiny().cuda()
    x = torch.randn(2, 4, 16, 16, device="cuda")
    t, y = torch.tensor([5, 900], device="cuda"), torch.tensor([1, 2], device="cuda")
    out_fla = model(x, t, y)
    assert kernels_used(model) == ["fla"]
    for block in model.blocks:
        block.attn.gla_kernel = "reference"
    torch.testing.assert_close(out_fla, model(x, t, y), rtol=2e-3, atol=2e-3)
    assert kernels_used(model) == ["reference"]
