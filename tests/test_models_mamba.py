"""Mamba-based comparison systems (DiS, DiM) and the selective-scan references they run on: the scan and the causal
conv equal step-by-step loops, tiny models train and guide, DiM's raster-order shortcut equals its source's permuted
stream, and the full presets count what DiCo prints when counted the way the papers count (`flops.count(...).gmacs`),
the reference kernels' ops apart in `full_gmacs`."""

import contextlib
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from repro.metrics.flops import _MacCounter, count
from repro.models import _no_init, dim as dim_module, ssm
from repro.models.dim import DiM, scan_patterns
from repro.models.dis import DiS
from repro.models.layers import in_source_kernel, kernels_used, modulate, source_kernel, timestep_embedding, unpatchify
from repro.models.ssm import MambaMixer, causal_conv1d, mamba_init_, selective_scan

F64 = torch.float64
TINY = dict(hidden_size=32, input_size=16, in_channels=4)
FAMILIES = {"DiS": (DiS, dict(depth=2)), "DiM": (DiM, dict(depth=3)),   # DiM's depth must be odd
            "DiM-rho_pad": (DiM, dict(depth=3, pad_layout="rho_pad"))}


def _tiny(family, **overrides):
    cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    return cls(**{**TINY, **kw, **overrides})


def _inputs(n=2):
    return torch.randn(n, 4, 16, 16), torch.tensor([10, 900, 500][:n]), torch.tensor([3, 7, 999][:n])


def _meta(cls, **kw):
    with torch.device("meta"), _no_init():
        return cls(**kw)


# ---- references -------------------------------------------------------------------------------------------------

def _naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    return y if z is None else y * F.silu(z)


@pytest.mark.parametrize("extras", [False, True])
def test_selective_scan_equals_step_loop(extras):
    g = torch.Generator().manual_seed(0)
    n, e, s, length = 2, 5, 4, 150                                 # 150 = 64 + 64 + 22: a partial last chunk
    u, z = torch.randn(n, e, length, generator=g, dtype=F64), torch.randn(n, e, length, generator=g, dtype=F64)
    delta = torch.randn(n, e, length, generator=g, dtype=F64)
    A = -torch.rand(e, s, generator=g, dtype=F64) * 2
    B, C = torch.randn(n, s, length, generator=g, dtype=F64), torch.randn(n, s, length, generator=g, dtype=F64)
    if extras:
        kw = dict(D=torch.randn(e, generator=g, dtype=F64), z=z, delta_bias=torch.randn(e, generator=g, dtype=F64),
                  delta_softplus=True)
    else:
        kw, delta = {}, delta.abs()                                # a decay, so no softplus is needed
    want = _naive_scan(u, delta, A, B, C, **kw)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, **kw), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, chunk_size=7, **kw), want, rtol=1e-12, atol=1e-12)
    got32 = selective_scan(*(v.float() for v in (u, delta, A, B, C)),
                           **{k: v.float() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


def test_selective_scan_gradients_match_step_loop():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(1, 3, 20, generator=g, dtype=F64), torch.randn(1, 3, 20, generator=g, dtype=F64),
            -torch.rand(3, 2, generator=g, dtype=F64), torch.randn(1, 2, 20, generator=g, dtype=F64),
            torch.randn(1, 2, 20, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    for a in args:
        a.requires_grad_(True)
    grads = []
    for fn in (selective_scan, _naive_scan):
        out = fn(*args[:5], D=args[5], delta_softplus=True)
        grads.append(torch.autograd.grad(out.square().sum(), args))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias,activation", [(False, None), (True, "silu")])
def test_causal_conv1d_equals_direct_loop(bias, activation):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 3, 9, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    b = torch.randn(3, generator=g, dtype=F64) if bias else None
    want = torch.zeros_like(x)
    for t in range(9):
        for k in range(4):                     # tap k sees x[t - 3 + k]; earlier than 0 is zero padding
            if t - 3 + k >= 0:
                want[:, :, t] += w[:, k] * x[:, :, t - 3 + k]
    if b is not None:
        want += b[:, None]
    if activation:
        want = F.silu(want)
    torch.testing.assert_close(causal_conv1d(x, w, b, activation), want, rtol=1e-12, atol=1e-12)


def test_mixer_is_causal_one_way_and_not_bidirectional():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 16)
    later = x.clone()
    later[:, -1] += 1.0
    uni, bi = MambaMixer(16, d_conv=3), MambaMixer(16, bidirectional=True)
    with torch.no_grad():
        torch.testing.assert_close(uni(later)[:, :-1], uni(x)[:, :-1])          # the past never sees the future
        assert not torch.allclose(bi(later)[:, 0], bi(x)[:, 0])                   # the backward scan does
    assert {n for n, _ in bi.named_parameters()} >= {"A_b_log", "D_b", "conv1d_b.weight", "x_proj_b.weight",
                                                     "dt_proj_b.bias"}


def test_scan_counts_the_sequential_scans_multiplies():
    # L * E * (4S + 3): delta A, (delta u) B, dA h, C h per state and step; delta u, D u, the gate per channel and
    # step. The prefix products of the parallel evaluation are never counted, whatever the chunking.
    n, e, s, length = 2, 5, 4, 150
    want = n * length * e * (4 * s + 3)
    for device, chunk in (("meta", 64), ("cpu", 64), ("cpu", 7)):
        g = torch.Generator().manual_seed(0)
        u, delta, z = (torch.randn(n, e, length, generator=g).to(device) for _ in range(3))
        A, D, bias = -torch.rand(e, s, generator=g).to(device), *(torch.randn(e, generator=g).to(device) for _ in "DB")
        B, C = (torch.randn(n, s, length, generator=g).to(device) for _ in range(2))
        for region in (None, "mamba_ssm.selective_scan_fn"):
            counter = _MacCounter(set())
            with torch.no_grad(), counter, source_kernel(region) if region else contextlib.nullcontext():
                selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, chunk_size=chunk)
            assert (counter.macs, counter.source_kernel_macs) == ((0, want) if region else (want, 0)), (device, chunk)
    assert in_source_kernel() is None


def test_mixer_regions_are_the_sources_kernels(monkeypatch):
    # Mamba v1: one mamba_inner_fn from the conv to out_proj; Vim v2: one mamba_inner_fn_no_out_proj per direction,
    # out_proj outside. The scan's own region is nested, so it belongs to the outer one.
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    seen = []
    real_scan = ssm.selective_scan

    def spy(*args, **kwargs):
        seen.append(("scan", in_source_kernel()))
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(ssm, "selective_scan", spy)
    for bidirectional, region, scans in ((False, "mamba_ssm.mamba_inner_fn", 1),
                                         (True, "mamba_ssm.mamba_inner_fn_no_out_proj", 2)):
        mixer, seen[:] = MambaMixer(16, bidirectional=bidirectional), []
        for name in ("in_proj", "out_proj"):
            def record(mod, args, name=name):
                seen.append((name, in_source_kernel()))
            getattr(mixer, name).register_forward_pre_hook(record)
        with torch.no_grad():
            mixer(x)
        out_region = None if bidirectional else region
        assert seen == [("in_proj", None)] + [("scan", region)] * scans + [("out_proj", out_region)]
        assert in_source_kernel() is None

    def failing(*args, **kwargs):
        raise RuntimeError("inside the kernel")

    monkeypatch.setattr(ssm, "selective_scan", failing)
    with pytest.raises(RuntimeError, match="inside the kernel"):
        MambaMixer(16)(x)
    assert in_source_kernel() is None                                    # the regions end even when a kernel raises


@pytest.mark.parametrize("family", FAMILIES)
def test_counting_leaves_no_region_active_and_outputs_unchanged(family):
    model, inputs = randomize_(_tiny(family)).eval(), _inputs()
    with torch.no_grad():
        before = model(*inputs)
    c = count(model, device="cpu")
    assert in_source_kernel() is None
    assert c.macs > 0 and c.source_kernel_macs > 0 and c.full_gmacs > c.gmacs
    assert count(model, device="cpu") == c
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), before, rtol=0, atol=0)
    assert kernels_used(model) == ["reference"]


# ---- tiny models ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_forward_backward_and_cfg(family):
    model = _tiny(family).train()
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16) and model.out_channels == 8
    # Random weights everywhere, so no parameter hides behind another's initial value.
    randomize_(model)
    (model(x, t, y) - torch.randn_like(out)).square().mean().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
    assert guided.shape == (2, 8, 16, 16) and torch.isfinite(guided).all()
    assert kernels_used(model) == ["reference"]                          # CPU: no mamba_ssm kernel can run


@pytest.mark.parametrize("family", FAMILIES)
def test_init_is_the_sources_and_output_is_not_zero(family):
    # Neither source zero-initialises any output layer (both use Mamba's init), so the output starts non-zero.
    model = _tiny(family)
    assert model(*_inputs()).abs().sum() > 0
    assert torch.equal(model.pos_embed, torch.zeros_like(model.pos_embed))
    for m in model.modules():
        if isinstance(m, MambaMixer):
            for dt_proj in m.dt_projections():
                dt = F.softplus(dt_proj.bias)
                assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
            torch.testing.assert_close(m.A_log[0], torch.log(torch.arange(1.0, 17.0)))
            assert torch.equal(m.D, torch.ones_like(m.D))
            bound = 1 / math.sqrt(m.d_inner) / math.sqrt(model.depth)    # kaiming(a=sqrt 5) / sqrt(n_layer)
            assert m.out_proj.weight.abs().max() <= bound
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    dt_projs = {id(p) for m in model.modules() if isinstance(m, MambaMixer) for p in m.dt_projections()}
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears if id(m) not in dt_projs)


def test_mamba_init_keeps_dt_biases():
    torch.manual_seed(0)
    mixer = MambaMixer(8, bidirectional=True)
    before = mixer.dt_proj_b.bias.clone()
    mamba_init_(mixer, n_layer=4)
    assert torch.equal(mixer.dt_proj_b.bias, before)


def test_kernel_record_is_none_before_a_forward_and_reference_on_cpu():
    model = _tiny("DiS")
    assert kernels_used(model) == []
    with torch.no_grad():
        model(*_inputs())
    assert kernels_used(model) == ["reference"]
    assert {m.kernel for m in model.modules() if isinstance(m, MambaMixer)} == {"reference"}


def test_dim_scan_patterns_follow_the_source_chain():
    # blocks 1..24 cycle 1,2,3,0,...; the middle block steps back; 0 at both ends (adapter_attn4mamba.py).
    p = scan_patterns(49)
    assert p[:6] == [0, 1, 2, 3, 0, 1] and p[24] == 0 and p[25] == 3 and p[47] == 1 and p[48] == 0
    assert scan_patterns(3) == [0, 1, 0]


def _source_dim_forward(m, x, t, y):
    """DiM's forward the way the source runs it: the whole stream re-ordered from block to block by the relative
    transforms of `adapter_attn4mamba.forward_fast`, the residual kept apart (`pre_norm_x`), the padding built by
    concatenation ("lateral") or by scattering into a zero sequence ("rho_pad")."""
    n, d, g, p = x.shape[0], m.hidden_size, m.grid, m.pad
    side, head = g + p, m.extras + p
    tokens = m.x_embedder(x).flatten(2).transpose(1, 2)
    time, label = timestep_embedding(t, d), m.label_emb(y)
    hs = torch.cat([time[:, None], label[:, None], tokens], dim=1) + m.pos_embed
    extra, grid = hs[:, :2], m.first_smoother(hs[:, 2:].transpose(1, 2).reshape(n, d, g, g))
    if m.pad_layout == "lateral":
        grid = torch.cat([grid, m.pad_token.reshape(1, d, 1, p).expand(n, d, g, p)], dim=-1)
        grid = torch.cat([grid, m.pad_token.reshape(1, d, p, 1).expand(n, d, p, side)], dim=-2)
        grid = grid.flatten(2).transpose(1, 2)
    else:
        cells = [(i, j) for i in range(side) for j in range(side)]
        image = [k for k, (i, j) in enumerate(cells) if i < g and j < g]
        pads = [k for k, (i, j) in enumerate(cells) if i >= g or j >= g]
        filled = grid.new_zeros(n, side * side, d)
        filled[:, image] = grid.flatten(2).transpose(1, 2)
        filled[:, pads] = m.pad_token.transpose(1, 2).repeat(1, len(pads) // p, 1).expand(n, -1, -1)
        grid = filled
    hs = torch.cat([extra, m.pad_token_dec_split.expand(n, -1, -1), grid], dim=1)

    def relative(seq, last, cur):                 # relative_scan_pattern_transformation on (N, L, D)
        if last < 0 <= cur:
            seq = seq.flip(1)
        if (last + cur) % 2:                      # the grid is square: either transpose is the same map
            seq = seq.reshape(n, side, side, d).transpose(1, 2).reshape(n, side * side, d)
        if cur < 0 <= last:
            seq = seq.flip(1)
        return seq

    ids = [0, -2, 1, -1]
    mod = m.adaln_single(m.t_embedder(t) + m.y_embedder(y))
    pre, skips, last = None, [], 0
    for b, (block, k) in enumerate(zip(m.blocks, m.patterns, strict=True)):
        if block.skip_linear is not None:
            skip, hs = skips.pop(), hs + pre
            if isinstance(block.skip_linear, torch.nn.ModuleList):
                hs = block.skip_linear[0](hs) + block.skip_linear[1](skip)
            else:
                hs = block.skip_linear(torch.cat([hs, skip], dim=-1))
            pre = None
        if pre is not None:
            hs = hs + pre
        hs = torch.cat([hs[:, :head], relative(hs[:, head:], last, ids[k])], dim=1)
        last = ids[k]
        pre = hs
        shift, scale, gate = (mod.view(n, 3, d) + block.scale_shift_table[None]).chunk(3, dim=1)
        hs = (1 + gate) * block.attn1(block.norm1(pre) * (1 + scale) + shift)
        if 1 <= b <= m.n_skips:
            skips.append(hs + pre)
    grid = (pre + hs)[:, head:].reshape(n, side, side, d)[:, :g, :g].reshape(n, g * g, d)
    grid = m.last_smoother(grid.transpose(1, 2).reshape(n, d, g, g)).flatten(2).transpose(1, 2)
    shift, scale = m.proj_out_1(F.silu(time + label)).chunk(2, dim=1)
    return unpatchify(m.proj_out_2(modulate(m.norm_out(grid), shift, scale)), m.patch_size, m.out_channels)


@pytest.mark.parametrize("pad_layout", ["lateral", "rho_pad"])
def test_dim_raster_shortcut_equals_the_sources_permuted_stream(pad_layout, monkeypatch):
    # depth 7 runs all four scan orders and three skips; width 32 above the threshold exercises the split skip.
    monkeypatch.setattr(dim_module, "SPLIT_SKIP_ABOVE", 16)
    model = randomize_(_tiny("DiM", depth=7, pad_layout=pad_layout), std=0.2).double().eval()
    assert sorted(set(model.patterns)) == [0, 1, 2, 3]
    assert isinstance(model.blocks[-1].skip_linear, torch.nn.ModuleList)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x.double(), t, y), _source_dim_forward(model, x.double(), t, y),
                                   rtol=1e-10, atol=1e-10)


def test_dim_sequence_layout():
    model = _tiny("DiM")                                   # 8x8 grid, 3 pads: 2 + 3 + 11 * 11 tokens per scan
    seen = []
    model.blocks[1].attn1.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(*_inputs())
    assert seen == [2 + 3 + 11 * 11]


def test_input_size_validation():
    with pytest.raises(ValueError, match="odd"):
        DiM(**{**TINY, "depth": 4})
    with pytest.raises(ValueError, match="pad_layout"):
        DiM(**{**TINY, "depth": 3, "pad_layout": "diagonal"})
    assert _meta(DiM, hidden_size=64, depth=3, input_size=64).pad_layout == "rho_pad"
    assert _meta(DiM, hidden_size=64, depth=3, input_size=32).pad_layout == "lateral"


# ---- full presets: MACs -----------------------------------------------------------------------------------------

def _hidden_per_token(d, directions, out_proj_in_kernel, d_state=16, d_conv=4, expand=2):
    """MACs per token and mixer inside the source's kernels: (the scan alone, the whole fused region)."""
    e, r = expand * d, math.ceil(d / 16)
    scan = e * (4 * d_state + 3)                                  # the sequential scan's multiplies
    kernel = scan + e * d_conv + e * (r + 2 * d_state) + r * e    # + conv, x_proj, dt_proj
    return directions * scan, directions * kernel + (e * d if out_proj_in_kernel else 0)


def test_dim_h_gmacs_match_published_when_counted_as_the_papers():
    from repro.models.dim import PRESETS, PUBLISHED
    published = PUBLISHED["DiM-H"]
    # (latent, key, tokens per scan, the module docstring's full and slow-path GMACs)
    for latent, key, tokens, full, slow in ((32, "gmacs_256", 2 + 3 + 19 * 19, 311.61, 307.92),
                                            (64, "gmacs_512", 2 + 3 + 35 * 35, 1047.20, 1034.80)):
        model = _meta(DiM, **PRESETS["DiM-H"], input_size=latent)
        c = count(model)
        assert c.gmacs == pytest.approx(published[key], rel=5e-3)
        # full_gmacs adds exactly mamba_inner_fn's region of the 49 mixers: scan, conv, x_proj, dt_proj, out_proj
        scan, fused = _hidden_per_token(1536, 1, True, d_conv=3)
        assert c.source_kernel_macs == 49 * tokens * fused
        assert c.full_gmacs == pytest.approx(full, abs=0.01)
        assert c.full_gmacs - 49 * tokens * scan / 1e9 == pytest.approx(slow, abs=0.01)  # only the scan left out
        if latent == 32:   # what the papers do count: 49 in_projs and 24 pairs of D x D skip Linears, all but 0.1 G
            assert c.gmacs - 49 * tokens * 4 * 1536 ** 2 / 1e9 - 24 * tokens * 2 * 1536 ** 2 / 1e9 < 0.12
        assert kernels_used(model) == ["reference"]


def test_dis_h2_gmacs_under_each_convention():
    # DiCo prints no GFLOPs for DiS-H/2: the count is pinned by its decomposition instead.
    from repro.models.dis import PRESETS, PUBLISHED
    assert "gmacs_256" not in PUBLISHED["DiS-H/2"]
    model = _meta(DiS, **PRESETS["DiS-H/2"])
    tokens = 2 + 16 * 16
    c = count(model)
    scan, fused = _hidden_per_token(1536, 2, False)
    # two mamba_inner_fn_no_out_proj per mixer: scan, conv, x_proj, dt_proj of each direction; out_proj stays visible
    assert c.source_kernel_macs == 49 * tokens * fused
    assert c.gmacs == pytest.approx(208.22, abs=0.01)
    assert c.full_gmacs == pytest.approx(231.13, abs=0.01)
    assert c.full_gmacs - 49 * tokens * scan / 1e9 == pytest.approx(225.93, abs=0.01)   # only the scans left out


def test_every_preset_counts_on_meta():
    from repro.models import dim, dis
    for module, cls in ((dis, DiS), (dim, DiM)):
        for name, kw in module.PRESETS.items():
            c = count(_meta(cls, **kw))
            assert 0 < c.gmacs < c.full_gmacs, name
    assert in_source_kernel() is None


# ---- CUDA kernels -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None,
                    reason="needs CUDA and mamba_ssm")
def test_mamba_ssm_kernels_match_the_references():
    torch.manual_seed(0)
    for bidirectional in (False, True):
        mixer = MambaMixer(64, d_conv=3 if not bidirectional else 4, bidirectional=bidirectional).cuda()
        x = torch.randn(2, 100, 64, device="cuda")
        # TF32 would put cuDNN's reference conv 1e-3 off the exact causal_conv1d kernel
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            fused = mixer(x)
            assert kernels_used(mixer) == ["mamba_ssm"]
            mixer.use_kernels = False
            reference = mixer(x)
            assert kernels_used(mixer) == ["reference"]
        torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-4)
