"""Bootstrap intervals over layouts, and paired comparisons of two methods or two runs.

A benchmark's images are not independent: the seeds of one layout share its boxes and prompt, so
the unit that is resampled is the **layout** (all its images come along). Each headline metric is a
ratio of per-layout sums (``miou``: sum of box IoUs / number of boxes, ``prompt_accuracy``: images
right / images, …; :data:`saltdiff.eval.metrics.RATIO_METRICS`), so one resample is a weighted sum;
mAP is re-accumulated by pycocotools over the resampled images
(:func:`saltdiff.eval.metrics.coco_map_resampled`).

* :func:`metric_intervals`: 95 % percentile intervals, ``{"<metric>_ci": [low, high]}``.
* :func:`paired_difference`: the difference of a metric between two sets of records on the **same**
  layouts (two methods of one run, or one method in two runs), with the same resamples for both, so
  what the layouts have in common cancels out; the difference is *beyond noise* when its interval
  excludes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Resamples per interval, and the interval's coverage.
N_BOOTSTRAP = 1000
CONFIDENCE = 0.95
#: Fixed seed of the resamples: the same run gives the same intervals.
BOOTSTRAP_SEED = 0


def resample_layouts(n_layouts: int, n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``(n_boot, n_layouts)`` indices of layouts drawn with replacement."""
    if n_boot < 1:
        raise ValueError(f"the bootstrap needs at least one resample, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_layouts, size=(n_boot, n_layouts))


def percentile_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> list[float] | None:
    """``[low, high]``: the central ``confidence`` share of the resampled values (``None`` if none is finite)."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not len(values):
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [round(float(low), 6), round(float(high), 6)]


def group_by_layout(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records keyed by layout id, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["layout_id"], []).append(r)
    return groups


def _layout_sums(groups: Sequence[list[dict]], ratio: Callable[[dict], tuple[float, float] | None]):
    """Per-layout ``(numerators, denominators)`` of one ratio metric."""
    num = np.zeros(len(groups))
    den = np.zeros(len(groups))
    for i, group in enumerate(groups):
        for r in group:
            part = ratio(r)
            if part is not None:
                num[i] += part[0]
                den[i] += part[1]
    return num, den


def _resampled_ratio(num: np.ndarray, den: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """The ratio of sums in each resample (NaN where the resample has no denominator)."""
    weights = np.stack([np.bincount(row, minlength=len(num)) for row in picks]).astype(np.float64)
    top, bottom = weights @ num, weights @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)


def resampled_metrics(
    records: Sequence[dict],
    picks: np.ndarray,
    layout_ids: Sequence[str],
    *,
    pairs: dict[str, list[dict]] | None = None,
    with_map: bool = True,
) -> dict[str, np.ndarray]:
    """Every headline metric of ``records`` in each resample ``picks`` (rows of indices into ``layout_ids``)."""
    from .metrics import RATIO_METRICS, coco_map_resampled, map_image

    groups_by_id = group_by_layout(records)
    groups = [groups_by_id.get(i, []) for i in layout_ids]
    out: dict[str, np.ndarray] = {}
    for name, ratio in RATIO_METRICS.items():
        num, den = _layout_sums(groups, ratio)
        if den.sum() > 0:
            out[name] = _resampled_ratio(num, den, picks)
    if pairs is not None:
        num = np.array(
            [sum(p["outside"] for p in pairs.get(i, []) if p["outside"] is not None) for i in layout_ids]
        )
        den = np.array([sum(p["outside"] is not None for p in pairs.get(i, [])) for i in layout_ids], float)
        if den.sum() > 0:
            out["seed_diversity"] = _resampled_ratio(num, den, picks)
    if with_map and records:
        images = [map_image(r) for group in groups for r in group]
        start = np.cumsum([0] + [len(g) for g in groups])
        image_picks = [[j for i in row for j in range(start[i], start[i + 1])] for row in picks]
        maps = coco_map_resampled(images, image_picks)
        out["map50"] = np.asarray(maps["map50"])
        out["map50_95"] = np.asarray(maps["map50_95"])
    return out


def metric_intervals(
    records: Sequence[dict],
    *,
    pairs: dict[str, list[dict]] | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, list[float] | None]:
    """``{"<metric>_ci": [low, high]}`` for every headline metric of one method's records (module docstring).

    ``pairs``: seed-pair statistics per layout id (:func:`saltdiff.eval.fidelity.seed_pairs`), for
    ``seed_diversity_ci``.
    """
    if not records:
        return {}
    layout_ids = list(group_by_layout(records))
    picks = resample_layouts(len(layout_ids), n_boot, seed)
    resampled = resampled_metrics(records, picks, layout_ids, pairs=pairs)
    return {f"{name}_ci": percentile_interval(values, confidence) for name, values in resampled.items()}


def paired_difference(
    records_a: Sequence[dict],
    records_b: Sequence[dict],
    metrics: Sequence[str],
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, dict[str, Any]]:
    """Per metric, ``B - A`` on the layouts and seeds both hold, with its paired bootstrap interval.

    Returns ``{metric: {"a", "b", "difference", "ci": [low, high], "beyond_noise": bool,
    "n_layouts"}}``; ``beyond_noise``: the interval excludes 0.
    """
    key = lambda r: (r["layout_id"], r["seed"])  # noqa: E731
    common = {key(r) for r in records_a} & {key(r) for r in records_b}
    if not common:
        raise ValueError("the two sets of records share no (layout, seed): compare runs of the same suite")
    a = [r for r in records_a if key(r) in common]
    b = [r for r in records_b if key(r) in common]
    layout_ids = sorted({lid for lid, _ in common})
    picks = resample_layouts(len(layout_ids), n_boot, seed)
    everything = np.arange(len(layout_ids))[None, :]
    with_map = any(m.startswith("map") for m in metrics)
    point_a = resampled_metrics(a, everything, layout_ids, with_map=with_map)
    point_b = resampled_metrics(b, everything, layout_ids, with_map=with_map)
    boot_a = resampled_metrics(a, picks, layout_ids, with_map=with_map)
    boot_b = resampled_metrics(b, picks, layout_ids, with_map=with_map)
    out = {}
    for metric in metrics:
        if metric not in point_a or metric not in point_b:
            known = sorted(set(point_a) & set(point_b))
            raise ValueError(f"metric {metric!r} is not in both sets of records; they have {known}")
        ci = percentile_interval(boot_b[metric] - boot_a[metric], confidence)
        va, vb = float(point_a[metric][0]), float(point_b[metric][0])
        out[metric] = {
            "a": round(va, 6),
            "b": round(vb, 6),
            "difference": round(vb - va, 6),
            "ci": ci,
            "beyond_noise": ci is not None and (ci[0] > 0 or ci[1] < 0),
            "n_layouts": len(layout_ids),
        }
    return out


#: Metrics :func:`compare_runs` reports unless told otherwise.
COMPARE_METRICS = (
    "miou",
    "map50",
    "prompt_accuracy",
    "extra_objects",
    "background_accuracy",
    "unboxed_recall",
)


def method_records(spec: str) -> tuple[str, list[dict]]:
    """``RUN:METHOD`` (or ``RUN`` holding one method) → ``(label, records)`` read from the run folder."""
    import glob
    import json
    import os

    run, _, method = spec.rpartition(":") if ":" in spec and not os.path.isdir(spec) else (spec, "", "")
    folder = os.path.join(run, "records")
    if not os.path.isdir(folder):
        raise ValueError(f"{run!r} is not a bench run folder (no records/ inside)")
    methods = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not method:
        if len(methods) != 1:
            raise ValueError(f"{run!r} holds methods {methods}: name one as {run}:METHOD")
        method = methods[0]
    if method not in methods:
        raise ValueError(f"{run!r} holds no method {method!r}; it holds {methods}")
    records = []
    for path in sorted(glob.glob(os.path.join(folder, method, "*.json"))):
        try:
            with open(path, encoding="utf-8") as fh:
                records.append(json.load(fh))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read record {path}: {exc}") from exc
    return f"{run}:{method}", records


def compare_table(label_a: str, label_b: str, result: dict[str, dict[str, Any]]) -> str:
    """A markdown table of :func:`paired_difference`'s result."""
    n = next(iter(result.values()))["n_layouts"] if result else 0
    lines = [
        f"A = {label_a}, B = {label_b}: {n} layouts in common, paired bootstrap over layouts (95 %).",
        "",
        "| metric | A | B | B − A | 95 % interval | beyond noise |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for metric, r in result.items():
        ci = "–" if r["ci"] is None else f"{r['ci'][0]:+.3f} … {r['ci'][1]:+.3f}"
        lines.append(
            f"| {metric} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} | {ci} | "
            f"{'yes' if r['beyond_noise'] else 'no'} |"
        )
    return "\n".join(lines)
