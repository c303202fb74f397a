"""Background classifier for the shapes world: which named background colour an image shows.

Backgrounds are near-neutral (:data:`~saltdiff.worlds.shapes.BACKGROUND_COLORS`), drawn plain, as a
linear brightness ramp (``gradient``: x0.88-0.95 to x1.02-1.08 along rows or columns) or with light
luminance noise (``texture``); objects are saturated palette colours. So:

1. **Background pixels**: every pixel whose chroma (RGB minus its gray component, relative to the
   image's own colour cast; averaged over 3x3 pixels against pixel noise) is at least
   :data:`OBJECT_CHROMA` is an object pixel; object pixels are
   grown by :data:`EDGE_PX` pixels (anti-aliased or blurred edges, which change brightness before
   they show chroma); pixels under the given boxes are left out too. If fewer than
   :data:`MIN_PIXELS_FRAC` of the image remain, the boxes are ignored, then the object mask.
2. **Its colour**: a plane ``c + g_x x + g_y y`` per channel, fitted by least squares to those pixels
   (coordinates centred on the image) and refitted twice without the pixels whose residual exceeds
   three robust standard deviations (stray pixels, shadows). The fitted centre colour ``c`` is the
   ramp's mid-tone whatever part of the ramp the objects hide (a median would follow the visible
   part), and the mean of the texture.
3. **Its name**: the background whose colour, scaled by a brightness factor in
   :data:`BRIGHTNESS_RANGE` (the ramps' mid-tones lie in x0.95-1.015), is nearest to ``c`` in RGB.
   Neutral and beige backgrounds of equal brightness differ by their chroma; the grays are 40-75
   levels apart, so the range leaves a margin of more than 10 levels between any two of them.
4. **Reject option**: a colour farther than :data:`BACKGROUND_TOLERANCE` from every (scaled) named
   background is none of them, and so is a background that cannot be seen (fewer than
   :data:`MIN_PIXELS_FRAC` of the image left once objects are masked): the name is
   :data:`UNKNOWN`, which matches no named background. Without it a blue background came out "gray"
   and a red one "dark gray", the nearest of five names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .detector import _CHROMA_BASIS, _PALETTE_CHROMA, _as_rgb_float
from .shapes import BACKGROUND_COLORS

__all__ = [
    "BACKGROUND_TOLERANCE",
    "BRIGHTNESS_RANGE",
    "UNKNOWN",
    "BackgroundGuess",
    "classify_background",
    "object_mask",
    "touched_by_boxes",
]

#: Chroma (RGB levels) from which a pixel counts as part of an object: an eighth of the least
#: saturated palette colour (a pixel at least ~1/8 covered by an object).
OBJECT_CHROMA = 0.125 * float(np.linalg.norm(_PALETTE_CHROMA, axis=1).min())
#: Object pixels are grown by this many pixels before the background is measured.
EDGE_PX = 2
#: Fewest background pixels (fraction of the image) the fit uses before relaxing the exclusions.
MIN_PIXELS_FRAC = 0.05
#: Brightness factors a background colour may be scaled by and still match it.
BRIGHTNESS_RANGE = (0.94, 1.03)
#: RGB distance to the nearest (scaled) named background beyond which the background is :data:`UNKNOWN`.
#: Measured (tuning split): plain, gradient and texture renders lie within 0.2 of their name;
#: ``sd`` on the built-in model within 9.4 (37 images); SALT's muddiest backgrounds, halfway
#: between light gray and gray, 15-35 away. The two closest names (light gray, beige) are 17.8 apart.
BACKGROUND_TOLERANCE = 15.0
#: The name of a background that is none of the named ones, or cannot be seen.
UNKNOWN = "unknown"

_NAMES: tuple[str, ...] = tuple(BACKGROUND_COLORS)
_BASES = np.asarray([BACKGROUND_COLORS[n] for n in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class BackgroundGuess:
    """A classified background.

    ``name``: the nearest named background, or :data:`UNKNOWN` (module docstring, step 4); ``rgb``:
    the fitted background colour (mid-tone of a ramp); ``distance``: RGB distance from ``rgb`` to the
    nearest (brightness-scaled) named colour;
    ``confidence``: ``(d2 - d1) / (d2 + d1)`` in [0, 1] from the nearest and second-nearest
    distances (0: halfway between two backgrounds).
    """

    name: str
    rgb: tuple[float, float, float]
    distance: float
    confidence: float


def touched_by_boxes(boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Pixels of an ``height x width`` image that a normalized ``(x0, y0, x1, y1)`` box overlaps, even partly."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        c0, c1 = max(0, int(np.floor(x0 * width))), min(width, int(np.ceil(x1 * width)))
        r0, r1 = max(0, int(np.floor(y0 * height))), min(height, int(np.ceil(y1 * height)))
        mask[r0:r1, c0:c1] = True
    return mask


def object_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of (or next to) a saturated object in an ``(H, W, 3)`` float RGB image in [0, 255]."""
    # A 3x3 mean first: pixel noise averages out, objects (several pixels wide) keep their chroma.
    chroma = ndimage.uniform_filter(rgb @ _CHROMA_BASIS.T, size=(3, 3, 1), mode="nearest")
    flat = chroma.reshape(-1, 2)
    low = flat[np.linalg.norm(flat, axis=1) < 2 * OBJECT_CHROMA]
    cast = np.median(low, axis=0) if len(low) else np.zeros(2, dtype=np.float32)
    colored = np.linalg.norm(chroma - cast, axis=-1) >= OBJECT_CHROMA
    if EDGE_PX and colored.any():
        colored = ndimage.binary_dilation(colored, iterations=EDGE_PX)
    return colored


def _fit_center(rgb: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Centre colour of a robust per-channel plane fit over the ``keep`` pixels."""
    height, width = keep.shape
    ys, xs = np.nonzero(keep)
    design = np.stack([np.ones(len(xs)), (xs + 0.5) / width - 0.5, (ys + 0.5) / height - 0.5], axis=1).astype(
        np.float64
    )
    values = rgb[ys, xs].astype(np.float64)
    use = np.ones(len(xs), dtype=bool)
    coef = np.zeros((3, 3))
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[use], values[use], rcond=None)
        residual = np.linalg.norm(values - design @ coef, axis=1)
        scale = 1.4826 * float(np.median(residual[use]))
        inliers = residual <= max(3.0 * scale, 6.0)
        if inliers.sum() < 3 or np.array_equal(inliers, use):
            break
        use = inliers
    return coef[0]


def classify_background(
    image: np.ndarray | Image.Image,
    boxes: Sequence[Sequence[float]] | None = None,
    *,
    tolerance: float = BACKGROUND_TOLERANCE,
) -> BackgroundGuess:
    """Classify the background of a shapes-world image (``(H, W, 3)`` uint8, floats in [0, 1], or PIL).

    ``boxes``: normalized ``(x0, y0, x1, y1)`` boxes whose pixels are left out (the layout's boxes),
    on top of the detected object pixels. ``tolerance``: farther than this from every named
    background is :data:`UNKNOWN`. Method and thresholds in the module docstring.
    """
    rgb = _as_rgb_float(image)
    height, width = rgb.shape[:2]
    min_pixels = max(3, int(MIN_PIXELS_FRAC * height * width))
    objects = object_mask(rgb)
    keep = ~objects
    if boxes:
        keep_boxes = keep & ~touched_by_boxes(boxes, height, width)
        if keep_boxes.sum() >= min_pixels:
            keep = keep_boxes
    visible = keep.sum() >= min_pixels
    if not visible:  # objects (or saturated colour) everywhere: fit all pixels for ``rgb``, name none
        keep = np.ones((height, width), dtype=bool)
    center = _fit_center(rgb, keep)
    lo, hi = BRIGHTNESS_RANGE
    scale = np.clip((_BASES @ center) / np.einsum("kc,kc->k", _BASES, _BASES), lo, hi)
    distances = np.linalg.norm(center[None, :] - scale[:, None] * _BASES, axis=1)
    order = np.argsort(distances)
    d1, d2 = float(distances[order[0]]), float(distances[order[1]])
    known = visible and d1 <= tolerance
    return BackgroundGuess(
        name=_NAMES[int(order[0])] if known else UNKNOWN,
        rgb=tuple(round(float(v), 2) for v in center),  # type: ignore[arg-type]
        distance=round(d1, 3),
        confidence=round((d2 - d1) / (d2 + d1), 4) if d2 + d1 > 0 else 0.0,
    )
