"""Evaluation suites: lists of layouts (a prompt and boxed phrases) to generate and score.

Four sources, all deterministic:

* ``shapes`` (test split) and ``shapes-val`` (tuning split): held-out layouts of the synthetic shapes
  world (:func:`saltdiff.worlds.shapes.heldout_layouts`), from disjoint halves of the held-out seeds:
  1–3 boxed objects; half of the prompts also name an object without a box (1–2 boxed objects then),
  and about 60 % name the background (``EvalLayout.background``; ``None`` when the prompt does not name
  it, the scene's own background is then kept in ``meta["scene_background"]``).
* ``shapes-hard`` (test) and ``shapes-hard-val`` (tuning): harder held-out layouts of the same world, from
  their own seeds (:func:`saltdiff.worlds.shapes.heldout_hard_layouts`): 3–4 boxed objects, box sides
  0.12–0.3 of the image, partly overlapping boxes (pairwise IoU up to 0.3; about nine layouts in ten
  have an overlapping pair), no unboxed object, and every prompt names the background.

Defaults are chosen on the tuning splits only (studies run there unless told otherwise); reported
numbers come from the test splits. The tuning split ``shapes-val`` holds, at its start, the layouts
that the defaults of earlier versions were tuned on.
* a **JSONL file**: one layout per line, ``{"prompt": str, "boxes": [{"phrase": str, "box": [x0, y0, x1, y1]}]}``
  with normalized coordinates (origin top-left), plus optional ``"id"`` (default: ``line-N``, 0-based),
  ``"unboxed": [phrases]`` (other objects the prompt mentions, counted by text alignment),
  ``"background": str`` (the background the prompt names, scored by ``background_accuracy``; with
  the shapes detector it must be a shapes-world background such as ``"dark gray"``; ``null`` or
  absent: none named) and ``"seed"`` (kept in ``meta``).
  Blank lines and lines starting with ``#`` are skipped; the first ``n`` layouts are used.
* ``coco``: COCO-format ``instances_*.json`` and ``captions_*.json`` files the user supplies
  (:func:`coco_suite`, selection rules in its docstring).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..layout import Layout

#: Built-in suites: name -> (layout generator name, split, id prefix).
WORLD_SUITES: dict[str, tuple[str, str, str]] = {
    "shapes": ("heldout_layouts", "test", "shapes-test"),
    "shapes-val": ("heldout_layouts", "val", "shapes-val"),
    "shapes-hard": ("heldout_hard_layouts", "test", "hard-test"),
    "shapes-hard-val": ("heldout_hard_layouts", "val", "hard-val"),
}
#: The tuning split of each built-in test suite.
TUNING_SPLIT = {"shapes": "shapes-val", "shapes-hard": "shapes-hard-val"}
SUITE_NAMES = (*WORLD_SUITES, "coco")
DEFAULT_N = 200


@dataclass(frozen=True)
class EvalLayout:
    """One evaluation item: ``boxes`` are ``(phrase, (x0, y0, x1, y1))`` pairs; ``unboxed`` are other
    mentioned phrases; ``background`` is the background the prompt names (``None``: none named)."""

    id: str
    prompt: str
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...]
    unboxed: tuple[str, ...] = ()
    background: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def n_objects(self) -> int:
        return len(self.boxes)

    @property
    def layout(self) -> Layout:
        return Layout.from_pairs(self.boxes)

    @property
    def mentioned(self) -> list[str]:
        """Every object the prompt names: boxed phrases then unboxed ones."""
        return [p for p, _ in self.boxes] + list(self.unboxed)

    def to_dict(self) -> dict[str, Any]:
        """The layout as a JSONL line (``background`` only when the prompt names one)."""
        out: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "boxes": [{"phrase": p, "box": list(b)} for p, b in self.boxes],
            "unboxed": list(self.unboxed),
        }
        if self.background is not None:
            out["background"] = self.background
        return out


def _from_dict(data: dict, default_id: str, where: str) -> EvalLayout:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"id", "prompt", "boxes", "unboxed", "background", "seed"}
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected prompt, boxes, id, unboxed, background, seed"
        )
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    boxes = data.get("boxes")
    if not isinstance(boxes, list):
        raise ValueError(f"{where}: 'boxes' must be a list of {{'phrase', 'box'}}, got {boxes!r}")
    layout = Layout.from_dict({"boxes": boxes})  # validates phrases and coordinates (LayoutError)
    unboxed = data.get("unboxed", [])
    if not isinstance(unboxed, list) or not all(isinstance(u, str) for u in unboxed):
        raise ValueError(f"{where}: 'unboxed' must be a list of phrases, got {unboxed!r}")
    background = data.get("background")
    if background is not None and (not isinstance(background, str) or not background.strip()):
        raise ValueError(f"{where}: 'background' must be a non-empty string or null, got {background!r}")
    layout_id = str(data.get("id", default_id))
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", layout_id):
        raise ValueError(f"{where}: id {layout_id!r} may only use letters, digits, '_', '-' and '.'")
    return EvalLayout(
        id=layout_id,
        prompt=prompt,
        boxes=tuple((b.phrase, tuple(b.box)) for b in layout),
        unboxed=tuple(unboxed),
        background=background.strip() if background is not None else None,
        meta={k: data[k] for k in ("seed",) if k in data},
    )


def _world_suite(dicts: Sequence[dict], prefix: str) -> list[EvalLayout]:
    """Shapes-world layout dicts (:func:`saltdiff.worlds.shapes.heldout_layouts`) → ids ``PREFIX-0000`` …"""
    layouts = []
    for i, d in enumerate(dicts):
        named = d["background"] if d["background_named"] else None
        lay = _from_dict(
            {**{k: d[k] for k in ("prompt", "boxes", "unboxed", "seed")}, "background": named},
            f"{prefix}-{i:04d}",
            f"{prefix} layout {i}",
        )
        layouts.append(replace(lay, meta={**lay.meta, "scene_background": d["background"]}))
    return layouts


def world_suite(name: str, n: int = DEFAULT_N) -> list[EvalLayout]:
    """The first ``n`` layouts of a built-in suite (:data:`WORLD_SUITES`; ids ``PREFIX-0000`` …).

    ``background`` is the scene's background when the prompt names it, else ``None``;
    ``meta["scene_background"]`` is the scene's background either way.
    """
    from ..worlds import shapes

    generator, split, prefix = WORLD_SUITES[name]
    return _world_suite(getattr(shapes, generator)(n, split=split), prefix)


def shapes_suite(n: int = DEFAULT_N, split: str = "test") -> list[EvalLayout]:
    """The first ``n`` held-out layouts of the shapes world, test split (``split="val"``: tuning)."""
    return world_suite("shapes" if split == "test" else f"shapes-{split}", n)


def shapes_hard_suite(n: int = DEFAULT_N, split: str = "test") -> list[EvalLayout]:
    """The first ``n`` harder held-out layouts (3–4 small, partly overlapping boxes), test split."""
    return world_suite("shapes-hard" if split == "test" else f"shapes-hard-{split}", n)


def jsonl_suite(path: str | os.PathLike, n: int | None = None) -> list[EvalLayout]:
    """Layouts from a JSONL file (format in the module docstring); the first ``n`` if given."""
    if not os.path.isfile(path):
        raise ValueError(f"layouts file {str(path)!r} not found")
    layouts: list[EvalLayout] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            layouts.append(_from_dict(data, f"line-{len(layouts)}", where))
            if n is not None and len(layouts) >= n:
                break
    if not layouts:
        raise ValueError(f"layouts file {str(path)!r} holds no layouts")
    ids = [lay.id for lay in layouts]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"layouts file {str(path)!r} repeats id(s) {dupes}")
    return layouts


def _word_in(word: str, text: str) -> bool:
    return (
        re.search(r"(?<![A-Za-z])" + re.escape(word) + r"(?![A-Za-z])", text, flags=re.IGNORECASE) is not None
    )


def coco_suite(
    instances: str | os.PathLike,
    captions: str | os.PathLike,
    n: int | None = DEFAULT_N,
    *,
    min_objects: int = 1,
    max_objects: int = 4,
    min_area: float = 0.02,
) -> list[EvalLayout]:
    """Layouts from COCO annotation files, selected deterministically.

    For each image, in increasing image id:

    1. keep its instance annotations with ``iscrowd == 0`` whose box covers at least ``min_area``
       of the image (normalized area ``w*h / (W*H)``);
    2. skip the image unless ``min_objects <= kept <= max_objects`` and every kept object has a
       different category (so each phrase names exactly one box);
    3. the prompt is the image's caption with the lowest annotation id, stripped of a final period;
       each category name the caption does not contain as a whole word (case-insensitive) is
       appended as ``"<caption> with a <name>[ and a <name>]"``;
    4. the layout boxes each category name (the phrase) at its normalized box, ordered as the
       annotations (by annotation id).

    The first ``n`` selected images form the suite (ids ``coco-<image_id>``).
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 <= min_area < 1:
        raise ValueError(f"min_area must be in [0, 1), got {min_area!r}")
    data = {}
    for name, path in (("instances", instances), ("captions", captions)):
        if path is None or not os.path.isfile(path):
            raise ValueError(f"COCO {name} file {str(path)!r} not found (--coco-{name.rstrip('s')}s ...)")
        with open(path, encoding="utf-8") as fh:
            data[name] = json.load(fh)
        for key in ("images", "annotations"):
            if key not in data[name]:
                raise ValueError(f"{path}: not a COCO {name} file (no {key!r})")
    inst = data["instances"]
    categories = {c["id"]: c["name"] for c in inst.get("categories", [])}
    images = {img["id"]: img for img in inst["images"]}
    by_image: dict[int, list[dict]] = {}
    for ann in sorted(inst["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    caption_of: dict[int, str] = {}
    for ann in sorted(data["captions"]["annotations"], key=lambda a: a["id"]):
        caption_of.setdefault(ann["image_id"], ann["caption"])

    layouts: list[EvalLayout] = []
    for image_id in sorted(images):
        if n is not None and len(layouts) >= n:
            break
        img = images[image_id]
        width, height = float(img["width"]), float(img["height"])
        if image_id not in caption_of:
            continue
        kept = []
        for ann in by_image.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            if w <= 0 or h <= 0 or (w * h) / (width * height) < min_area:
                continue
            kept.append(ann)
        if not min_objects <= len(kept) <= max_objects:
            continue
        names = [categories[a["category_id"]] for a in kept]
        if len(set(names)) != len(names):
            continue
        prompt = " ".join(caption_of[image_id].strip().split()).rstrip(".").strip()
        missing = [name for name in names if not _word_in(name, prompt)]
        if missing:
            prompt = prompt + " with " + " and ".join(f"a {name}" for name in missing)
        boxes = []
        for ann, name in zip(kept, names):
            x, y, w, h = ann["bbox"]
            box = (
                max(0.0, x / width),
                max(0.0, y / height),
                min(1.0, (x + w) / width),
                min(1.0, (y + h) / height),
            )
            boxes.append((name, box))
        layouts.append(
            _from_dict(
                {"prompt": prompt, "boxes": [{"phrase": p, "box": list(b)} for p, b in boxes]},
                f"coco-{image_id}",
                f"COCO image {image_id}",
            )
        )
    if not layouts:
        raise ValueError("no COCO image passes the selection (check the files and --coco-min-area)")
    return layouts


def load_suite(
    suite: str,
    n: int | None = None,
    *,
    coco_annotations: str | None = None,
    coco_captions: str | None = None,
    coco_min_area: float = 0.02,
) -> list[EvalLayout]:
    """A built-in suite (:data:`WORLD_SUITES`), ``coco`` or a ``.jsonl`` file → its first ``n`` layouts."""
    if suite in WORLD_SUITES:
        return world_suite(suite, DEFAULT_N if n is None else n)
    if suite == "coco":
        return coco_suite(
            coco_annotations, coco_captions, DEFAULT_N if n is None else n, min_area=coco_min_area
        )
    if suite.endswith(".jsonl") or os.path.isfile(suite):
        return jsonl_suite(suite, n)
    raise ValueError(f"suite must be one of {SUITE_NAMES} or a .jsonl file of layouts, got {suite!r}")


def suite_fingerprint(layouts: Sequence[EvalLayout]) -> str:
    """A short hash of the first layout (id, prompt, boxes, unboxed phrases, background), whatever ``n``:
    a run folder made with other layouts under the same suite name (an older version of a built-in
    suite) is refused on resume instead of being mixed in."""
    import hashlib

    text = json.dumps([lay.to_dict() for lay in layouts[:1]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_for_process(layouts: Sequence[EvalLayout], index: int, count: int) -> list[EvalLayout]:
    """Layouts ``index, index + count, …``: process ``index`` of ``count``'s share."""
    return list(layouts[index::count])
