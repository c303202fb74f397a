"""Loss curves of a run, drawn from its ``work/log.jsonl`` (``--plot-loss``)."""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["plot_loss_curves", "plot_mmdit_curves"]


def _records(log_path) -> dict[tuple[str, int], dict]:
    """``(stage, step) -> record``; the last record wins for a repeated step (a resumed run redoes
    the steps after its last checkpoint)."""
    records: dict[tuple[str, int], dict] = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            records[(r["stage"], r["step"])] = r
    return records


def _series(records, stage: str, key: str):
    rows = sorted((s, r[key]) for (st, s), r in records.items() if st == stage and key in r)
    return [s for s, _ in rows], [v for _, v in rows]


def _smooth(values, k: int = 8):
    v = np.asarray(values, dtype=np.float64)
    if len(v) < k:
        return v
    return np.convolve(v, np.ones(k) / k, mode="valid")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mmdit_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """The flow model's curves: train velocity MSE (against the data, or the teacher where one
    taught), the EMA's validation MSE against the data, the grounding loss and the learning rate,
    with a line where distillation started (the first step with ``taught`` > 0)."""
    plt = _pyplot()
    records = _records(log_path)
    series = lambda key, stage="mmdit": _series(records, stage, key)  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    steps, mse = series("mse")
    axes[0].semilogy(steps, mse, alpha=0.25, color="C2")
    axes[0].semilogy(steps[len(steps) - len(_smooth(mse)) :], _smooth(mse), color="C2", label="train velocity MSE")
    vs, vl = series("val_loss_ema", "mmdit_val")
    axes[0].semilogy(vs, vl, "o-", color="C3", markersize=3, label="VAL velocity MSE vs data (EMA)")
    taught = [s for s, t in zip(*series("taught")) if t > 0]
    for ax in axes:
        if taught:
            ax.axvline(taught[0], color="gray", linestyle="--", label="teacher on")
    axes[0].set(title="flow matching loss", xlabel="step")
    axes[0].legend(fontsize=8)
    gs, gv = series("grounding")
    axes[1].plot(gs, gv, alpha=0.25, color="C4")
    axes[1].plot(gs[len(gs) - len(_smooth(gv)) :], _smooth(gv), color="C4", label="train grounding loss")
    axes[1].set(title="token grounding loss (attention outside the box)", xlabel="step", ylim=(0, None))
    axes[1].legend(fontsize=8)
    ls, lr = series("lr")
    axes[2].plot(ls, lr, color="C0", label="learning rate")
    axes[2].set(title="learning rate", xlabel="step")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def plot_loss_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Plot the VAE and UNet training curves of ``log.jsonl`` (last record wins for a repeated step)."""
    plt = _pyplot()
    records = _records(log_path)
    series = lambda stage, key: _series(records, stage, key)  # noqa: E731
    smooth = _smooth

    g_steps, ground = series("unet", "grounding")
    g_rows = [(st, g) for st, g in zip(g_steps, ground) if g > 0]  # steps trained with the grounding loss
    fig, axes = plt.subplots(1, 4 if g_rows else 3, figsize=(18 if g_rows else 14, 3.6))
    steps, l1 = series("vae", "l1")
    axes[0].semilogy(steps, l1, alpha=0.3, color="C0")
    axes[0].semilogy(steps[len(steps) - len(smooth(l1)) :], smooth(l1), color="C0", label="train L1")
    axes[0].set(title="VAE reconstruction (L1, [-1, 1])", xlabel="step")
    axes[0].legend()
    steps, p = series("vae_val", "psnr_mean")
    fs, fp = series("vae_final", "psnr_mean")
    axes[1].plot(steps + fs, p + fp, "o-", color="C1")
    axes[1].set(title="VAE PSNR on VAL scenes (dB)", xlabel="step")
    steps, loss = series("unet", "mse")
    axes[2].semilogy(steps, loss, alpha=0.25, color="C2")
    axes[2].semilogy(steps[len(steps) - len(smooth(loss)) :], smooth(loss), color="C2", label="train eps MSE")
    vs, vl = series("unet_val", "val_loss_ema")
    axes[2].semilogy(vs, vl, "o-", color="C3", markersize=3, label="VAL eps MSE (EMA weights)")
    axes[2].set(title="UNet epsilon MSE", xlabel="step")
    if g_rows:
        axes[2].axvline(g_rows[0][0], color="gray", linestyle="--", label="grounding loss on")
        gs, gv = zip(*g_rows)
        axes[3].plot(gs, gv, alpha=0.25, color="C4")
        axes[3].plot(gs[len(gs) - len(smooth(gv)) :], smooth(gv), color="C4", label="train grounding loss")
        axes[3].set(title="token grounding loss (attention outside the box)", xlabel="step", ylim=(0, None))
        axes[3].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
