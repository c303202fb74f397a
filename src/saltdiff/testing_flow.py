"""Flow-matching test material built in code: the exact Gaussian velocity field, tiny SD3 and FLUX parts.

Like :mod:`saltdiff.testing` for the UNet families: real diffusers / transformers classes at tiny
sizes (random weights, no downloads), so that every code path a real SD3 or FLUX checkpoint goes
through (joint attention, packing, T5 tokenization, dynamic shift) is the one the tests run.
"""

from __future__ import annotations

import torch

__all__ = ["GaussianVelocity"]


class GaussianVelocity:
    """The exact flow-matching velocity for data ``x0 ~ N(mean, std^2 I)`` (elementwise).

    With ``x = (1 - s) x0 + s eps``, ``x`` is Gaussian with mean ``m_s = (1 - s) mean`` and variance
    ``v_s = (1 - s)^2 std^2 + s^2``; the regression target ``E[eps - x0 | x]`` is
    ``u(x, s) = (s - (1 - s) std^2) / v_s * (x - m_s) - mean``. Its ODE keeps the standardized
    ``(x - m_s) / sqrt(v_s)`` constant, so the exact flow map is :meth:`flow_map` -- what an
    integrator must reproduce as its steps shrink. A random transformer's output is no velocity
    field at all, and would hide an inversion stepping the wrong way.
    """

    def __init__(self, mean: float = 0.5, std: float = 0.5):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.mean = float(mean)
        self.std = float(std)
        self.calls: list[float] = []  # the sigmas it was called at, in order

    def _moments(self, s: float) -> tuple[float, float]:
        return (1.0 - s) * self.mean, (1.0 - s) ** 2 * self.std**2 + s**2

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``u(x, sigma)`` in float64 (then ``x``'s dtype); records ``sigma`` in :attr:`calls`."""
        s = float(sigma)
        self.calls.append(s)
        m, v = self._moments(s)
        u = (s - (1.0 - s) * self.std**2) / v * (x.double() - m) - self.mean
        return u.to(x.dtype)

    def flow_map(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact ODE solution: ``m_t + sqrt(v_t / v_s) (x - m_s)``."""
        m_s, v_s = self._moments(float(sigma_from))
        m_t, v_t = self._moments(float(sigma_to))
        return (m_t + (v_t / v_s) ** 0.5 * (x.double() - m_s)).to(x.dtype)
