"""Diffusion process, loss and samplers shared by every arm, equivalent to DiT's `diffusion/` package.

    diffusion = create_diffusion()                        # training: all 1000 steps, learned sigma
    losses = diffusion.training_losses(lambda x, t: model(x, t, y), x0, t)
    sampler = create_diffusion("250")                     # the papers' DDPM sampler
    z = sampler.p_sample_loop(cfg_model_fn(model, y, 1.5), shape, generator=g, device="cuda")

Deviations from DiT, all documented where they live: coefficients are cast to x's dtype (DiT casts to float32),
learn_sigma=False means FIXED_SMALL (DiT's default there is FIXED_LARGE), fresh noise may come from a
`torch.Generator`, and guidance returns only the kept conditional half (`cfg_model_fn`).
"""

from __future__ import annotations

import torch

from repro.models.layers import check_choice

from .gaussian import SCHEDULES, GaussianDiffusion, ModelFn, get_betas
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(timestep_respacing: str = "", noise_schedule: str = "linear", learn_sigma: bool = True,
                     diffusion_steps: int = 1000) -> SpacedDiffusion:
    """DiT's `create_diffusion`: eps-prediction, MSE (+ vb with learned sigma); "" keeps every step."""
    if not isinstance(timestep_respacing, str):
        raise ValueError(f"timestep_respacing must be a string ('' for all steps, '250', 'ddim50', ...), "
                         f"got {timestep_respacing!r}")
    check_choice("noise_schedule", noise_schedule, SCHEDULES)
    if isinstance(diffusion_steps, bool) or not isinstance(diffusion_steps, int) or diffusion_steps < 2:
        raise ValueError(f"diffusion_steps must be an int >= 2, got {diffusion_steps!r}")
    betas = get_betas(noise_schedule, diffusion_steps)
    if not bool((betas <= 1).all()):
        raise ValueError(f"diffusion_steps={diffusion_steps} is too few for the {noise_schedule!r} schedule "
                         f"(betas above 1)")
    use = space_timesteps(diffusion_steps, timestep_respacing or str(diffusion_steps))
    return SpacedDiffusion(use, betas, learn_sigma=learn_sigma)


def cfg_model_fn(model: torch.nn.Module, y: torch.Tensor, cfg_scale: float, guide_channels: int | str = 3) -> ModelFn:
    """`model_fn(x, t)` for the samplers: classifier-free guidance at `cfg_scale`, plain `model(x, t, y)` at 1.

    DiT samples a doubled batch [z; z] with labels [y; null] and discards the unconditional half at the end.
    Our `forward_with_cfg` takes the n conditional inputs, runs the doubled forward internally and returns only
    the n guided outputs, so that discarded chain is never simulated. The kept samples have the same law, but
    DiT draws 2n noises per step, so a seed does not reproduce DiT's images bit for bit. guide_channels=3 is
    DiT's legacy (guidance on eps channels 0-2 only); "all" or C guides every eps channel.
    """
    if not cfg_scale >= 1:
        raise ValueError(f"cfg_scale must be >= 1, got {cfg_scale}")
    if cfg_scale == 1:
        return lambda x, t: model(x, t, y)
    return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale, guide_channels)


__all__ = ["GaussianDiffusion", "ModelFn", "SCHEDULES", "SpacedDiffusion", "cfg_model_fn", "create_diffusion",
           "get_betas", "space_timesteps"]
