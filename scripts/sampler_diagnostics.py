"""Why PNDM and LMS fail at 25 steps on the built-in model: local and global ODE error per sampler.

Every deterministic sampler here integrates the same probability-flow ODE. In DDIM's coordinates
(``xbar = x_vp / sqrt(abar)``, ``sigma = sqrt((1 - abar) / abar)``; k-diffusion's ``x`` is ``xbar``)
it reads ``d xbar / d sigma = eps(xbar, sigma)``, with eps the CFG-combined prediction. This script

1. integrates it accurately (Heun on every integer timestep from the 25-step grid's first timestep,
   961, down to 0: 1,922 UNet calls) from the random start of each of the first ``--n`` shapes
   prompts (seed 0, the start ``pipe(...)`` uses),
2. compares each sampler's 25-step result (diffusers' own scheduler, same start) to it, and
3. on that exact trajectory, measures each method's *slope error* per interval of the 25- and the
   50-step grids: the exact slope is ``(xbar(s_{i+1}) - xbar(s_i)) / (s_{i+1} - s_i)``; DDIM/Euler use
   ``eps_i``, PNDM's PLMS the Adams-Bashforth-4 mix ``(55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24``,
   LMS order-4 Lagrange weights in sigma (diffusers' ``get_lms_coefficient``), and
4. the stiffness each step faces: ``h * lambda`` with ``h = s_{i+1} - s_i`` (negative) and ``lambda`` the
   dominant eigenvalue of ``d eps / d xbar`` at ``xbar(s_i)`` (power iteration on finite-difference
   Jacobian-vector products). On the test equation ``y' = lambda y`` explicit Adams-Bashforth methods
   are stable for real ``h * lambda`` in about [-2, 0] (Euler = DDIM), [-1, 0] (2 steps),
   [-0.55, 0] (3) and [-0.3, 0] (4 steps: PLMS, LMS order 4).

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/sampler_diagnostics.py --n 8 --cfg 7.5,3
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy import integrate


def lagrange_weights(sigmas, i, order):
    """diffusers' LMS coefficients for the step sigmas[i] -> sigmas[i+1] from eps at i, i-1, ..."""
    out = []
    for cur in range(order):

        def basis(tau, cur=cur):
            prod = 1.0
            for k in range(order):
                if k != cur:
                    prod *= (tau - sigmas[i - k]) / (sigmas[i - cur] - sigmas[i - k])
            return prod

        out.append(integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-6)[0])
    return out


def main() -> None:
    from saltdiff.eval.suites import shapes_suite
    from saltdiff.loading import load_pipeline
    from saltdiff.samplers import make_scheduler

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--cfg", default="7.5,3")
    ap.add_argument("--samplers", default="ddim,euler,heun,pndm,lms")
    ap.add_argument("--json", default=None)
    ap.add_argument("--power-iters", type=int, default=20)
    args = ap.parse_args()

    pipe = load_pipeline("builtin:shapes", device="cpu", dtype="float32")
    unet, vae = pipe.unet, pipe.vae
    abar = pipe.scheduler.alphas_cumprod.double()
    sig = ((1 - abar) / abar).sqrt()  # sigma of every integer timestep
    start = 961  # the first timestep of every 25-step grid here (leading spacing, steps_offset 1)
    coarse = {25: list(range(start, 0, -40)) + [0], 50: list(range(start, 0, -20)) + [0]}
    results: dict = {}

    for w in [float(c) for c in args.cfg.split(",")]:
        slope_err = {m: {g: [] for g in coarse} for m in ("ddim", "plms4", "lms4")}
        cfg_ratio = []
        stiffness: dict = {25: {}, 50: {}}
        trajectory = {s: [] for s in args.samplers.split(",")}
        global_err = {s: [] for s in args.samplers.split(",")}
        pixel_err = {s: [] for s in args.samplers.split(",")}
        for item in shapes_suite(args.n):
            cond, uncond = pipe.encode_prompt(item.prompt, "cpu", 1, True, "")  # diffusers' CFG batch
            embeds = torch.cat([uncond, cond])

            @torch.no_grad()
            def eps(xbar, t, embeds=embeds, w=w, ratios=cfg_ratio):
                x_vp = (xbar * abar[t].sqrt()).float()
                u, c = unet(torch.cat([x_vp] * 2), t, encoder_hidden_states=embeds).sample.chunk(2)
                ratios.append(float((c - u).norm() / u.norm()))
                return (u + w * (c - u)).double()

            shape = (1, unet.config.in_channels, *(s // pipe.vae_scale_factor for s in (64, 64)))
            z = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0))  # unit-variance VP start
            # 1. the reference: Heun on every integer timestep 961 -> 0, then an Euler step to sigma 0
            xbar = {start: z.double() / abar[start].sqrt()}
            e_at = {}
            x = xbar[start]
            for t in range(start, 0, -1):
                e1 = eps(x, t)
                e_at[t] = e1
                x_pred = x + (sig[t - 1] - sig[t]) * e1
                e2 = eps(x_pred, t - 1)
                x = x + (sig[t - 1] - sig[t]) * (e1 + e2) / 2
                xbar[t - 1] = x
            e_at[0] = eps(x, 0)
            ref_vp_end = xbar[0]  # VP samplers end at abar[0] (set_alpha_to_one=False)
            ref_k_end = xbar[0] - sig[0] * e_at[0]  # k-diffusion samplers end at sigma = 0
            # 3. slope errors on the 25- and 50-step grids
            for g, grid in coarse.items():
                s = [float(sig[t]) if t > 0 else float(sig[0]) for t in grid]
                es = [e_at[t] for t in grid]
                for i in range(3, len(grid) - 1):
                    exact = (xbar[grid[i + 1]] - xbar[grid[i]]) / (s[i + 1] - s[i])
                    norm = exact.norm()
                    plms = (55 * es[i] - 59 * es[i - 1] + 37 * es[i - 2] - 9 * es[i - 3]) / 24
                    lw = lagrange_weights(s, i, 4)
                    lms = sum(c * es[i - j] for j, c in enumerate(lw)) / (s[i + 1] - s[i])
                    slope_err["ddim"][g].append(float((es[i] - exact).norm() / norm))
                    slope_err["plms4"][g].append(float((plms - exact).norm() / norm))
                    slope_err["lms4"][g].append(float((lms - exact).norm() / norm))
            # 4. h * lambda at the 25-step grid's points (lambda by power iteration)
            grid = coarse[25]
            for i, t in enumerate(grid[:-1]):
                v = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(i)).double()
                v = v / v.norm()
                base, lam = e_at[t], 0.0
                delta = 1e-3 * float(xbar[t].norm())
                for _ in range(args.power_iters):
                    jv = (eps(xbar[t] + delta * v, t) - base) / delta
                    lam = float((jv * v).sum())
                    v = jv / jv.norm()
                h25 = float(sig[grid[i + 1]] - sig[t]) if grid[i + 1] > 0 else float(-sig[t])
                h50 = float(sig[t - 20] - sig[t]) if t > 20 else float(-sig[t])
                stiffness[25].setdefault(t, []).append(h25 * lam)
                stiffness[50].setdefault(t, []).append(h50 * lam)
            # 2. each sampler's 25 steps from the same start
            with torch.no_grad():
                ref_img = vae.decode(ref_k_end.float() / vae.config.scaling_factor).sample
            for name in global_err:
                sch = make_scheduler(name, pipe.scheduler.config)
                sch.set_timesteps(25)
                lat = z * sch.init_noise_sigma
                vp = float(sch.init_noise_sigma) == 1.0
                errs = []
                with torch.no_grad():
                    for j, t in enumerate(sch.timesteps):
                        inp = sch.scale_model_input(torch.cat([lat] * 2), t)
                        u, c = unet(inp, t, encoder_hidden_states=embeds).sample.chunk(2)
                        lat = sch.step(u + w * (c - u), t, lat).prev_sample
                        # the distance to the exact solution at each 25-grid point the sampler reaches
                        if name in ("ddim", "euler", "pndm", "lms") and not (name == "pndm" and j == 0):
                            tn = coarse[25][len(errs) + 1]
                            now = lat.double() / abar[tn].sqrt() if vp else lat.double()
                            ref_now = ref_k_end if (tn == 0 and not vp) else xbar[tn]
                            errs.append(float((now - ref_now).norm() / ref_now.norm()))
                if errs:
                    trajectory[name].append(errs)
                end = lat.double() / abar[0].sqrt() if vp else lat.double()
                ref = ref_vp_end if vp else ref_k_end
                global_err[name].append(float((end - ref).norm() / ref.norm()))
                with torch.no_grad():
                    img = vae.decode(
                        lat.float() / (abar[0].sqrt().float() if vp else 1.0) / vae.config.scaling_factor
                    ).sample
                pixel_err[name].append(float(((img - ref_img).abs() / 2).mean()))
        summary = {
            "cfg": w,
            "cond_minus_uncond_over_uncond_median": float(np.median(cfg_ratio)),
            "global_rel_error_25_steps": {k: float(np.mean(v)) for k, v in global_err.items()},
            "mean_abs_pixel_diff_25_steps": {k: float(np.mean(v)) for k, v in pixel_err.items()},
            "slope_rel_error_median": {
                m: {g: float(np.median(v)) for g, v in d.items()} for m, d in slope_err.items()
            },
            "slope_rel_error_max": {
                m: {g: float(np.max(v)) for g, v in d.items()} for m, d in slope_err.items()
            },
            "h_lambda_median_over_layouts": {
                g: {t: round(float(np.median(v)), 3) for t, v in d.items()} for g, d in stiffness.items()
            },
            "h_lambda_most_negative": {
                g: float(min(min(v) for v in d.values())) for g, d in stiffness.items()
            },
            "steps_with_median_h_lambda_below_-0.3": {
                g: int(sum(np.median(v) < -0.3 for v in d.values())) for g, d in stiffness.items()
            },
            "rel_error_along_the_way_mean": {
                k: [round(float(x), 3) for x in np.mean(v, axis=0)] for k, v in trajectory.items() if v
            },
        }
        results[str(w)] = summary
        print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
