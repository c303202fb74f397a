"""Stage 1: the tiny ``AutoencoderKL`` (64x64x3 <-> 16x16x4), built, trained, evaluated.

L1 reconstruction + a small KL term; at the end ``scaling_factor`` is set so that scaled latents
have unit standard deviation on the VAL scenes, as SD's 0.18215 does for its own VAE.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .bookkeeping import Logger, atomic_torch_save, count_params, lr_factor, progress
from .config import TrainConfig
from .data import render_seeds, step_generator, train_seeds

logger = logging.getLogger(__name__)

__all__ = ["evaluate_vae", "make_vae", "psnr", "train_vae"]


def make_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
    )


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_vae(vae, cfg: TrainConfig, n: int | None = None) -> dict:
    """Reconstruction PSNR (posterior mean) and latent statistics on the first VAL scenes."""
    from ..worlds.shapes import VAL_SEEDS

    n = cfg.val_size if n is None else n
    vae.eval()
    psnrs, latents = [], []
    for start in range(0, n, 64):
        x, _ = render_seeds(VAL_SEEDS[start : min(n, start + 64)], cfg.image_size)
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
        psnrs.append(psnr(y, x))
        latents.append(z)
    vae.train()
    p = torch.cat(psnrs)
    z = torch.cat(latents)
    return {
        "psnr_mean": float(p.mean()),
        "psnr_min": float(p.min()),
        "latent_std": float(z.std()),
        "latent_mean": float(z.mean()),
    }


def train_vae(cfg: TrainConfig, work: Path, log: Logger):
    """Train (or resume, or load the finished) VAE; returns it with ``scaling_factor`` set."""
    from diffusers import AutoencoderKL

    final_dir = work / "vae_final"
    if (final_dir / "config.json").exists():
        logger.info("VAE stage already finished: loading %s", final_dir)
        return AutoencoderKL.from_pretrained(final_dir)
    if cfg.init_from:
        vae = AutoencoderKL.from_pretrained(Path(cfg.init_from) / "vae", torch_dtype=torch.float32)
        vae.save_pretrained(final_dir)
        logger.info("VAE taken from %s (no VAE training)", cfg.init_from)
        return vae

    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt_path = work / "vae_ckpt.pt"
    step = 0
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed VAE from step %d", step)

    def save() -> None:
        state = {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step}
        atomic_torch_save({**state, "torch_rng": torch.get_rng_state()}, ckpt_path)

    logger.info("VAE: %.3f M parameters", count_params(vae) / 1e6)
    vae.train()
    last_save = time.time()
    bar = progress(cfg.vae_steps, step, "vae", cfg.progress)
    while step < cfg.vae_steps:
        factor = lr_factor(step, cfg.vae_warmup, cfg.vae_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * factor
        x, _ = render_seeds(train_seeds(cfg.seed, 1, step * cfg.vae_batch, cfg.vae_batch), cfg.image_size)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=step_generator(cfg.seed, 1, step))
        y = vae.decode(z).sample
        rec = F.l1_loss(y, x)
        kl = posterior.kl().mean()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            mse = F.mse_loss(y.detach(), x).item()
            bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.0f}")
            log.write(
                stage="vae",
                step=step,
                l1=rec.item(),
                mse=mse,
                kl=kl.item(),
                lr=cfg.vae_lr * factor,
                time=time.time(),
            )
        if time.time() - last_save > cfg.checkpoint_minutes * 60:
            save()
            last_save = time.time()
            stats = evaluate_vae(vae, cfg, n=128)
            log.write(stage="vae_val", step=step, **stats, time=time.time())
            logger.info("VAE step %d: %s", step, stats)
    bar.close()
    save()

    stats = evaluate_vae(vae, cfg)
    vae.register_to_config(scaling_factor=1.0 / stats["latent_std"])
    stats["scaling_factor"] = vae.config.scaling_factor
    log.write(stage="vae_final", step=step, **stats, time=time.time())
    logger.info("VAE done: %s", stats)
    tmp = work / "vae_final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    os.replace(tmp, final_dir)
    return vae
