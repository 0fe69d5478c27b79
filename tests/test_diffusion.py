"""Diffusion against closed forms recomputed here in float64, DiT's respacing rules and an exact denoiser."""

import math

import numpy as np
import pytest
import torch

from repro import models
from repro.diffusion import (GaussianDiffusion, SpacedDiffusion, cfg_model_fn, create_diffusion, get_betas,
                             space_timesteps)

F64 = torch.float64
LN2 = math.log(2.0)


def linear_abar(steps: int = 1000) -> torch.Tensor:
    """abar_t of DiT's linear schedule, computed independently of the package."""
    betas = torch.tensor(np.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps, dtype=np.float64))
    return torch.cumprod(1 - betas, 0)


def closed_forms(t: torch.Tensor):
    """beta_t, abar_t, abar_{t-1}, posterior coefficients and variance for the full linear chain, as (N,1,1,1)."""
    abar_all = linear_abar()
    abar = abar_all[t]
    abar_prev = torch.where(t > 0, abar_all[(t - 1).clamp(min=0)], torch.ones_like(abar))
    beta = 1 - abar / abar_prev
    coef_x0 = abar_prev.sqrt() * beta / (1 - abar)
    coef_xt = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
    var = beta * (1 - abar_prev) / (1 - abar)
    view = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    return tuple(view(v) for v in (beta, abar, abar_prev, coef_x0, coef_xt, var))


# -- schedules and the forward process --------------------------------------------------------------------------

def test_linear_betas_equal_numpy_linspace_and_cosine_formula():
    for steps in (1000, 250, 7):
        s = 1000 / steps
        ref = np.linspace(1e-4 * s, 0.02 * s, steps, dtype=np.float64)
        assert np.array_equal(get_betas("linear", steps).numpy(), ref)       # bit for bit, like DiT
    betas = get_betas("squaredcos_cap_v2", 1000).numpy()
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(1000)
    np.testing.assert_allclose(betas, np.minimum(1 - f((i + 1) / 1000) / f(i / 1000), 0.999), rtol=1e-12)
    assert betas.max() == 0.999
    with pytest.raises(ValueError, match="noise_schedule"):
        get_betas("cosine", 1000)


def test_q_sample_moments():
    d = create_diffusion()
    n, x0 = 20000, 0.7
    g = torch.Generator().manual_seed(0)
    abar = linear_abar()
    for step in (0, 100, 500, 999):
        t = torch.full((n,), step, dtype=torch.long)
        xt = d.q_sample(torch.full((n, 1), x0, dtype=F64), t, torch.randn(n, 1, generator=g, dtype=F64))
        mean, var = abar[step].sqrt() * x0, 1 - abar[step]
        assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(xt.var().item() / var - 1) < 5 * math.sqrt(2 / n)


def test_posterior_mean_and_variance_closed_forms():
    d = create_diffusion()
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 2, 37, 500, 998, 999])
    x0, xt = torch.randn(7, 2, 3, 3, generator=g, dtype=F64), torch.randn(7, 2, 3, 3, generator=g, dtype=F64)
    _, _, _, coef_x0, coef_xt, var = closed_forms(t)
    mean, variance, log_var = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, coef_x0 * x0 + coef_xt * xt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance, var, rtol=1e-12, atol=0)
    assert variance[0].item() == 0
    # "clipped": the log of entry 0 (zero variance) is replaced by entry 1
    torch.testing.assert_close(log_var[1:], var[1:].log(), rtol=1e-12, atol=0)
    assert log_var[0].item() == log_var[1].item()


# -- the training loss ------------------------------------------------------------------------------------------

def _fake_batch(t: torch.Tensor, channels: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    n = t.numel()
    x0 = torch.rand(n, channels, 3, 3, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(n, channels, 3, 3, generator=g, dtype=F64)
    eps_hat = noise + 0.1 * torch.randn(n, channels, 3, 3, generator=g, dtype=F64)
    v = torch.rand(n, channels, 3, 3, generator=g, dtype=F64) * 2 - 1
    return x0, noise, eps_hat, v


def test_vb_is_the_gaussian_kl_in_bits():
    d = create_diffusion()
    t = torch.tensor([1, 10, 500, 999])
    x0, noise, eps_hat, v = _fake_batch(t)
    out = torch.cat([eps_hat, v], 1)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise)

    beta, abar, _, coef_x0, coef_xt, var = closed_forms(t)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    x0_hat = (xt - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    frac = (v + 1) / 2
    var_p = beta ** frac * var ** (1 - frac)                                 # geometric interpolation, t >= 1
    m_q, m_p = coef_x0 * x0 + coef_xt * xt, coef_x0 * x0_hat + coef_xt * xt
    kl = 0.5 * (torch.log(var_p / var) + (var + (m_q - m_p) ** 2) / var_p - 1)
    torch.testing.assert_close(terms["vb"], kl.mean((1, 2, 3)) / LN2, rtol=1e-9, atol=1e-12)


def test_vb_at_t0_is_the_discretised_decoder_nll():
    d = create_diffusion()
    x0 = torch.tensor([-1.0, -0.3, 0.0, 0.52, 1.0], dtype=F64).view(5, 1, 1, 1)
    noise = torch.tensor([0.3, -1.2, 0.5, 0.0, -0.4], dtype=F64).view(5, 1, 1, 1)
    eps_hat = noise + torch.tensor([0.2, -0.1, 0.3, 0.05, 0.1], dtype=F64).view(5, 1, 1, 1)
    v = torch.tensor([1.0, 0.5, -1.0, 0.0, 0.8], dtype=F64).view(5, 1, 1, 1)
    t = torch.zeros(5, dtype=torch.long)
    vb = d.training_losses(lambda x, tt: torch.cat([eps_hat, v], 1), x0, t, noise)["vb"]

    beta, abar, _, _, _, var = closed_forms(torch.tensor([0, 1]))
    beta0, abar0, var1 = beta[0], abar[0], var[1]                            # log var clipped: beta~_1 at t = 0
    xt = abar0.sqrt() * x0 + (1 - abar0).sqrt() * noise
    mean = (xt - (1 - abar0).sqrt() * eps_hat) / abar0.sqrt()                # posterior mean at t = 0 is x0_hat
    frac = (v + 1) / 2
    std = (beta0 ** frac * var1 ** (1 - frac)).sqrt()
    h = 1 / 255

    def nll_bits(cdf):
        upper, lower = cdf((x0 + h - mean) / std), cdf((x0 - h - mean) / std)
        p = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
        return (-p.log() / LN2).flatten()

    # Exact normal CDF: agrees up to ADM's tanh approximation (|error| < 2e-4 on the CDF).
    torch.testing.assert_close(vb, nll_bits(torch.special.ndtr), rtol=2e-3, atol=1e-3)
    # ADM's approximation, written out: agrees to rounding.
    tanh_cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    torch.testing.assert_close(vb, nll_bits(tanh_cdf), rtol=1e-10, atol=1e-12)


def test_vb_trains_only_the_variance_and_mse_only_eps():
    d = create_diffusion()
    t = torch.tensor([0, 3, 400])
    x0, noise, eps_hat, v = _fake_batch(t)
    c = x0.shape[1]
    for term, live, dead in (("vb", slice(c, None), slice(0, c)), ("mse", slice(0, c), slice(c, None))):
        out = torch.cat([eps_hat, v], 1).requires_grad_(True)
        d.training_losses(lambda x, tt, out=out: out, x0, t, noise)[term].sum().backward()
        assert out.grad[:, dead].abs().max() == 0
        assert (out.grad[:, live].abs().amax((1, 2, 3)) > 0).all()


def test_training_losses_sum_and_mse():
    t = torch.tensor([0, 5, 999])
    x0, noise, eps_hat, v = _fake_batch(t)
    terms = create_diffusion().training_losses(lambda x, tt: torch.cat([eps_hat, v], 1), x0, t, noise)
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["mse"], ((noise - eps_hat) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert terms["loss"].shape == (3,)

    fixed = create_diffusion(learn_sigma=False).training_losses(lambda x, tt: eps_hat, x0, t, noise)
    assert set(fixed) == {"loss", "mse"}
    torch.testing.assert_close(fixed["loss"], ((noise - eps_hat) ** 2).mean((1, 2, 3)))
    with pytest.raises(ValueError, match="model output has shape"):
        create_diffusion().training_losses(lambda x, tt: eps_hat, x0, t, noise)


# -- respacing --------------------------------------------------------------------------------------------------

def test_respaced_betas_keep_the_marginals():
    for spec in ("250", "ddim50", "25,25,50", "1"):
        d = create_diffusion(spec)
        kept = d.timestep_map
        abar = linear_abar()[kept]
        prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
        torch.testing.assert_close(d.betas, 1 - abar / prev, rtol=1e-12, atol=0)
        torch.testing.assert_close(d.alphas_cumprod, abar, rtol=1e-10, atol=0)
        assert d.num_timesteps == len(kept) == len(set(kept.tolist()))


def test_space_timesteps_rules():
    assert space_timesteps(1000, "250") == {round(i * 999 / 249) for i in range(250)}
    assert {0, 999} <= space_timesteps(1000, "250")
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))
    assert space_timesteps(1000, "ddim250") != space_timesteps(1000, "250")
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))
    # ADM adds the float stride up: ten times 49.95 is 499.49999999999994, so DiT keeps 499 where
    # round(10 * 999 / 20) would give 500 (283 of the counts 2..1000 differ from the closed form this way).
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")

    kept = sorted(space_timesteps(1000, "25,25,50"))                         # sections of 334, 333, 333 steps
    assert len(kept) == 100
    sections = [[k for k in kept if lo <= k < hi] for lo, hi in ((0, 334), (334, 667), (667, 1000))]
    assert [len(s) for s in sections] == [25, 25, 50]
    assert [(s[0], s[-1]) for s in sections] == [(0, 333), (334, 666), (667, 999)]


@pytest.mark.parametrize("spec", ["0", "abc", "", "1001", "500,600", "-5", "25,,25", "2.5", "ddim", "ddim0",
                                  "ddimx", "ddim999"])
def test_bad_respacing_specs_raise(spec):
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(1000, spec)


def test_ddim_spec_without_a_stride_raises():
    with pytest.raises(ValueError, match="ddim7"):
        space_timesteps(10, "ddim7")                                         # strides give 10, 5, 4, 3, 2 or 1 steps


def test_create_diffusion_validates_options():
    with pytest.raises(ValueError, match="noise_schedule"):
        create_diffusion(noise_schedule="cosine")
    with pytest.raises(ValueError, match="learn_sigma"):
        create_diffusion(learn_sigma="yes")
    with pytest.raises(ValueError, match="diffusion_steps"):
        create_diffusion(diffusion_steps=0)
    with pytest.raises(ValueError, match="timestep_respacing"):
        create_diffusion(timestep_respacing=250)
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion([1000], get_betas("linear", 1000))
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusion([0.5, 1.5])
    d = create_diffusion("", "squaredcos_cap_v2", learn_sigma=False, diffusion_steps=100)
    assert d.num_timesteps == 100 and not d.learn_sigma


# -- sampling ---------------------------------------------------------------------------------------------------

def exact_denoiser(x_star: torch.Tensor, kept: set[int]):
    """eps-predictor of the one-point dataset {x*} on the original chain, with v = -1 (variance beta~_t)."""
    abar_all = linear_abar().to(x_star.device)

    def model_fn(x, t):
        assert t.dtype == torch.long and t.device == x.device
        assert set(t.tolist()) <= kept                                      # original indices, not spaced ones
        abar = abar_all[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x_star) / (1 - abar).sqrt()
        return torch.cat([eps, -torch.ones_like(x)], 1)

    return model_fn


@pytest.mark.parametrize("spec, sampler", [("50", "ddpm"), ("", "ddpm"), ("ddim50", "ddim"), ("100", "ddim")])
@pytest.mark.parametrize("shape", [(1, 2, 4, 4), (2, 1, 5, 5)])
def test_exact_denoiser_recovers_the_data_point(spec, sampler, shape):
    g = torch.Generator().manual_seed(3)
    x_star = torch.rand(shape, generator=g, dtype=F64) * 2 - 1
    d = create_diffusion(spec)
    model_fn = exact_denoiser(x_star, set(d.timestep_map.tolist()))
    noise = torch.randn(shape, generator=g, dtype=F64)
    if sampler == "ddpm":
        x = d.p_sample_loop(model_fn, shape, noise=noise, generator=g)
    else:
        x = d.ddim_sample_loop(model_fn, shape, noise=noise, generator=g)
    assert x.dtype == F64
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_denoiser_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(3)
    x_star = torch.rand(2, 4, 4, 4, generator=g, device="cuda", dtype=F64) * 2 - 1
    d = create_diffusion("50")
    model_fn = exact_denoiser(x_star, set(d.timestep_map.tolist()))
    x = d.p_sample_loop(model_fn, x_star.shape, generator=g, device="cuda", dtype=F64)
    assert x.device.type == "cuda"
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-5)
    y = d.ddim_sample_loop(model_fn, x_star.shape, generator=g, device="cuda", dtype=torch.float32)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_same_seed_same_samples():
    d = create_diffusion("10")
    model_fn = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], 1)  # noqa: E731
    shape = (2, 1, 4, 4)

    def sample(seed, ddim=False):
        g = torch.Generator().manual_seed(seed)
        if ddim:
            return d.ddim_sample_loop(model_fn, shape, eta=1.0, generator=g)
        return d.p_sample_loop(model_fn, shape, generator=g)

    for ddim in (False, True):
        assert torch.equal(sample(0, ddim), sample(0, ddim))
        assert not torch.allclose(sample(0, ddim), sample(1, ddim))
    torch.manual_seed(5)
    a = d.p_sample_loop(model_fn, shape)                                     # generator=None: the global RNG
    torch.manual_seed(5)
    assert torch.equal(a, d.p_sample_loop(model_fn, shape))
    with pytest.raises(ValueError, match="noise has shape"):
        d.p_sample_loop(model_fn, shape, noise=torch.zeros(1, 1, 4, 4))


def test_cfg_model_fn_drives_forward_with_cfg():
    m = models.build("DiT-S/2", hidden_size=32, depth=2, num_heads=2, input_size=16).eval()
    calls = []
    real = m.forward_with_cfg

    def spy(x, t, y, cfg_scale, guide_channels):
        calls.append((x.shape[0], cfg_scale, guide_channels))
        return real(x, t, y, cfg_scale, guide_channels)

    m.forward_with_cfg = spy
    y = torch.tensor([1, 7])
    g = torch.Generator().manual_seed(0)
    d = create_diffusion("ddim5")
    x = d.p_sample_loop(cfg_model_fn(m, y, 1.5, guide_channels=3), (2, 4, 16, 16), generator=g)
    assert x.shape == (2, 4, 16, 16) and torch.isfinite(x).all()
    assert calls == [(2, 1.5, 3)] * 5
    calls.clear()
    d.ddim_sample_loop(cfg_model_fn(m, y, 1.0), (2, 4, 16, 16), generator=g)
    assert calls == []                                                       # scale 1: plain model(x, t, y)
    with pytest.raises(ValueError, match="cfg_scale"):
        cfg_model_fn(m, y, 0.5)
