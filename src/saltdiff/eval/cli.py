"""``saltdiff bench`` and ``saltdiff study``: the benchmark and ablation commands.

    saltdiff bench --suite shapes --methods sd,salt --n 200 --seeds 1 --out runs/shapes
    saltdiff bench --suite coco --coco-annotations instances_val2017.json \\
        --coco-captions captions_val2017.json --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --detector owlv2 --out runs/coco
    saltdiff bench --suite layouts.jsonl --out runs/mine      # one {"prompt", "boxes"} per line
    accelerate launch -m saltdiff bench ...                   # layouts split across processes
    saltdiff study spatial-awareness --suite shapes --n 50 --out runs/spatial

A rerun with the same ``--out`` resumes: finished images are skipped.
"""

from __future__ import annotations

import argparse
import sys

from ..cli_args import CliError, HelpFormatter, add_method_args, add_model_args, check_applies, given
from ..registry import GUIDANCE_LOSSES, REFERENCE_BUILDERS
from .detectors import DETECTOR_NAMES
from .methods import default_methods, parse_methods, presets
from .studies import STUDIES, parse_values


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        default=None,
        help="shapes (held-out shapes-world layouts, test split), shapes-val (its tuning split), "
        "shapes-hard / shapes-hard-val (3-4 small, partly overlapping boxes, background always named), "
        "coco (with --coco-annotations/--coco-captions), "
        "or a .jsonl file with one {'prompt', 'boxes': [{'phrase', 'box': [x0,y0,x1,y1]}]} per line "
        "(default: shapes for bench, shapes-val for study: defaults are chosen on the tuning split)",
    )
    parser.add_argument("--n", type=int, default=None, help="number of layouts (default: 200; JSONL: all)")
    parser.add_argument(
        "--seeds", default="1", help="a count (3 → seeds 0,1,2) or a comma list of seeds (0,7,42)"
    )
    parser.add_argument("--out", required=True, help="run folder (a rerun with the same folder resumes)")
    add_model_args(parser, scheduler_default=None)
    # 25: every table in README.md and benchmarks/RESULTS.md (saltdiff generate defaults to 50)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the model's: 5 for the built-in models, as their model cards "
        "say; else its pipeline's: 7.5 SD 1.x/2.x and SDXL, 7.0 SD3, 3.5 FLUX's embedded guidance)",
    )
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="run a height or width more than 4x the model's trained size (refused otherwise: slow)",
    )
    parser.add_argument(
        "--detector",
        default="auto",
        help=f"one of {DETECTOR_NAMES}, optionally NAME:MODEL_ID (auto: shapes for the shapes suite or "
        "the built-in model, else owlv2)",
    )
    parser.add_argument(
        "--clip-model",
        default="auto",
        help="CLIP model for text alignment on real images (auto: none with the shapes detector, where "
        "text alignment is object recall; else openai/clip-vit-large-patch14); 'none': object recall",
    )
    parser.add_argument("--coco-annotations", default=None, help="COCO instances_*.json (suite coco)")
    parser.add_argument("--coco-captions", default=None, help="COCO captions_*.json (suite coco)")
    parser.add_argument(
        "--coco-min-area", type=float, default=0.02, help="smallest COCO box kept, as a fraction of the image"
    )
    parser.add_argument("--grid-rows", type=int, default=8, help="rows per image grid in the report")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=None,
        help="resamples of the 95%% bootstrap intervals over layouts (default: 1000; 0: no intervals)",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the finished images of --out again with the current detector and metric definitions",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_method_args(parser, choose=False)


def add_bench_parser(subparsers) -> None:
    """Add ``bench`` and ``study`` to the ``saltdiff`` command."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmark methods on a suite of layouts (mIoU, mAP, text alignment, time, memory)",
        description="Benchmark methods on a suite of layouts: images, per-image records, metrics.json, "
        "results.csv and report.md in --out; a rerun with the same --out resumes.",
        formatter_class=HelpFormatter,
    )
    _add_run_args(bench)
    bench.set_defaults(seeds="2", suite="shapes")  # with --n 200 and --steps 25: README.md's table
    bench.add_argument(
        "--methods",
        default="all",
        help=f"comma list from {list(presets())}, or all (= {','.join(default_methods())})",
    )
    bench.set_defaults(func=cmd_bench)

    study = subparsers.add_parser(
        "study",
        help="run an ablation study (one report and plot per study)",
        description="Ablation studies: " + ", ".join(f"{k} ({s.description})" for k, s in STUDIES.items()),
        formatter_class=HelpFormatter,
    )
    study.add_argument("name", choices=sorted(STUDIES), help="which study")
    _add_run_args(study)
    study.set_defaults(suite="shapes-val")  # studies choose defaults: the tuning split
    study.add_argument("--values", default=None, help="comma list of the swept values (default: per study)")
    study.add_argument(
        "--loss",
        default=None,
        choices=GUIDANCE_LOSSES.names(),
        help="guidance loss of the variants (default: per study; spatial-awareness is always unguided)",
    )
    study.add_argument(
        "--iters-values", default="1,5", help="guidance-budget: comma list of guidance iterations"
    )
    study.set_defaults(func=cmd_study)

    compare = subparsers.add_parser(
        "compare",
        help="compare two methods or two runs on the same layouts (paired bootstrap)",
        description="Compare B against A on the layouts and seeds both hold: each metric's difference "
        "with a 95% paired bootstrap interval over layouts, and whether it is beyond noise (the interval "
        "excludes 0). A and B are RUN:METHOD (or a RUN folder with one method), e.g. "
        "`saltdiff compare runs/table:sd runs/table:salt` or `saltdiff compare runs/old:salt runs/new:salt`.",
        formatter_class=HelpFormatter,
    )
    compare.add_argument("a", help="RUN:METHOD, the baseline")
    compare.add_argument("b", help="RUN:METHOD, compared against A")
    compare.add_argument(
        "--metrics",
        default=None,
        help="comma list (default: miou,map50,prompt_accuracy,extra_objects,background_accuracy,"
        "unboxed_recall; also text_alignment, extra_share, map50_95, ref_iou)",
    )
    compare.add_argument("--bootstrap", type=int, default=1000, help="resamples")
    compare.set_defaults(func=cmd_compare)


def _config(args, methods):
    from ..loading import default_guidance_scale
    from .bench import BenchConfig, parse_seeds
    from .methods import SharedSettings

    reference_params = given(args, "reference")
    if reference_params.get("image") is not None:
        raise CliError(
            "--reference IMG is one image for one layout; a benchmark builds a reference per layout"
        )
    check_applies(REFERENCE_BUILDERS, ["objects"], reference_params, "the reference builder(s)")
    shared = SharedSettings(
        guidance=given(args, "guidance"),
        loss_params=given(args, "loss"),
        init_params=given(args, "init"),
        reference_params=reference_params,
    )
    return BenchConfig(
        suite=args.suite,
        out=args.out,
        methods=methods,
        model=args.model,
        n=args.n,
        seeds=parse_seeds(args.seeds),
        steps=args.steps,
        cfg=default_guidance_scale(args.model) if args.cfg is None else args.cfg,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
        force=args.force,
        detector=args.detector,
        clip_model=args.clip_model,
        shared=shared,
        coco_annotations=args.coco_annotations,
        coco_captions=args.coco_captions,
        coco_min_area=args.coco_min_area,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
        grid_rows=args.grid_rows,
        **({} if args.bootstrap is None else {"bootstrap": args.bootstrap}),
        rescore=args.rescore,
    )


def _print_summary(metrics: dict | None, out: str) -> None:
    if metrics is None:  # a non-main process of a distributed run
        return
    from .report import metrics_table

    sys.stdout.write(metrics_table(metrics["methods"]) + "\n")
    sys.stderr.write(f"saltdiff: wrote {out}/metrics.json, results.csv, report.md\n")


def _require_eval_extra(command: str) -> None:
    missing = []
    for module in ("pycocotools", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CliError(
            f"saltdiff {command} needs the 'eval' extra ({', '.join(missing)}): pip install 'saltdiff[eval]'"
        )


def cmd_bench(args) -> int:
    _require_eval_extra("bench")
    from .bench import run_bench

    config = _config(args, parse_methods(args.methods))
    _print_summary(run_bench(config), args.out)
    return 0


def cmd_compare(args) -> int:
    _require_eval_extra("compare")
    from .intervals import COMPARE_METRICS, compare_table, method_records, paired_difference

    label_a, records_a = method_records(args.a)
    label_b, records_b = method_records(args.b)
    metrics = COMPARE_METRICS if args.metrics is None else [m for m in args.metrics.split(",") if m.strip()]
    if args.metrics is None:  # the default list, less what these records do not have (e.g. no unboxed layout)
        metrics = [m for m in metrics if m.startswith("map") or _has_metric(records_a, m)]
    result = paired_difference(records_a, records_b, metrics, n_boot=args.bootstrap)
    sys.stdout.write(compare_table(label_a, label_b, result) + "\n")
    return 0


def _has_metric(records, metric: str) -> bool:
    from .metrics import RATIO_METRICS

    return metric in RATIO_METRICS and any(RATIO_METRICS[metric](r) is not None for r in records)


def cmd_study(args) -> int:
    _require_eval_extra("study")
    from .studies import run_study

    study = STUDIES[args.name]
    values = parse_values(study, args.values)
    try:
        iters = tuple(int(t) for t in args.iters_values.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--iters-values takes integers, got {args.iters_values!r}") from None
    variants = study.variants(values, args.loss or study.default_loss, iters)
    config = _config(args, [v.spec for v in variants])
    metrics = run_study(args.name, config, values=values, loss=args.loss, iters=iters)
    _print_summary(metrics, args.out)
    if metrics is not None:
        sys.stderr.write(f"saltdiff: wrote {args.out}/study.md and study.png\n")
    return 0
