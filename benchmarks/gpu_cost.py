"""Seconds per image and peak memory of each method on a full-size architecture (random weights).

    python benchmarks/gpu_cost.py --device cuda --dtype float16 --out gpu_cost.json
    python benchmarks/gpu_cost.py --tiny --steps 4 --out /tmp/cost.json      # a CPU smoke run

Random weights give the real cost (the same layers, shapes and attention), not image quality. Every
method runs on the same pipeline after one warm-up call; ``salt`` regenerates its reference objects
on every call (an in-memory model has no object cache), so its time includes them, batched
(``--object-batch-size``, default 8) and one at a time (``salt-objects-1by1``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build_pipe(tiny: bool, device: str, dtype: torch.dtype):
    from saltdiff.pipeline import SaltPipeline
    from saltdiff.testing import sd15_architecture_components, tiny_sd_components

    components = tiny_sd_components() if tiny else sd15_architecture_components(dtype=dtype)
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe = SaltPipeline.from_pipe(sd).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def methods(batch_size: int):
    from saltdiff import GeneratedObjects, GuidanceConfig, RandomInit, SpatialAwareInit

    salt = SpatialAwareInit(reference=GeneratedObjects(cache=False, batch_size=batch_size))
    one = SpatialAwareInit(reference=GeneratedObjects(cache=False, batch_size=1))
    return {
        "sd": (RandomInit(), GuidanceConfig(loss="none")),
        "random+salt-loss": (RandomInit(), GuidanceConfig(loss="salt")),
        "salt": (salt, GuidanceConfig(loss="salt")),
        "salt-objects-1by1": (one, GuidanceConfig(loss="salt")),
        "salt-init": (salt, GuidanceConfig(loss="none")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--object-batch-size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="tiny components (a smoke run on CPU)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    size = 32 if args.tiny else args.size
    t0 = time.perf_counter()
    pipe = build_pipe(args.tiny, args.device, dtype)
    build_s = time.perf_counter() - t0
    prompt = "a red circle and a blue square on a white background"
    layout = [("red circle", (0.06, 0.3, 0.44, 0.7)), ("blue square", (0.56, 0.3, 0.94, 0.7))]
    cuda = args.device.startswith("cuda")
    results = {}
    for name, (init, guidance) in methods(args.object_batch_size).items():
        kwargs = dict(
            init=init,
            guidance=guidance,
            num_inference_steps=args.steps,
            height=size,
            width=size,
            progress=False,
        )
        pipe(prompt, layout, seed=0, **kwargs)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            pipe(prompt, layout, seed=r + 1, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = {
            "sec_per_image": sum(times) / len(times),
            "min_sec": min(times),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
        print(name, json.dumps(results[name]), flush=True)
    base = results["sd"]["sec_per_image"]
    for r in results.values():
        r["time_vs_sd"] = r["sec_per_image"] / base
    report = {
        "device": torch.cuda.get_device_name() if cuda else args.device,
        "arch": "tiny" if args.tiny else "sd15",
        "dtype": args.dtype,
        "size": size,
        "steps": args.steps,
        "repeats": args.repeats,
        "object_batch_size": args.object_batch_size,
        "build_seconds": build_s,
        "torch": torch.__version__,
        "methods": results,
    }
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
