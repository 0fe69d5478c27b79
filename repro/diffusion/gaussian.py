"""Gaussian diffusion as in DiT's `gaussian_diffusion.py` (from ADM / iDDPM), restricted to what the papers use.

eps-prediction only; variance LEARNED_RANGE when the model learns sigma (output 2C channels), else FIXED_SMALL
(the posterior variance, output C channels). The loss is DiT's `LossType.MSE` with learned sigma: mse + vb
(`specs/protocol.md` section 1). Schedule arithmetic is float64 on the CPU; per-timestep coefficients are cast
to the dtype and device of x when used.

`model_fn(x, t)` is any callable returning the model output; the caller binds labels and guidance. t is a
LongTensor of indices on this diffusion's chain; `_model_timesteps` maps them to the indices the model was
trained on (the identity here, the original 1000-step index under respacing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from rich.progress import track

from repro.models.layers import check_choice

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_betas(schedule: str, num_steps: int) -> torch.Tensor:
    """DiT's `get_named_beta_schedule`: the float64 betas of a named schedule with `num_steps` steps."""
    check_choice("noise_schedule", schedule, SCHEDULES)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if schedule == "linear":
        # Ho et al.'s 1e-4..0.02 over 1000 steps, rescaled so any step count gives a comparable process.
        scale = 1000 / num_steps
        start, stop = scale * 0.0001, scale * 0.02
        if num_steps == 1:
            return torch.tensor([start], dtype=torch.float64)
        # numpy.linspace's own arithmetic (i * step + start, last = stop), so the betas equal DiT's bit for bit.
        step = (stop - start) / (num_steps - 1)
        betas = torch.arange(num_steps, dtype=torch.float64) * step + start
        betas[-1] = stop
        return betas
    # iDDPM's cosine schedule: betas from alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008, capped
    # at 0.999 so the last steps stay invertible.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))                               # (N,)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM's tanh approximation of the standard normal CDF (kept so the t=0 loss term equals DiT's)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data x in [-1, 1], quantised to 256 bins, under N(means, exp(log_scales)^2).

    The two outermost bins extend to -inf and +inf (ADM). Applied to latents as-is, like DiT (legacy).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    # generator=None draws from torch's global RNG, the stream DiT's randn / randn_like use.
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


class GaussianDiffusion:
    """Forward process, posterior, eps-parameterised reverse process, DiT's training loss and its samplers.

    Args:
        betas: the noise schedule, one value in (0, 1] per step (see `get_betas`).
        learn_sigma: the model outputs 2C channels [eps, v] and the variance is LEARNED_RANGE
            (log var = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2); otherwise C channels and FIXED_SMALL.
    """

    def __init__(self, betas: torch.Tensor | Sequence[float], learn_sigma: bool = True):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        if not isinstance(learn_sigma, bool):
            raise ValueError(f"learn_sigma must be True or False, got {learn_sigma!r}")
        self.learn_sigma = learn_sigma
        self.num_timesteps = betas.numel()
        one = torch.ones(1, dtype=torch.float64)

        # Everything below is float64, as in ADM's numpy code.
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.log_betas = betas.log()

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        if self.num_timesteps > 1:
            # beta~_0 = 0, so its log is replaced by the next entry ("clipped").
            self.posterior_log_variance_clipped = torch.cat(
                [self.posterior_variance[1:2], self.posterior_variance[1:]]).log()
        else:
            # A one-step chain has no entry to borrow (ADM breaks here); log beta_0 keeps it finite.
            self.posterior_log_variance_clipped = self.log_betas.clone()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self._device_tables: dict[tuple[int, torch.device], torch.Tensor] = {}

    # -- helpers -------------------------------------------------------------------------------------------

    def _extract(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] in x's dtype and device, shaped (N, 1, ..., 1) to broadcast against x."""
        key = (id(table), x.device)                                          # tables are attributes: ids are stable
        on_device = self._device_tables.get(key)
        if on_device is None:
            # One float64 copy per device, so sampling does not re-upload the schedule every step.
            on_device = self._device_tables[key] = table.to(x.device)
        return on_device[t.to(x.device)].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))   # (N, 1, ..., 1)

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep indices the model is called with (identity; respacing maps them to the original chain)."""
        return t

    def _model_output(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(x, self._model_timesteps(t))
        want = 2 * x.shape[1] if self.learn_sigma else x.shape[1]
        if out.shape != (x.shape[0], want, *x.shape[2:]):
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {(x.shape[0], want, *x.shape[2:])} "
                             f"(learn_sigma={self.learn_sigma} with {x.shape[1]} input channels)")
        # The chain keeps the dtype it was started in: a float64 or bf16 model output must not re-type x_t.
        return out.to(x.dtype)

    # -- forward process and posterior ---------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (noise ~ N(0, I) from the global RNG when None)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * x0 \
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor,
                                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract(self.posterior_mean_coef1, t, xt) * x0 \
            + self._extract(self.posterior_mean_coef2, t, xt) * xt
        return (mean, self._extract(self.posterior_variance, t, xt),
                self._extract(self.posterior_log_variance_clipped, t, xt))

    # -- reverse process -----------------------------------------------------------------------------------

    def _p_from_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                       clip_denoised: bool) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from an already computed model output."""
        c = x.shape[1]
        if self.learn_sigma:
            eps, v = out[:, :c], out[:, c:]
            frac = (v + 1) / 2                                                # v in [-1, 1] spans [beta~_t, beta_t]
            log_variance = frac * self._extract(self.log_betas, t, x) \
                + (1 - frac) * self._extract(self.posterior_log_variance_clipped, t, x)
            variance = torch.exp(log_variance)
        else:
            eps = out
            variance = self._extract(self.posterior_variance, t, x).expand_as(x)
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x).expand_as(x)
        pred_xstart = self._extract(self.sqrt_recip_alphas_cumprod, t, x) * x \
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

    def p_mean_variance(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """Mean, variance, log_variance of p(x_{t-1} | x_t) and the x0 estimate `pred_xstart` (ADM's keys)."""
        return self._p_from_output(self._model_output(model_fn, x, t), x, t, clip_denoised)

    # -- training loss -------------------------------------------------------------------------------------

    def _vb_bits(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)), the decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        p = self._p_from_output(out, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)                    # (N,)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses {loss, mse, vb}: loss = mse + vb with learned sigma, else {loss, mse} with loss = mse."""
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = self._model_output(model_fn, xt, t)
        c = x0.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :c]) ** 2)}                 # (N,)
        if self.learn_sigma:
            # iDDPM's hybrid loss: the VLB trains only the variance, so eps gets its gradient from mse alone.
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            terms["vb"] = self._vb_bits(frozen, x0, xt, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # -- samplers ------------------------------------------------------------------------------------------

    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} = mean + sigma z, with no noise where t == 0."""
        p = self.p_mean_variance(model_fn, x, t, clip_denoised)
        # Drawn at t == 0 too, so the RNG stream is the one DiT's loop consumes.
        z = _randn(x.shape, generator, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return dict(sample=p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * z,
                    pred_xstart=p["pred_xstart"])

    def ddim_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                    eta: float = 0.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DDIM step (ADM's `ddim_sample`); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        p = self.p_mean_variance(model_fn, x, t, clip_denoised)
        # eps re-derived from x0_hat: the model's eps unless clip_denoised moved x0_hat.
        eps = (self._extract(self.sqrt_recip_alphas_cumprod, t, x) * x - p["pred_xstart"]) \
            / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x)
        abar = self._extract(self.alphas_cumprod, t, x)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        z = _randn(x.shape, generator, x.device, x.dtype)
        mean = p["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return dict(sample=mean + nonzero * sigma * z, pred_xstart=p["pred_xstart"])

    def _loop(self, step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], shape: Sequence[int],
              noise: torch.Tensor | None, generator: torch.Generator | None, device: torch.device | str | None,
              dtype: torch.dtype, progress: bool) -> torch.Tensor:
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)}")
            device = noise.device
        device = torch.device(device if device is not None else "cpu")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but sampling runs on {device}")
        x = noise if noise is not None else _randn(shape, generator, device, dtype)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            steps = track(steps, description="sampling", total=self.num_timesteps)
        with torch.no_grad():
            for i in steps:
                t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
                x = step(x, t)["sample"]
        return x

    def p_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], noise: torch.Tensor | None = None,
                      clip_denoised: bool = False, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                      progress: bool = False) -> torch.Tensor:
        """DDPM ancestral sampling from x_T = noise (or fresh N(0, I) of `shape`, `dtype` on `device`) to x_0.

        Fresh noise comes from `generator` (global RNG if None), which must live on the sampling device;
        a given `noise` fixes device and dtype.
        """
        def step(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.p_sample(model_fn, x, t, clip_denoised, generator)

        return self._loop(step, shape, noise, generator, device, dtype, progress)

    def ddim_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], noise: torch.Tensor | None = None,
                         clip_denoised: bool = False, eta: float = 0.0, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                         progress: bool = False) -> torch.Tensor:
        """DDIM sampling over this diffusion's (usually respaced, e.g. "ddim50") chain; arguments as p_sample_loop."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")

        def step(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.ddim_sample(model_fn, x, t, clip_denoised, eta, generator)

        return self._loop(step, shape, noise, generator, device, dtype, progress)
