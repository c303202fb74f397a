"""Reproducible training of the built-in model ``builtin:shapes`` on the synthetic shapes world.

Two stages, both on scenes rendered from :data:`saltdiff.worlds.shapes.TRAIN_SEEDS`:

1. a tiny ``AutoencoderKL`` (64x64x3 <-> 16x16x4), L1 reconstruction + a small KL term; its
   ``scaling_factor`` is then set so that scaled latents have unit standard deviation;
2. a tiny ``UNet2DConditionModel`` (cross-attention at the 8x8 and 4x4 levels) and a tiny
   ``CLIPTextModel`` trained jointly from scratch: epsilon prediction on the SD-1.x noise schedule,
   caption dropout for classifier-free guidance, min-SNR loss weighting, EMA of the weights.

The UNet stage reads VAE latents from a cache encoded once (``--latent-cache`` scenes, a fixed
deterministic subset of the training seeds): encoding on the fly cost about a third of each step on
a 2-core CPU. Every random choice (seed order, noise, timesteps, caption dropout) is a pure function
of ``--seed`` and the step number, so a run killed and resumed with ``--resume`` sees exactly the
data an uninterrupted run would. Checkpoints (model, optimizer, EMA, step, RNG) are written
atomically to ``--work``; at each UNet checkpoint the EMA weights are exported (fp16) as a diffusers
``StableDiffusionPipeline`` folder into ``--out``.

    python -m saltdiff.train_builtin --out src/saltdiff/models/shapes --work train_work/shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attention import capture_cross_attention

logger = logging.getLogger(__name__)

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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


# --------------------------------------------------------------------------------------------------------
# Components


def make_scheduler():
    """The SD-1.x DDIM scheduler (scaled_linear betas 0.00085..0.012 over 1000 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


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


def make_tokenizer(cfg: TrainConfig, directory: str | os.PathLike):
    from .tokenization import build_clip_tokenizer
    from .worlds.shapes import vocabulary

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


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------------
# Data: every random choice is a pure function of (seed, stream, step)


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
    from .worlds.shapes import render_batch

    images, captions = render_batch([int(s) for s in seeds], size=size)
    return images_to_tensor(images), captions


def train_seeds(seed: int, stream: int, start: int, count: int) -> list[int]:
    from .worlds.shapes import TRAIN_SEEDS

    positions = permuted_positions(seed, stream, len(TRAIN_SEEDS), start, count)
    return [TRAIN_SEEDS[int(p)] for p in positions]


# --------------------------------------------------------------------------------------------------------
# Bookkeeping helpers


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


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


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


# --------------------------------------------------------------------------------------------------------
# Stage 1: VAE


@torch.no_grad()
def evaluate_vae(vae, cfg: TrainConfig, n: int | None = None) -> dict:
    """Reconstruction PSNR (posterior mean) and latent statistics on the first VAL scenes."""
    from .worlds.shapes import VAL_SEEDS

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


# --------------------------------------------------------------------------------------------------------
# Latent cache


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


# --------------------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder


def export_pipeline(out: Path, vae, text_encoder, tokenizer, unet, scheduler, dtype=torch.float16) -> None:
    """Save a ``StableDiffusionPipeline`` folder (fp16 weights) into ``out``, keeping other files there.

    Components are written to a temporary folder first and then moved in one by one, so an
    interrupted export never leaves a half-written component; a README or pictures in ``out`` stay.
    """
    import copy

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to(dtype),
        text_encoder=copy.deepcopy(text_encoder).to(dtype),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to(dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in PIPELINE_COMPONENTS:
            old = out / name
            if old.exists():
                trash = out.parent / f".old-{name}-{os.getpid()}"
                os.replace(old, trash)
                shutil.rmtree(trash)
            os.replace(tmp / name, old)
        os.replace(tmp / "model_index.json", out / "model_index.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unet_batch(
    cfg: TrainConfig, cache: dict, scaling: float, empty_ids: torch.Tensor, step: int, alphas_cumprod
):
    """The batch of one step: noisy latents, timesteps, token ids, noise (a pure function of the step)."""
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


def box_cell_coverage(box: Sequence[float], h: int, w: int) -> torch.Tensor:
    """``[h, w]``: the fraction of each cell of an ``h x w`` grid that the normalized box covers."""
    ys = torch.arange(h + 1, dtype=torch.float32) / h
    xs = torch.arange(w + 1, dtype=torch.float32) / w
    cover_y = (
        torch.minimum(ys[1:], torch.tensor(box[3])) - torch.maximum(ys[:-1], torch.tensor(box[1]))
    ).clamp(min=0)
    cover_x = (
        torch.minimum(xs[1:], torch.tensor(box[2])) - torch.maximum(xs[:-1], torch.tensor(box[0]))
    ).clamp(min=0)
    return (cover_y[:, None] * h) * (cover_x[None, :] * w)


def grounding_targets(seeds: torch.Tensor, tokenizer) -> list[list[tuple[int, tuple]]]:
    """Per sample: ``(token position, box)`` for each token of every object's phrase (color, shape).

    The scene is re-created from its seed (the cache keeps seeds), so boxes need no storage; token
    positions come from :meth:`Layout.resolve_tokens` on the scene's caption, the same resolution
    the pipeline uses. An object whose phrase occurs twice in the scene is skipped.
    """
    from .layout import Layout
    from .worlds.shapes import sample_scene

    out = []
    for seed in seeds.tolist():
        scene = sample_scene(int(seed))
        phrases = [o.phrase for o in scene.objects]
        unique = [o for o in scene.objects if phrases.count(o.phrase) == 1]
        if not unique:
            out.append([])
            continue
        layout = Layout.from_pairs([(o.phrase, o.box) for o in unique])
        positions = layout.resolve_tokens(tokenizer, scene.caption)
        out.append([(pos, tuple(o.box)) for o, toks in zip(unique, positions) for pos in toks])
    return out


def grounding_loss(store, targets: list[list[tuple[int, tuple]]], keep: torch.Tensor) -> torch.Tensor:
    """Mean over captured layers and grounded words of ``(1 - attention mass inside the box)^2``.

    A word's map is its column of the head-averaged attention probabilities, normalized over
    the layer's pixels (TokenCompose's token loss, with boxes for masks). Caption-dropped samples
    (``keep`` false) have no words to ground.
    """
    rows = [(b, pos, box) for b, pairs in enumerate(targets) if keep[b] for pos, box in pairs]
    if not rows:
        return torch.zeros(())
    b_idx = torch.tensor([r[0] for r in rows])
    t_idx = torch.tensor([r[1] for r in rows])
    losses = []
    mask_cache: dict = {}
    for name, probs in store.maps.items():
        h, w = store.layer_hw[name]
        if (h, w) not in mask_cache:
            mask_cache[(h, w)] = torch.stack([box_cell_coverage(r[2], h, w).flatten() for r in rows])
        masks = mask_cache[(h, w)]
        maps = probs.mean(dim=1)[b_idx, :, t_idx]  # [R, Q]
        inside = (maps * masks).sum(-1) / maps.sum(-1).clamp_min(1e-8)
        losses.append(((1.0 - inside) ** 2).mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def _val_batch(cfg: TrainConfig, vae, tokenizer, scaling: float, alphas_cumprod):
    """A fixed VAL batch (latents, ids, timesteps spread over [0, 1000), noise) for validation loss."""
    from .worlds.shapes import VAL_SEEDS

    n = min(cfg.val_size, 256)
    x, captions = render_seeds(VAL_SEEDS[:n], cfg.image_size)
    z0 = vae.encode(x).latent_dist.mean * scaling
    gen = torch.Generator().manual_seed(12345)
    t = torch.linspace(0, len(alphas_cumprod) - 1, n).long()
    noise = torch.randn(z0.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, tokenize(tokenizer, captions), noise


def load_pretrained_weights(unet, text_encoder, folder: str | os.PathLike) -> None:
    """Copy an exported pipeline's UNet and text-encoder weights into freshly built modules.

    Loading state dicts (not whole models) keeps the architecture owned by ``TrainConfig``; a folder
    with another architecture fails here with the names of the first mismatched tensors.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    sources = {
        "unet": (
            unet,
            UNet2DConditionModel.from_pretrained(Path(folder) / "unet", torch_dtype=torch.float32),
        ),
        "text_encoder": (
            text_encoder,
            CLIPTextModel.from_pretrained(Path(folder) / "text_encoder", torch_dtype=torch.float32),
        ),
    }
    for name, (target, source) in sources.items():
        want, have = target.state_dict(), source.state_dict()
        bad = [k for k in want if k not in have or have[k].shape != want[k].shape]
        bad += [k for k in have if k not in want]
        if bad:
            raise ValueError(
                f"init_from {str(folder)!r}: its {name} does not match the configured architecture "
                f"(first mismatched tensors: {', '.join(bad[:3])}); pass the same --unet-channels, "
                "--text-hidden etc. it was trained with"
            )
        target.load_state_dict({k: v.float() for k, v in have.items()})
    logger.info("UNet and text encoder initialized from %s", folder)


def train_unet(cfg: TrainConfig, work: Path, out: Path, vae, tokenizer, log: Logger) -> dict:
    scheduler = make_scheduler()
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
        zt, t, ids, noise, seeds, keep = _unet_batch(cfg, cache, scaling, empty_ids, step, alphas_cumprod)
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


# --------------------------------------------------------------------------------------------------------
# Entry point


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


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saltdiff.train_builtin", description=__doc__.split("\n")[0]
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=_parse_ints, default=default, help="comma-separated integers")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    parser.add_argument("--plot-loss", default=None, help="only plot work/log.jsonl into this PNG and exit")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plot = args.pop("plot_loss")
    if plot is not None:
        plot_loss_curves(Path(args["work"]) / "log.jsonl", plot)
        return
    cfg = TrainConfig(**args)
    summary = train(cfg)
    logger.info("summary: %s", summary)


if __name__ == "__main__":
    main()


__all__ = ["TrainConfig", "export_pipeline", "main", "make_scheduler", "train"]
