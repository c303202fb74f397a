"""The flow-matching stage: an SD3-structured ``SD3Transformer2DModel`` trained on the shapes world.

What makes the result a plain ``StableDiffusion3Pipeline`` folder (diffusers loads and samples it):

- **Text.** SD3 reads two CLIP encoders with projection (``text_encoder``, ``text_encoder_2``) and an
  optional T5. Both CLIP slots hold the frozen CLIP text encoder of ``base`` (``builtin:shapes``),
  wrapped as ``CLIPTextModelWithProjection`` with an identity projection, so its pooled output is its
  pooled state; there is no T5. The transformer therefore sees exactly what
  ``StableDiffusion3Pipeline.encode_prompt`` makes: the penultimate CLIP states of both slots side by
  side, zero-padded to ``joint_attention_dim``, followed by ``max_sequence_length`` zero rows (SD3's
  stand-in for a missing T5), and both pooled outputs side by side.
- **The zero rows.** SD3 has no positional embedding on text, so identical rows stay identical through
  every block and act as one key whose logit is raised by ``log(count)``: a model trained with one
  count shifts its attention when sampled with another (diffusers' default is 256). Each step draws
  the count from ``t5_padding`` (a pure function of the step), so the model learns to ignore it.
- **Latents.** The VAE of ``base`` (4 channels, 16x16 for 64 pixels), exported with
  ``shift_factor=0`` because SD3's decode adds the shift unconditionally.
- **Training.** Rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``, target ``eps - x0``, sigma
  from a logit-normal (SD3's sampling), timestep ``1000 sigma``, caption dropout for CFG, an EMA of the
  weights (what is exported), and the token-grounding loss of :mod:`.grounding` on the image->text
  joint attention. Optionally (``teacher``) the target is the velocity of a VP UNet teacher
  (:mod:`.teacher`), mixed with the data target by ``teacher_weight``. Validation: the EMA's velocity MSE on a fixed VAL batch with sigmas spread over
  (0, 1), so checkpoints compare.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .bookkeeping import Logger, atomic_torch_save, count_params, lr_factor, progress
from .data import build_latent_cache, permuted_positions, render_seeds, step_generator, tokenize
from .grounding import grounding_loss, grounding_targets
from .mmdit_config import MMDiTTrainConfig
from .unet import EMA

logger = logging.getLogger(__name__)

__all__ = [
    "flow_batch",
    "grow_transformer",
    "load_base",
    "make_scheduler",
    "make_transformer",
    "sd3_text_conditions",
    "train_mmdit",
]


def make_transformer(cfg: MMDiTTrainConfig, text_hidden: int):
    """The ``SD3Transformer2DModel``: joint width ``2 * text_hidden`` (both CLIP slots side by side)."""
    from diffusers import SD3Transformer2DModel

    latent = cfg.image_size // 4
    return SD3Transformer2DModel(
        sample_size=latent,
        patch_size=cfg.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=2 * text_hidden,
        caption_projection_dim=cfg.heads * cfg.head_dim,
        pooled_projection_dim=2 * text_hidden,
        # token grids up to 4x the training side (256 pixels for the 64-pixel world)
        pos_embed_max_size=4 * latent // cfg.patch_size,
    )


@torch.no_grad()
def grow_transformer(target, source) -> None:
    """Load ``source``'s weights into the deeper (or equally deep) ``target``, in place.

    Why: a deeper student can start where a trained shallower one stopped instead of from noise. The
    source's blocks keep their indices except its last (``context_pre_only``: it drops the text stream),
    which becomes the target's last; the blocks in between keep their random weights but get zero
    modulation (adaLN-zero, as DiT initializes every block), so each gate is shut and the grown model
    computes exactly what ``source`` did until training opens them.
    """
    n_src, n_dst = len(source.transformer_blocks), len(target.transformer_blocks)
    for key in (
        "patch_size",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "in_channels",
        "out_channels",
    ):
        if source.config[key] != target.config[key]:
            raise ValueError(
                f"cannot grow: {key} is {source.config[key]} in the source, {target.config[key]} here"
            )
    if n_dst < n_src:
        raise ValueError(f"cannot grow {n_src} blocks into {n_dst}: the target must be at least as deep")
    block_map = {i: i for i in range(n_src - 1)} | {n_src - 1: n_dst - 1}
    state = {}
    for name, value in source.state_dict().items():
        if name.startswith("transformer_blocks."):
            _, index, rest = name.split(".", 2)
            name = f"transformer_blocks.{block_map[int(index)]}.{rest}"
        state[name] = value.to(torch.float32)
    missing, unexpected = target.load_state_dict(state, strict=False)
    grown = {f"transformer_blocks.{i}." for i in range(n_src - 1, n_dst - 1)}
    if unexpected or any(not any(m.startswith(g) for g in grown) for m in missing):
        raise ValueError(f"cannot grow: unmatched weights {sorted(unexpected)[:3]} {sorted(missing)[:3]}")
    for i in range(n_src - 1, n_dst - 1):
        block = target.transformer_blocks[i]
        for norm in (block.norm1, block.norm1_context):
            norm.linear.weight.zero_()
            norm.linear.bias.zero_()


def make_scheduler(cfg: MMDiTTrainConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift)


def load_base(cfg: MMDiTTrainConfig):
    """The frozen parts from ``base``: VAE (``shift_factor`` 0), CLIP with an identity projection, tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = cfg.base_folder()
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32, shift_factor=0.0)
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
    config = CLIPTextConfig(**{**clip.config.to_dict(), "projection_dim": clip.config.hidden_size})
    text_encoder = CLIPTextModelWithProjection(config)
    with torch.no_grad():
        text_encoder.text_model.load_state_dict(clip.state_dict())  # transformers 5: no text_model prefix
        text_encoder.text_projection.weight.copy_(torch.eye(clip.config.hidden_size))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if tokenizer.model_max_length != cfg.model_max_length:
        raise ValueError(
            f"base {cfg.base!r} has model_max_length {tokenizer.model_max_length}, config says "
            f"{cfg.model_max_length}"
        )
    for module in (vae, text_encoder):
        module.eval().requires_grad_(False)
    return vae, text_encoder, tokenizer


@torch.no_grad()
def sd3_text_conditions(text_encoder, ids: torch.Tensor, joint_dim: int, t5_rows: int):
    """``(prompt_embeds, pooled)`` as ``StableDiffusion3Pipeline.encode_prompt`` makes them when both
    CLIP slots hold ``text_encoder`` and there is no T5 (``max_sequence_length=t5_rows``)."""
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-2]
    clip = torch.cat([hidden, hidden], dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    zeros = clip.new_zeros(clip.shape[0], t5_rows, joint_dim)
    return torch.cat([clip, zeros], dim=1), torch.cat([out.text_embeds, out.text_embeds], dim=-1)


def sample_sigmas(n: int, gen: torch.Generator, mean: float, std: float) -> torch.Tensor:
    """Logit-normal sigmas in (0, 1): SD3's timestep sampling, which spends steps on mid noise levels."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=gen))


def flow_batch(cfg: MMDiTTrainConfig, cache: dict, scaling: float, empty_ids: torch.Tensor, step: int):
    """One step's batch (a pure function of the step): noisy latents, sigmas, ids, target velocity,
    the scenes' seeds (for grounding), ``keep`` (false for dropped captions) and the T5 zero-row count."""
    gen = step_generator(cfg.seed, 4, step)
    idx = torch.from_numpy(permuted_positions(cfg.seed, 5, cache["n"], step * cfg.batch, cfg.batch))
    x0 = cache["latents"][idx].float() * scaling
    ids = cache["ids"][idx].long()
    drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
    ids[drop] = empty_ids
    sigma = sample_sigmas(len(idx), gen, cfg.logit_mean, cfg.logit_std)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    rows = cfg.t5_padding[int(torch.randint(len(cfg.t5_padding), (1,), generator=gen))]
    return xt, sigma, ids, noise - x0, cache["seeds"][idx], ~drop, rows


def _val_batch(cfg: MMDiTTrainConfig, vae, tokenizer, scaling: float):
    from ..worlds.shapes import VAL_SEEDS

    n = min(cfg.val_size, 256)
    x, captions = render_seeds(VAL_SEEDS[:n], cfg.image_size)
    with torch.no_grad():
        x0 = vae.encode(x).latent_dist.mean * scaling
    gen = torch.Generator().manual_seed(12345)
    sigma = torch.linspace(0.02, 0.98, n)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma, tokenize(tokenizer, captions), noise - x0


def export_sd3_pipeline(out: Path, vae, text_encoder, tokenizer, transformer, scheduler) -> None:
    """Save a ``StableDiffusion3Pipeline`` folder (fp16) into ``out``, keeping a README or pictures there."""
    import copy

    from diffusers import StableDiffusion3Pipeline

    from .export import replace_components

    te = copy.deepcopy(text_encoder).half()
    pipe = StableDiffusion3Pipeline(
        transformer=copy.deepcopy(transformer).half(),
        scheduler=scheduler,
        vae=copy.deepcopy(vae).half(),
        text_encoder=te,
        tokenizer=tokenizer,
        text_encoder_2=copy.deepcopy(te),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    replace_components(
        out,
        pipe,
        ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    )


def train_mmdit(cfg: MMDiTTrainConfig) -> dict:
    """Train (or resume) the transformer; each checkpoint also exports the EMA weights to ``cfg.out``."""
    work, out = Path(cfg.work), Path(cfg.out)
    ckpt_path = work / "mmdit_ckpt.pt"
    if not cfg.resume and ckpt_path.exists():
        raise ValueError(
            f"work directory {str(work)!r} holds a checkpoint: pass --resume, or use a fresh --work"
        )
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "config.json", "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    log = Logger(work / "log.jsonl")
    t_start = time.time()
    vae, text_encoder, tokenizer = load_base(cfg)
    scaling = float(vae.config.scaling_factor)
    cache = build_latent_cache(cfg, work, vae, tokenizer)
    empty_ids = tokenize(tokenizer, [""])[0]
    text_hidden = int(text_encoder.config.hidden_size)
    joint_dim = 2 * text_hidden
    scheduler = make_scheduler(cfg)

    torch.manual_seed(cfg.seed + 3)
    transformer = make_transformer(cfg, text_hidden)
    init_folder = cfg.init_folder()
    if init_folder is not None and not (cfg.resume and ckpt_path.exists()):
        from diffusers import SD3Transformer2DModel

        source = SD3Transformer2DModel.from_pretrained(init_folder / "transformer", torch_dtype=torch.float32)
        grow_transformer(transformer, source)
        logger.info(
            "started from %s (%d blocks grown to %d)", init_folder, len(source.transformer_blocks), cfg.layers
        )
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay)
    step = 0
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        transformer.load_state_dict(state["transformer"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        step = state["step"]
        logger.info("resumed the transformer from step %d", step)
    logger.info("SD3 transformer: %.3f M parameters", count_params(transformer) / 1e6)
    val = _val_batch(cfg, vae, tokenizer, scaling)

    def ema_model():
        import copy

        model = copy.deepcopy(transformer)
        ema.copy_to(list(model.parameters()))
        return model.eval()

    @torch.no_grad()
    def val_loss(model) -> float:
        xt, sigma, ids, target = val
        losses = []
        for s in range(0, len(sigma), 64):
            embeds, pooled = sd3_text_conditions(text_encoder, ids[s : s + 64], joint_dim, cfg.t5_padding[-1])
            pred = model(xt[s : s + 64], embeds, pooled, sigma[s : s + 64] * 1000, return_dict=False)[0]
            losses.append(F.mse_loss(pred, target[s : s + 64], reduction="none").flatten(1).mean(1))
        return float(torch.cat(losses).mean())

    def checkpoint() -> None:
        state = {
            "transformer": transformer.state_dict(),
            "optimizer": opt.state_dict(),
            "ema": ema.shadow,
            "step": step,
            "config": dataclasses.asdict(cfg),
        }
        atomic_torch_save(state, ckpt_path)
        model = ema_model()
        vl = val_loss(model)
        log.write(stage="mmdit_val", step=step, val_loss_ema=vl, time=time.time())
        export_sd3_pipeline(out, vae, text_encoder, tokenizer, model, scheduler)
        logger.info("MMDiT checkpoint at step %d (EMA val loss %.4f) exported to %s", step, vl, out)

    from ..joint_attention import capture_joint_attention

    teacher_folder = cfg.teacher_folder()
    teacher = None
    if teacher_folder is not None:
        from .teacher import load_vp_teacher

        teacher = load_vp_teacher(teacher_folder)
        logger.info("distilling from the teacher %s (weight %.2f)", teacher_folder, cfg.teacher_weight)
    transformer.train()
    last_save = time.time()
    last_step = cfg.last_step()
    bar = progress(last_step, step, "mmdit", cfg.progress)
    while step < last_step:
        factor = lr_factor(step, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor
        xt, sigma, ids, target, seeds, keep, rows = flow_batch(cfg, cache, scaling, empty_ids, step)
        embeds, pooled = sd3_text_conditions(text_encoder, ids, joint_dim, rows)
        taught = 0.0
        if teacher is not None:
            with torch.no_grad():
                v_teacher, inside = teacher.velocity(xt, sigma, text_encoder(ids).last_hidden_state)
            mixed = cfg.teacher_weight * v_teacher + (1 - cfg.teacher_weight) * target
            inside = inside & (sigma <= cfg.teacher_max_sigma)
            target = torch.where(inside.view(-1, 1, 1, 1), mixed, target)
            taught = float(inside.float().mean())
        if cfg.grounding_weight > 0:
            with capture_joint_attention(transformer) as store:
                pred = transformer(xt, embeds, pooled, sigma * 1000, return_dict=False)[0]
            ground = grounding_loss(store, grounding_targets(seeds, tokenizer), keep)
            store.reset()
        else:
            pred = transformer(xt, embeds, pooled, sigma * 1000, return_dict=False)[0]
            ground = torch.zeros(())
        mse = F.mse_loss(pred, target)
        loss = mse + cfg.grounding_weight * ground
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(params, step)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == last_step:
            bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse.item():.4f}")
            log.write(
                stage="mmdit",
                step=step,
                loss=loss.item(),
                mse=mse.item(),
                grounding=float(ground.detach()),
                grad_norm=float(grad_norm),
                lr=cfg.lr * factor,
                t5_rows=rows,
                taught=taught,
                time=time.time(),
            )
        if time.time() - last_save > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_save = time.time()
    bar.close()
    checkpoint()
    summary = {
        "transformer_params": count_params(transformer),
        "steps": step,
        "seconds_this_run": time.time() - t_start,
    }
    with open(work / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
