"""A VP ε-prediction UNet as a teacher of a flow-matching student (distillation of its velocity).

Why: trained on data pairs, a flow model regresses ``eps - x0`` for one (x0, eps) pair per sample,
a target whose variance, at mid and high noise, dwarfs what the model can learn from it; a teacher
that already denoises well gives the *expected* velocity at that point instead (knowledge
distillation of diffusion models). The shapes-world UNet (``builtin:shapes``) shares the student's
VAE and text encoder, so its prediction is a drop-in target.

The two noise families describe the same point up to a scale. Flow: ``x = (1 - s) x0 + s eps``; VP:
``z = sqrt(a) x0 + sqrt(1 - a) eps``. Equal noise-to-signal ratios ``s / (1 - s) = sqrt((1 - a) / a)``
give ``a = (1 - s)^2 / ((1 - s)^2 + s^2)`` and ``z = x / sqrt((1 - s)^2 + s^2)``. The teacher's
``eps_hat`` at the (fractional) timestep whose ``alphas_cumprod`` is ``a`` then gives
``x0_hat = (x - s eps_hat) / (1 - s)`` and the velocity ``eps_hat - x0_hat``. Outside the teacher's
trained range of ``a`` (sigmas very near 0 or 1) the data target is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VPTeacher", "flow_to_vp", "load_vp_teacher"]


def flow_to_vp(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_bar, input_scale)`` of the VP point equal to the flow point at ``sigma``."""
    norm2 = (1 - sigma) ** 2 + sigma**2
    return (1 - sigma) ** 2 / norm2, norm2.rsqrt()


@dataclass
class VPTeacher:
    """A frozen ε-prediction UNet and its ``alphas_cumprod`` (decreasing in the timestep)."""

    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor

    def timesteps(self, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fractional timesteps with ``alphas_cumprod(t) = alpha_bar`` (linear in log alpha_bar between
        table entries), and a mask of the points inside the table's range."""
        log_table = self.alphas_cumprod.log()  # decreasing
        log_a = alpha_bar.clamp_min(1e-12).log()
        inside = (log_a <= log_table[0]) & (log_a >= log_table[-1])
        flipped = log_table.flip(0)  # increasing
        hi = torch.searchsorted(flipped, log_a.clamp(flipped[0], flipped[-1])).clamp(1, len(flipped) - 1)
        lo = hi - 1
        frac = (log_a - flipped[lo]) / (flipped[hi] - flipped[lo])
        position = lo.float() + frac.clamp(0, 1)  # index into the flipped table
        return (len(flipped) - 1) - position, inside

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text_states: torch.Tensor):
        """``(velocity, inside)``: the teacher's ``eps - x0`` at the flow point ``x`` (noise level
        ``sigma`` per sample), conditioned on ``text_states`` (the UNet's cross-attention input)."""
        alpha_bar, scale = flow_to_vp(sigma.float())
        t, inside = self.timesteps(alpha_bar)
        eps = self.unet(x * scale.view(-1, 1, 1, 1), t, text_states).sample
        s = sigma.view(-1, 1, 1, 1)
        x0 = (x - s * eps) / (1 - s)
        return eps - x0, inside


def load_vp_teacher(folder) -> VPTeacher:
    """The UNet and scheduler of a diffusers ``StableDiffusionPipeline`` folder, frozen, float32.

    Refuses a v-prediction teacher in one line (the velocity above assumes ε)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(
            f"teacher {str(folder)!r} predicts {scheduler.config.prediction_type!r}: only epsilon is supported"
        )
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    unet.eval().requires_grad_(False)
    return VPTeacher(unet, scheduler.alphas_cumprod.clone().float())
