"""Pipeline folders in and out: export the EMA weights as a diffusers folder, load a folder to fine-tune."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "PIPELINE_COMPONENTS",
    "export_pipeline",
    "load_pretrained_weights",
    "replace_components",
    "write_vocabulary",
]

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def export_pipeline(out: Path, vae, text_encoder, tokenizer, unet, scheduler, dtype=torch.float16) -> None:
    """Save a ``StableDiffusionPipeline`` folder (fp16 weights) into ``out``, keeping other files there."""
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
    replace_components(out, pipe, PIPELINE_COMPONENTS)


def replace_components(out: Path, pipe, components) -> None:
    """``pipe.save_pretrained`` into ``out``, one component folder at a time.

    Components are written to a temporary folder first and then moved in one by one, so an
    interrupted export never leaves a half-written component; a README or pictures in ``out`` stay.
    """
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in components:
            old = out / name
            if old.exists():
                trash = out.parent / f".old-{name}-{os.getpid()}"
                os.replace(old, trash)
                shutil.rmtree(trash)
            os.replace(tmp / name, old)
        os.replace(tmp / "model_index.json", out / "model_index.json")
        write_vocabulary(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shapes_vocabulary() -> dict:
    """The words and names the shapes world's captions use (:mod:`saltdiff.vocabulary`'s file format)."""
    from ..worlds.shapes import BACKGROUNDS, COLORS, SHAPES, vocabulary

    return {
        "words": vocabulary(),
        "groups": {"colours": list(COLORS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS)},
    }


def write_vocabulary(out: Path) -> None:
    """Write the model's :data:`saltdiff.vocabulary.VOCABULARY_FILE`: every model trained here learns the
    shapes world's captions, and nothing else."""
    import json

    from ..fileio import atomic_write
    from ..vocabulary import VOCABULARY_FILE

    atomic_write(str(Path(out) / VOCABULARY_FILE), json.dumps(shapes_vocabulary(), indent=1) + "\n")


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
