"""DiffuSSM (no public code: built from the paper): tiny models train and guide, the hourglass runs the dense layers at
L / M and the S4D scans at the full length L, S4D is the causal convolution it claims, and the full preset counts
the printed 280.3 GMACs at 256 px (512 px a documented miss)."""

import pytest
import torch
from conftest import randomize_

from repro.metrics.flops import _MacCounter, count
from repro.models import _no_init
from repro.models.diffussm import PRESETS, PUBLISHED, S4D, DiffuSSM, HourglassBiSSM
from repro.models.layers import in_source_kernel, kernels_used

TINY = dict(hidden_size=32, depth=2, input_size=16)


def _tiny(**overrides):
    torch.manual_seed(0)
    return DiffuSSM(**{**TINY, **overrides})


def _inputs(n=2):
    return torch.randn(n, 4, 16, 16), torch.tensor([10, 900, 500][:n]), torch.tensor([3, 7, 999][:n])


def _meta(**kw):
    with torch.device("meta"), _no_init():
        return DiffuSSM(**kw)


def test_tiny_forward_backward_and_cfg():
    model = _tiny().train()
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16) and model.out_channels == 8
    assert torch.equal(out, torch.zeros_like(out))                      # adaLN-Zero and a zeroed final layer
    randomize_(model)                                                    # so no parameter hides behind a zero
    (model(x, t, y) - torch.randn_like(out)).square().mean().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
    assert guided.shape == (2, 8, 16, 16) and torch.isfinite(guided).all()
    assert kernels_used(model) == ["reference"]


def test_patch_and_hourglass_variants_round_trip_shapes():
    for kw in (dict(patch_size=2), dict(hourglass=4)):
        model = randomize_(_tiny(**kw))
        with torch.no_grad():
            assert model(*_inputs()).shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        DiffuSSM(**{**TINY, "input_size": 15})


def test_output_pixels_come_back_where_they_were():
    # Each stream token decodes a 1 x M strip: with the blocks' gates at zero and the final layer the identity on the
    # embedding, the model maps the input back onto itself, so the strip layout and the unpatchify agree.
    model = _tiny(hidden_size=8, in_channels=2).eval()   # D = M * C * 2: the final Linear can be a permutation
    with torch.no_grad():
        model.x_embedder.weight.zero_()
        for c in range(2):
            for m in range(2):
                model.x_embedder.weight[c * 2 + m, c, 0, m] = 1.0
        model.final_layer.linear.weight.zero_()
        for m in range(2):
            for c in range(2):
                model.final_layer.linear.weight[m * 4 + c, c * 2 + m] = 1.0   # (p, q=m, c) order; sigma rows stay 0
        model.final_layer.norm_final = torch.nn.Identity()
    x = torch.randn(1, 2, 16, 16)
    out = model(x, torch.tensor([5]), torch.tensor([1]))
    torch.testing.assert_close(out[:, :2], x)


def test_hourglass_runs_dense_layers_at_l_over_m_and_the_ssm_at_l():
    model = _tiny()
    length, short = model.sequence_lengths()
    assert (length, short) == (256, 128)
    seen = {}
    mixer = model.blocks[0].mixer

    def record(name):
        def hook(mod, args, out):
            seen[name] = tuple(args[0].shape)
        return hook

    mixer.ssm_fwd.register_forward_hook(record("ssm"))
    mixer.w1.register_forward_hook(record("dense"))
    with torch.no_grad():
        model(*_inputs())
    assert seen == {"ssm": (2, 32, length), "dense": (2, short, 32)}
    # The paper's FLOPs analysis: (13 / M + 1) L D^2 MACs per layer in the dense maps, 7.5 L D^2 at M = 2.
    for m in (2, 4):
        mixer = HourglassBiSSM(64, m, d_state=8)
        counter = _MacCounter(set())
        for module in (mixer.ssm_fwd, mixer.ssm_bwd):   # S4D's own multiplies apart
            module.forward = lambda u: u.clone()
        with torch.no_grad(), counter:
            mixer(torch.randn(1, 256 // m, 64))
        gate = 256 // m * 2 * 64                       # the elementwise gate s(W^2 I') * s(W^1 I)
        assert counter.macs == round((13 / m + 1) * 256 * 64 * 64) + gate


def test_s4d_is_its_causal_convolution_and_scans_both_ways():
    torch.manual_seed(0)
    ssm = S4D(3, d_state=8).double()
    u = torch.randn(2, 3, 20, dtype=torch.float64)
    k = ssm.conv_kernel(20, torch.float64)
    want = torch.zeros_like(u)
    for t in range(20):
        for s in range(t + 1):
            want[:, :, t] += k[:, s] * u[:, :, t - s]
    want += u * ssm.D.double()[:, None]
    with torch.no_grad():
        torch.testing.assert_close(ssm(u), want, rtol=1e-9, atol=1e-9)
        # the kernel is the sum over states of the discretised modes: check one tap by hand
        dt = ssm.log_dt.exp()[0]
        A = torch.complex(-ssm.log_A_real.exp()[0], ssm.A_imag[0]).to(torch.complex128)
        C = torch.view_as_complex(ssm.C[0].contiguous()).to(torch.complex128)
        tap5 = 2 * (C * (torch.exp(dt * A) - 1) / A * torch.exp(5 * dt * A)).sum().real
        torch.testing.assert_close(k[0, 5], tap5, rtol=1e-5, atol=1e-6)
    # bidirectional: the first position hears the last one
    mixer = HourglassBiSSM(16, 2, d_state=8)
    x = torch.randn(1, 12, 16)
    later = x.clone()
    later[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(mixer(later)[:, 0], mixer(x)[:, 0])
    assert ssm.kernel == "reference"


def test_diffussm_xl_gmacs_match_published_at_256_and_512_is_a_recorded_miss():
    published = PUBLISHED["DiffuSSM-XL"]
    model = _meta(**PRESETS["DiffuSSM-XL"])
    c = count(model)
    assert c.gmacs == pytest.approx(published["gmacs_256"], rel=5e-3)
    assert c.gmacs == pytest.approx(279.905, abs=0.01)
    assert c.full_gmacs == c.gmacs and c.source_kernel_macs == 0          # no fused kernel in a PyTorch S4D
    assert c.params == 664_134_964                                        # the paper: 673M
    # the dense maps alone are the paper's 7.5 L D^2 per layer; the rest is S4D's, the embedders and adaLN
    dense = 29 * 7.5 * 1024 * 1116 ** 2 / 1e9
    assert 0 < c.gmacs - dense < 0.01 * c.gmacs
    big = count(_meta(**PRESETS["DiffuSSM-XL"], input_size=64))
    assert big.gmacs == pytest.approx(1119.27, abs=0.01)                  # printed 1066.2: +5.0%, see the docstring
    assert big.gmacs / c.gmacs == pytest.approx(4.0, rel=1e-3)           # linear in L; the printed pair is 3.80x
    # the paper's stated width misses by 6.4%, which is why the width is our assumption
    assert count(_meta(**{**PRESETS["DiffuSSM-XL"], "hidden_size": 1152})).gmacs == pytest.approx(298.175, abs=0.01)
    assert kernels_used(model) == ["reference"]
    assert in_source_kernel() is None
