"""Cut-outs: which pixels of a generated object image are the object.

A reference image is only as good as its cut-outs: background pasted with an object inverts into a
start that draws the wrong thing in the box. Two kinds of evidence exist for an image generated
from "a {phrase} on a white background":

* **colour**: the object differs from the background. Cheap and pixel-sharp, but "the background"
  is only known if it is flat: a soft shadow, a vignette, an off-white gradient or clutter all
  differ from the border colour too, and a white object on white does not differ at all.
* **attention**: the phrase's own cross-attention, averaged over the sampling steps, says *where*
  the object is, whatever the colours. But it is coarse (16×16 for SD at 512², one cell = 32 px),
  blurred, a little off, and peaks on the object's centre rather than filling it, so thresholding
  it gives a blob, not an outline.

:func:`attention_color_mask` uses each for what it is good at: attention decides where the object
is and which colours belong to it and which to the background around it, colour draws the edge.
:func:`border_color_mask` (colour alone) and :func:`attention_mask` (attention alone) remain, and
:func:`cut_out` picks one by name and falls back to colour when no attention map is available.
All functions take ``[H, W, 3]`` float RGB images in [0, 1] and return ``[H, W]`` bool masks.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

CUTOUTS = ("attention-color", "foreground", "attention")

# attention-color: each constant was tuned on tests/test_cutout.py's synthetic cases (python
# tests/test_cutout.py prints the table); the docstrings below say what each one trades.
COLOR_BINS = 32  # per channel: 0.03 of the range, fine enough to tell off-white from white
PRIOR_SLOPE = 4.0  # log-odds per unit of normalized attention: -1 where it is 0, +3 at its peak
PRIOR_CENTER = 0.25  # normalized attention at which location alone says "don't know"
EVIDENCE_LIMIT = 6.0  # colour can overrule location, but no single colour is certain
LOCAL_WEIGHT = 0.5  # background colour: half "seen anywhere in the background", half "seen nearby"
LOCAL_SIGMA = 0.04  # "nearby": a Gaussian of this fraction of the image side
LOCAL_TAU = 0.04  # RGB distance at which a colour stops matching the nearby background
SMOOTHNESS = 12.0  # log-odds paid per pixel of boundary through a flat region
EM_ITERATIONS = 3  # cut, re-learn the colours from the cut, cut again
HOLE_ATTENTION = 0.5  # an enclosed hole is object when its mean normalized attention is at least this
CUT_SCALE = 1000  # scipy's max-flow wants integer capacities: log-odds in thousandths


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` with its holes filled: one solid object."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    keep = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(keep)


def border_color(image: np.ndarray, width: int = 2) -> np.ndarray:
    """The median colour of the image's outer ``width`` pixels: the background, if it is flat."""
    border = np.concatenate(
        [
            image[:width].reshape(-1, 3),
            image[-width:].reshape(-1, 3),
            image[:, :width].reshape(-1, 3),
            image[:, -width:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def border_color_mask(image: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """Pixels farther than ``threshold`` (RGB distance) from the border colour, as one solid object.

    Exact on a flat background, which is what the object prompt asks for; wrong wherever the
    background is not flat (shadows, vignettes, gradients, clutter) or the object has the
    background's colour. The cut-out of last resort: it needs nothing but the image.
    """
    distance = np.sqrt(((image - border_color(image)) ** 2).sum(-1))
    return largest_component(distance > threshold)


def resize_bilinear(attention: np.ndarray, height: int, width: int) -> np.ndarray:
    """A low-resolution map resized to ``height × width``, cell centres kept (torch's
    ``interpolate(mode="bilinear", align_corners=False)``, without torch)."""
    att = np.asarray(attention, dtype=np.float32)
    rows = np.clip((np.arange(height) + 0.5) * att.shape[0] / height - 0.5, 0, att.shape[0] - 1)
    cols = np.clip((np.arange(width) + 0.5) * att.shape[1] / width - 0.5, 0, att.shape[1] - 1)
    return ndimage.map_coordinates(att, np.meshgrid(rows, cols, indexing="ij"), order=1, mode="nearest")


def has_location(attention: np.ndarray | None) -> bool:
    """Whether an attention map can say where anything is: 2-D, finite and not constant."""
    if attention is None:
        return False
    att = np.asarray(attention, dtype=np.float32)
    if att.ndim != 2 or att.size == 0 or not np.isfinite(att).all():
        return False
    return float(att.max() - att.min()) > 1e-8 * max(float(np.abs(att).max()), 1e-30)


def upsample_attention(attention: np.ndarray, height: int, width: int) -> np.ndarray:
    """The attention map resized to ``height × width`` and stretched to [0, 1] (min to max).

    The stretch makes the prior independent of how much attention the phrase got in absolute
    terms, which varies with the prompt's length and the layer mix.
    """
    up = resize_bilinear(attention, height, width)
    low, high = float(up.min()), float(up.max())
    return (up - low) / max(high - low, 1e-30)


def attention_mask(attention: np.ndarray, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """The phrase's cross-attention, upsampled and thresholded at ``threshold`` × its maximum.

    Finds the object whatever its colours, but its outline is the attention's: coarse, and smaller
    than the object when the map peaks on the object's centre. Empty for a map without location.
    """
    if not has_location(attention):
        return np.zeros((height, width), dtype=bool)
    up = resize_bilinear(attention, height, width)
    return largest_component(up >= threshold * up.max())


def color_histogram(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The weighted ``COLOR_BINS³`` colour histogram of ``image``, smoothed by one bin (shading does
    not split a colour) and summing to one (zero if all weights are)."""
    bins = COLOR_BINS
    index = np.clip((image * bins).astype(np.int64), 0, bins - 1)
    flat = (index[..., 0] * bins + index[..., 1]) * bins + index[..., 2]
    hist = np.bincount(flat.ravel(), weights=weight.ravel(), minlength=bins**3).reshape(bins, bins, bins)
    hist = ndimage.gaussian_filter(hist, sigma=1.0, mode="constant")
    total = hist.sum()
    return hist / total if total > 0 else hist


def color_bins(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pixel's histogram bin, as an index into a ``COLOR_BINS³`` array."""
    index = np.clip((image * COLOR_BINS).astype(np.int64), 0, COLOR_BINS - 1)
    return index[..., 0], index[..., 1], index[..., 2]


def unmix(core: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The object's colours: the attention core's histogram less the share that is background.

    Coarse or broad attention spills onto the background around the object, so the core's colours
    are a mixture ``π·object + (1 − π)·background``. ``1 − π`` is at most the smallest ratio
    ``core / background`` over the background's main colours; subtracting that much leaves the
    colours the background cannot explain. Unchanged if nothing would be left.
    """
    main = background >= 0.2 * background.max()
    spill = float(np.clip(np.min(core[main] / background[main]), 0.0, 1.0)) if main.any() else 0.0
    obj = np.maximum(core - spill * background, 0.0)
    total = obj.sum()
    return obj / total if total > 1e-3 else core


def local_background(image: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """The background colour expected at each pixel: a ``sigma``-wide Gaussian average of the pixels
    believed to be background (normalized convolution), which follows gradients and vignettes."""
    spread = ndimage.gaussian_filter(weight, sigma, mode="nearest")
    total = ndimage.gaussian_filter(image * weight[..., None], (sigma, sigma, 0), mode="nearest")
    return total / np.maximum(spread, 1e-6)[..., None]


def min_cut(logit: np.ndarray, image: np.ndarray, smoothness: float) -> np.ndarray:
    """The labelling that minimizes ``Σ_i cost(i) + smoothness · Σ_{i~j, split} exp(−β‖I_i − I_j‖²)``.

    ``cost(i)`` is ``max(−logit_i, 0)`` for object and ``max(logit_i, 0)`` for background; the
    pairwise term (GrabCut's, 4-neighbours, β from the mean squared neighbour difference) makes a
    boundary cheap where the colour jumps and dear where it is smooth, so the cut follows the
    object's edge, not the coarse attention's iso-line. Solved exactly as a minimum s-t cut.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import breadth_first_order, maximum_flow

    height, width = logit.shape
    n = height * width
    index = np.arange(n).reshape(height, width)
    first = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
    second = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
    flat = image.reshape(n, -1)
    jump = ((flat[first] - flat[second]) ** 2).sum(-1)
    pair = smoothness * np.exp(-jump / (2 * jump.mean() + 1e-12))
    source, sink = n, n + 1
    nodes = np.arange(n)
    rows = np.concatenate([first, second, np.full(n, source), nodes])
    cols = np.concatenate([second, first, nodes, np.full(n, sink)])
    cost = logit.ravel()
    capacity = np.concatenate([pair, pair, np.maximum(cost, 0), np.maximum(-cost, 0)])
    graph = sparse.csr_matrix(
        (np.round(capacity * CUT_SCALE).astype(np.int32), (rows, cols)), shape=(n + 2, n + 2)
    )
    flow = maximum_flow(graph, source, sink, method="dinic").flow
    residual = (graph - flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int32)
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    side = np.zeros(n + 2, dtype=bool)
    side[reached] = True
    return side[:n].reshape(height, width)


def attention_color_mask(
    image: np.ndarray, attention: np.ndarray | None, threshold: float = 0.15
) -> np.ndarray:
    """The object as attention locates it and colour outlines it: GrabCut, seeded by attention.

    Per pixel, the log-odds of "object" add a location prior, ``PRIOR_SLOPE · (a − PRIOR_CENTER)``
    for the normalized attention ``a``, and colour evidence, ``log p(colour | object) −
    log p(colour | background)`` clipped to ``±EVIDENCE_LIMIT``. The object's colours are a
    histogram of the pixels weighted by ``a²`` less its share of background colours
    (:func:`unmix`), then the last cut's. The background's are a
    mixture of a histogram weighted by ``(1 − a)²`` (clutter, shadows: colours seen anywhere in the
    background) and a Gaussian around the background colour nearby (:func:`local_background`:
    gradients and vignettes, whose colours next to the object occur nowhere else). A minimum cut
    with GrabCut's edge-aware smoothness (:func:`min_cut`) labels the pixels, so the boundary
    follows the object's edge rather than the coarse attention's; the labels re-learn the colours,
    ``EM_ITERATIONS`` times. The object is the labelled component holding the most attention, with
    the enclosed holes filled whose mean attention is at least ``HOLE_ATTENTION`` (a highlight on
    a white object, not the opening of a mug's handle).

    Where colour says nothing (white on white) location decides; where location is vague (the
    attention's blurred rim) colour and edges decide. Without a usable attention map this is
    :func:`border_color_mask` with ``threshold``.
    """
    height, width = image.shape[:2]
    if not has_location(attention):
        return border_color_mask(image, threshold)
    att = upsample_attention(attention, height, width)
    prior = PRIOR_SLOPE * (att - PRIOR_CENTER)
    where = color_bins(image)
    volume = float(COLOR_BINS**3)  # histogram mass per bin -> density per unit of RGB volume
    bg_weight = (1.0 - att) ** 2
    obj = unmix(color_histogram(image, att**2), color_histogram(image, bg_weight))
    for _ in range(EM_ITERATIONS):
        anywhere = color_histogram(image, bg_weight)[where] * volume
        near = local_background(image, bg_weight, LOCAL_SIGMA * max(height, width))
        distance2 = ((image - near) ** 2).sum(-1)
        nearby = np.exp(-distance2 / (2 * LOCAL_TAU**2)) / (2 * np.pi * LOCAL_TAU**2) ** 1.5
        density_bg = (1 - LOCAL_WEIGHT) * anywhere + LOCAL_WEIGHT * nearby
        evidence = np.log(obj[where] * volume + 1e-3) - np.log(density_bg + 1e-3)
        mask = min_cut(prior + np.clip(evidence, -EVIDENCE_LIMIT, EVIDENCE_LIMIT), image, SMOOTHNESS)
        if not mask.any() or mask.all():
            break
        obj, bg_weight = color_histogram(image, mask.astype(np.float64)), (~mask).astype(np.float64)
    labels, count = ndimage.label(mask)
    if count == 0 or mask.all():
        logger.info("the attention-color cut-out found no object boundary; using the attention alone")
        return attention_mask(attention, height, width)
    held = ndimage.sum(att, labels, index=range(1, count + 1))
    mask = labels == (int(np.argmax(held)) + 1)
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if count:
        mean = ndimage.mean(att, holes, index=range(1, count + 1))
        mask |= np.isin(holes, 1 + np.flatnonzero(np.asarray(mean) >= HOLE_ATTENTION))
    return mask


def cut_out(
    image: np.ndarray,
    attention: np.ndarray | None,
    method: str = "attention-color",
    *,
    threshold: float = 0.15,
    attention_threshold: float = 0.5,
) -> np.ndarray:
    """The object mask of ``image`` by ``method`` (one of :data:`CUTOUTS`).

    The attention cut-outs fall back to :func:`border_color_mask` (with ``threshold``) when
    ``attention`` is ``None`` or carries no location, so a cached object without a map or a model
    whose attention was not recorded still gets cut out.
    """
    if method not in CUTOUTS:
        raise ValueError(f"cutout must be one of {CUTOUTS}, got {method!r}")
    height, width = image.shape[:2]
    if method == "foreground" or not has_location(attention):
        if method != "foreground":
            logger.info("no usable attention map for the %s cut-out; cutting out by border colour", method)
        return border_color_mask(image, threshold)
    if method == "attention":
        return attention_mask(attention, height, width, attention_threshold)
    return attention_color_mask(image, attention, threshold)
