"""Plain sampling through SaltPipeline against diffusers' StableDiffusionPipeline, per sampler.

Same components, same scheduler config, same seed and steps; prints the largest pixel difference
(images in [0, 1]) for (a) no layout (``init="random"``) and (b) the bench's ``sd`` method (a layout,
attention captured, no guidance), for a few layouts of the shapes suite.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/sampler_parity.py --n 3 --steps 25
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    from diffusers import StableDiffusionPipeline

    from saltdiff.eval.suites import shapes_suite
    from saltdiff.loading import load_pipeline
    from saltdiff.registry import SCHEDULERS
    from saltdiff.samplers import make_scheduler

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:shapes")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS.names()))
    args = ap.parse_args()

    salt = load_pipeline(args.model, device="cpu", dtype="float32")
    salt.set_progress_bar_config(disable=True)
    base_config = salt.scheduler.config
    layouts = shapes_suite(args.n)
    for name in args.schedulers.split(","):
        worst_plain = worst_sd = 0.0
        for item in layouts:
            seed = 0
            salt.scheduler = make_scheduler(name, base_config)
            ref_pipe = StableDiffusionPipeline(
                **{**salt.components, "scheduler": make_scheduler(name, base_config)},
                requires_safety_checker=False,
            )
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
