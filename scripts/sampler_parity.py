"""Plain sampling through saltdiff's pipeline against diffusers' own, per sampler: SaltPipeline against
StableDiffusionPipeline, or, for an SD3 folder, SaltSD3Pipeline against StableDiffusion3Pipeline (the
samplers of the model's noise family by default).

Same components, same scheduler config, same seed and steps; prints the largest pixel difference
(images in [0, 1]) for (a) no layout (``init="random"``) and (b) the bench's ``sd`` method (a layout,
attention captured, no guidance), for a few layouts of the shapes suite.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/sampler_parity.py --n 3 --steps 25
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main(argv=None) -> None:
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from saltdiff.eval.suites import shapes_suite
    from saltdiff.loading import load_pipeline
    from saltdiff.samplers import config_family, family_samplers, make_scheduler

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:shapes")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument(
        "--schedulers", default=None, help="comma list (default: every sampler of the model's family)"
    )
    args = ap.parse_args(argv)

    salt = load_pipeline(args.model, device="cpu", dtype="float32")
    salt.set_progress_bar_config(disable=True)
    base_config = salt.scheduler.config
    schedulers = (
        args.schedulers.split(",") if args.schedulers else family_samplers(config_family(base_config))
    )
    sd3 = isinstance(salt, StableDiffusion3Pipeline)
    layouts = shapes_suite(args.n)
    for name in schedulers:
        worst_plain = worst_sd = 0.0
        for item in layouts:
            seed = 0
            salt.scheduler = make_scheduler(name, base_config)
            components = {**salt.components, "scheduler": make_scheduler(name, base_config)}
            if sd3:
                ref_pipe = StableDiffusion3Pipeline(**components)
            else:
                ref_pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
            ref_pipe.set_progress_bar_config(disable=True)
            ref = ref_pipe(
                item.prompt,
                num_inference_steps=args.steps,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
            ).images
            ours = salt(
                item.prompt, init="random", seed=seed, num_inference_steps=args.steps, output_type="np"
            ).images
            sd = salt(
                item.prompt,
                item.layout,
                init="random",
                guidance="none",
                seed=seed,
                num_inference_steps=args.steps,
                output_type="np",
            ).images
            worst_plain = max(worst_plain, float(np.abs(ours - ref).max()))
            worst_sd = max(worst_sd, float(np.abs(sd - ref).max()))
        print(
            f"{name:16s} max|salt(no layout) - diffusers| = {worst_plain:.2e}   "
            f"max|salt(layout, no guidance) - diffusers| = {worst_sd:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
