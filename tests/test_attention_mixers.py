"""DiCo Table 5's attention mixers against direct float64 computations written out here: MDTA (Restormer),
W-MSA / SW-MSA (Swin), FLatten's focused linear attention and Agent Attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from repro.models.attention_mixers import AgentAttention, ChannelSelfAttention, FocusedLinearAttention, WindowAttention

N, C, HEAD_DIM, R = 2, 16, 8, 8


def _input(seed: int = 1, size: int = R) -> torch.Tensor:
    return torch.randn(N, C, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mdta(bias: bool) -> ChannelSelfAttention:
    torch.manual_seed(0)
    m = ChannelSelfAttention(C, head_dim=HEAD_DIM, bias=bias).double()
    with torch.no_grad():   # temperature starts at 1 for every head, which would hide a head mix-up
        m.temperature.copy_(torch.randn(m.temperature.shape, generator=torch.Generator().manual_seed(2),
                                        dtype=torch.float64))
    return m


def _window(shift: bool, window_size: int = 4) -> WindowAttention:
    torch.manual_seed(0)
    m = WindowAttention(C, HEAD_DIM, R, window_size=window_size, shift=shift).double()
    with torch.no_grad():   # Swin's std .02 table is too small to catch an index error at 1e-12
        m.relative_position_bias_table.copy_(torch.randn(m.relative_position_bias_table.shape, dtype=torch.float64,
                                                         generator=torch.Generator().manual_seed(3)))
    return m


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _mdta_reference(m: ChannelSelfAttention, x: torch.Tensor) -> torch.Tensor:
    n, c, hh, ww = x.shape
    heads, d = m.num_heads, c // m.num_heads

    def pointwise(conv, t):
        out = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], t)
        return out if conv.bias is None else out + conv.bias[:, None, None]

    qkv = pointwise(m.qkv, x)
    padded = F.pad(qkv, (1, 1, 1, 1))
    kernel = m.qkv_dwconv.weight[:, 0]                                       # (3C, 3, 3), one filter per channel
    qkv = sum(kernel[:, i, j, None, None] * padded[:, :, i:i + hh, j:j + ww] for i in range(3) for j in range(3))
    if m.qkv_dwconv.bias is not None:
        qkv = qkv + m.qkv_dwconv.bias[:, None, None]
    q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
    out = torch.empty(n, c, hh * ww, dtype=x.dtype)
    for b in range(n):
        for head in range(heads):
            rows = slice(head * d, (head + 1) * d)
            qh, kh, vh = (t[b, rows].reshape(d, hh * ww) for t in (q, k, v))
            qh = qh / qh.norm(dim=1, keepdim=True)
            kh = kh / kh.norm(dim=1, keepdim=True)
            out[b, rows] = _softmax_rows(m.temperature[head, 0, 0] * (qh @ kh.T)) @ vh
    return pointwise(m.project_out, out.reshape(n, c, hh, ww))


def _window_reference(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Per window of the rolled map and per head; tokens are gathered by coordinates, no roll or partition."""
    n, c, r, _ = x.shape
    w, s, heads = m.window_size, m.shift_size, m.num_heads
    d = c // heads
    wq, bq = m.qkv.weight, m.qkv.bias
    y = torch.empty_like(x)

    def region(p: int) -> int:   # Swin's three slices of each axis of the rolled map
        return 0 if p < r - w else (1 if p < r - s else 2)

    for a in range(r // w):
        for b in range(r // w):
            cells = [(u, v) for u in range(w) for v in range(w)]                  # row-major inside the window
            rolled = [(a * w + u, b * w + v) for u, v in cells]
            src = [((pi + s) % r, (pj + s) % r) for pi, pj in rolled]            # rolled[p] = x[p + s]
            rows = torch.tensor([i for i, _ in src])
            cols = torch.tensor([j for _, j in src])
            labels = [(region(pi), region(pj)) if s else (0, 0) for pi, pj in rolled]
            mask = torch.tensor([[0.0 if l1 == l2 else -100.0 for l2 in labels] for l1 in labels], dtype=x.dtype)
            for batch in range(n):
                tokens = x[batch][:, rows, cols].T                                # (T, C)
                qkv = tokens @ wq.T + bq
                heads_out = []
                for head in range(heads):
                    q, k, v = (qkv[:, part * c + head * d: part * c + (head + 1) * d] for part in range(3))
                    bias = torch.empty(w * w, w * w, dtype=x.dtype)
                    for t1, (u1, v1) in enumerate(cells):
                        for t2, (u2, v2) in enumerate(cells):
                            row = (u1 - u2 + w - 1) * (2 * w - 1) + (v1 - v2 + w - 1)
                            bias[t1, t2] = m.relative_position_bias_table[row, head]
                    logits = (q @ k.T) * d ** -0.5 + bias + mask
                    heads_out.append(_softmax_rows(logits) @ v)
                out = torch.cat(heads_out, dim=1) @ m.proj.weight.T + m.proj.bias
                y[batch][:, rows, cols] = out.T
    return y


@pytest.mark.parametrize("bias", [False, True])
def test_mdta_matches_direct_computation(bias):
    m = _mdta(bias)
    x = _input()
    with torch.no_grad():
        got, want = m(x), _mdta_reference(m, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_mdta_defaults_follow_restormer():
    m = ChannelSelfAttention(128)
    assert m.num_heads == 2 and m.qkv.bias is None and m.qkv_dwconv.bias is None and m.project_out.bias is None
    assert torch.equal(m.temperature, torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match="head_dim=64"):
        ChannelSelfAttention(96)


@pytest.mark.parametrize("shift", [False, True])
def test_window_attention_matches_direct_computation(shift):
    m = _window(shift)
    assert (m.window_size, m.shift_size) == (4, 2 if shift else 0)
    assert m.attn_mask is None or m.attn_mask.dtype == torch.float64    # .double() reaches the buffers
    x = _input()
    with torch.no_grad():
        got, want = m(x), _window_reference(m, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_shift_changes_the_output():
    plain, shifted = _window(False), _window(True)
    shifted.load_state_dict(plain.state_dict())
    x = _input()
    with torch.no_grad():
        assert (plain(x) - shifted(x)).abs().max() > 1e-3


def test_window_becomes_the_map_when_the_map_is_small():
    m = WindowAttention(C, HEAD_DIM, resolution=4, window_size=8, shift=True)
    assert (m.window_size, m.shift_size) == (4, 0)
    assert m.attn_mask is None and m.relative_position_bias_table.shape == (7 * 7, C // HEAD_DIM)
    assert m(_input(size=4).float()).shape == (N, C, 4, 4)


def test_non_dividing_window_is_refused():
    with pytest.raises(ValueError) as err:
        WindowAttention(C, HEAD_DIM, resolution=12, window_size=8)
    message = str(err.value)
    assert "\n" not in message and "window_size=8" in message and "12x12" in message


def test_window_attention_refuses_another_map_size():
    with pytest.raises(ValueError, match="8x8"):
        _window(False)(_input(size=4))


@pytest.mark.parametrize("make", [lambda: _mdta(False), lambda: _window(False), lambda: _window(True)],
                         ids=["mdta", "window", "shifted_window"])
def test_mdta_and_window_backward_reach_every_parameter(make):
    m = make()
    m(_input()).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_both_build_and_run_on_the_meta_device():
    with torch.device("meta"):
        mods = [ChannelSelfAttention(C, HEAD_DIM), WindowAttention(C, HEAD_DIM, R, 4, shift=True)]
        x = torch.empty(N, C, R, R)
    for m in mods:
        assert all(b.is_meta for b in m.buffers())
        assert m(x).shape == (N, C, R, R)


NB, CB, HD, RB = 2, 16, 8, 6  # the linear-attention tests: a 6x6 map
TOL = dict(rtol=1e-10, atol=1e-10)


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Every parameter (biases, position tables, scale included) non-zero, so a missing term changes the output."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return module


def _map(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NB, CB, RB, RB, generator=g, dtype=torch.float64)


def _linear(lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ lin.weight.T + lin.bias


def _dw_conv(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' conv of v (ch, RB, RB) as a sum of zero-padded shifted copies times the kernel taps."""
    ks = weight.shape[-1]
    pad = ks // 2
    vp = torch.zeros(v.shape[0], RB + 2 * pad, RB + 2 * pad, dtype=v.dtype)
    vp[:, pad:pad + RB, pad:pad + RB] = v
    out = bias[:, None, None].expand(-1, RB, RB).clone()
    for dy in range(ks):
        for dx in range(ks):
            out = out + weight[:, 0, dy, dx][:, None, None] * vp[:, dy:dy + RB, dx:dx + RB]
    return out


def _ref_focused(m: FocusedLinearAttention, h: torch.Tensor) -> torch.Tensor:
    heads, n = CB // HD, RB * RB
    scale = torch.log1p(torch.exp(m.scale[0, 0]))                             # softplus

    def phi(x: torch.Tensor) -> torch.Tensor:                                 # one token, all CB channels
        x = (torch.clamp(x, min=0) + 1e-6) / scale
        xp = x ** 3
        return xp / torch.sqrt((xp * xp).sum()) * torch.sqrt((x * x).sum())

    out = torch.empty_like(h)
    for bi in range(NB):
        tok = h[bi].reshape(CB, n).T                                           # (HW, CB), row-major pixels
        q = _linear(m.q, tok)
        kv = _linear(m.kv, tok)
        k, v = kv[:, :CB] + m.positional_encoding[0], kv[:, CB:]
        fq = torch.stack([phi(q[i]) for i in range(n)])
        fk = torch.stack([phi(k[j]) for j in range(n)])
        y = torch.empty(n, CB, dtype=h.dtype)
        for hi in range(heads):
            sl = slice(hi * HD, (hi + 1) * HD)
            for i in range(n):
                num = torch.zeros(HD, dtype=h.dtype)
                den = torch.zeros((), dtype=h.dtype)
                for j in range(n):
                    s = (fq[i, sl] * fk[j, sl]).sum()
                    num = num + s * v[j, sl]
                    den = den + s
                y[i, sl] = (num / n) / (den / n + 1e-6)
            y[:, sl] += _dw_conv(v[:, sl].T.reshape(HD, RB, RB), m.dwc.weight, m.dwc.bias).reshape(HD, n).T
        out[bi] = _linear(m.proj, y).T.reshape(CB, RB, RB)
    return out


def _bilinear_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) matrix of 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    w = torch.zeros(dst, src, dtype=torch.float64)
    for o in range(dst):
        x = max((o + 0.5) * src / dst - 0.5, 0.0)
        i0 = int(math.floor(x))
        i1 = min(i0 + 1, src - 1)
        lam = x - i0
        w[o, i0] += 1 - lam
        w[o, i1] += lam
    return w


def _ref_agent(m: AgentAttention, h: torch.Tensor) -> torch.Tensor:
    heads, n, a, p = CB // HD, RB * RB, m.agent_num, math.isqrt(m.agent_num)
    sc = HD ** -0.5
    wi = _bilinear_weights(7, RB)
    bins = [(math.floor(i * RB / p), math.ceil((i + 1) * RB / p)) for i in range(p)]   # adaptive avg pool bins
    out = torch.empty_like(h)
    for bi in range(NB):
        tok = h[bi].reshape(CB, n).T
        q = _linear(m.q, tok)
        kv = _linear(m.kv, tok)
        k, v = kv[:, :CB], kv[:, CB:]
        qmap = q.T.reshape(CB, RB, RB)
        agents = torch.stack([qmap[:, y0:y1, x0:x1].mean(dim=(1, 2)) for (y0, y1) in bins for (x0, x1) in bins])
        y = torch.empty(n, CB, dtype=h.dtype)
        for hi in range(heads):
            sl = slice(hi * HD, (hi + 1) * HD)
            an = torch.stack([wi @ m.an_bias[hi, ai] @ wi.T for ai in range(a)])    # (A, RB, RB)
            na = torch.stack([wi @ m.na_bias[hi, ai] @ wi.T for ai in range(a)])
            agent_v = torch.empty(a, HD, dtype=h.dtype)
            for ai in range(a):                                              # agents attend to all keys
                logits = torch.stack([
                    sc * (agents[ai, sl] * k[j, sl]).sum() + an[ai, j // RB, j % RB]
                    + m.ah_bias[0, hi, ai, j // RB, 0] + m.aw_bias[0, hi, ai, 0, j % RB] for j in range(n)])
                e = torch.exp(logits - logits.max())
                agent_v[ai] = (e[:, None] * v[:, sl]).sum(0) / e.sum()
            for i in range(n):                                               # each query reads the agents
                logits = torch.stack([
                    sc * (q[i, sl] * agents[ai, sl]).sum() + na[ai, i // RB, i % RB]
                    + m.ha_bias[0, hi, i // RB, 0, ai] + m.wa_bias[0, hi, 0, i % RB, ai] for ai in range(a)])
                e = torch.exp(logits - logits.max())
                y[i, sl] = (e[:, None] * agent_v).sum(0) / e.sum()
        y = y + _dw_conv(v.T.reshape(CB, RB, RB), m.dwc.weight, m.dwc.bias).reshape(CB, n).T
        out[bi] = _linear(m.proj, y).T.reshape(CB, RB, RB)
    return out


def test_focused_linear_attention_matches_direct_formula():
    m = _randomise(FocusedLinearAttention(CB, HD, RB), seed=0)
    h = _map(1)
    with torch.no_grad():
        torch.testing.assert_close(m(h), _ref_focused(m, h), **TOL)


@pytest.mark.parametrize("agent_num", [4, 9, 16])  # 16: 4x4 bins of a 6x6 map overlap
def test_agent_attention_matches_direct_formula(agent_num):
    m = _randomise(AgentAttention(CB, HD, RB, agent_num=agent_num), seed=agent_num)
    h = _map(2)
    with torch.no_grad():
        torch.testing.assert_close(m(h), _ref_agent(m, h), **TOL)


def _build(kind: str) -> torch.nn.Module:
    return FocusedLinearAttention(CB, HD, RB) if kind == "flatten" else AgentAttention(CB, HD, RB, agent_num=4)


@pytest.mark.parametrize("kind", ["flatten", "agent"])
def test_linear_and_agent_backward_reach_every_parameter(kind):
    m = _randomise(_build(kind), seed=3)
    m(_map(4)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["flatten", "agent"])
@pytest.mark.parametrize("shape", [(NB, CB, RB - 1, RB - 1), (NB, CB, RB, RB - 1), (CB, RB, RB)])
def test_wrong_map_refused(kind, shape):
    with pytest.raises(ValueError) as err:
        _build(kind)(torch.zeros(shape))
    assert "\n" not in str(err.value)


def test_bad_hyper_parameters_refused():
    with pytest.raises(ValueError, match="perfect square"):
        AgentAttention(CB, HD, RB, agent_num=8)
    with pytest.raises(ValueError, match="divisible"):
        FocusedLinearAttention(CB, 6, RB)


@pytest.mark.parametrize("kind", ["flatten", "agent"])
def test_builds_on_meta_device(kind):
    with torch.device("meta"):
        m = _build(kind)
    assert all(p.is_meta for p in m.parameters())
