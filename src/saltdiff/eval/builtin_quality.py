"""Quality bar of the built-in models (``builtin:shapes``, ``builtin:shapes-mmdit``): text faithfulness
and VAE fidelity.

* **Caption accuracy**: for ``n`` captions of held-out scenes (:data:`HELDOUT_SEEDS`), generate one
  image each with the model's plain diffusers pipeline (``StableDiffusionPipeline`` with DDIM, or
  ``StableDiffusion3Pipeline`` with its flow-matching Euler sampler; random initial noise, no layout
  guidance, classifier-free guidance) and count the images in which the exact detector finds *every* object
  the caption mentions with the right color and shape. Per-object recall is reported too.
* **Attention localization**: does each mentioned phrase's cross-attention map (argmax cell) land on
  the object the detector finds for it (:func:`attention_localization`)?
* **VAE PSNR**: reconstruction PSNR (posterior mean, [0, 1] scale) on held-out scenes.

``--tune`` first tries several guidance scales on the first ``--tune-n`` captions and uses the best
for the full run.

    python -m saltdiff.eval.builtin_quality --model src/saltdiff/models/shapes --n 200 --tune
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionResult:
    """Accuracy of one run over captions: all-objects-found rate and per-object recall."""

    guidance_scale: float
    num_inference_steps: int
    n: int
    all_found: float
    object_recall: float
    extra_objects_per_image: float
    seconds: float


def heldout_prompts(n: int) -> list[tuple[str, list[str]]]:
    """``(caption, mentioned phrases)`` of the first ``n`` held-out scenes."""
    from ..worlds.shapes import HELDOUT_SEEDS, sample_scene

    if not 1 <= n <= len(HELDOUT_SEEDS):
        raise ValueError(f"n must be in [1, {len(HELDOUT_SEEDS)}], got {n}")
    out = []
    for i in range(n):
        scene = sample_scene(HELDOUT_SEEDS[i])
        out.append((scene.caption, [o.phrase for o in scene.objects]))
    return out


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """The model's own diffusers pipeline class (from ``model_index.json``); components the folder saved
    as null (the MMDiT's T5) are passed as ``None``."""
    from diffusers import DiffusionPipeline

    from ..checkpoints import null_components, resolve_model

    path = resolve_model(model)
    nulls = {c: None for c in null_components(path)}
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **nulls)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def salt_pipeline_of(pipe):
    """The saltdiff pipeline on ``pipe``'s components: ``SaltSD3Pipeline`` for SD3, ``SaltPipeline`` else."""
    if hasattr(pipe, "transformer"):
        from ..pipeline_sd3 import SaltSD3Pipeline

        salt = SaltSD3Pipeline.from_pipe(pipe)
    else:
        from ..pipeline import SaltPipeline

        salt = SaltPipeline.from_pipe(pipe)
    salt.set_progress_bar_config(disable=True)
    return salt


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float,
    num_inference_steps: int = 50,
    batch_size: int = 50,
) -> np.ndarray:
    """uint8 images ``(N, H, W, 3)``; image ``i`` starts from the noise of ``torch.Generator().manual_seed(seeds[i])``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    images = []
    for s in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds[s : s + batch_size]]
        out = pipe(
            list(prompts[s : s + batch_size]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="np",
        ).images
        images.append(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(images)


def score_images(images: np.ndarray, mentioned: Sequence[Sequence[str]]) -> dict:
    """Fraction of images with every mentioned phrase detected, per-object recall, extra detections."""
    from ..worlds.detector import detect

    all_found, found, total, extra = 0, 0, 0, 0
    per_image = []
    for image, phrases in zip(images, mentioned):
        labels = [d.label for d in detect(image)]
        hits = [p in labels for p in phrases]
        all_found += all(hits)
        found += sum(hits)
        total += len(phrases)
        extra += sum(1 for lab in labels if lab not in phrases)
        per_image.append({"phrases": list(phrases), "detected": labels, "ok": all(hits)})
    return {
        "all_found": all_found / len(images),
        "object_recall": found / total,
        "extra_objects_per_image": extra / len(images),
        "per_image": per_image,
    }


def caption_accuracy(pipe, n: int, guidance_scale: float, num_inference_steps: int = 50, offset: int = 0):
    """Run the caption-accuracy measurement; returns ``(CaptionResult, images, per-image records)``."""
    prompts = heldout_prompts(offset + n)[offset:]
    t0 = time.time()
    images = generate(
        pipe, [p for p, _ in prompts], list(range(offset, offset + n)), guidance_scale, num_inference_steps
    )
    scores = score_images(images, [m for _, m in prompts])
    result = CaptionResult(
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        n=n,
        all_found=scores["all_found"],
        object_recall=scores["object_recall"],
        extra_objects_per_image=scores["extra_objects_per_image"],
        seconds=time.time() - t0,
    )
    records = [{"prompt": p, **r} for (p, _), r in zip(prompts, scores["per_image"])]
    return result, images, records


def attention_localization(pipe, n: int, guidance_scale: float, num_inference_steps: int = 50) -> dict:
    """Do the model's cross-attention maps point at the objects it draws?

    For the first ``n`` held-out captions, generate with ``pipe``'s components in a
    :class:`~saltdiff.SaltPipeline` or ``SaltSD3Pipeline`` (random
    init, no guidance; each mentioned phrase is put in the layout only so that its tokens are found
    and its map recorded), average each phrase's map (its color and shape tokens) over the steps and
    the default layers, and check whether the argmax cell of the map overlaps the box of the
    highest-scoring detection with that label. Objects the detector does not find are not counted.
    """
    from ..worlds.detector import detect
    from ..worlds.shapes import HELDOUT_SEEDS, sample_scene
    from .metrics import box_iou

    pipe = salt_pipeline_of(pipe)
    hits, counted, t0 = 0, 0, time.time()
    for i in range(n):
        scene = sample_scene(HELDOUT_SEEDS[i])
        layout = [(o.phrase, o.box) for o in scene.objects]
        out = pipe(
            scene.caption,
            layout,
            init="random",
            guidance="none",
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=i,
            return_attention_maps=True,
            progress=False,
        )
        detections = detect(out.images[0])
        maps = out.attention_maps[0]  # [K, h, w]
        h, w = maps.shape[-2:]
        for k, phrase in enumerate(out.phrases):
            same = [d for d in detections if d.label == phrase]
            if not same:
                continue
            box = max(same, key=lambda d: d.score).box
            row, col = np.unravel_index(int(np.argmax(maps[k])), (h, w))
            cell = (col / w, row / h, (col + 1) / w, (row + 1) / h)
            hits += int(box_iou(cell, box) > 0)
            counted += 1
    return {
        "n_captions": n,
        "guidance_scale": guidance_scale,
        "detected_objects": counted,
        "argmax_on_object": hits,
        "fraction": hits / counted if counted else None,
        "seconds": time.time() - t0,
    }


@torch.no_grad()
def vae_psnr(vae, n: int = 256, size: int = 64) -> dict:
    """Reconstruction PSNR (dB, [0, 1] scale, posterior mean) on the first ``n`` held-out scenes."""
    from ..worlds.shapes import HELDOUT_SEEDS, render_batch

    values = []
    dtype = vae.dtype
    for s in range(0, n, 64):
        images, _ = render_batch(list(HELDOUT_SEEDS[s : min(n, s + 64)]), size=size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        mse = ((y - x.float()) / 2).pow(2).flatten(1).mean(1)
        values.append(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))
    p = torch.cat(values)
    return {
        "psnr_mean": float(p.mean()),
        "psnr_median": float(p.median()),
        "psnr_min": float(p.min()),
        "n": n,
    }


def save_grid(images: np.ndarray, path: str, columns: int = 8, scale: int = 2) -> None:
    """Save images (N, H, W, 3) as one PNG grid."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = image
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def save_samples(pipe, path: str, guidance_scale: float, n: int = 16, num_inference_steps: int = 50) -> None:
    """The model card's sample grid: for the first ``n`` VAL captions, the generated image (seed ``i``)
    next to the render of that VAL scene (one valid layout for the caption, not a target)."""
    from ..worlds.shapes import VAL_SEEDS, render, sample_scene

    scenes = [sample_scene(VAL_SEEDS[i]) for i in range(n)]
    generated = generate(
        pipe, [s.caption for s in scenes], list(range(n)), guidance_scale, num_inference_steps
    )
    pairs = np.stack([np.concatenate([g, render(s)], axis=1) for g, s in zip(generated, scenes)])
    save_grid(pairs, path, columns=4)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m saltdiff.eval.builtin_quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="src/saltdiff/models/shapes", help="diffusers folder of the model")
    parser.add_argument("--n", type=int, default=200, help="held-out captions for the caption accuracy")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale when not tuning")
    parser.add_argument("--tune", action="store_true", help="pick the guidance scale on a subset first")
    parser.add_argument("--tune-scales", default="3,5,7.5", help="comma-separated scales tried with --tune")
    parser.add_argument("--tune-n", type=int, default=40, help="captions used to tune (after the first n)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--vae-n", type=int, default=256, help="held-out scenes for the VAE PSNR")
    parser.add_argument(
        "--attention-n",
        type=int,
        default=100,
        help="held-out captions for the attention localization (0: skip)",
    )
    parser.add_argument(
        "--samples", default=None, help="save the model card's sample grid (16 VAL captions) here"
    )
    parser.add_argument("--output", default=None, help="write the JSON results here")
    parser.add_argument("--grid", default=None, help="save a PNG grid of the first 32 generated images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    results: dict = {"model": args.model, "vae": vae_psnr(pipe.vae, args.vae_n)}
    logger.info("VAE PSNR: %s", results["vae"])
    scale = args.guidance_scale
    if args.tune:
        # Tune on captions *after* the first n so the reported number is not selected on its own data.
        tuning = []
        for g in [float(v) for v in args.tune_scales.split(",")]:
            res, _, _ = caption_accuracy(pipe, args.tune_n, g, args.steps, offset=args.n)
            logger.info("tuning: %s", res)
            tuning.append(asdict(res))
        results["tuning"] = tuning
        scale = max(tuning, key=lambda r: (r["all_found"], r["object_recall"]))["guidance_scale"]
    res, images, records = caption_accuracy(pipe, args.n, scale, args.steps)
    results["caption_accuracy"] = asdict(res)
    results["records"] = records
    logger.info("caption accuracy: %s", res)
    if args.attention_n:
        results["attention_localization"] = attention_localization(pipe, args.attention_n, scale, args.steps)
        logger.info("attention localization: %s", results["attention_localization"])
    if args.samples:
        save_samples(pipe, args.samples, scale, num_inference_steps=args.steps)
    if args.grid:
        save_grid(images[:32], args.grid)
    summary = {k: v for k, v in results.items() if k != "records"}
    print(json.dumps(summary, indent=2))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
