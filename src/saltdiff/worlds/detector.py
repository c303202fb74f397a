"""Exact detector for the shapes world: color segmentation, connected components, shape features.

Pixels are compared in the *chroma plane* (RGB minus its gray component). Alpha blending is linear,
so a pixel mixing palette color ``c`` with a near-neutral background in proportion ``alpha`` has
chroma ``alpha * chroma(c)`` (after removing the background's own chroma, estimated from the
low-chroma pixels, as a color cast): its direction names the color (nearest palette hue, at least
``min_cosine``), its length gives ``alpha``, a soft coverage. Per color, a core mask
(``alpha >= core_alpha``, opened to drop speckles) gives connected components; each grows into
adjacent pixels with ``alpha >= edge_alpha`` (anti-aliased edges, a triangle's thin apex). Coverage
is renormalized by the component's own interior level (faded or drifted colors). The shape is the
nearest prototype in a 3-feature space (fill ratio, vertical centroid, corner fill, all measured in
the half-coverage box, which blur does not inflate); the box is the moment-matched box of that
shape, kept between the half-coverage and grown extents. Score = color purity x shape confidence x
size confidence, in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .shapes import COLORS, SHAPES

__all__ = ["Detection", "box_iou", "detect", "match_detections"]

# Orthonormal basis of the plane orthogonal to the gray axis (1, 1, 1).
_CHROMA_BASIS = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=np.float32) / np.array(
    [[np.sqrt(2.0)], [np.sqrt(6.0)]], dtype=np.float32
)
_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE_CHROMA = np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32) @ _CHROMA_BASIS.T

# Shape prototypes in feature space (fill ratio, vertical centroid in the box, corner fill) and the
# scale of each feature; measured on anti-aliased renders, clean and blurred (sigma 0.8 px).
_PROTOTYPES = np.array([[0.77, 0.5, 0.15], [0.95, 0.5, 0.88], [0.58, 0.635, 0.42]], dtype=np.float32)
_FEATURE_SCALE = np.array([0.08, 0.04, 0.15], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """A detected object: ``label`` is ``f"{color} {shape}"``; ``box`` is normalized ``(x0, y0, x1, y1)``."""

    label: str
    color: str
    shape: str
    box: tuple[float, float, float, float]
    score: float


def _as_rgb_float(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32) * 255.0  # floats are taken in [0, 1]
    return image.astype(np.float32)


def _background_chroma(chroma: np.ndarray, max_chroma: float) -> np.ndarray:
    """Median chroma of the low-chroma pixels (the background); zero if there are none."""
    flat = chroma.reshape(-1, 2)
    low = flat[np.einsum("ij,ij->i", flat, flat) < max_chroma**2]
    if len(low) == 0:
        return np.zeros(2, dtype=np.float32)
    return np.median(low, axis=0).astype(np.float32)


def _shape_features(alpha: np.ndarray) -> np.ndarray:
    """(fill ratio, vertical centroid / height, mean corner fill) of a soft mask cropped to its box."""
    h, w = alpha.shape
    total = float(alpha.sum())
    fill = total / (h * w)
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h
    centroid = float((alpha.sum(axis=1) * ys).sum()) / max(total, 1e-6)
    ch, cw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    corners = np.concatenate(
        [
            alpha[:ch, :cw].ravel(),
            alpha[:ch, -cw:].ravel(),
            alpha[-ch:, :cw].ravel(),
            alpha[-ch:, -cw:].ravel(),
        ]
    )
    return np.array([fill, centroid, float(corners.mean())], dtype=np.float32)


def _classify_shape(features: np.ndarray) -> tuple[str, float]:
    """Nearest prototype and a confidence in [0, 1] (softmax over scaled squared distances)."""
    d2 = (((features[None, :] - _PROTOTYPES) / _FEATURE_SCALE) ** 2).sum(axis=1)
    logits = -0.5 * d2
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    k = int(np.argmin(d2))
    # Far from every prototype lowers the confidence too (a blob that is no shape at all).
    closeness = float(np.exp(-max(0.0, float(d2[k]) - 4.0) / 16.0))
    return SHAPES[k], float(probs[k]) * closeness


def _moment_box(soft: np.ndarray, shape: str) -> tuple[float, float, float, float]:
    """Box of the ideal ``shape`` with the same centroid and second moments as the soft mask.

    Mass, centroid and (up to the blur's own variance) second moments survive blur, unlike extents:
    a w x h rectangle has variance w^2/12 along x, an ellipse w^2/16, an upright triangle w^2/24 along
    x and h^2/18 along y with its centroid 2h/3 below the apex. ``1/12`` undoes pixel discretization.
    """
    h, w = soft.shape
    mass = float(soft.sum())
    ys = np.arange(h, dtype=np.float64) + 0.5
    xs = np.arange(w, dtype=np.float64) + 0.5
    py, px = soft.sum(axis=1) / mass, soft.sum(axis=0) / mass
    my, mx = float((py * ys).sum()), float((px * xs).sum())
    vy = float((py * (ys - my) ** 2).sum()) + 1.0 / 12.0
    vx = float((px * (xs - mx) ** 2).sum()) + 1.0 / 12.0
    kx, ky = {"square": (12.0, 12.0), "circle": (16.0, 16.0), "triangle": (24.0, 18.0)}[shape]
    bw, bh = np.sqrt(kx * vx), np.sqrt(ky * vy)
    top = my - 2.0 * bh / 3.0 if shape == "triangle" else my - bh / 2.0
    return mx - bw / 2.0, top, mx + bw / 2.0, top + bh


def detect(
    image: np.ndarray | Image.Image,
    *,
    min_area_frac: float = 0.004,
    core_alpha: float = 0.45,
    edge_alpha: float = 0.12,
    min_cosine: float = 0.8,
    min_score: float = 0.05,
) -> list[Detection]:
    """Detect colored circles, squares and triangles; detections sorted by decreasing score.

    ``image`` is an ``(H, W, 3)`` uint8 array (floats are taken in [0, 1]) or a PIL image.
    ``min_area_frac``: smallest component kept, as a fraction of the image area.
    ``core_alpha`` / ``edge_alpha``: coverage thresholds of a component's core and of its grown edge.
    ``min_cosine``: how closely a pixel's chroma must point toward a palette color to count as it.
    ``min_score``: detections scoring below it are dropped.

    A box is the moment-matched box of the detected shape (see :func:`_moment_box`), kept between
    the extents of the half-coverage region and of the grown region: exact on clean renders, and
    not inflated by blur.
    """
    if not 0.0 < min_area_frac < 1.0:
        raise ValueError(f"min_area_frac must be in (0, 1), got {min_area_frac}")
    if not 0.0 < edge_alpha <= core_alpha <= 1.0:
        raise ValueError(
            f"need 0 < edge_alpha <= core_alpha <= 1, got edge_alpha={edge_alpha}, core_alpha={core_alpha}"
        )
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    rgb = _as_rgb_float(image)
    height, width = rgb.shape[:2]
    chroma = rgb @ _CHROMA_BASIS.T  # (H, W, 2)
    # The true background is near-neutral: its observed chroma is a color cast, removed from every pixel.
    bg = _background_chroma(chroma, max_chroma=0.25 * float(np.linalg.norm(_PALETTE_CHROMA, axis=1).min()))
    rel = chroma - bg
    norms = np.linalg.norm(_PALETTE_CHROMA, axis=1)
    proj = np.einsum("hwc,kc->hwk", rel, _PALETTE_CHROMA)  # (H, W, K)
    cosine = proj / (np.linalg.norm(rel, axis=-1, keepdims=True) * norms + 1e-6)
    label = np.argmax(cosine, axis=-1)
    best_cos = np.take_along_axis(cosine, label[..., None], axis=-1)[..., 0]
    alpha = np.take_along_axis(proj, label[..., None], axis=-1)[..., 0] / norms[label] ** 2
    colored = best_cos >= min_cosine
    min_area = min_area_frac * height * width
    cross = ndimage.generate_binary_structure(2, 1)
    detections: list[Detection] = []
    for k, color in enumerate(_COLOR_NAMES):
        is_color = colored & (label == k)
        core = is_color & (alpha >= core_alpha)
        if core.sum() < min_area:
            continue
        core = ndimage.binary_opening(core, structure=cross)
        if not core.any():
            continue
        edge = is_color & (alpha >= edge_alpha)
        components, _ = ndimage.label(core, structure=cross)
        for i, sl in enumerate(ndimage.find_objects(components), start=1):
            if sl is None:
                continue
            # Work in a window around the component, two pixels wider on each side.
            r0, r1 = max(0, sl[0].start - 2), min(height, sl[0].stop + 2)
            c0, c1 = max(0, sl[1].start - 2), min(width, sl[1].stop + 2)
            comp = components[r0:r1, c0:c1] == i
            if comp.sum() < min_area:
                continue
            # Grow into adjacent low-coverage pixels: anti-aliased edges, a triangle's thin apex.
            grown = comp | (ndimage.binary_dilation(comp, iterations=2) & edge[r0:r1, c0:c1])
            grown = ndimage.binary_fill_holes(grown)
            rows, cols = np.flatnonzero(grown.any(axis=1)), np.flatnonzero(grown.any(axis=0))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            # Coverage relative to the object's own full-coverage level (drifted or faded colors).
            win_alpha = alpha[r0:r1, c0:c1]
            interior = ndimage.binary_erosion(comp, structure=cross)
            full = max(float(np.median(win_alpha[interior if interior.any() else comp])), core_alpha)
            # Not clipped at 1, so zero-mean noise inside the object stays zero-mean.
            soft = np.where(grown, np.clip(win_alpha / full, 0.0, 2.0), 0.0)[y0:y1, x0:x1]
            # Shape features inside the half-coverage box: a blurred straight edge stays at the 0.5
            # level, so blur does not inflate this box the way it inflates the grown one; a 3x3 median
            # keeps isolated noisy pixels from stretching it.
            half = ndimage.median_filter(soft, size=3, mode="constant") >= 0.5
            if not half.any():
                continue
            hr, hc = np.flatnonzero(half.any(axis=1)), np.flatnonzero(half.any(axis=0))
            shape, shape_conf = _classify_shape(_shape_features(soft[hr[0] : hr[-1] + 1, hc[0] : hc[-1] + 1]))
            mx0, my0, mx1, my1 = _moment_box(soft, shape)
            # A pixel at least half covered has the edge at most half a pixel inside it.
            bx0 = float(np.clip(mx0, 0.0, hc[0] + 0.5))
            by0 = float(np.clip(my0, 0.0, hr[0] + 0.5))
            bx1 = float(np.clip(mx1, hc[-1] + 0.5, x1 - x0))
            by1 = float(np.clip(my1, hr[-1] + 0.5, y1 - y0))
            purity = float(np.clip(best_cos[r0:r1, c0:c1][comp].mean(), 0.0, 1.0))
            size_conf = float(np.clip(soft.sum() / (4.0 * min_area), 0.0, 1.0))
            score = purity * shape_conf * size_conf
            if score < min_score:
                continue
            ox, oy = c0 + x0, r0 + y0
            box = ((ox + bx0) / width, (oy + by0) / height, (ox + bx1) / width, (oy + by1) / height)
            detections.append(
                Detection(label=f"{color} {shape}", color=color, shape=shape, box=box, score=round(score, 6))
            )
    detections.sort(key=lambda d: -d.score)
    return detections


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_detections(
    detections: Sequence[Detection], phrase: str, box: Sequence[float] | None = None
) -> Detection | None:
    """The best detection labeled ``phrase``: highest IoU with ``box`` if given, else highest score."""
    same = [d for d in detections if d.label == phrase]
    if not same:
        return None
    if box is None:
        return max(same, key=lambda d: d.score)
    return max(same, key=lambda d: (box_iou(d.box, box), d.score))
