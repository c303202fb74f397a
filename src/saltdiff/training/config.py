"""The configuration of a training run: every knob, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults reproduce the shipped ``builtin:shapes`` weights."""

    out: str = "src/saltdiff/models/shapes"
    work: str = "train_work/shapes"
    seed: int = 0
    image_size: int = 64
    model_max_length: int = 32
    # VAE stage
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 16
    vae_steps: int = 3600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_warmup: int = 100
    vae_kl_weight: float = 1e-6
    # UNet + text encoder stage
    latent_cache: int = 80_000
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_norm_groups: int = 32
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 512
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_warmup: int = 300
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    # Token grounding (TokenCompose-style): weight of a loss that pulls each object word's
    # cross-attention into its object's box; 0 = plain epsilon loss. The shipped weights used 0.05 for
    # their last 11,500 steps (scripts/train_builtin_shapes.sh).
    grounding_weight: float = 0.0
    # Fine-tuning: a pipeline folder exported by this trainer (same architecture), e.g. the shipped
    # ``builtin:shapes``. Its VAE replaces the VAE stage and its UNet + text encoder are the starting
    # weights of the UNet stage (fresh optimizer, warmup and cosine over ``unet_steps``). "" = from scratch.
    init_from: str = ""
    # bookkeeping
    checkpoint_minutes: float = 5.0
    log_every: int = 25
    val_size: int = 256
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "vae_steps",
            "unet_steps",
            "vae_batch",
            "unet_batch",
            "latent_cache",
            "log_every",
            "val_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not (self.grounding_weight >= 0.0 and math.isfinite(self.grounding_weight)):
            raise ValueError(f"grounding_weight must be a finite number >= 0, got {self.grounding_weight}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if len(self.vae_channels) != 3:
            raise ValueError(f"vae_channels needs 3 levels (two downsamplings), got {self.vae_channels}")
        if len(self.unet_channels) != 3:
            raise ValueError(f"unet_channels needs 3 levels, got {self.unet_channels}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {self.image_size}")
        if self.init_from:
            missing = [c for c in ("vae", "unet", "text_encoder") if not (Path(self.init_from) / c).is_dir()]
            if missing:
                raise ValueError(
                    f"init_from {self.init_from!r} is not a pipeline folder exported by this trainer: "
                    f"no {', '.join(missing)} sub-folder"
                )
