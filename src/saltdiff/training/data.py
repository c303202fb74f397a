"""Training data: every random choice is a pure function of ``(seed, stream, step)``.

That is what makes ``--resume`` exact: a run killed and resumed sees the very seeds, noise,
timesteps and caption dropout an uninterrupted run would, with no RNG state to restore for the data.
Streams: 1 = VAE batches, 2 = UNet noise and the latent cache's seeds, 3 = UNet batch order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bookkeeping import atomic_torch_save, progress
from .config import TrainConfig

__all__ = [
    "build_latent_cache",
    "images_to_tensor",
    "make_tokenizer",
    "permuted_positions",
    "render_seeds",
    "step_generator",
    "tokenize",
    "train_seeds",
    "unet_batch",
]


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A generator for one step of one stream (1 = VAE, 2 = UNet), independent of history."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stream) * 10_000_019 + int(step))


def permuted_positions(seed: int, stream: int, n: int, start: int, count: int) -> np.ndarray:
    """Positions ``start .. start+count`` of an endless stream of per-epoch permutations of ``range(n)``."""
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        epoch, offset = divmod(start + filled, n)
        perm = np.random.default_rng([int(seed), stream, epoch]).permutation(n)
        take = min(count - filled, n - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_seeds(seeds: Sequence[int], size: int) -> tuple[torch.Tensor, list[str]]:
    from ..worlds.shapes import render_batch

    images, captions = render_batch([int(s) for s in seeds], size=size)
    return images_to_tensor(images), captions


def train_seeds(seed: int, stream: int, start: int, count: int) -> list[int]:
    from ..worlds.shapes import TRAIN_SEEDS

    positions = permuted_positions(seed, stream, len(TRAIN_SEEDS), start, count)
    return [TRAIN_SEEDS[int(p)] for p in positions]


def make_tokenizer(cfg: TrainConfig, directory: str | os.PathLike):
    from ..tokenization import build_clip_tokenizer
    from ..worlds.shapes import vocabulary

    return build_clip_tokenizer(vocabulary(), directory, model_max_length=cfg.model_max_length)


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them; refuses truncation."""
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=False
    )
    for caption, row in zip(captions, ids.input_ids):
        if len(row) > tokenizer.model_max_length:
            raise ValueError(
                f"caption {caption!r} is {len(row)} tokens, more than model_max_length={tokenizer.model_max_length}"
            )
    return torch.tensor(ids.input_ids, dtype=torch.long)


@torch.no_grad()
def build_latent_cache(cfg: TrainConfig, work: Path, vae, tokenizer) -> dict:
    """Encode ``cfg.latent_cache`` training scenes once: unscaled posterior means (fp16) and token ids."""
    path = work / "latents.pt"
    if path.exists():
        cache = torch.load(path, weights_only=False)
        if cache["n"] == cfg.latent_cache:
            return cache
    seeds = train_seeds(cfg.seed, 2, 0, cfg.latent_cache)
    latents = torch.empty(cfg.latent_cache, 4, cfg.image_size // 4, cfg.image_size // 4, dtype=torch.float16)
    ids = torch.empty(cfg.latent_cache, cfg.model_max_length, dtype=torch.int32)
    vae.eval()
    bar = progress(cfg.latent_cache, 0, "encode", cfg.progress)
    for start in range(0, cfg.latent_cache, 128):
        chunk = seeds[start : start + 128]
        x, captions = render_seeds(chunk, cfg.image_size)
        latents[start : start + len(chunk)] = vae.encode(x).latent_dist.mean.half()
        ids[start : start + len(chunk)] = tokenize(tokenizer, captions).int()
        bar.update(len(chunk))
    bar.close()
    cache = {"n": cfg.latent_cache, "seeds": torch.tensor(seeds), "latents": latents, "ids": ids}
    atomic_torch_save(cache, path)
    return cache


def unet_batch(
    cfg: TrainConfig, cache: dict, scaling: float, empty_ids: torch.Tensor, step: int, alphas_cumprod
):
    """The batch of one step: noisy latents, timesteps, token ids, noise (a pure function of the step).

    Also returns the scenes' seeds (the grounding loss re-creates their boxes) and ``keep``, false
    for the captions dropped for classifier-free guidance.
    """
    gen = step_generator(cfg.seed, 2, step)
    idx = torch.from_numpy(permuted_positions(cfg.seed, 3, cache["n"], step * cfg.unet_batch, cfg.unet_batch))
    z0 = cache["latents"][idx].float() * scaling
    ids = cache["ids"][idx].long()
    drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
    ids[drop] = empty_ids
    t = torch.randint(0, len(alphas_cumprod), (len(idx),), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    return zt, t, ids, noise, cache["seeds"][idx], ~drop
