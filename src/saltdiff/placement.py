"""Where the objects a prompt names without a box go: squares in the free space of a layout.

An object the prompt names without a box is drawn wherever the noise lets it: twice, on top of a
boxed object, or with a boxed object's colour. SALT's reference gives each such phrase
(:attr:`saltdiff.layout.Layout.unboxed`) a place of its own, pastes the object there, and the
guidance treats that place as a box (``benchmarks/RESULTS.md``, "Objects named without a box").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .layout import Box, Layout

__all__ = ["free_boxes", "guided_layout"]


def free_boxes(
    layout: Layout, side: float | None = None, grid: int = 32, generator: torch.Generator | None = None
) -> list[Box]:
    """A square box for each :attr:`unboxed` phrase, placed where it overlaps the boxes least.

    Why: an object the prompt names without a box is otherwise drawn wherever the noise lets it,
    often twice or on top of a boxed object. Each phrase gets a square of
    ``side`` (default: the boxes' median side, within [0.2, 0.35]) at a grid position with the
    least overlap with the boxes and the squares placed before it. Without ``generator``: among
    those, the one whose centre lies farthest from every box (the middle of the free space), then
    the most central, and each square is placed again given the others (so the first does not
    block the rest); the same layout always gets the same places. With ``generator``: one drawn
    from it among those at least half as far from every box as the farthest, so each seed puts
    the object somewhere else in the free space (the seed keeps its say where no box is).
    """
    if not layout.unboxed:
        return []
    if side is None:
        sides = sorted((b.width * b.height) ** 0.5 for b in layout.boxes) or [0.3]
        side = min(0.35, max(0.2, sides[len(sides) // 2]))
    steps = [i * (1.0 - side) / (grid - 1) for i in range(grid)]
    fixed = [b.box for b in layout.boxes]

    def best(others: list) -> tuple[float, float, float, float]:
        def score(xy: tuple[float, float]) -> tuple[float, float, float]:
            x, y = xy
            cand = (x, y, x + side, y + side)
            overlap = sum(_overlap(cand, t) for t in fixed + others)
            cx, cy = x + side / 2, y + side / 2
            clearance = min((_distance_to_box(cx, cy, t) for t in fixed + others), default=1.0)
            return (round(overlap, 6), -round(clearance, 6), abs(cx - 0.5) + abs(cy - 0.5))

        scored = sorted((score(xy), xy) for y in steps for x in steps for xy in [(x, y)])
        if generator is None:
            x, y = scored[0][1]
        else:
            least, far = scored[0][0][0], -scored[0][0][1]
            good = [xy for sc, xy in scored if sc[0] == least and -sc[1] >= 0.5 * far]
            pick = int(torch.randint(len(good), (1,), generator=generator, device=generator.device))
            x, y = good[pick]
        return (x, y, x + side, y + side)

    places: list = []
    for _ in layout.unboxed:  # greedy, in phrase order
        places.append(best(places))
    if generator is None:
        for _ in range(2):  # then each again given the others: the first no longer blocks the rest
            for i in range(len(places)):
                places[i] = best(places[:i] + places[i + 1 :])
    return [Box(phrase, place) for phrase, place in zip(layout.unboxed, places)]


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of the intersection of two normalized boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def _distance_to_box(x: float, y: float, box: Sequence[float]) -> float:
    """Euclidean distance from a point to a box (0 inside it)."""
    dx = max(box[0] - x, 0.0, x - box[2])
    dy = max(box[1] - y, 0.0, y - box[3])
    return math.hypot(dx, dy)


def guided_layout(layout: Layout, init_info: dict, guidance) -> Layout:
    """The boxes the guidance loss and the outside prompt act on: ``layout``'s, followed by the places
    SALT's reference chose for its unboxed objects (``init_info["placed_unboxed"]``) when the guidance
    runs and ``guidance.placed_unboxed`` is ``"guide"``; box ``k < len(layout)`` stays box ``k``.
    ``layout`` itself when nothing is added, so a caller resolves tokens again only for a new layout."""
    placed = init_info.get("placed_unboxed") or []
    if not placed or not guidance.enabled or guidance.placed_unboxed != "guide":
        return layout
    return Layout(layout.boxes + tuple(Box(b["phrase"], b["box"]) for b in placed))
