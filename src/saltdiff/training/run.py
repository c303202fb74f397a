"""Both stages, start to finish: the entry point of a training run (and of a resumed one)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .bookkeeping import Logger
from .config import TrainConfig
from .data import make_tokenizer
from .unet import train_unet
from .vae import train_vae

__all__ = ["train"]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) both stages; returns a summary dict (also written to ``work/summary.json``)."""
    work, out = Path(cfg.work), Path(cfg.out)
    if not cfg.resume and any((work / n).exists() for n in ("vae_ckpt.pt", "vae_final", "unet_ckpt.pt")):
        raise ValueError(
            f"work directory {str(work)!r} holds checkpoints: pass --resume, or use a fresh --work"
        )
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    with open(work / "config.json", "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    log = Logger(work / "log.jsonl")
    tokenizer = make_tokenizer(cfg, work / "tokenizer")
    t0 = time.time()
    vae = train_vae(cfg, work, log)
    vae.eval().requires_grad_(False)
    t1 = time.time()
    summary = train_unet(cfg, work, out, vae, tokenizer, log)
    t2 = time.time()
    summary.update(vae_seconds_this_run=t1 - t0, unet_seconds_this_run=t2 - t1)
    with open(work / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
