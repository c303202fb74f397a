"""Stage 2: the tiny ``UNet2DConditionModel`` and ``CLIPTextModel``, trained jointly from scratch.

Epsilon prediction on the SD-1.x noise schedule, caption dropout for classifier-free guidance,
min-SNR loss weighting, an EMA of the weights (what gets exported) and an optional token-grounding
loss. Validation is the EMA weights' epsilon MSE on a fixed VAL batch whose timesteps span the
schedule, so successive checkpoints are comparable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import capture_cross_attention
from ..components import sd_ddim_scheduler
from .bookkeeping import Logger, atomic_torch_save, count_params, lr_factor, progress
from .config import TrainConfig
from .data import build_latent_cache, render_seeds, tokenize, unet_batch
from .export import export_pipeline, load_pretrained_weights
from .grounding import grounding_loss, grounding_targets

logger = logging.getLogger(__name__)

__all__ = ["EMA", "make_text_encoder", "make_unet", "train_unet"]


def make_unet(cfg: TrainConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.image_size // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.unet_norm_groups,
    )


def make_text_encoder(cfg: TrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=cfg.text_hidden,
        )
    )


class EMA:
    """Exponential moving average of a list of parameters, with the usual warmup of the decay."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.nn.Parameter], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)


@torch.no_grad()
def _val_batch(cfg: TrainConfig, vae, tokenizer, scaling: float, alphas_cumprod):
    """A fixed VAL batch (latents, ids, timesteps spread over [0, 1000), noise) for validation loss."""
    from ..worlds.shapes import VAL_SEEDS

    n = min(cfg.val_size, 256)
    x, captions = render_seeds(VAL_SEEDS[:n], cfg.image_size)
    z0 = vae.encode(x).latent_dist.mean * scaling
    gen = torch.Generator().manual_seed(12345)
    t = torch.linspace(0, len(alphas_cumprod) - 1, n).long()
    noise = torch.randn(z0.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, tokenize(tokenizer, captions), noise


def train_unet(cfg: TrainConfig, work: Path, out: Path, vae, tokenizer, log: Logger) -> dict:
    """Train (or resume) the UNet and text encoder; each checkpoint also exports the EMA weights to ``out``.

    Returns the parameter counts and the number of steps done.
    """
    scheduler = sd_ddim_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.clone().float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    scaling = float(vae.config.scaling_factor)
    cache = build_latent_cache(cfg, work, vae, tokenizer)
    empty_ids = tokenize(tokenizer, [""])[0]

    torch.manual_seed(cfg.seed + 1)
    unet = make_unet(cfg)
    torch.manual_seed(cfg.seed + 2)
    text_encoder = make_text_encoder(cfg, tokenizer)
    ckpt_path = work / "unet_ckpt.pt"
    resuming = cfg.resume and ckpt_path.exists()
    if cfg.init_from and not resuming:
        load_pretrained_weights(unet, text_encoder, cfg.init_from)  # before the EMA copies the weights
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay)
    step = 0
    if resuming:
        state = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed UNet from step %d", step)
    logger.info(
        "UNet: %.3f M parameters, text encoder: %.3f M",
        count_params(unet) / 1e6,
        count_params(text_encoder) / 1e6,
    )
    val = _val_batch(cfg, vae, tokenizer, scaling, alphas_cumprod)

    def ema_models():
        import copy

        u, te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        ema.copy_to(list(u.parameters()) + list(te.parameters()))
        return u.eval(), te.eval()

    @torch.no_grad()
    def val_loss(u, te) -> float:
        zt, t, ids, noise = val
        losses = []
        for s in range(0, len(t), 64):
            pred = u(zt[s : s + 64], t[s : s + 64], te(ids[s : s + 64])[0]).sample
            losses.append(F.mse_loss(pred, noise[s : s + 64], reduction="none").flatten(1).mean(1))
        return float(torch.cat(losses).mean())

    def checkpoint() -> None:
        state = {
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "optimizer": opt.state_dict(),
            "ema": ema.shadow,
            "step": step,
            "torch_rng": torch.get_rng_state(),
            "config": dataclasses.asdict(cfg),
        }
        atomic_torch_save(state, ckpt_path)
        u, te = ema_models()
        vl = val_loss(u, te)
        log.write(stage="unet_val", step=step, val_loss_ema=vl, time=time.time())
        export_pipeline(out, vae, te, tokenizer, u, scheduler)
        logger.info("UNet checkpoint at step %d (EMA val loss %.4f) exported to %s", step, vl, out)

    unet.train()
    text_encoder.train()
    last_save = time.time()
    bar = progress(cfg.unet_steps, step, "unet", cfg.progress)
    while step < cfg.unet_steps:
        factor = lr_factor(step, cfg.unet_warmup, cfg.unet_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * factor
        zt, t, ids, noise, seeds, keep = unet_batch(cfg, cache, scaling, empty_ids, step, alphas_cumprod)
        if cfg.grounding_weight > 0:
            with capture_cross_attention(unet, "all") as store:
                pred = unet(zt, t, text_encoder(ids)[0]).sample
            ground = grounding_loss(store, grounding_targets(seeds, tokenizer), keep)
            store.reset()
        else:
            pred = unet(zt, t, text_encoder(ids)[0]).sample
            ground = torch.zeros(())
        per_sample = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
        weight = (
            snr[t].clamp(max=cfg.snr_gamma) / snr[t] if cfg.snr_gamma > 0 else torch.ones_like(per_sample)
        )
        loss = (per_sample * weight).mean() + cfg.grounding_weight * ground
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(params, step)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.unet_steps:
            bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{per_sample.mean().item():.4f}")
            log.write(
                stage="unet",
                step=step,
                loss=loss.item(),
                mse=per_sample.mean().item(),
                grounding=float(ground.detach()),
                grad_norm=float(grad_norm),
                lr=cfg.unet_lr * factor,
                time=time.time(),
            )
        if time.time() - last_save > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_save = time.time()
    bar.close()
    checkpoint()
    return {
        "unet_params": count_params(unet),
        "text_encoder_params": count_params(text_encoder),
        "vae_params": count_params(vae),
        "steps": step,
    }
