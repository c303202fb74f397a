"""``report.md`` of a run: the comparison table, plots (matplotlib) and image grids with boxes."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..fileio import atomic_write

COLUMNS = (
    ("miou", "mIoU", "{:.3f}"),
    ("map50", "mAP@0.5", "{:.3f}"),
    ("map50_95", "mAP@[.5:.95]", "{:.3f}"),
    ("text_alignment", "text align.", "{:.3f}"),
    ("background_accuracy", "bg acc.", "{:.3f}"),
    ("prompt_accuracy", "prompt acc.", "{:.3f}"),
    ("extra_objects", "extra obj.", "{:.3f}"),
    ("seed_diversity", "seed div.", "{:.3f}"),
    ("ref_iou", "ref IoU", "{:.3f}"),
    ("sec_per_image", "s / image", "{:.2f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("n_images", "images", "{}"),
)


def _fmt(value, pattern: str, ci=None) -> str:
    if value is None:
        return "–"
    text = pattern.format(value)
    if ci:
        text += " (" + pattern.format(ci[0]) + "–" + pattern.format(ci[1]) + ")"
    return text


def metrics_table(methods: dict[str, dict], columns=COLUMNS) -> str:
    """A markdown table: one row per method; a metric with a bootstrap interval shows it in brackets."""
    head = "| method | " + " | ".join(c[1] for c in columns) + " |"
    sep = "|---|" + "|".join("---:" for _ in columns) + "|"
    rows = [
        f"| {name} | "
        + " | ".join(_fmt(m.get(key), pat, m.get(f"{key}_ci")) for key, _, pat in columns)
        + " |"
        for name, m in methods.items()
    ]
    return "\n".join([head, sep, *rows])


#: Columns of the table split by "the prompt names an object without a box".
UNBOXED_COLUMNS = (
    ("miou", "mIoU", "{:.3f}"),
    ("map50", "mAP@0.5", "{:.3f}"),
    ("prompt_accuracy", "prompt acc.", "{:.3f}"),
    ("extra_objects", "extra obj.", "{:.3f}"),
    ("extra_share", "images with extras", "{:.3f}"),
    ("background_accuracy", "bg acc.", "{:.3f}"),
    ("n_images", "images", "{}"),
)


def by_unboxed_table(methods: dict[str, dict]) -> str:
    """One row per method and group (layouts that name an unboxed object or not), with intervals."""
    rows = {
        f"{name}, {'with' if key == 'yes' else 'no'} unboxed": group
        for name, m in methods.items()
        for key, group in m.get("by_unboxed", {}).items()
    }
    return metrics_table(rows, UNBOXED_COLUMNS)


def by_objects_table(methods: dict[str, dict], key: str = "miou") -> str:
    counts = sorted({int(k) for m in methods.values() for k in m.get("by_objects", {})})
    head = "| method | " + " | ".join(f"{c} obj." for c in counts) + " |"
    sep = "|---|" + "|".join("---:" for _ in counts) + "|"
    rows = []
    for name, m in methods.items():
        cells = [_fmt(m.get("by_objects", {}).get(str(c), {}).get(key), "{:.3f}") for c in counts]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """A matplotlib figure as a PNG at ``path``, written atomically."""
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def plot_by_method(methods: dict[str, dict], path: str) -> None:
    plt = _plt()
    names = list(methods)
    keys = [("miou", "mIoU"), ("map50", "mAP@0.5"), ("map50_95", "mAP@[.5:.95]"), ("text_alignment", "text")]
    x = np.arange(len(names))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 4))
    for i, (key, label) in enumerate(keys):
        vals = [methods[n].get(key) or 0.0 for n in names]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_by_objects(methods: dict[str, dict], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, [("miou", "mIoU"), ("map50", "mAP@0.5")]):
        for name, m in methods.items():
            groups = m.get("by_objects", {})
            counts = sorted(int(k) for k in groups)
            ax.plot(counts, [groups[str(c)].get(key) or 0.0 for c in counts], marker="o", label=name)
        ax.set_xlabel("boxed objects in the layout")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_losses(curves: dict[str, dict[str, list[float]]], path: str) -> None:
    """Mean layout energy per denoising step, and mean first-iteration guidance loss per guided step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        if c["layout"]:
            axes[0].plot(c["layout"], label=name)
        if c["guidance"]:
            axes[1].plot(c["guidance"], marker=".", label=name)
    axes[0].set_title("layout energy (Chen et al.) per step")
    axes[0].set_xlabel("denoising step")
    axes[1].set_title("guidance loss (first iteration) per guided step")
    axes[1].set_xlabel("guided step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _mean_curve(rows: list[list[float]]) -> list[float]:
    if not rows:
        return []
    length = max(len(r) for r in rows)
    out = []
    for i in range(length):
        vals = [r[i] for r in rows if len(r) > i]
        out.append(float(np.mean(vals)))
    return out


def loss_curves(out: str, layouts, seeds, methods) -> dict[str, dict[str, list[float]]]:
    from .runs import load_records

    curves = {}
    for m in methods:
        records = load_records(out, layouts, seeds, m.name)
        curves[m.name] = {
            "layout": _mean_curve([r.get("layout_losses") or [] for r in records]),
            "guidance": _mean_curve([[g[0] for g in r.get("guidance_losses") or [] if g] for r in records]),
        }
    return curves


def image_grids(out: str, layouts, seeds, methods, rows_per_grid: int = 8, max_grids: int = 4) -> list[str]:
    """PNG grids: one row per (layout, seed), one column per method (+ the first reference), boxes drawn."""
    from ..viz import draw_boxes, image_grid
    from .runs import image_path

    items = [(lay, seed) for lay in layouts for seed in seeds]
    ref_method = next((m for m in methods if m.uses_reference), None)
    paths = []
    for g in range(min(max_grids, (len(items) + rows_per_grid - 1) // rows_per_grid)):
        chunk = items[g * rows_per_grid : (g + 1) * rows_per_grid]
        rows, labels = [], []
        for lay, seed in chunk:
            layout = lay.layout
            row = []
            for m in methods:
                img = Image.open(image_path(out, m.name, lay.id, seed)).convert("RGB")
                scale = max(1, 128 // img.width)
                row.append(draw_boxes(img, layout, scale=scale, labels=False))
            if ref_method is not None:
                ref_file = image_path(out, ref_method.name, lay.id, seed, "_ref")
                if os.path.isfile(ref_file):
                    ref = Image.open(ref_file).convert("RGB")
                    row.append(draw_boxes(ref, layout, scale=max(1, 128 // ref.width), labels=False))
            rows.append(row)
            labels.append(f"{lay.id} s{seed}")
        cols = [m.name for m in methods] + (["reference"] if ref_method is not None else [])
        grid = image_grid(rows, row_labels=labels, col_labels=[c[:18] for c in cols])
        path = os.path.join(out, "grids", f"grid_{g:02d}.png")
        atomic_write(path, lambda fh, grid=grid: grid.save(fh, format="PNG"))
        paths.append(path)
    return paths


def _diversity_lines(per: dict[str, dict]) -> list[str]:
    if not any(m.get("seed_pairs") for m in per.values()):
        return [
            "Seed diversity: one seed per layout, no pairs to compare (run with `--seeds 2` or more).",
            "",
        ]
    rows = [
        f"| {name} | {_fmt(m.get('seed_diversity'), '{:.3f}')} | {_fmt(m.get('seed_diversity_image'), '{:.3f}')} "
        f"| {_fmt(m.get('identical_seed_pairs'), '{}')} | {m.get('seed_pairs', 0)} |"
        for name, m in per.items()
    ]
    return [
        "## Seed diversity",
        "",
        "Mean over every pair of seeds of a layout of the share of pixels whose colour differs visibly "
        "(CIELAB ΔE*76 > 8) between the two images, outside every box (where the layout pins nothing) "
        "and over the whole image; identical pairs differ by at most 1/255 everywhere.",
        "",
        "| method | outside boxes | whole image | identical pairs | pairs |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def write_report(config, metrics: dict, layouts: Sequence, methods: Sequence, descriptions: dict) -> str:
    """Write ``report.md`` with its plots and grids; returns its path."""
    out = config.out
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    per = metrics["methods"]
    plot_by_method(per, os.path.join(plots, "metrics_by_method.png"))
    plot_by_objects(per, os.path.join(plots, "by_object_count.png"))
    plot_losses(loss_curves(out, layouts, config.seeds, methods), os.path.join(plots, "losses.png"))
    grids = image_grids(out, layouts, config.seeds, methods, rows_per_grid=config.grid_rows)
    text_note = (
        "recall of every object the prompt mentions (boxed or not) among the detections"
        if metrics["text_alignment"] == "object_recall"
        else "CLIP score (100 × cosine of image and prompt embeddings)"
    )
    lines = [
        f"# {config.title or 'Benchmark'}: {metrics['suite']} suite, {metrics['model']}",
        "",
        f"{metrics['n_layouts']} layouts × seeds {metrics['seeds']}, {metrics['steps']} steps "
        f"({metrics.get('scheduler', 'ddim')}), CFG {metrics['cfg']}, detector `{metrics['detector']}`.",
        f"Text alignment: {text_note}. ref IoU: the detector on the reference image (spatial-aware init only).",
        (
            f"In brackets: 95 % bootstrap intervals over layouts ({metrics['bootstrap']} resamples)."
            if metrics.get("bootstrap")
            else "No intervals (--bootstrap 0)."
        ),
        "",
        metrics_table(per),
        "",
        "## mIoU by number of boxed objects",
        "",
        by_objects_table(per, "miou"),
        "",
        "## mAP@0.5 by number of boxed objects",
        "",
        by_objects_table(per, "map50"),
        "",
    ]
    unboxed = {n: m.get("unboxed_recall") for n, m in per.items() if m.get("unboxed_recall") is not None}
    if unboxed:
        lines += [
            "Recall of unboxed objects (prompts that name an object without a box): "
            + ", ".join(f"{n} {v:.3f}" for n, v in unboxed.items()),
            "",
        ]
    if any(len(m.get("by_unboxed", {})) > 1 for m in per.values()):
        lines += [
            "## Layouts that name an object without a box, and the others",
            "",
            by_unboxed_table(per),
            "",
        ]
    if any(m.get("prompt_accuracy") is not None for m in per.values()):
        lines += [
            "## Prompt accuracy by number of boxed objects",
            "",
            "Share of images that hold exactly what the prompt asks for: every boxed object found with its "
            "colour and shape at IoU ≥ 0.5 with its box (one-to-one), every unboxed object as often as "
            "named and not inside another phrase's box, the background the named one, and nothing else "
            "(bg acc.: over the prompts that name a background; extra obj.: detections per image that "
            "match nothing asked for).",
            "",
            by_objects_table(per, "prompt_accuracy"),
            "",
        ]
    lines += _diversity_lines(per)
    lines += [
        "## Plots",
        "",
        "![metrics by method](plots/metrics_by_method.png)",
        "",
        "![by object count](plots/by_object_count.png)",
        "",
        "![loss curves](plots/losses.png)",
        "",
        "## Images (columns: methods, then the reference; boxes drawn)",
        "",
        *[f"![grid]({os.path.relpath(p, out)})" for p in grids],
        "",
        "## Methods",
        "",
        "```json",
        json.dumps(descriptions, indent=1),
        "```",
        "",
    ]
    path = os.path.join(out, "report.md")
    atomic_write(path, "\n".join(lines))
    return path
