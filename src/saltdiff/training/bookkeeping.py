"""Bookkeeping shared by both stages: learning-rate schedule, atomic saves, the JSON-lines log, progress."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

__all__ = ["Logger", "atomic_torch_save", "count_params", "lr_factor", "progress"]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Logger:
    """Appends JSON lines (one per logged step) to ``work/log.jsonl`` for the loss curves."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
