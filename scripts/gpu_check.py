"""Seconds per image, peak memory and non-finite values of each method on SD 1.5, SDXL, SD3.5 and FLUX.1.

    python scripts/gpu_check.py --device cuda --dtype float16 --out gpu_check.json
    python scripts/gpu_check.py --families sd3.5-medium,flux.1-dev --steps 10 --repeats 1 --out flow.json
    python scripts/gpu_check.py --tiny --device cpu --dtype float32 --steps 3 --repeats 1 --out /tmp/c.json

The full SD 1.5 and SDXL base architectures with random weights, built in code
(``saltdiff.testing``): the real layers, shapes and attention, so the cost and numerical range (fp16
overflow, NaN from a guided backward) are real, the images are not. SD3.5-medium, SD3.5-large and
FLUX.1-dev likewise (``saltdiff.testing_flow.flow_architecture_components``): the real transformer and
VAE, built directly on ``--device`` (FLUX.1-dev is 48 GB in float32 before the cast), with tiny random
text encoders of the real output widths and sequence lengths -- only the transformer's and the VAE's
cost is real there, and the tables say so. Per family one pipeline (``SaltPipeline`` /
``SaltXLPipeline`` / ``SaltSD3Pipeline`` / ``SaltFluxPipeline`` via ``from_pipe``); per method one
warm-up call, then ``--repeats`` timed calls. Methods: ``sd`` (random init, no guidance: the plain
diffusers pipeline's image), ``layout-guidance`` (random init, Chen et al.'s loss), ``random+salt-loss``
(random init, SALT's guidance), ``salt`` (SALT init, default guidance; the reference objects are
regenerated on every call: an in-memory model has no object cache). Each family runs at its pipeline's
defaults otherwise (SD3: CFG 7 in one batch; FLUX.1-dev: embedded guidance 3.5, one call per step).
Peak memory is CUDA's ``max_memory_allocated`` over the timed calls (weights included), or on CPU the
process's peak RSS (monotone over the run). Non-finite: NaN/inf in any output image
(``output_type="np"``), initial latent or guidance loss. A method that raises counts as a failure too
(an out-of-memory error is reported and the run goes on). Exit status 1 when anything failed, 2 on a
bad request (``--device cuda`` without CUDA). ``--tiny``: tiny components at 32 px, 4 steps unless
``--steps`` (a CPU smoke run in seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

FLOW_FAMILIES = ("sd3.5-medium", "sd3.5-large", "flux.1-dev")  # saltdiff.testing_flow.FLOW_ARCHITECTURES
FAMILIES = ("sd15", "sdxl", *FLOW_FAMILIES)
METHODS = ("sd", "layout-guidance", "random+salt-loss", "salt")
DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024, **dict.fromkeys(FLOW_FAMILIES, 1024)}
TEXT_ENCODERS_NOTE = "text encoders tiny and random: only the transformer's and the VAE's cost is real"
PROMPT = "a red circle and a blue square on a white background"  # every word is one tiny-tokenizer token
LAYOUT = [("red circle", (0.06, 0.3, 0.44, 0.7)), ("blue square", (0.56, 0.3, 0.94, 0.7))]


def method_kwargs(name: str, steps: int) -> dict:
    """``init`` and ``guidance`` of one method, as ``pipe(...)`` takes them. ``salt`` inverts in its
    default number of steps, which follows ``steps`` where sampling starts too low for it."""
    return {
        "sd": dict(init="random", guidance="none"),
        "layout-guidance": dict(init="random", guidance="layout-guidance"),
        "random+salt-loss": dict(init="random", guidance="salt"),
        "salt": dict(init="salt"),  # the default guidance and inversion depth
    }[name]


def build_pipe(family: str, tiny: bool, device: str, dtype: torch.dtype):
    """A SALT pipeline of ``family`` on random weights: full architecture, or tiny with ``tiny``."""
    from saltdiff import testing

    if family == "sd15":
        from diffusers import StableDiffusionPipeline

        from saltdiff.pipeline import SaltPipeline

        if tiny:
            base = testing.tiny_sd_pipeline()
        else:
            base = StableDiffusionPipeline(
                **testing.sd15_architecture_components(dtype=dtype),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe = SaltPipeline.from_pipe(base)
    elif family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        from saltdiff.pipeline_xl import SaltXLPipeline

        if tiny:
            base = testing.tiny_sdxl_pipeline()
        else:
            base = StableDiffusionXLPipeline(
                **testing.sdxl_architecture_components(dtype=dtype), add_watermarker=False
            )
        pipe = SaltXLPipeline.from_pipe(base)
    elif family in FLOW_FAMILIES:
        import diffusers

        from saltdiff import testing_flow
        from saltdiff.pipeline_flux import SaltFluxPipeline
        from saltdiff.pipeline_sd3 import SaltSD3Pipeline

        pipeline = testing_flow.FLOW_ARCHITECTURES[family][0]
        flux = pipeline == "FluxPipeline"
        if tiny:  # FLUX.1-dev is guidance-distilled: the tiny one too
            base = (
                testing_flow.tiny_flux_pipeline(guidance_embeds=True)
                if flux
                else testing_flow.tiny_sd3_pipeline()
            )
        else:
            components = testing_flow.flow_architecture_components(family, dtype=dtype, device=device)
            base = getattr(diffusers, pipeline)(**components)
        pipe = (SaltFluxPipeline if flux else SaltSD3Pipeline).from_pipe(base)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def non_finite(out) -> dict:
    """Which of the call's outputs hold NaN/inf: the images, the initial latent, the guidance losses."""
    import numpy as np

    images = np.asarray(out.images)
    latent = out.init_latent
    losses = [v for step in out.guidance_losses for v in step]
    return {
        "image": bool(not np.isfinite(images).all()),
        "init_latent": bool(latent is not None and not torch.isfinite(latent.float()).all()),
        "guidance_loss": bool(any(not math.isfinite(float(v)) for v in losses)),
    }


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def run_method(pipe, name: str, *, size: int, steps: int, repeats: int, cuda: bool) -> dict:
    """One warm-up call and ``repeats`` timed calls of method ``name``; times, memory, non-finite flags."""
    from saltdiff.eval.metrics import peak_memory_mb

    call = dict(
        **method_kwargs(name, steps),
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="np",
        progress=False,
    )
    flags = {"image": False, "init_latent": False, "guidance_loss": False}

    def once(seed: int) -> None:
        out = pipe(PROMPT, LAYOUT, seed=seed, **call)
        for key, bad in non_finite(out).items():
            flags[key] |= bad

    once(0)  # warm-up (its outputs are checked too)
    _sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        once(r + 1)
        _sync(cuda)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_memory_mb("cpu") / 2**10
    return {
        "call": {k: v for k, v in call.items() if k in ("init", "guidance", "inversion_steps")},
        "sec_per_image": sum(times) / len(times),
        "min_sec": min(times),
        "times": times,
        "peak_mem_gib": peak,
        "non_finite": any(flags.values()),
        "non_finite_where": sorted(k for k, bad in flags.items() if bad),
        "error": None,
    }


def run_family(family: str, args, dtype: torch.dtype, cuda: bool) -> dict:
    size = 32 if args.tiny else (args.size or DEFAULT_SIZE[family])
    start = time.perf_counter()
    pipe = build_pipe(family, args.tiny, args.device, dtype)
    build_s = time.perf_counter() - start
    methods = {}
    for name in args.methods:
        try:
            methods[name] = run_method(
                pipe, name, size=size, steps=args.steps, repeats=args.repeats, cuda=cuda
            )
        except Exception as exc:  # e.g. out of memory: reported, counted as a failure, the run goes on
            methods[name] = {
                "sec_per_image": None,
                "peak_mem_gib": None,
                "non_finite": None,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            }
            if cuda:
                torch.cuda.empty_cache()
        print(f"{family} {name} {json.dumps(methods[name])}", file=sys.stderr, flush=True)
    base = methods.get("sd", {}).get("sec_per_image")
    for result in methods.values():
        sec = result["sec_per_image"]
        result["time_vs_sd"] = sec / base if sec is not None and base else None
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    return {
        "arch": "tiny" if args.tiny else family,
        "note": TEXT_ENCODERS_NOTE if family in FLOW_FAMILIES and not args.tiny else None,
        "size": size,
        "build_seconds": build_s,
        "methods": methods,
    }


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(family: str, report: dict) -> str:
    """One family's markdown table, under a header line with the device and settings."""
    fam = report["families"][family]
    memory = "CUDA max_memory_allocated" if report["cuda"] else "process peak RSS"
    lines = [
        f"{family} ({fam['arch']}) on {report['device']}: {report['dtype']}, {fam['size']}x{fam['size']}, "
        f"{report['steps']} steps, {report['repeats']} timed call(s) after 1 warm-up; peak = {memory}"
        + (f"; {fam['note']}" if fam.get("note") else ""),
        "",
        "| method | s / image | × sd | peak GiB | non-finite |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in fam["methods"].items():
        if r["error"]:
            verdict = f"error: {r['error']}"
        else:
            verdict = ("yes: " + ", ".join(r["non_finite_where"])) if r["non_finite"] else "no"
        lines.append(
            f"| {name} | {_fmt(r['sec_per_image'], '.2f')} | {_fmt(r['time_vs_sd'], '.2f')} | "
            f"{_fmt(r['peak_mem_gib'], '.2f')} | {verdict} |"
        )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES)
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (30; 4 with --tiny)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--size", type=int, default=None, help="image side (512 SD 1.5, 1024 SDXL, SD3.5 and FLUX.1)"
    )
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny components at 32 px (a CPU smoke run)")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for value, allowed, what in ((args.families, FAMILIES, "family"), (args.methods, METHODS, "method")):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            parser.error(f"unknown {what} {bad or value}; choose from {', '.join(allowed)}")
    if args.steps is None:
        args.steps = 4 if args.tiny else 30
    if args.repeats < 1 or args.steps < 1:
        parser.error("--steps and --repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device} asked but CUDA is not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    report = {
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "cuda": cuda,
        "dtype": args.dtype,
        "steps": args.steps,
        "repeats": args.repeats,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "families": {},
    }
    for family in args.families:
        report["families"][family] = run_family(family, args, dtype, cuda)
    results = [r for fam in report["families"].values() for r in fam["methods"].values()]
    report["non_finite"] = any(r["non_finite"] for r in results)
    report["errors"] = any(r["error"] for r in results)
    report["ok"] = not (report["non_finite"] or report["errors"])
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print("\n\n".join(table(family, report) for family in args.families))
    print(f"\n{'ok' if report['ok'] else 'FAILED'}: wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
