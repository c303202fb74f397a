"""Round-trip error of flow inversion, reverse Euler against midpoint.

Invert a clean latent up to the sampler's first sigma on the sampler's own grid, sample it back down
with the Euler sampler on the same grid, and report ``|x0' - x0| / |x0|`` (RMS) for each method and
inversion depth. Three velocity fields:

* ``gaussian``: the exact field of Gaussian data (:class:`saltdiff.testing_flow.GaussianVelocity`),
  where the error is the integrators' alone;
* ``tiny-sd3`` / ``tiny-flux``: the tiny random-weight transformers of the tests (their output is no
  trained field: a check that the code paths agree, not a quality number);
* ``--model FOLDER``: a trained SD3-structured model (e.g. ``builtin:shapes-mmdit``), on the VAE
  latents of held-out shapes scenes, with the empty prompt (SALT's inversion prompt).

    python scripts/flow_inversion_roundtrip.py [--model builtin:shapes-mmdit] [--steps 25] [--depths 2,5,10]
"""

from __future__ import annotations

import argparse
import json

import torch

from saltdiff.flow_inversion import FLOW_INVERSION_METHODS, flow_invert, inversion_sigmas, solve_flow_ode


def round_trip(velocity, x0: torch.Tensor, grid: torch.Tensor, method: str) -> float:
    """Relative RMS error after inverting ``x0`` along ``grid`` and sampling back with Euler."""
    up = flow_invert(velocity, x0, grid, method=method)
    down = solve_flow_ode(velocity, up, grid.flip(0), method="euler")
    return float((down - x0).pow(2).mean().sqrt() / x0.pow(2).mean().sqrt())


def _grids(scheduler, steps: int, depths: list[int], **schedule) -> dict[int, torch.Tensor]:
    """Per depth, the inversion grid of a ``depth``-step schedule ending at the ``steps``-step sampler's
    first sigma (what :mod:`saltdiff.flow_init` inverts on)."""
    from saltdiff.flow_inversion import sampler_sigmas

    start = float(sampler_sigmas(scheduler, steps, **schedule)[0])
    out = {}
    for depth in depths:
        grid = inversion_sigmas(scheduler, depth, **schedule)
        if abs(float(grid[-1]) - start) > 1e-6:
            grid = torch.cat([grid[grid < start], grid.new_tensor([start])])
        out[depth] = grid
    return out


def _fields(args):
    """``(name, velocity, clean latents, scheduler, schedule kwargs)`` for each field measured."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from saltdiff.testing_flow import GaussianVelocity

    gen = torch.Generator().manual_seed(0)
    gaussian = GaussianVelocity(mean=0.5, std=0.5)
    x0 = 0.5 + 0.5 * torch.randn(4, 16, 8, 8, generator=gen)
    yield "gaussian", gaussian, x0.double(), FlowMatchEulerDiscreteScheduler(shift=3.0), {}
    for family in ("sd3", "flux"):
        yield _tiny(family, gen)
    if args.model:
        yield _trained(args.model, args.n)


@torch.no_grad()
def _tiny(family: str, gen):
    from saltdiff.families import guided_denoiser
    from saltdiff.testing_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    if family == "sd3":
        from saltdiff.pipeline_sd3 import SaltSD3Pipeline as cls

        pipe = cls.from_pipe(tiny_sd3_pipeline())
    else:
        from saltdiff.pipeline_flux import SaltFluxPipeline as cls

        pipe = cls.from_pipe(tiny_flux_pipeline())
    adapter = pipe.family()
    x0 = torch.randn(2, adapter.latent_channels, 8, 8, generator=gen)
    velocity = guided_denoiser(adapter, adapter.conditions([""] * 2))
    return f"tiny-{family}", velocity, x0, pipe.scheduler, adapter.schedule_kwargs(1, (8, 8))


@torch.no_grad()
def _trained(model: str, n: int):
    """A trained flow model on the VAE latents of ``n`` held-out shapes scenes, empty prompt."""
    from saltdiff import load_pipeline
    from saltdiff.families import guided_denoiser
    from saltdiff.training.data import render_seeds
    from saltdiff.worlds.shapes import HELDOUT_SEEDS

    pipe = load_pipeline(model)
    adapter = pipe.family()
    size = pipe.default_size()
    pixels, _ = render_seeds(HELDOUT_SEEDS[:n], size)
    x0 = adapter.encode(pixels)
    velocity = guided_denoiser(adapter, adapter.conditions([""] * n))
    latent_hw = (size // pipe.vae_scale_factor,) * 2
    return model, velocity, x0, pipe.scheduler, adapter.schedule_kwargs(1, latent_hw)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a trained SD3/FLUX folder or builtin:NAME")
    parser.add_argument("--n", type=int, default=16, help="held-out scenes for --model")
    parser.add_argument(
        "--steps", type=int, default=25, help="sampling steps (the grid the inversion ends on)"
    )
    parser.add_argument("--depths", default="2,5,10,25", help="inversion steps, comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    depths = [int(d) for d in args.depths.split(",")]
    results: dict = {}
    print("| field | inversion steps | " + " | ".join(FLOW_INVERSION_METHODS) + " |")
    print("|---|---:|" + "---:|" * len(FLOW_INVERSION_METHODS))
    for name, velocity, x0, scheduler, schedule in _fields(args):
        mu = {"mu": schedule["mu"]} if "mu" in schedule else {}
        for depth, grid in _grids(scheduler, args.steps, depths, **mu).items():
            errors = {m: round_trip(velocity, x0, grid.to(x0.dtype), m) for m in FLOW_INVERSION_METHODS}
            results.setdefault(name, {})[depth] = errors
            print(f"| {name} | {depth} | " + " | ".join(f"{e:.2e}" for e in errors.values()) + " |")
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
