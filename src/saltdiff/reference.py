"""Reference images for a layout: each boxed object pasted into its box on a background.

SALT's initial latent is the DDIM inversion of such an image, so what matters is the reference's
*fidelity*: each object clean, solid, tightly cut and scaled to fill its box. Measured on a
half-trained model, noisy cut-outs gave no gain over random noise while clean objects drawn in
their boxes tripled the IoU — so every builder returns the masks it pasted, and the benchmark runs
the detector on the reference itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from .colors import BACKGROUND_HELP, GENERATED_BACKGROUNDS, SPECIAL_BACKGROUNDS, background_rgb
from .cutout import border_color_mask, cut_out
from .fileio import atomic_write, clip
from .layout import Layout
from .placement import free_boxes
from .registry import REFERENCE_BUILDERS, check_fields

logger = logging.getLogger(__name__)

BUILDER = REFERENCE_BUILDERS.get("objects")
BACKGROUNDS = SPECIAL_BACKGROUNDS  # and any colour: saltdiff.colors
FITS = BUILDER.param("fit").choices


@dataclass
class GeneratedObject:
    """One generated image (``[H, W, 3]`` floats in [0, 1]) and, if asked for, its phrase's attention map."""

    image: np.ndarray
    attention: np.ndarray | None = None


class ObjectGenerator(Protocol):
    """What a reference builder may ask of the model: plain text-to-image, batched.

    ``identity`` names the weights for disk caches (``None``: do not cache). Every prompt starts
    from the same noise (``seed``), so an object does not depend on what else is in the batch.
    """

    identity: list | None

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        phrases: Sequence[str] | None = None,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
    ) -> list[GeneratedObject]: ...


@dataclass
class ReferenceImage:
    """A reference image and, per box, the pixels where an object was pasted.

    ``free_boxes`` / ``free_masks``: the objects placed for the layout's unboxed phrases (not boxes of
    the layout; no guidance reads them), and their pixels.
    """

    image: Image.Image
    object_masks: np.ndarray  # [K, H, W] bool
    object_images: list[Image.Image] = field(default_factory=list)  # raw object generations, if any
    free_boxes: list = field(default_factory=list)
    free_masks: np.ndarray | None = None  # [U, H, W] bool

    @property
    def all_masks(self) -> np.ndarray:
        """Every pasted object's pixels, boxed then placed: ``[K + U, H, W]``."""
        if self.free_masks is None or not len(self.free_masks):
            return np.asarray(self.object_masks)
        return np.concatenate([np.asarray(self.object_masks), self.free_masks])


class ReferenceBuilder(Protocol):
    def build(
        self,
        objects: ObjectGenerator,
        prompt: str,
        layout: Layout,
        *,
        height: int,
        width: int,
        generator: torch.Generator | None,
    ) -> ReferenceImage: ...


def default_cache_dir() -> Path:
    root = os.environ.get("SALTDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "saltdiff"
    )
    return Path(root) / "objects"


def strip_phrases(prompt: str, phrases: list[str]) -> str:
    """The prompt without the boxed phrases (and their articles), for a background-only scene.

    The connectors between removed phrases go with them ("a picture of a cat and a dog in the park"
    becomes "a picture in the park", not "a picture of and in the park"): a dangling "of" or "and"
    makes small models draw stray objects.
    """
    slot = "\x00"
    text = prompt
    for phrase in sorted(set(phrases), key=len, reverse=True):
        pattern = r"\b(?:(?:a|an|the|one|two|some)\s+)?" + re.escape(phrase) + r"s?\b"
        text = re.sub(pattern, f" {slot} ", text, flags=re.IGNORECASE)
    joined = re.compile(slot + r"(?:\s|,|\band\b|\bwith\b|\bor\b)*" + slot, re.IGNORECASE)
    while joined.search(text):
        text = joined.sub(slot, text)
    text = re.sub(r"\bof\s+" + slot, slot, text, flags=re.IGNORECASE)
    text = text.replace(slot, " ")
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    text = re.sub(r"\s+", " ", text).strip(" ,.;")
    text = re.sub(r"^(and|with|,)\s+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+(and|with)$", "", text, flags=re.IGNORECASE)
    return text.strip(" ,.;")


def boxed_phrases_prompt(phrases: list[str]) -> str:
    """The boxed phrases as one prompt ("a red circle and an apple"), each once, in layout order:
    the negative prompt outside the boxes (``outside_prompt="boxed-negative"``)."""
    unique = list(dict.fromkeys(phrases))
    with_article = [
        p
        if re.match(r"(a|an|the)\s", p, re.IGNORECASE)
        else f"{'an' if p[:1].lower() in 'aeiou' else 'a'} {p}"
        for p in unique
    ]
    return (
        " and ".join(with_article)
        if len(with_article) < 3
        else ", ".join(with_article[:-1]) + " and " + with_article[-1]
    )


def solid_background(kind: str, height: int, width: int, generator: torch.Generator | None) -> np.ndarray:
    """A float RGB array in [0, 1] for the non-generated backgrounds (gray, white, noise, a colour)."""
    if kind in GENERATED_BACKGROUNDS:
        raise ValueError(f"background {kind!r} is generated by the model, not a solid canvas")
    if kind == "gray":
        return np.full((height, width, 3), 0.5, dtype=np.float32)
    if kind == "white":
        return np.ones((height, width, 3), dtype=np.float32)
    if kind == "noise":
        noise = torch.rand((height, width, 3), generator=generator, dtype=torch.float32)
        return noise.numpy()
    rgb = background_rgb(kind)  # a colour name or #rrggbb; ValueError names what is accepted
    if rgb is None:
        raise ValueError(f"background must be {BACKGROUND_HELP}, got {kind!r}")
    return np.broadcast_to(np.asarray(rgb, dtype=np.float32) / 255.0, (height, width, 3)).copy()


def foreground_mask(image: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """The border-colour cut-out (:func:`saltdiff.cutout.border_color_mask`), for user object images."""
    return border_color_mask(image, threshold)


def paste_object(
    canvas: np.ndarray,
    obj: np.ndarray,
    mask: np.ndarray,
    box_px: tuple[int, int, int, int],
    fit: str = "stretch",
) -> np.ndarray:
    """Crop ``obj`` to ``mask``'s bounding box, scale it into ``box_px`` and paste it; returns the pasted mask."""
    height, width = canvas.shape[:2]
    x0, y0, x1, y1 = box_px
    pasted = np.zeros((height, width), dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return pasted
    crop = obj[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    crop_mask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    bw, bh = max(1, x1 - x0), max(1, y1 - y0)
    if fit == "contain":
        scale = min(bw / crop.shape[1], bh / crop.shape[0])
        tw, th = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
        ox, oy = x0 + (bw - tw) // 2, y0 + (bh - th) // 2
    else:
        tw, th, ox, oy = bw, bh, x0, y0
    img = Image.fromarray((np.clip(crop, 0, 1) * 255).astype(np.uint8)).resize((tw, th), Image.BICUBIC)
    msk = Image.fromarray(crop_mask.astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)
    img_arr = np.asarray(img, dtype=np.float32) / 255.0
    msk_arr = np.asarray(msk) > 127
    # Clip the target rectangle to the canvas.
    cx0, cy0, cx1, cy1 = max(ox, 0), max(oy, 0), min(ox + tw, width), min(oy + th, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return pasted
    sub_img = img_arr[cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
    sub_msk = msk_arr[cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
    region = canvas[cy0:cy1, cx0:cx1]
    region[sub_msk] = sub_img[sub_msk]
    pasted[cy0:cy1, cx0:cx1] = sub_msk
    return pasted


def to_array(image: Image.Image | np.ndarray | str | os.PathLike) -> np.ndarray:
    """An RGB float array in [0, 1] from a PIL image, a uint8/float array or a path."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ValueError(f"reference image file not found: {str(image)!r}")
        image = Image.open(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"reference image array must be H×W×3, got shape {arr.shape}")
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def resize_array(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    if arr.shape[:2] == (height, width):
        return arr
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


@dataclass
class GeneratedObjects:
    """Generate each boxed object with the same model, cut it out, and paste it into its box.

    The layout's objects (``object_prompt`` with ``{phrase}``) are generated in batches of
    ``batch_size`` through the pipeline's object generator, each from the same fixed seed, so a
    layout's reference is reproducible and objects can be cached on disk, keyed by (model, prompt,
    seed, size, steps, cfg). The background is ``"prompt-color"`` (default): the median colour of a
    scene generated from the prompt without the boxed phrases, flat; ``"generated"``: that scene
    itself; or a flat white, gray or noise canvas. A flat canvas inverts into a clean start for the
    objects, and the prompt's colour keeps the prompt's background where the objects' own z_T* is
    kept (``SpatialAwareInit`` renews the rest with fresh noise). With white, the output copied the
    white canvas whatever the prompt said (background right in 29 % of images on the shapes suite,
    against 98 % for plain sampling); ``benchmarks/RESULTS.md`` has the studies.

    Hyper-parameters, their bounds and help are declared once in
    :data:`saltdiff.registry.REFERENCE_BUILDERS` (entry ``"objects"``).
    """

    background: str = "prompt-color"
    object_prompt: str = "a {phrase} on a white background"
    object_seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    cutout: str = "attention-color"
    threshold: float = 0.15
    attention_threshold: float = 0.5
    fit: str = "stretch"
    unboxed: str = "place"
    batch_size: int = 8
    cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, BUILDER.params, "GeneratedObjects")
        if "{phrase}" not in self.object_prompt:
            raise ValueError(f"object_prompt must contain '{{phrase}}', got {self.object_prompt!r}")

    # -- generation with a disk cache ------------------------------------------------------------
    def _cache_path(self, objects: ObjectGenerator, prompt: str, height: int, width: int) -> Path | None:
        identity = objects.identity
        if not self.cache or not identity:
            return None  # in-memory models have no stable identity: never share a cache entry
        key = json.dumps(
            [
                *identity,
                prompt,
                self.object_seed,
                height,
                width,
                self.num_inference_steps,
                self.guidance_scale,
            ]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return Path(self.cache_dir or default_cache_dir()) / f"{digest}.npz"

    def generate(
        self, objects: ObjectGenerator, prompts: Sequence[str], phrases: Sequence[str] | None, height, width
    ) -> list[GeneratedObject]:
        """One :class:`GeneratedObject` per prompt: cached ones read from disk, the others generated in
        batches of ``batch_size`` (a prompt that occurs twice is generated once)."""
        unique = list(dict.fromkeys(prompts))
        phrase_of = {} if phrases is None else dict(zip(prompts, phrases))
        made: dict[str, GeneratedObject] = {}
        paths = {p: self._cache_path(objects, p, height, width) for p in unique}
        for p, path in paths.items():
            cached = _load_object(path) if path is not None else None
            if cached is not None:
                made[p] = cached
        todo = [p for p in unique if p not in made]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            outputs = objects(
                batch,
                phrases=None if phrases is None else [phrase_of[p] for p in batch],
                height=height,
                width=width,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                seed=self.object_seed,
            )
            for p, obj in zip(batch, outputs):
                made[p] = obj
                if paths[p] is not None:
                    try:
                        _save_object(paths[p], obj)
                    except OSError as exc:  # a full cache disk costs time later, not this run
                        logger.warning("object cache entry not saved: %s", exc)
        return [made[p] for p in prompts]

    def build(self, objects, prompt, layout, *, height, width, generator) -> ReferenceImage:
        if self.background in ("generated", "prompt-color"):
            bg_prompt = strip_phrases(prompt, layout.phrases)
            (background,) = self.generate(objects, [bg_prompt], None, height, width)
            canvas = background.image.copy()
            if self.background == "prompt-color":  # the scene's colour, flat: no stray shapes to invert
                canvas[:] = np.median(canvas.reshape(-1, 3), axis=0)
        else:
            canvas = solid_background(self.background, height, width, generator)
        placed = []
        if self.unboxed == "place":
            placed = free_boxes(layout)
        elif self.unboxed == "place-seeded":
            placed = free_boxes(layout, generator=generator)
        boxes = [*layout, *placed]
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        prompts = [self.object_prompt.format(phrase=box.phrase) for box in boxes]
        generated = self.generate(objects, prompts, [b.phrase for b in boxes], height, width)
        images = []
        for k, (box, made) in enumerate(zip(boxes, generated)):
            obj = made.image
            images.append(Image.fromarray((np.clip(obj, 0, 1) * 255).astype(np.uint8)))
            mask = cut_out(
                obj,
                made.attention,
                self.cutout,
                threshold=self.threshold,
                attention_threshold=self.attention_threshold,
            )
            if not mask.any():
                logger.warning(
                    "no object found in the generated image for %r; using the whole image", box.phrase
                )
                mask = np.ones(obj.shape[:2], dtype=bool)
            masks[k] = paste_object(canvas, obj, mask, box.to_pixels(width, height), self.fit)
        image = Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))
        k = len(layout)
        return ReferenceImage(image, masks[:k], images[:k], free_boxes=placed, free_masks=masks[k:])


def _save_object(path: Path, obj: GeneratedObject) -> None:
    """Write one cache entry atomically: a killed run or a full disk never leaves half an entry."""
    attention = np.zeros(0) if obj.attention is None else obj.attention
    atomic_write(path, lambda fh: np.savez(fh, image=obj.image, attention=attention))


def _load_object(path: Path) -> GeneratedObject | None:
    """The cache entry at ``path``, or ``None`` when there is none. An entry that cannot be read
    (truncated, not an ``.npz``, the wrong arrays) is removed with one warning, so it is made again."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            image, attention = data["image"], data["attention"]
        if image.ndim != 3 or image.shape[-1] != 3 or not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"an image of shape {image.shape} ({image.dtype}), not [H, W, 3] floats")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        logger.warning(
            "object cache entry %s is unreadable (%s: %s); removing it and generating the object again",
            path,
            type(exc).__name__,
            clip(str(exc)),
        )
        with contextlib.suppress(OSError):  # removed by another run already, or a read-only cache
            path.unlink()
        return None
    return GeneratedObject(image, attention if attention.size else None)


@dataclass
class UserImages:
    """References from the user: one whole reference ``image``, or one object image per phrase.

    Object images are cut out from their plain background (border color) and pasted into their
    boxes, like generated objects.
    """

    image: Image.Image | str | None = None
    objects: Mapping[str, Image.Image | str] | None = None
    background: str = "gray"
    threshold: float = 0.15
    fit: str = "stretch"

    def __post_init__(self) -> None:
        if (self.image is None) == (self.objects is None):
            raise ValueError("UserImages needs exactly one of `image` (whole reference) or `objects`")
        BUILDER.param("background").check(self.background, "UserImages")
        if self.background in GENERATED_BACKGROUNDS:
            raise ValueError(
                f"UserImages background must be gray, white, noise or a colour, got {self.background!r}"
            )
        BUILDER.param("threshold").check(self.threshold, "UserImages")
        BUILDER.param("fit").check(self.fit, "UserImages")

    def build(self, objects, prompt, layout, *, height, width, generator) -> ReferenceImage:
        if self.image is not None:
            arr = resize_array(to_array(self.image), height, width)
            masks = layout.masks(height, width).numpy().astype(bool)
            return ReferenceImage(Image.fromarray((arr * 255).round().astype(np.uint8)), masks)
        missing = [box.phrase for box in layout if box.phrase not in self.objects]
        if missing:
            raise ValueError(f"no object image given for phrase(s) {missing}; given: {sorted(self.objects)}")
        canvas = solid_background(self.background, height, width, generator)
        masks = np.zeros((len(layout), height, width), dtype=bool)
        for k, box in enumerate(layout):
            obj = to_array(self.objects[box.phrase])
            masks[k] = paste_object(
                canvas, obj, foreground_mask(obj, self.threshold), box.to_pixels(width, height), self.fit
            )
        return ReferenceImage(Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)), masks)
