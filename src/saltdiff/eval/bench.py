"""The benchmark runner: layouts × seeds × methods → images, per-image records, metrics and a report.

Layout of a run folder ``OUT``::

    config.json                    what was run (checked when a run is resumed)
    images/METHOD/ID_sSEED.png     every generated image (and ID_sSEED_ref.png, its reference)
    records/METHOD/ID_sSEED.json   one record per image: detections, IoUs, text alignment, background
                                   and whole-prompt fidelity (shapes world), time, losses
    metrics.json                   aggregated metrics (schema in :func:`aggregate`)
    results.csv                    one row per image × method
    report.md, plots/, grids/      the comparison table, plots and image grids

Each image and then its record are written atomically (:func:`saltdiff.fileio.atomic_write`:
temporary file + ``os.replace``); a record is the proof that an image is done, so a rerun after a
crash or ``kill -9`` skips finished images and the final metrics equal those of an uninterrupted
run. A record that does not parse (damaged by a disk error or an older saltdiff) is redone, with one
warning line.

Distributed: under ``accelerate launch`` every process takes layouts ``rank, rank + world, …``
(:func:`~saltdiff.eval.suites.split_for_process`), writes its own records, and the main process
aggregates after a barrier.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import __version__
from ..fileio import atomic_write
from ..registry import SCHEDULERS
from ..samplers import config_family
from .detectors import DetectedBox, make_detector, resolve_detector_name
from .fidelity import prompt_fields, seed_pairs, summarize_seed_pairs
from .intervals import N_BOOTSTRAP, metric_intervals
from .methods import MethodSpec, SharedSettings, build_request, describe, for_pipeline
from .metrics import (
    ClipScorer,
    box_ious,
    object_recall,
    peak_memory_mb,
    reset_peak_memory,
    summarize,
    summarize_by_objects,
    summarize_by_unboxed,
)
from .runs import (
    clean_temporaries,
    finished_record,
    image_path,
    jsonable,
    load_records,
    png_bytes,
    read_json,
    record_path,
)
from .suites import EvalLayout, load_suite, split_for_process, suite_fingerprint

logger = logging.getLogger(__name__)

#: Keys of config.json that must match for a folder to be resumed.
RESUME_KEYS = (
    "suite",
    "suite_fingerprint",
    "model",
    "steps",
    "cfg",
    "scheduler",
    "height",
    "width",
    "detector",
    "text_alignment",
    "dtype",
)
#: Values a config.json written before a key existed is read with.
RESUME_DEFAULTS = {"scheduler": "ddim"}
# (no default for "suite_fingerprint": a folder written before built-in suites had splits holds other
# layouts under the name "shapes", and is refused rather than mixed in)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (the CLI maps onto these fields)."""

    suite: str
    out: str
    methods: Sequence[MethodSpec]
    model: str = "builtin:shapes"
    n: int | None = None
    seeds: Sequence[int] = (0,)
    steps: int = 50
    cfg: float = 7.5
    scheduler: str | None = None  # None: the model's own family's sampler (ddim; SD3: flow-euler)
    height: int | None = None
    width: int | None = None
    force: bool = False
    detector: str = "auto"
    clip_model: str = "auto"
    shared: SharedSettings = field(default_factory=SharedSettings)
    coco_annotations: str | None = None
    coco_captions: str | None = None
    coco_min_area: float = 0.02
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    grid_rows: int = 8
    title: str | None = None
    bootstrap: int = N_BOOTSTRAP
    rescore: bool = False

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("no methods to run")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg!r}")
        if self.scheduler is not None:
            SCHEDULERS.get(self.scheduler)
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n!r}")
        seeds = list(self.seeds)
        if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
        if not self.out:
            raise ValueError("an output folder is required (--out runs/NAME)")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ValueError(
                f"bootstrap must be a number of resamples >= 0 (0: no intervals), got {self.bootstrap!r}"
            )
        self.shared.check_applies(self.methods)


def parse_seeds(text: str | int) -> list[int]:
    """``"3"`` → seeds 0, 1, 2; ``"0,7,42"`` → those seeds."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(t) for t in text.split(",") if t.strip()]
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            seeds = list(range(count))
    except ValueError:
        raise ValueError(
            f"--seeds takes a count (3 → 0,1,2) or a comma list (0,7,42), got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


# -- distributed state ----------------------------------------------------------------------------------
def _process_state(device: str | None = None):
    """``(rank, world_size, is_main, barrier, device)``; a single process without a launcher's env.

    Processes on CPU (no CUDA, or ``--device cpu``) use accelerate's MULTI_CPU mode (gloo), so
    ``accelerate launch --multi_gpu --num_processes 2`` or ``torchrun`` work on a CPU-only machine.
    """
    import torch

    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return 0, 1, True, (lambda: None), None
    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=datetime.timedelta(hours=12))
    device = None
    if state.num_processes > 1:
        device = "cpu" if state.device.type == "cpu" else str(state.device)
    return state.process_index, state.num_processes, state.is_main_process, state.wait_for_everyone, device


# -- the run --------------------------------------------------------------------------------------------
def _check_layouts(pipe, layouts: Sequence[EvalLayout], detector: str) -> None:
    for lay in layouts:
        try:
            lay.layout.resolve_tokens(pipe.tokenizer, lay.prompt)
        except ValueError as exc:
            raise ValueError(f"layout {lay.id!r} does not fit this model's tokenizer: {exc}") from exc
    if detector == "shapes":
        from ..worlds.shapes import BACKGROUNDS

        for lay in layouts:
            if lay.background is not None and lay.background not in BACKGROUNDS:
                raise ValueError(
                    f"layout {lay.id!r} names background {lay.background!r}, which the shapes detector "
                    f"cannot classify; expected one of {BACKGROUNDS}"
                )


def _run_config(
    config: BenchConfig, layouts, detector: str, text_alignment: str, dtype: str, methods: dict
) -> dict:
    return {
        "saltdiff_version": __version__,
        "suite": config.suite,
        "suite_fingerprint": suite_fingerprint(layouts),
        "model": config.model,
        "steps": config.steps,
        "cfg": config.cfg,
        "scheduler": config.scheduler,
        "height": config.height,
        "width": config.width,
        "detector": detector,
        "text_alignment": text_alignment,
        "dtype": dtype,
        "n": config.n,
        "seeds": list(config.seeds),
        "methods": methods,
    }


def _check_resume(out: str, current: dict) -> None:
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return
    previous = read_json(path, "run config")
    for key in RESUME_KEYS:
        if previous.get(key, RESUME_DEFAULTS.get(key)) != current.get(key):
            raise ValueError(
                f"{out!r} holds a run with {key}={previous.get(key)!r}, this one has {current.get(key)!r}: "
                "use another --out (or delete the folder)"
            )
    for name, desc in current["methods"].items():
        old = previous.get("methods", {}).get(name)
        if old is not None and jsonable(old) != jsonable(desc):
            raise ValueError(
                f"{out!r} holds results of method {name!r} with other settings: use another --out "
                "(or delete its records)"
            )


def _round(values):
    if isinstance(values, list):
        return [_round(v) for v in values]
    return round(float(values), 6)


def evaluate_image(
    image,
    lay: EvalLayout,
    detector,
    *,
    text_kind: str,
    clip: Callable | None = None,
) -> dict[str, Any]:
    """Detections, per-box IoU, text alignment, background and whole-prompt fidelity of one image
    (the metric part of a record; the last two only with the shapes detector, see :mod:`.fidelity`)."""
    phrases = lay.mentioned
    dets = detector(image, phrases)
    ious = box_ious(list(lay.boxes), dets)
    found, total = object_recall(phrases, dets)
    unboxed_found, _ = object_recall(list(lay.unboxed), dets) if lay.unboxed else (0, 0)
    if text_kind == "object_recall":
        text = found / total if total else None
    else:
        text = clip(image, lay.prompt)
    return {
        "detections": [d.to_dict() for d in dets],
        "box_ious": _round(ious),
        "iou": _round(sum(ious) / len(ious)) if ious else None,
        "text_alignment": text,
        "text_found": found,
        "text_total": total,
        "unboxed_found": unboxed_found,
        **prompt_fields(image, lay, dets, shapes=getattr(detector, "name", None) == "shapes"),
    }


def generate_record(
    pipe, spec: MethodSpec, shared: SharedSettings, lay: EvalLayout, seed: int, config: BenchConfig, ctx
) -> tuple[dict, Any]:
    """Generate one image with method ``spec`` and score it: ``(record, SaltOutput)``."""
    request = build_request(
        spec,
        shared,
        flow=config_family(pipe.scheduler.config) == "flow",
        prompt=lay.prompt,
        layout=lay.layout,
        seed=seed,
        num_inference_steps=config.steps,
        guidance_scale=config.cfg,
        scheduler=config.scheduler,
        height=config.height,
        width=config.width,
    )
    request = request.resolved(pipe.scheduler)  # as the method's description records it
    reset_peak_memory(ctx["device"])
    start = time.perf_counter()
    result = request.run(pipe, progress=False)
    if str(ctx["device"]).startswith("cuda"):
        import torch

        torch.cuda.synchronize(ctx["device"])
    seconds = time.perf_counter() - start
    peak = peak_memory_mb(ctx["device"])
    image = result.images[0]
    record: dict[str, Any] = {
        "method": spec.name,
        "layout_id": lay.id,
        "seed": seed,
        "prompt": lay.prompt,
        "boxes": [{"phrase": p, "box": list(b)} for p, b in lay.boxes],
        "unboxed": list(lay.unboxed),
        "n_objects": lay.n_objects,
        "width": image.width,
        "height": image.height,
        "text_alignment_kind": ctx["text_kind"],
        **evaluate_image(image, lay, ctx["detector"], text_kind=ctx["text_kind"], clip=ctx["clip"]),
        "ref_detections": None,
        "ref_box_ious": None,
        "ref_iou": None,
        "seconds": round(seconds, 4),
        "peak_mem_mb": round(peak, 1),
        "layout_losses": _round(list(result.layout_losses)),
        "guidance_losses": _round([list(x) for x in result.guidance_losses]),
        "image": os.path.relpath(image_path(config.out, spec.name, lay.id, seed), config.out),
        "reference": None,
        "method_config": ctx["descriptions"][spec.name],
    }
    if result.reference_image is not None:
        ref = result.reference_image
        ref_dets = ctx["detector"](ref, lay.mentioned)
        ref_ious = box_ious(list(lay.boxes), ref_dets)
        record["ref_detections"] = [d.to_dict() for d in ref_dets]
        record["ref_box_ious"] = _round(ref_ious)
        record["ref_iou"] = _round(sum(ref_ious) / len(ref_ious)) if ref_ious else None
        record["reference"] = os.path.relpath(
            image_path(config.out, spec.name, lay.id, seed, "_ref"), config.out
        )
    return record, result


def _rescore(path: str, out: str, lay: EvalLayout, ctx) -> None:
    """Score a finished image again with the current detector and metric definitions (the record's
    generation fields, its time and losses, stay as they were)."""
    from PIL import Image

    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    with Image.open(os.path.join(out, record["image"])) as img:
        image = img.convert("RGB")
    record.update(evaluate_image(image, lay, ctx["detector"], text_kind=ctx["text_kind"], clip=ctx["clip"]))
    if record.get("reference"):
        with Image.open(os.path.join(out, record["reference"])) as img:
            ref_ious = box_ious(list(lay.boxes), ctx["detector"](img.convert("RGB"), lay.mentioned))
        record["ref_box_ious"] = _round(ref_ious)
        record["ref_iou"] = _round(sum(ref_ious) / len(ref_ious)) if ref_ious else None
    atomic_write(path, json.dumps(record))


def run_bench(config: BenchConfig, pipe=None) -> dict | None:
    """Run (or resume) a benchmark; returns the aggregated metrics on the main process, else ``None``.

    ``pipe``: an already loaded ``SaltPipeline`` (``config.model`` is then only a label).
    """
    rank, world, is_main, barrier, dist_device = _process_state(config.device)
    layouts = load_suite(
        config.suite,
        config.n,
        coco_annotations=config.coco_annotations,
        coco_captions=config.coco_captions,
        coco_min_area=config.coco_min_area,
    )
    ids = [lay.id for lay in layouts]
    if len(set(ids)) != len(ids):
        raise ValueError("layout ids must be unique within a suite")
    detector_name = resolve_detector_name(config.detector, suite=config.suite, model=config.model)
    if config.clip_model == "auto":
        text_kind = "object_recall" if detector_name == "shapes" else "clip_score"
        clip_model = None if detector_name == "shapes" else DEFAULT_CLIP_MODEL
    elif config.clip_model == "none":
        text_kind, clip_model = "object_recall", None
    else:
        text_kind, clip_model = "clip_score", config.clip_model
    out = config.out
    shared = config.shared
    if not shared.reference_params.get("cache_dir"):
        # A per-run (per-process) object cache: self-contained runs, no two writers on one file.
        sub = "object_cache" if world == 1 else os.path.join("object_cache", f"rank{rank}")
        cache_dir = os.path.join(os.path.abspath(out), sub)
        shared = replace(shared, reference_params={**shared.reference_params, "cache_dir": cache_dir})
    specs = list(config.methods)
    if pipe is None:
        from ..loading import load_pipeline

        pipe = load_pipeline(
            config.model, device=config.device, dtype=config.dtype, fallback_device=dist_device
        )
    from ..loading import check_image_size, denoiser

    check_image_size(pipe, config.height, config.width, force=config.force)
    scheduler, shared = for_pipeline(
        specs, shared, pipe, scheduler=config.scheduler, steps=config.steps, guidance_scale=config.cfg
    )
    config = replace(config, scheduler=scheduler)
    sampling = {"num_inference_steps": config.steps, "scheduler": config.scheduler}
    descriptions = {spec.name: describe(spec, shared, pipe.scheduler, **sampling) for spec in specs}
    device = str(pipe.device)
    dtype = str(denoiser(pipe).dtype).replace("torch.", "")
    pipe.set_progress_bar_config(disable=True)
    _check_layouts(pipe, layouts, detector_name)
    run_config = _run_config(config, layouts, detector_name, text_kind, dtype, descriptions)
    if is_main:
        os.makedirs(out, exist_ok=True)
        _check_resume(out, run_config)
        clean_temporaries(out)
        if os.path.isfile(os.path.join(out, "config.json")):
            previous = read_json(os.path.join(out, "config.json"), "run config")
            run_config["methods"] = {**previous.get("methods", {}), **run_config["methods"]}
        atomic_write(os.path.join(out, "config.json"), json.dumps(run_config, indent=2))
    barrier()
    if not is_main:
        _check_resume(out, run_config)

    ctx = {
        "device": device,
        "detector": make_detector(detector_name, device=device),
        "text_kind": text_kind,
        "clip": ClipScorer(clip_model, device=device) if clip_model else None,
        "descriptions": descriptions,
    }
    mine = split_for_process(layouts, rank, world)
    todo = [(lay, seed, m) for lay in mine for seed in config.seeds for m in specs]
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(todo),
        desc="bench" if world == 1 else f"bench (process {rank + 1}/{world})",
        unit="img",
        disable=not (config.progress and is_main),
    )
    done = 0
    with bar:
        for lay, seed, method in todo:
            path = record_path(out, method.name, lay.id, seed)
            if finished_record(path):
                if config.rescore:
                    _rescore(path, out, lay, ctx)
                bar.update()
                continue
            try:
                record, result = generate_record(pipe, method, shared, lay, seed, config, ctx)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"method {method.name!r}, layout {lay.id!r}, seed {seed}: {exc}") from exc
            atomic_write(image_path(out, method.name, lay.id, seed), png_bytes(result.images[0]))
            if result.reference_image is not None:
                atomic_write(
                    image_path(out, method.name, lay.id, seed, "_ref"), png_bytes(result.reference_image)
                )
            atomic_write(path, json.dumps(record))
            done += 1
            bar.update()
            bar.set_postfix(method=method.name, iou=record["iou"])
    logger.info("process %d/%d generated %d images (%d already done)", rank, world, done, len(todo) - done)
    barrier()
    if not is_main:
        return None
    metrics = aggregate(config, layouts, specs, detector_name, text_kind)
    from .report import write_report

    write_report(config, metrics, layouts, specs, descriptions)
    return metrics


def aggregate(
    config: BenchConfig, layouts, methods: Sequence[MethodSpec], detector: str, text_kind: str
) -> dict:
    """Write ``metrics.json`` and ``results.csv`` from the records and images; returns the metrics.

    ``metrics.json``: ``{"suite", "model", "n_layouts", "seeds", "methods": {NAME: {"miou", "map50",
    "map50_95", "text_alignment", "ref_iou", "sec_per_image", "peak_mem_mb", "n_images",
    "text_alignment_kind", "unboxed_recall", "background_accuracy", "prompt_accuracy",
    "seed_diversity", "seed_diversity_image", "identical_seed_pairs", "seed_pairs", "extra_objects",
    "extra_share", "final_layout_loss", "<metric>_ci": [low, high], "by_objects": {"1": {...}, ...},
    "by_unboxed": {"no": {...}, "yes": {...}}}}, "steps", "cfg", "detector", "text_alignment",
    "bootstrap"}``. Seed diversity compares the saved images of every pair of seeds of a layout
    (:mod:`.fidelity`); it is ``None`` with one seed. ``<metric>_ci``: 95 % bootstrap interval over
    layouts (``config.bootstrap`` resamples; none with 0), also inside each ``by_unboxed`` group.
    """
    out = config.out
    per_method: dict[str, Any] = {}
    rows = []
    n_objects = {lay.id: lay.n_objects for lay in layouts}
    has_unboxed = {lay.id: "yes" if lay.unboxed else "no" for lay in layouts}

    def intervals(records, pairs):
        if not config.bootstrap:
            return {}
        return metric_intervals(records, pairs=pairs, n_boot=config.bootstrap)

    for method in methods:
        records = load_records(out, layouts, config.seeds, method.name)
        pairs = seed_pairs(out, layouts, config.seeds, method.name)
        summary = summarize(records)
        summary.update(summarize_seed_pairs([p for ps in pairs.values() for p in ps]))
        summary.update(intervals(records, pairs))
        summary["by_objects"] = summarize_by_objects(records)
        for count, group in summary["by_objects"].items():
            group.update(
                summarize_seed_pairs([p for i, ps in pairs.items() if str(n_objects[i]) == count for p in ps])
            )
        summary["by_unboxed"] = summarize_by_unboxed(records)
        for key, group in summary["by_unboxed"].items():
            mine = {i: ps for i, ps in pairs.items() if has_unboxed[i] == key}
            group.update(summarize_seed_pairs([p for ps in mine.values() for p in ps]))
            group.update(intervals([r for r in records if has_unboxed[r["layout_id"]] == key], mine))
        per_method[method.name] = summary
        for r in records:
            rows.append(
                {
                    "method": r["method"],
                    "layout_id": r["layout_id"],
                    "seed": r["seed"],
                    "n_objects": r["n_objects"],
                    "prompt": r["prompt"],
                    "iou": r["iou"],
                    "box_ious": ";".join(f"{v:.4f}" for v in r["box_ious"]),
                    "text_alignment": r["text_alignment"],
                    "ref_iou": r["ref_iou"],
                    "background_named": r.get("background_named"),
                    "background_found": r.get("background_found"),
                    "background_ok": r.get("background_ok"),
                    "prompt_ok": r.get("prompt_ok"),
                    "extra_objects": r.get("extra_objects"),
                    "seconds": r["seconds"],
                    "peak_mem_mb": r["peak_mem_mb"],
                    "image": r["image"],
                }
            )
    metrics = {
        "suite": config.suite,
        "model": config.model,
        "n_layouts": len(layouts),
        "seeds": list(config.seeds),
        "methods": per_method,
        "steps": config.steps,
        "cfg": config.cfg,
        "scheduler": config.scheduler,
        "detector": detector,
        "text_alignment": text_kind,
        "bootstrap": config.bootstrap,
    }
    atomic_write(os.path.join(out, "metrics.json"), json.dumps(_nan_to_none(metrics), indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(out, "results.csv"), buf.getvalue())
    return _nan_to_none(metrics)


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


__all__ = [
    "BenchConfig",
    "DetectedBox",
    "aggregate",
    "atomic_write",
    "evaluate_image",
    "parse_seeds",
    "run_bench",
]
