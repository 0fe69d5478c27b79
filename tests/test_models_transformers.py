"""PixArt-α (adaLN-single) and DiT-LLaMA: tiny versions run, start where their sources start, and the full presets
count what DiC's 400K table prints."""

import pytest
import torch
from conftest import randomize_

from repro.metrics.flops import count
from repro.models import _no_init, dit_llama, pixart
from repro.models.dit_llama import DiTLlama, apply_rope, rope_angles
from repro.models.pixart import PixArt

FAMILIES = {"PixArt": (PixArt, pixart), "DiT-LLaMA": (DiTLlama, dit_llama)}
TINY = dict(hidden_size=32, depth=2, num_heads=2, input_size=16, in_channels=4)


def _tiny(family, **overrides):
    torch.manual_seed(0)
    return FAMILIES[family][0](**{**TINY, **overrides})


def _inputs(n=2):
    return torch.randn(n, 4, 16, 16), torch.tensor([10, 900, 500][:n]), torch.tensor([3, 7, 999][:n])


def _meta(cls, **kw):
    with torch.device("meta"), _no_init():
        return cls(**kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_forward_backward_and_cfg(family):
    model = _tiny(family).train()
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16) and model.out_channels == 8
    (out - torch.randn_like(out)).square().mean().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
    assert guided.shape == (2, 8, 16, 16) and torch.isfinite(guided).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_output_exactly_zero_at_init(family):
    model = _tiny(family).eval()
    with torch.no_grad():
        assert torch.count_nonzero(model(*_inputs())) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_label_and_time_reach_the_output(family):
    model = randomize_(_tiny(family)).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        out = model(x, t, y)
        assert not torch.allclose(out, model(x, t, torch.full_like(y, model.num_classes)))
        assert not torch.allclose(out, model(x, t + 50, y))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_weights_forward(family):
    model = _tiny(family).to(torch.bfloat16).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        out = model(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 16, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_preset_gmacs_match_the_printed_value(family):
    cls, module = FAMILIES[family]
    (name, kw), = module.PRESETS.items()
    printed = module.PUBLISHED[name]["gmacs_256"]
    gmacs = count(_meta(cls, **kw)).gmacs
    assert abs(gmacs / printed - 1) < 0.005, (name, gmacs, printed)


# --------------------------------------------------------------------------------------------- PixArt
def test_pixart_modulation_is_one_shared_mlp_plus_per_block_tables():
    d, depth = 1152, 28
    model = _meta(PixArt, **pixart.PRESETS["PixArt-α-XL/2"])
    shared = sum(p.numel() for p in model.t_block.parameters())
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("scale_shift_table"))
    assert shared == d * 6 * d + 6 * d                   # one Linear(D, 6D) in the whole model
    assert tables == depth * 6 * d + 2 * d
    # nothing else in a block depends on the condition: attention, MLP and the table are all it holds
    attn, mlp = 4 * d * d + 4 * d, 8 * d * d + 5 * d
    for block in model.blocks:
        assert sum(p.numel() for p in block.parameters()) == attn + mlp + 6 * d
    # and the position table is a buffer, as in PixArt, so DiT-XL/2's 675.1M drops by exactly the adaLN Linears
    assert "pos_embed" in dict(model.named_buffers())
    dit_xl = 675_129_632
    saved = depth * (d * 6 * d + 6 * d) + (d * 2 * d + 2 * d) + 256 * d - shared - tables
    assert sum(p.numel() for p in model.parameters()) == dit_xl - saved


def test_pixart_t_block_runs_once_per_forward_on_time_plus_label():
    model = randomize_(_tiny("PixArt")).eval()
    seen = []
    model.t_block.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    x, t, y = _inputs()
    with torch.no_grad():
        model(x, t, y)
        expected = model.t_embedder(t) + model.y_embedder(y)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected)


# ------------------------------------------------------------------------------------------ DiT-LLaMA
def test_dit_llama_xl_layout():
    model = _meta(DiTLlama, **dit_llama.PRESETS["DiT-LLaMA-XL/2"])
    assert model.ffn_hidden == 3072                      # int(2 * 4 * 1152 / 3) = 3072, already a multiple of 256
    block = model.layers[0]
    assert block.adaLN_modulation[-1].in_features == 1024   # adaLN input is min(D, 1024) wide
    assert not any(m.bias is not None for m in (block.attention.wq, block.attention.wo, block.feed_forward.w2))
    assert isinstance(block.attention.q_norm, torch.nn.LayerNorm)
    assert not any("pos_embed" in n for n, _ in model.named_parameters())


def test_dit_llama_blocks_start_as_identity():
    model = _tiny("DiT-LLaMA")
    x = torch.randn(2, 64, 32)
    rot = rope_angles(64, model.head_dim, model.rope_theta, x.device)
    assert torch.equal(model.layers[0](x, torch.randn(2, 32), rot), x)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, length = 16, 12
    rot = rope_angles(length, head_dim, 10000.0, torch.device("cpu"))
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    # the same q and k at every position; a score is then a function of the offset between them
    rq = apply_rope(q.expand(1, length, 1, head_dim), rot)[0, :, 0]
    rk = apply_rope(k.expand(1, length, 1, head_dim), rot)[0, :, 0]
    scores = rq @ rk.T                                   # (length, length)
    torch.testing.assert_close(scores[3, 1], scores[10, 8])
    torch.testing.assert_close(scores[0, 5], scores[6, 11])
    assert not torch.allclose(scores[3, 1], scores[3, 2])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(length))   # rotations keep lengths
