"""Ablation studies: each is a list of named method variants run by the bench runner, plus a plot.

=================== ======================================================================
name                variants (x axis)
=================== ======================================================================
spatial-awareness   *unguided* sampling from z_T* vs inversion steps (1, 2, 5, 10, 25, 50),
                    against random init: does the inverted latent alone carry the layout?
inversion-steps     the same sweep with guidance (``--loss``, default salt) vs random init
background          reference background: generated, prompt-color, gray, noise, white (guided)
guidance-budget     guidance steps × iterations, random vs spatial-aware init (does the
                    better start need fewer?)
reg-weight          SALT loss regularization weight (0, 0.25, 0.5, 1, 2)
sde-inversion       DDIM (ODE, noise 0) vs SDE-style inversion (``inversion_noise_scale`` > 0)
noise-outside       fresh noise outside the kept region of z_T* (0 … 1), against ``sd`` and the
                    same loss from random noise: background, unboxed objects, seed diversity
noise-inside        fresh noise inside the kept region (object variants per seed)
feather             feathering of the kept region (latent cells)
keep-region         z_T* kept in the whole boxes or only on the pasted objects' pixels
inversion-method    flow models: reverse Euler vs midpoint inversion at the same depth
outside-prompt      outside the boxes, the prompt without its boxed phrases for the first N steps
step-size           the guided update's step size, against the same loss from random noise
layers              the attention layers the guidance loss reads (a ``+`` joins selectors into
                    one variant: ``up+mid``; SD3: ``transformer_blocks.0``, ...), against ``sd``
                    and the same loss from random noise on the default layers
=================== ======================================================================

Every study writes the bench outputs (records, metrics.json, report.md) plus ``study.md`` and
``study.png`` (mIoU and mAP@0.5 against the swept value) in its output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..fileio import atomic_write
from .methods import MethodSpec

if TYPE_CHECKING:  # pragma: no cover
    from .bench import BenchConfig


@dataclass(frozen=True)
class Variant:
    spec: MethodSpec
    series: str
    x: float | str | None  # None: a baseline drawn as a horizontal line


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    x_label: str
    default_values: tuple
    value_type: type
    default_loss: str

    def variants(self, values: Sequence, loss: str, iters: Sequence[int] = (1, 5)) -> list[Variant]:
        return _VARIANTS[self.name](self, values, loss, iters)


def _spatial(study, values, loss, iters):
    base_loss = "none" if study.name == "spatial-awareness" else loss
    tag = "" if base_loss == "none" else f"+{base_loss}"
    out = [Variant(MethodSpec(f"random{tag}", "random", base_loss), "random init", None)]
    for k in values:
        spec = MethodSpec(f"inv={k}{tag}", "salt", base_loss, init_params={"inversion_steps": int(k)})
        out.append(Variant(spec, "spatial-aware init", int(k)))
    return out


def _background(study, values, loss, iters):
    out = [Variant(MethodSpec(f"random+{loss}", "random", loss), "random init", None)]
    for v in values:
        out.append(
            Variant(
                MethodSpec(f"bg={v}", "salt", loss, reference_params={"background": v}),
                "spatial-aware init",
                v,
            )
        )
    return out


def _budget(study, values, loss, iters):
    out = []
    for init in ("random", "salt"):
        for it in iters:
            for steps in values:
                spec = MethodSpec(
                    f"{init}-gs{steps}-gi{it}",
                    init,
                    loss,
                    guidance={"guidance_steps": int(steps), "guidance_iters": int(it)},
                )
                label = "random init" if init == "random" else "spatial-aware init"
                out.append(Variant(spec, f"{label}, {it} iters", int(steps)))
    return out


def _reg(study, values, loss, iters):
    return [
        Variant(
            MethodSpec(f"reg={v:g}", "salt", "salt", loss_params={"reg_weight": float(v)}), "salt", float(v)
        )
        for v in values
    ]


def _sde(study, values, loss, iters):
    out = []
    for v in values:
        spec = MethodSpec(f"noise={v:g}", "salt", loss, init_params={"inversion_noise_scale": float(v)})
        out.append(Variant(spec, "spatial-aware init", float(v)))
    return out


def _init_sweep(param: str, cast):
    """Spatial-aware init with one initializer param swept, against plain sampling (``sd``) and the
    same guidance from random noise: the fidelity studies (background, unboxed objects, seeds)."""

    def variants(study, values, loss, iters):
        out = [
            Variant(MethodSpec("sd", "random", "none"), "random init, no guidance", None),
            Variant(MethodSpec(f"random+{loss}", "random", loss), "random init", None),
        ]
        for v in values:
            label = f"{v:g}" if isinstance(v, float) else str(v)
            spec = MethodSpec(f"{param}={label}", "salt", loss, init_params={param: cast(v)})
            out.append(Variant(spec, "spatial-aware init", cast(v)))
        return out

    return variants


def _guidance_sweep(param: str, cast):
    """Spatial-aware init with one guidance knob swept, against ``sd`` and the same loss from random
    noise, plus random noise with the sweep's largest value (does the knob need the better start?)."""

    def variants(study, values, loss, iters):
        top = max(cast(v) for v in values)
        out = [
            Variant(MethodSpec("sd", "random", "none"), "random init, no guidance", None),
            Variant(MethodSpec(f"random+{loss}", "random", loss), "random init", None),
            Variant(
                MethodSpec(f"random+{loss}+{param}={top:g}", "random", loss, guidance={param: top}),
                f"random init, {param}={top:g}",
                None,
            ),
        ]
        for v in values:
            spec = MethodSpec(f"{param}={cast(v):g}", "salt", loss, guidance={param: cast(v)})
            out.append(Variant(spec, "spatial-aware init", cast(v)))
        return out

    return variants


def _layers(study, values, loss, iters):
    out = [
        Variant(MethodSpec("sd", "random", "none"), "random init, no guidance", None),
        Variant(MethodSpec(f"random+{loss}", "random", loss), "random init", None),
    ]
    for v in values:
        spec = MethodSpec(f"layers={v}", "salt", loss, guidance={"layers": str(v).replace("+", ",")})
        out.append(Variant(spec, "spatial-aware init", v))
    return out


_VARIANTS = {
    "layers": _layers,
    "outside-prompt": _guidance_sweep("outside_prompt_steps", int),
    "step-size": _guidance_sweep("step_size", float),
    "noise-outside": _init_sweep("noise_outside", float),
    "noise-inside": _init_sweep("noise_inside", float),
    "feather": _init_sweep("feather", float),
    "keep-region": _init_sweep("keep_region", str),
    "inversion-method": _init_sweep("inversion_method", str),
    "spatial-awareness": _spatial,
    "inversion-steps": _spatial,
    "background": _background,
    "guidance-budget": _budget,
    "reg-weight": _reg,
    "sde-inversion": _sde,
}

STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study(
            "spatial-awareness",
            "unguided sampling from the inverted reference vs inversion steps, against random noise",
            "inversion steps",
            (1, 2, 5, 10, 25, 50),
            int,
            "none",
        ),
        Study(
            "inversion-steps",
            "guided sampling vs inversion steps",
            "inversion steps",
            (1, 2, 5, 10, 25, 50),
            int,
            "salt",
        ),
        Study(
            "background",
            "reference background",
            "background",
            ("generated", "prompt-color", "gray", "noise", "white"),
            str,
            "salt",
        ),
        Study("guidance-budget", "guidance steps × iterations", "guidance steps", (2, 5, 10), int, "salt"),
        Study(
            "reg-weight",
            "SALT loss regularization weight",
            "reg_weight",
            (0.0, 0.25, 0.5, 1.0, 2.0),
            float,
            "salt",
        ),
        Study(
            "noise-outside",
            "fresh noise outside the kept region of z_T* (seeds, background, unboxed objects)",
            "noise_outside",
            (0.0, 0.5, 0.8, 0.9, 1.0),
            float,
            "salt",
        ),
        Study(
            "noise-inside",
            "fresh noise inside the kept region of z_T* (object variants per seed)",
            "noise_inside",
            (0.0, 0.1, 0.2, 0.4),
            float,
            "salt",
        ),
        Study(
            "feather",
            "feathering of the kept region, latent cells",
            "feather",
            (0.0, 0.5, 1.0, 2.0),
            float,
            "salt",
        ),
        Study(
            "keep-region",
            "z_T* kept in the boxes or only on the pasted objects",
            "keep_region",
            ("boxes", "objects"),
            str,
            "salt",
        ),
        Study(
            "inversion-method",
            "flow models: reverse Euler vs midpoint inversion (same depth)",
            "inversion_method",
            ("euler", "midpoint"),
            str,
            "salt",
        ),
        Study(
            "outside-prompt",
            "outside the boxes, its own text condition (--outside-prompt) for the first N steps",
            "outside_prompt_steps",
            (0, 5, 10, 25),
            int,
            "salt",
        ),
        Study(
            "step-size",
            "the guided update's step size (times the schedule's sigma^2 or 1 - alpha_bar)",
            "step_size",
            (10.0, 30.0, 100.0),
            float,
            "salt",
        ),
        Study(
            "layers",
            "attention layers the guidance loss reads ('+' joins selectors; SD3: transformer_blocks.N)",
            "layers",
            ("default", "all"),
            str,
            "salt",
        ),
        Study(
            "sde-inversion",
            "ODE (0) vs SDE-style inversion noise",
            "inversion_noise_scale",
            (0.0, 0.1, 0.3, 0.5),
            float,
            "salt",
        ),
    )
}


def parse_values(study: Study, text: str | None) -> tuple:
    if text is None:
        return study.default_values
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--values is empty for study {study.name!r}")
    try:
        values = tuple(study.value_type(t) for t in items)
    except ValueError:
        raise ValueError(
            f"study {study.name!r} takes {study.value_type.__name__} values, got {text!r}"
        ) from None
    if (
        study.value_type is int
        and any(v < 1 for v in values)
        and study.name not in ("guidance-budget", "outside-prompt")
    ):
        raise ValueError(f"study {study.name!r} needs values >= 1, got {text!r}")
    return values


def run_study(
    name: str,
    config: BenchConfig,
    *,
    values: Sequence | None = None,
    loss: str | None = None,
    iters: Sequence[int] = (1, 5),
    pipe=None,
) -> dict | None:
    """Run study ``name`` with ``config``'s suite, model and shared settings (its methods are replaced)."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose from {sorted(STUDIES)}")
    study = STUDIES[name]
    values = study.default_values if values is None else tuple(values)
    loss = loss or study.default_loss
    variants = study.variants(values, loss, iters)
    from .bench import run_bench

    cfg = replace(config, methods=[v.spec for v in variants], title=f"Study {name}")
    metrics = run_bench(cfg, pipe=pipe)
    if metrics is None:  # not the main process
        return None
    write_study_report(study, cfg, variants, metrics, loss)
    return metrics


def write_study_report(
    study: Study, config: BenchConfig, variants: list[Variant], metrics: dict, loss: str
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    per = metrics["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    categorical = study.value_type is str
    for ax, (key, label) in zip(axes, [("miou", "mIoU"), ("map50", "mAP@0.5")]):
        series: dict[str, list[Variant]] = {}
        for v in variants:
            series.setdefault(v.series, []).append(v)
        for sname, vs in series.items():
            points = [v for v in vs if v.x is not None]
            baselines = [v for v in vs if v.x is None]
            for b in baselines:
                val = per[b.spec.name].get(key)
                if val is not None:
                    ax.axhline(val, linestyle="--", color="gray", label=f"{sname} ({b.spec.name})")
            if points:
                xs = [str(v.x) if categorical else v.x for v in points]
                ys = [per[v.spec.name].get(key) or 0.0 for v in points]
                if categorical:
                    ax.bar(xs, ys, label=sname, alpha=0.8)
                else:
                    ax.plot(xs, ys, marker="o", label=sname)
        if not categorical and study.name in ("spatial-awareness", "inversion-steps"):
            ax.set_xscale("log")
        ax.set_xlabel(study.x_label)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{study.name}: {study.description} (guidance: {loss})", fontsize=9)
    fig.tight_layout()
    plot = os.path.join(config.out, "study.png")
    save_figure(fig, plot)
    plt.close(fig)

    lines = [
        f"# Study `{study.name}`: {study.description}",
        "",
        f"Suite {metrics['suite']}, model {metrics['model']}, {metrics['n_layouts']} layouts × seeds "
        f"{metrics['seeds']}, {metrics['steps']} steps ({metrics.get('scheduler', 'ddim')}), CFG {metrics['cfg']}, guidance loss `{loss}`.",
        "",
        f"| variant | series | {study.x_label} | mIoU | mAP@0.5 | mAP@[.5:.95] | text | unboxed | bg acc. | "
        "prompt acc. | seed div. | ref IoU | s / image |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(value, pat="{:.3f}"):
        return "–" if value is None else pat.format(value)

    for v in variants:
        m = per[v.spec.name]
        lines.append(
            f"| {v.spec.name} | {v.series} | {'baseline' if v.x is None else v.x} | {f(m['miou'])} | "
            f"{f(m['map50'])} | {f(m['map50_95'])} | {f(m['text_alignment'])} | {f(m.get('unboxed_recall'))} | "
            f"{f(m.get('background_accuracy'))} | {f(m.get('prompt_accuracy'))} | {f(m.get('seed_diversity'))} | "
            f"{f(m['ref_iou'])} | {f(m['sec_per_image'], '{:.2f}')} |"
        )
    lines += ["", "![study](study.png)", "", "Full bench report: [report.md](report.md).", ""]
    path = os.path.join(config.out, "study.md")
    atomic_write(path, "\n".join(lines))
    summary = {
        "study": study.name,
        "loss": loss,
        "variants": [{"method": v.spec.name, "series": v.series, "x": v.x} for v in variants],
    }
    atomic_write(os.path.join(config.out, "study.json"), json.dumps(summary, indent=2))
    return path
