"""The synthetic "shapes" world: colored circles, squares and triangles on plain backgrounds.

Every scene is a pure function of an integer seed (``numpy.random.default_rng(seed)``): its objects,
their tight boxes, its background and its caption. Rendering is anti-aliased (4x supersampled
coverage) and vectorized, so a training loop can render batches on the fly.

Boxes are normalized ``(x0, y0, x1, y1)`` with the origin at the top-left corner. Boxes of sampled
scenes lie on the 64-pixel grid (multiples of 1/64) and are tight: the shape touches all four sides
(an upright isosceles triangle has its apex on the top side and its base on the bottom side).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_STYLES",
    "COLORS",
    "HARD_HELDOUT_SEEDS",
    "HELDOUT_SEEDS",
    "HELDOUT_SPLIT_SEEDS",
    "HARD_HELDOUT_SPLIT_SEEDS",
    "EVAL_SPLITS",
    "EXTRA_UNBOXED_FRACTION",
    "NUM_TEMPLATES",
    "SHAPES",
    "TRAIN_SEEDS",
    "VAL_SEEDS",
    "Scene",
    "SceneObject",
    "caption_for",
    "heldout_hard_layouts",
    "heldout_layouts",
    "render",
    "render_batch",
    "render_objects",
    "render_single_object",
    "sample_scene",
    "vocabulary",
]

#: Object colors (RGB): saturated, with hues spread around the wheel (about 0, 33, 55, 130, 220, 285 degrees).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (250, 135, 0),
    "yellow": (235, 215, 0),
    "green": (30, 165, 55),
    "blue": (30, 85, 230),
    "purple": (150, 40, 200),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Low-saturation background colors (RGB).
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light gray": (205, 205, 205),
    "gray": (150, 150, 150),
    "dark gray": (75, 75, 75),
    "beige": (228, 220, 202),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_COLORS)
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "texture")

TRAIN_SEEDS = range(0, 1_000_000)
VAL_SEEDS = range(1_000_000, 1_100_000)
HELDOUT_SEEDS = range(2_000_000, 2_100_000)
#: Seeds of the harder held-out layouts (:func:`heldout_hard_layouts`), disjoint from the ranges above.
HARD_HELDOUT_SEEDS = range(2_100_000, 2_200_000)
#: The evaluation splits, each half of its held-out range. The *tuning* split (``"val"``) is the first
#: half: it holds every layout that defaults were chosen on before the splits existed (the first 200
#: of ``HELDOUT_SEEDS`` / ``HARD_HELDOUT_SEEDS``). The *test* split is the second half, never looked at
#: while choosing a default; reported numbers come from it.
EVAL_SPLITS: tuple[str, ...] = ("val", "test")
HELDOUT_SPLIT_SEEDS: dict[str, range] = {
    "val": range(2_000_000, 2_050_000),
    "test": range(2_050_000, 2_100_000),
}
HARD_HELDOUT_SPLIT_SEEDS: dict[str, range] = {
    "val": range(2_100_000, 2_150_000),
    "test": range(2_150_000, 2_200_000),
}
#: Share of held-out layouts whose prompt also names an object without a box (evenly spread).
EXTRA_UNBOXED_FRACTION = 0.5

#: Grid on which sampled boxes are snapped (pixels of a 64x64 image).
GRID = 64
#: Box side in grid pixels: about 0.22 to 0.55 of the image.
MIN_SIDE_PX = 14
MAX_SIDE_PX = 35
#: Minimum empty gap between two boxes and between a box and the image border, in grid pixels.
GAP_PX = 3
BORDER_PX = 1
#: Probability that a sampled caption names the background.
P_MENTION_BACKGROUND = 0.6
SUPERSAMPLE = 4

_TEMPLATES: tuple[tuple[str, str], ...] = (
    # (template without background, template with background); {objs} has articles, {bare} has none.
    ("{objs}", "{objs} on a {bg} background"),
    ("a photo of {objs}", "a photo of {objs} on a {bg} background"),
    ("{bare}", "{bare}, {bg} background"),
    ("an image of {objs}", "{objs} on {bg}"),
    ("a picture with {objs}", "a picture of {objs} on a {bg} background"),
)
NUM_TEMPLATES = len(_TEMPLATES)


@dataclass(frozen=True)
class SceneObject:
    """One object: a color, a shape and its tight normalized box ``(x0, y0, x1, y1)``."""

    color: str
    shape: str
    box: tuple[float, float, float, float]

    @property
    def phrase(self) -> str:
        """The object's phrase in captions, e.g. ``"red circle"``."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A sampled scene: objects (non-overlapping), background, caption, and the seed it came from."""

    objects: tuple[SceneObject, ...]
    background: str
    background_style: str
    caption: str
    seed: int


# ----------------------------------------------------------------------------------------------------------
# Captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _phrase_of(obj: SceneObject | str | tuple[str, str]) -> str:
    if isinstance(obj, SceneObject):
        return obj.phrase
    if isinstance(obj, str):
        return obj
    color, shape = obj
    return f"{color} {shape}"


def caption_for(
    objects: Sequence[SceneObject | str | tuple[str, str]], background: str | None, template_index: int
) -> str:
    """Caption naming ``objects`` in the given order, with the background when it is not ``None``.

    ``objects`` may be scene objects, phrases ("red circle") or ``(color, shape)`` pairs;
    ``template_index`` is taken modulo :data:`NUM_TEMPLATES`.
    """
    if len(objects) == 0:
        raise ValueError("caption_for needs at least one object, got an empty sequence")
    phrases = [_phrase_of(o) for o in objects]
    for p in phrases:
        color, _, shape = p.partition(" ")
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"unknown object phrase {p!r}: expected '<color> <shape>' from the shapes world")
    if background is not None and background not in BACKGROUND_COLORS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    without_bg, with_bg = _TEMPLATES[template_index % NUM_TEMPLATES]
    template = without_bg if background is None else with_bg
    bare = ", ".join(phrases)
    objs = _join([_article(p) for p in phrases])
    return template.format(objs=objs, bare=bare, bg=background)


def vocabulary() -> list[str]:
    """Every word that can appear in a caption (lowercase, alphabetic), sorted."""
    words: set[str] = set()
    for color in COLORS:
        words.add(color)
    words.update(SHAPES)
    for bg in BACKGROUNDS:
        words.update(bg.split())
    for pair in _TEMPLATES:
        for template in pair:
            for token in template.replace(",", " ").split():
                if not token.startswith("{"):
                    words.add(token)
    words.update({"a", "an", "and"})
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------
# Sampling


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place_boxes(rng: np.random.Generator, shapes: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """Non-overlapping integer boxes on the 64-pixel grid, one per shape, separated by ``GAP_PX``."""
    n = len(shapes)
    # Larger objects when fewer share the image; shrink the upper bound after repeated failures.
    max_side = {1: MAX_SIDE_PX, 2: 30, 3: 26}.get(n, 22)
    while True:
        placed: list[tuple[int, int, int, int]] = []
        for shape in shapes:
            for _ in range(60):
                w = int(rng.integers(MIN_SIDE_PX, max_side + 1))
                if shape == "triangle":
                    h = int(np.clip(round(w * rng.uniform(0.85, 1.15)), MIN_SIDE_PX, MAX_SIDE_PX))
                else:
                    h = w
                x0 = int(rng.integers(BORDER_PX, GRID - BORDER_PX - w + 1))
                y0 = int(rng.integers(BORDER_PX, GRID - BORDER_PX - h + 1))
                box = (x0, y0, x0 + w, y0 + h)
                if all(_separated(box, other, GAP_PX) for other in placed):
                    placed.append(box)
                    break
            else:
                break
        if len(placed) == n:
            return placed
        max_side = max(MIN_SIDE_PX, max_side - 2)


def sample_scene(seed: int, *, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """Sample a scene deterministically from ``seed``: 1-3 distinct (color, shape) objects, apart from each other."""
    if not 1 <= min_objects <= max_objects <= 4:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= 4, got min_objects={min_objects}, max_objects={max_objects}"
        )
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rng = np.random.default_rng(int(seed))
    n = int(rng.integers(min_objects, max_objects + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    kinds = [pairs[i] for i in chosen]
    boxes = _place_boxes(rng, [s for _, s in kinds])
    objects = tuple(
        SceneObject(color=c, shape=s, box=tuple(v / GRID for v in b))  # type: ignore[arg-type]
        for (c, s), b in zip(kinds, boxes)
    )
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    style = BACKGROUND_STYLES[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    order = rng.permutation(n)
    template = int(rng.integers(NUM_TEMPLATES))
    mention_bg = bool(rng.random() < P_MENTION_BACKGROUND)
    caption = caption_for([objects[i] for i in order], background if mention_bg else None, template)
    return Scene(
        objects=objects, background=background, background_style=style, caption=caption, seed=int(seed)
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _background(background: str, style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Float32 HxWx3 background in [0, 255]."""
    if background not in BACKGROUND_COLORS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    base = np.asarray(BACKGROUND_COLORS[background], dtype=np.float32)
    if style == "plain":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if style == "gradient":
        # Soft ramp between two close tones of the same color (brightness x0.9 .. x1.08).
        lo, hi = rng.uniform(0.88, 0.95), rng.uniform(1.02, 1.08)
        ramp = np.linspace(lo, hi, size, dtype=np.float32)
        if rng.random() < 0.5:
            ramp = ramp[::-1]
        scale = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        img = base[None, None, :] * np.broadcast_to(scale, (size, size))[..., None]
        return np.clip(img, 0, 255)
    if style == "texture":
        # Light luminance-only noise: a smooth 8x8 field upsampled, plus a little fine grain.
        coarse = rng.normal(0.0, 6.0, size=(8, 8)).astype(np.float32)
        pos = np.clip((np.arange(size, dtype=np.float32) + 0.5) * 8 / size - 0.5, 0, 7)
        i0 = np.minimum(pos.astype(np.int64), 6)
        t = pos - i0
        rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]  # (size, 8): bilinear upsampling
        smooth = rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]
        fine = rng.normal(0.0, 2.5, size=(size, size)).astype(np.float32)
        return np.clip(base[None, None, :] + (smooth + fine)[..., None], 0, 255)
    raise ValueError(f"unknown background_style {style!r}; expected one of {BACKGROUND_STYLES}")


def _coverage(shape: str, box_px: tuple[float, float, float, float], size: int):
    """Anti-aliased coverage of a shape: ``(alpha window, (r0, r1, c0, c1))`` in pixel rows/cols."""
    x0, y0, x1, y1 = box_px
    c0, c1 = max(0, int(np.floor(x0))), min(size, int(np.ceil(x1)))
    r0, r1 = max(0, int(np.floor(y0))), min(size, int(np.ceil(y1)))
    if c1 <= c0 or r1 <= r0:
        return np.zeros((0, 0), np.float32), (r0, r0, c0, c0)
    ss = SUPERSAMPLE
    xs = (np.arange(c0 * ss, c1 * ss, dtype=np.float32) + 0.5) / ss
    ys = (np.arange(r0 * ss, r1 * ss, dtype=np.float32) + 0.5) / ss
    X, Y = xs[None, :], ys[:, None]
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        inside = ((X - cx) / (w / 2)) ** 2 + ((Y - cy) / (h / 2)) ** 2 <= 1.0
    elif shape == "square":
        inside = (X >= x0) & (X <= x1) & (Y >= y0) & (Y <= y1)
    elif shape == "triangle":
        inside = (Y >= y0) & (Y <= y1) & (np.abs(X - cx) <= (w / 2) * (Y - y0) / h)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    alpha = inside.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3), dtype=np.float32)
    return alpha, (r0, r1, c0, c1)


def _check_object(obj: SceneObject) -> None:
    if obj.color not in COLORS:
        raise ValueError(f"unknown color {obj.color!r}; expected one of {tuple(COLORS)}")
    if obj.shape not in SHAPES:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    x0, y0, x1, y1 = obj.box
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(
            f"box {obj.box!r} of {obj.phrase!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
        )


def _draw(img: np.ndarray, objects: Sequence[SceneObject]) -> np.ndarray:
    size = img.shape[0]
    for obj in objects:
        box_px = tuple(v * size for v in obj.box)
        alpha, (r0, r1, c0, c1) = _coverage(obj.shape, box_px, size)  # type: ignore[arg-type]
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        region = img[r0:r1, c0:c1]
        a = alpha[..., None]
        img[r0:r1, c0:c1] = region * (1.0 - a) + color * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")


def render_objects(
    objects: Sequence[SceneObject],
    background: str = "white",
    background_style: str = "plain",
    size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """Draw ``objects`` exactly in their boxes on a background: a uint8 ``size x size x 3`` image.

    Boxes may be any normalized boxes (circles become ellipses in non-square boxes); later objects are
    drawn over earlier ones. ``seed`` drives the gradient direction and texture noise.
    """
    _check_size(size)
    for obj in objects:
        _check_object(obj)
    rng = np.random.default_rng([int(seed), 7])
    img = _background(background, background_style, size, rng)
    return _draw(img, objects)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a sampled scene as a uint8 ``size x size x 3`` image (deterministic)."""
    return render_objects(scene.objects, scene.background, scene.background_style, size=size, seed=scene.seed)


def render_batch(seeds: Sequence[int], size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Sample and render scenes: ``(images (N, size, size, 3) uint8, captions)``."""
    _check_size(size)
    images = np.empty((len(seeds), size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i, seed in enumerate(seeds):
        scene = sample_scene(int(seed))
        images[i] = render(scene, size)
        captions.append(scene.caption)
    return images, captions


def render_single_object(color: str, shape: str, size: int = 64, background: str = "white") -> np.ndarray:
    """One object centered, its box covering the central 70% of the image (side 0.7)."""
    obj = SceneObject(color=color, shape=shape, box=(0.15, 0.15, 0.85, 0.85))
    return render_objects([obj], background=background, background_style="plain", size=size)


# ----------------------------------------------------------------------------------------------------------
# Held-out layouts


def _split_seeds(seeds: dict[str, range], split: str) -> range:
    if split not in seeds:
        raise ValueError(f"split must be one of {tuple(seeds)}, got {split!r}")
    return seeds[split]


def heldout_layouts(
    n: int, *, split: str = "test", extra_unboxed_fraction: float = EXTRA_UNBOXED_FRACTION
) -> list[dict]:
    """``n`` deterministic evaluation layouts of one split (:data:`HELDOUT_SPLIT_SEEDS`, never used in
    training): ``"val"`` to choose defaults on, ``"test"`` to report.

    Each is ``{"prompt", "boxes": [{"phrase", "box"}], "unboxed": [phrases], "background",
    "background_named", "seed"}``: ``background`` is the scene's background whether or not the prompt
    names it, ``background_named`` whether it does (with probability :data:`P_MENTION_BACKGROUND`).
    In an evenly spread ``extra_unboxed_fraction`` of them (layout ``i`` has one when
    ``floor((i + 1) * f) > floor(i * f)``), the scene has at most two objects and the prompt also
    names a third, different object that has no box, to measure text alignment outside the layout.
    """
    seeds = _split_seeds(HELDOUT_SPLIT_SEEDS, split)
    if not isinstance(n, (int, np.integer)) or n < 0 or n > len(seeds):
        raise ValueError(f"n must be an integer in [0, {len(seeds)}], got {n!r}")
    if not 0.0 <= extra_unboxed_fraction <= 1.0:
        raise ValueError(f"extra_unboxed_fraction must be in [0, 1], got {extra_unboxed_fraction}")
    layouts = []
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(n):
        seed = seeds[i]
        extra = int(np.floor((i + 1) * extra_unboxed_fraction)) > int(np.floor(i * extra_unboxed_fraction))
        scene = sample_scene(seed, max_objects=2 if extra else 3)
        unboxed: list[str] = []
        prompt = scene.caption
        # Object phrases and background-free templates hold no background word: the caption names
        # the background exactly when the background's name appears in it.
        named = re.search(rf"\b{scene.background}\b", scene.caption) is not None
        if extra:
            rng = np.random.default_rng([seed, 11])
            used = {(o.color, o.shape) for o in scene.objects}
            free = [p for p in pairs if p not in used]
            color, shape = free[int(rng.integers(len(free)))]
            unboxed = [f"{color} {shape}"]
            mentioned = [o.phrase for o in scene.objects] + unboxed
            order = rng.permutation(len(mentioned))
            bg = scene.background if rng.random() < P_MENTION_BACKGROUND else None
            prompt = caption_for([mentioned[j] for j in order], bg, int(rng.integers(NUM_TEMPLATES)))
            named = bg is not None
        layouts.append(
            {
                "prompt": prompt,
                "boxes": [{"phrase": o.phrase, "box": [float(v) for v in o.box]} for o in scene.objects],
                "unboxed": unboxed,
                "background": scene.background,
                "background_named": named,
                "seed": int(seed),
            }
        )
    return layouts


# ----------------------------------------------------------------------------------------------------------
# Harder held-out layouts: small, partly overlapping boxes

#: Box side of hard layouts in grid pixels: 8/64 = 0.125 to 19/64 = 0.297 of the image.
HARD_MIN_SIDE_PX = 8
HARD_MAX_SIDE_PX = 19
#: Largest IoU of two boxes, and largest share of either box's area that may lie inside the other
#: (partial overlap, never one box nested in another).
HARD_MAX_IOU = 0.3
HARD_MAX_COVERED = 0.5
#: Smallest IoU of a pair placed to overlap on purpose.
HARD_MIN_OVERLAP_IOU = 0.05
#: Probability that the second object overlaps the first, and that each later one overlaps an earlier one.
P_HARD_OVERLAP_FIRST = 0.8
P_HARD_OVERLAP_LATER = 0.4


def _int_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[float, float]:
    """``(IoU, intersection / smaller area)`` of two integer boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


def _place_hard_boxes(
    rng: np.random.Generator, kinds: Sequence[tuple[str, str]]
) -> list[tuple[int, int, int, int]]:
    """Integer boxes on the 64-pixel grid for :func:`heldout_hard_layouts`, one per ``(color, shape)``.

    Each object after the first overlaps a random earlier one on purpose (IoU at least
    :data:`HARD_MIN_OVERLAP_IOU`) with probability :data:`P_HARD_OVERLAP_FIRST` (the second) or
    :data:`P_HARD_OVERLAP_LATER` (later ones), else lies anywhere. Every pair keeps IoU at most
    :data:`HARD_MAX_IOU` and at most :data:`HARD_MAX_COVERED` of either box inside the other; two
    objects of the same color stay ``GAP_PX`` apart (touching, they would merge into one blob).
    """
    lo, hi = HARD_MIN_SIDE_PX, HARD_MAX_SIDE_PX
    while True:
        placed: list[tuple[int, int, int, int]] = []
        for k, (color, shape) in enumerate(kinds):
            p_overlap = P_HARD_OVERLAP_FIRST if k == 1 else P_HARD_OVERLAP_LATER
            anchor = int(rng.integers(k)) if k > 0 and rng.random() < p_overlap else None
            for _ in range(100):
                w = int(rng.integers(lo, hi + 1))
                h = int(np.clip(round(w * rng.uniform(0.85, 1.15)), lo, hi)) if shape == "triangle" else w
                x_lo, x_hi = BORDER_PX, GRID - BORDER_PX - w
                y_lo, y_hi = BORDER_PX, GRID - BORDER_PX - h
                if anchor is not None:  # the new box shares at least one grid pixel with the anchor
                    a = placed[anchor]
                    x_lo, x_hi = max(x_lo, a[0] - w + 1), min(x_hi, a[2] - 1)
                    y_lo, y_hi = max(y_lo, a[1] - h + 1), min(y_hi, a[3] - 1)
                    if x_lo > x_hi or y_lo > y_hi:
                        continue
                x0, y0 = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
                box = (x0, y0, x0 + w, y0 + h)
                ok = anchor is None or _int_overlap(box, placed[anchor])[0] >= HARD_MIN_OVERLAP_IOU
                for j, other in enumerate(placed):
                    if not ok:
                        break
                    if kinds[j][0] == color:
                        ok = _separated(box, other, GAP_PX)
                    else:
                        iou, covered = _int_overlap(box, other)
                        ok = iou <= HARD_MAX_IOU and covered <= HARD_MAX_COVERED
                if ok:
                    placed.append(box)
                    break
            else:
                break
        if len(placed) == len(kinds):
            return placed


def heldout_hard_layouts(n: int, *, split: str = "test") -> list[dict]:
    """``n`` deterministic harder evaluation layouts of one split (:data:`HARD_HELDOUT_SPLIT_SEEDS`, never
    used in training).

    Same dicts as :func:`heldout_layouts`. Layout ``i`` is drawn from
    ``numpy.random.default_rng(seeds[i])`` (the split's seeds): 3 or 4 boxed objects with distinct
    ``(color, shape)`` phrases, box sides 0.125 to 0.297 of the image (the 64-pixel grid's
    :data:`HARD_MIN_SIDE_PX` to :data:`HARD_MAX_SIDE_PX`), partly overlapping boxes (see
    :func:`_place_hard_boxes`: pairwise IoU at most 0.3, about nine layouts in ten with at least one
    overlapping pair), no unboxed object, and a prompt that always names the background.
    Later boxes are meant to be drawn over earlier ones (:func:`render_objects` order).
    """
    seeds = _split_seeds(HARD_HELDOUT_SPLIT_SEEDS, split)
    if not isinstance(n, (int, np.integer)) or n < 0 or n > len(seeds):
        raise ValueError(f"n must be an integer in [0, {len(seeds)}], got {n!r}")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    layouts = []
    for i in range(n):
        seed = seeds[i]
        rng = np.random.default_rng(seed)
        count = int(rng.integers(3, 5))
        kinds = [pairs[j] for j in rng.choice(len(pairs), size=count, replace=False)]
        boxes = _place_hard_boxes(rng, kinds)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        phrases = [f"{c} {s}" for c, s in kinds]
        order = rng.permutation(count)
        prompt = caption_for([phrases[j] for j in order], background, int(rng.integers(NUM_TEMPLATES)))
        layouts.append(
            {
                "prompt": prompt,
                "boxes": [{"phrase": p, "box": [v / GRID for v in b]} for p, b in zip(phrases, boxes)],
                "unboxed": [],
                "background": background,
                "background_named": True,
                "seed": int(seed),
            }
        )
    return layouts
