"""Loss curves of a run, drawn from its ``work/log.jsonl`` (``--plot-loss``)."""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["plot_loss_curves"]


def plot_loss_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Plot the VAE and UNet training curves of ``log.jsonl`` (last record wins for a repeated step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records: dict[tuple[str, int], dict] = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            records[(r["stage"], r["step"])] = r

    def series(stage: str, key: str):
        rows = sorted((s, r[key]) for (st, s), r in records.items() if st == stage and key in r)
        return [s for s, _ in rows], [v for _, v in rows]

    def smooth(values, k: int = 8):
        v = np.asarray(values, dtype=np.float64)
        if len(v) < k:
            return v
        return np.convolve(v, np.ones(k) / k, mode="valid")

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
