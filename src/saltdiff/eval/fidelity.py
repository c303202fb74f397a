"""Whole-prompt fidelity (shapes world) and seed diversity of a method's images.

**Per image** (:func:`prompt_fields`, shapes detector only; other detectors give ``None``):

* ``background_found``: the background classifier's answer
  (:func:`saltdiff.worlds.background.classify_background`, the layout's boxes left out);
* ``background_ok``: whether it is the background the prompt names (``None`` when none is named;
  a background the classifier cannot name, ``"unknown"``, is wrong);
* ``prompt_ok``: the image holds **exactly** what the prompt asks for (:func:`match_prompt`): every
  boxed object detected with its label at IoU ≥ 0.5 with its box (one detection per box), every
  unboxed object as many times as the prompt names it and not inside another phrase's box, the
  background right when named, and no other object;
* ``extra_objects``: the detections that match nothing asked for (copies of boxed objects outside
  their boxes, unboxed objects beyond their count or inside another phrase's box, objects the prompt
  does not name), and ``extra_labels``, their labels.

A detection lies *inside* a box when at least half of its own area does (which every detection at
IoU ≥ 0.5 with the box satisfies): an unboxed object drawn in a boxed phrase's place took that box.

**Per pair of seeds of one layout** (:func:`pair_stats`): the share of pixels whose colour differs
*visibly* between the two images, over the pixels outside every box (``seed_diversity``) and over
the whole image (``seed_diversity_image``), and whether the images are identical up to 1/255.

A pixel differs visibly when the CIELAB colour difference ΔE*76 (Euclidean distance in L*a*b*, the
colour space built so that equal distances look equally different) exceeds :data:`VISIBLE_DELTA_E`
= 8 (2.3 is a just-noticeable difference). The shapes world is made of flat-colour regions, so a
person sees a different picture when regions change colour — another background, an object that
appears, moves or changes colour — not when every pixel moves by a few levels. Measured on renders
in random styles (30 pairs per case): two different named backgrounds differ at 96–100 % of their
pixels on average (73 % in the worst pair; the closest colours, light gray and beige, are ΔE 11.3
apart), two renders of the same background with another texture seed or gradient at ≤ 2.4 %. A mean
absolute difference would score a picture covered in imperceptible noise like one with a
different background; a maximum channel difference above 0.1 would miss light gray vs beige (23
levels apart at most, yet clearly different) and weighs blue like green, which the eye does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..worlds.background import classify_background, touched_by_boxes
from ..worlds.detector import box_iou
from .detectors import DetectedBox
from .runs import image_path
from .suites import EvalLayout

#: ΔE*76 above which two colours count as visibly different.
VISIBLE_DELTA_E = 8.0
#: Largest per-channel difference (in levels of 255) of two images counted as identical.
IDENTICAL_LEVELS = 1
#: IoU a boxed object's detection needs for ``prompt_ok``.
PROMPT_MIN_IOU = 0.5

# sRGB (D65) → XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], dtype=np.float64
)
_WHITE = np.array([0.95047, 1.0, 1.08883])


# -- whole-prompt fidelity --------------------------------------------------------------------------------
def boxes_matched(
    targets: Sequence[tuple[str, Sequence[float]]],
    detections: Sequence[DetectedBox],
    min_iou: float = PROMPT_MIN_IOU,
) -> list[bool]:
    """Per target ``(phrase, box)``: whether it gets its own same-label detection with IoU ≥ ``min_iou``.

    Greedy one-to-one matching, highest IoU first, so two boxes of one phrase need two detections.
    """
    return match_boxes(targets, detections, min_iou)[0]


def match_boxes(
    targets: Sequence[tuple[str, Sequence[float]]], detections: Sequence[DetectedBox], min_iou: float
) -> tuple[list[bool], set[int]]:
    """:func:`boxes_matched` and the indices of the detections it used."""
    pairs = sorted(
        (
            (box_iou(d.box, box), t, j)
            for t, (phrase, box) in enumerate(targets)
            for j, d in enumerate(detections)
            if d.label == phrase
        ),
        key=lambda p: -p[0],
    )
    matched = [False] * len(targets)
    used: set[int] = set()
    for iou, t, j in pairs:
        if iou < min_iou:
            break
        if not matched[t] and j not in used:
            matched[t] = True
            used.add(j)
    return matched, used


def inside(det_box: Sequence[float], box: Sequence[float]) -> bool:
    """Whether at least half of ``det_box``'s area lies inside ``box`` (module docstring)."""
    ix = max(0.0, min(det_box[2], box[2]) - max(det_box[0], box[0]))
    iy = max(0.0, min(det_box[3], box[3]) - max(det_box[1], box[1]))
    area = (det_box[2] - det_box[0]) * (det_box[3] - det_box[1])
    return area > 0 and ix * iy >= 0.5 * area


def allowed_unboxed(
    targets: Sequence[tuple[str, Sequence[float]]],
    unboxed: Sequence[str],
    detections: Sequence[DetectedBox],
    taken: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[int]:
    """Indices of the detections that stand for the prompt's unboxed objects.

    For each unboxed phrase named ``k`` times: its ``k`` highest-scoring detections that are not in
    ``taken`` (detections matched to boxes) and not inside a box of another phrase. Everything else of
    that label is a copy nobody asked for.
    """
    wanted: dict[str, int] = {}
    for phrase in unboxed:
        wanted[phrase] = wanted.get(phrase, 0) + 1
    chosen: list[int] = []
    for phrase, count in wanted.items():
        other_boxes = [box for p, box in targets if p != phrase]
        candidates = [
            j
            for j, d in enumerate(detections)
            if d.label == phrase and j not in taken and not any(inside(d.box, b) for b in other_boxes)
        ]
        candidates.sort(key=lambda j: -detections[j].score)
        chosen.extend(candidates[:count])
    return sorted(chosen)


def match_prompt(
    targets: Sequence[tuple[str, Sequence[float]]],
    unboxed: Sequence[str],
    detections: Sequence[DetectedBox],
    min_iou: float = PROMPT_MIN_IOU,
) -> dict[str, Any]:
    """Match detections to what the prompt asks for: ``{"boxes_ok": [bool per target],
    "unboxed_ok": bool, "extra": [indices of detections that match nothing asked for]}``.

    Boxed targets first, one-to-one (:func:`boxes_matched`), then the unboxed objects among the
    remaining detections (:func:`allowed_unboxed`); the rest are extras.
    """
    matched, used = match_boxes(targets, detections, min_iou)
    for_unboxed = allowed_unboxed(targets, unboxed, detections, used)
    wanted = len(unboxed)
    taken = used | set(for_unboxed)
    return {
        "boxes_ok": matched,
        "unboxed_ok": len(for_unboxed) == wanted,
        "extra": [j for j in range(len(detections)) if j not in taken],
    }


def prompt_fields(
    image, lay: EvalLayout, detections: Sequence[DetectedBox], *, shapes: bool
) -> dict[str, Any]:
    """``background_named``, ``background_found``, ``background_ok``, ``prompt_ok``, ``extra_objects``,
    ``extra_labels`` of one image (module docstring).

    ``shapes``: whether ``detections`` come from the shapes detector; otherwise all but
    ``background_named`` are ``None`` (no background classifier, and an open-vocabulary detector only
    looks for the phrases it is given, so it cannot see unrequested objects).
    """
    fields: dict[str, Any] = {
        "background_named": lay.background,
        "background_found": None,
        "background_ok": None,
        "prompt_ok": None,
        "extra_objects": None,
        "extra_labels": None,
    }
    if not shapes:
        return fields
    found = classify_background(image, [box for _, box in lay.boxes]).name
    background_ok = None if lay.background is None else found == lay.background
    match = match_prompt(list(lay.boxes), list(lay.unboxed), detections)
    fields["background_found"] = found
    fields["background_ok"] = background_ok
    fields["prompt_ok"] = (
        all(match["boxes_ok"]) and match["unboxed_ok"] and background_ok is not False and not match["extra"]
    )
    fields["extra_objects"] = len(match["extra"])
    fields["extra_labels"] = [detections[j].label for j in match["extra"]]
    return fields


# -- seed diversity -----------------------------------------------------------------------------------------
def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of ``(..., 3)`` sRGB values in [0, 255]."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    eps = (6.0 / 29.0) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    return np.stack(
        [116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1
    )


def outside_boxes(boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Pixels of an ``height x width`` image that no normalized box overlaps, even partly."""
    return ~touched_by_boxes(boxes, height, width)


def _rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"images must be (H, W, 3) uint8 arrays or PIL images, got {image.dtype} {image.shape}"
        )
    return image


def pair_stats(a, b, boxes: Sequence[Sequence[float]] = ()) -> dict[str, Any]:
    """``{"outside", "image", "identical"}`` for two images of one layout (module docstring).

    ``outside``: share of the pixels outside every box whose ΔE*76 exceeds :data:`VISIBLE_DELTA_E`
    (``None`` when the boxes cover the image); ``image``: the same over all pixels; ``identical``:
    no channel differs by more than :data:`IDENTICAL_LEVELS`.
    """
    a, b = _rgb(a), _rgb(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare images of shapes {a.shape} and {b.shape}")
    visible = np.linalg.norm(srgb_to_lab(a) - srgb_to_lab(b), axis=-1) > VISIBLE_DELTA_E
    outside = outside_boxes(boxes, a.shape[0], a.shape[1])
    return {
        "outside": float(visible[outside].mean()) if outside.any() else None,
        "image": float(visible.mean()),
        "identical": bool(np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= IDENTICAL_LEVELS),
    }


def layout_pairs(images: Sequence, boxes: Sequence[Sequence[float]] = ()) -> list[dict[str, Any]]:
    """:func:`pair_stats` of every pair of ``images`` (one per seed of one layout)."""
    return [pair_stats(a, b, boxes) for a, b in itertools.combinations(images, 2)]


def seed_pairs(out: str, layouts: Sequence[EvalLayout], seeds: Sequence[int], method: str) -> dict[str, list]:
    """Pair statistics per layout id, from the saved images ``images/METHOD/ID_sSEED.png``."""
    result = {}
    for lay in layouts:
        images = []
        for seed in seeds:
            with Image.open(image_path(out, method, lay.id, seed)) as img:
                images.append(np.asarray(img.convert("RGB")))
        result[lay.id] = layout_pairs(images, [box for _, box in lay.boxes])
    return result


def summarize_seed_pairs(pairs: Sequence[dict]) -> dict[str, Any]:
    """``seed_diversity`` (outside the boxes), ``seed_diversity_image``, ``identical_seed_pairs``,
    ``seed_pairs``: means over pairs (``None`` without pairs, i.e. with one seed)."""
    outside = [p["outside"] for p in pairs if p["outside"] is not None]
    return {
        "seed_diversity": float(np.mean(outside)) if outside else None,
        "seed_diversity_image": float(np.mean([p["image"] for p in pairs])) if pairs else None,
        "identical_seed_pairs": sum(p["identical"] for p in pairs) if pairs else None,
        "seed_pairs": len(pairs),
    }
