"""Layouts: phrases of a prompt with normalized bounding boxes.

A :class:`Layout` is a tuple of :class:`Box` es. Each box names a phrase of the prompt and where it
should appear, in normalized image coordinates ``(x0, y0, x1, y1)`` with the origin at the top-left
corner, ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``. This module turns a layout into

* binary masks at any attention resolution (:meth:`Layout.masks`), and
* the positions of each phrase's tokens in the *pipeline's own* tokenization of the prompt
  (:meth:`Layout.resolve_tokens`; the lookup itself is :mod:`saltdiff.phrases`').

Every invalid value raises :class:`LayoutError` (a ``ValueError``) whose message names the bad
phrase, box or value.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch

from .fileio import atomic_write, excerpt, read_text
from .phrases import LayoutError, normalize_phrase, resolve_boxes, resolve_phrase_tokens

__all__ = ["Box", "Layout", "LayoutError", "resolve_phrase_tokens"]

_SPEC_FORM = "'PHRASE=x0,y0,x1,y1' or 'PHRASE#N=x0,y0,x1,y1' (N = 1 for the first occurrence)"
_BOX_KEYS = {"phrase", "box", "occurrence"}
_LAYOUT_KEYS = {"boxes", "prompt", "unboxed"}
#: The largest layout file read: a layout holds at most a prompt's worth of boxes (a few KB).
MAX_LAYOUT_BYTES = 1_000_000


@dataclass(frozen=True)
class Box:
    """One phrase of the prompt and the normalized box ``(x0, y0, x1, y1)`` where it should appear.

    ``occurrence`` picks which occurrence of ``phrase`` in the prompt the box refers to, **0-based**
    (``0`` = first). ``None`` means the first occurrence that no earlier box of the layout has taken,
    so ``[Box("dog", ...), Box("dog", ...)]`` binds the two boxes to the first and second "dog".
    """

    phrase: str
    box: tuple[float, float, float, float]
    occurrence: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.phrase, str):
            raise LayoutError(f"box phrase must be a string, got {excerpt(self.phrase)}")
        if not self.phrase.strip():
            raise LayoutError(
                f"box phrase must not be empty, got {excerpt(self.phrase)} (box {excerpt(self.box)})"
            )
        coords = _coerce_coords(self.box, self.phrase)
        # Normalizing a list to a tuple of floats keeps the dataclass hashable; the values are unchanged.
        object.__setattr__(self, "box", coords)
        if self.occurrence is not None and (
            isinstance(self.occurrence, bool) or not isinstance(self.occurrence, int) or self.occurrence < 0
        ):
            raise LayoutError(
                f"occurrence of phrase {excerpt(self.phrase)} must be a non-negative integer (0 = first) or None, "
                f"got {excerpt(self.occurrence)}"
            )
        x0, y0, x1, y1 = coords
        bad = [v for v in coords if not 0.0 <= v <= 1.0]
        if bad:
            raise LayoutError(
                f"box {coords} of phrase {excerpt(self.phrase)} lies outside the image: coordinates are normalized "
                f"to [0, 1], got {excerpt(bad[0])}"
            )
        if x1 <= x0 or y1 <= y0:
            raise LayoutError(
                f"box {coords} of phrase {excerpt(self.phrase)} is empty (zero or negative area): "
                f"need x0 < x1 and y0 < y1 in (x0, y0, x1, y1)"
            )

    @property
    def x0(self) -> float:
        return self.box[0]

    @property
    def y0(self) -> float:
        return self.box[1]

    @property
    def x1(self) -> float:
        return self.box[2]

    @property
    def y1(self) -> float:
        return self.box[3]

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (0.5 * (self.x0 + self.x1), 0.5 * (self.y0 + self.y1))

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box in pixels of a ``width`` × ``height`` image, as ``(x0, y0, x1, y1)`` with x1, y1 exclusive.

        Edges are rounded to the nearest pixel; a box thinner than one pixel still gets one pixel.
        """
        _check_size(width, "width")
        _check_size(height, "height")
        x0 = min(round(self.x0 * width), width - 1)
        y0 = min(round(self.y0 * height), height - 1)
        x1 = max(round(self.x1 * width), x0 + 1)
        y1 = max(round(self.y1 * height), y0 + 1)
        return (x0, y0, x1, y1)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phrase": self.phrase, "box": list(self.box)}
        if self.occurrence is not None:
            out["occurrence"] = self.occurrence
        return out


@dataclass(frozen=True)
class Layout:
    """An ordered, possibly empty, collection of :class:`Box` es; box ``k`` is mask/map ``k`` everywhere.

    ``unboxed``: phrases of the prompt that name an object the user wants somewhere, without a box
    (``"a cat"`` in "a dog and a cat" with a box for the dog only). SALT's reference gives each of
    them a place of its own away from the boxes (:func:`saltdiff.placement.free_boxes`), so the object is drawn once,
    there, instead of in a box or twice. Empty: the pipeline detects them when the model lists its
    object words (:func:`saltdiff.vocabulary.unboxed_objects`), and leaves them to the prompt otherwise.
    """

    boxes: tuple[Box, ...] = ()
    unboxed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.boxes, (str, bytes, Mapping)) or not isinstance(self.boxes, Iterable):
            raise LayoutError(f"Layout.boxes must be a sequence of Box, got {excerpt(self.boxes)}")
        boxes = tuple(self.boxes)
        for b in boxes:
            if not isinstance(b, Box):
                raise LayoutError(f"Layout.boxes must hold Box instances, got {excerpt(b)}")
        object.__setattr__(self, "boxes", boxes)
        if isinstance(self.unboxed, (str, bytes)) or not isinstance(self.unboxed, Iterable):
            raise LayoutError(f"Layout.unboxed must be a sequence of phrases, got {excerpt(self.unboxed)}")
        unboxed = tuple(self.unboxed)
        for phrase in unboxed:
            if not isinstance(phrase, str) or not phrase.strip():
                raise LayoutError(f"an unboxed phrase must be a non-empty string, got {excerpt(phrase)}")
        object.__setattr__(self, "unboxed", unboxed)
        self.validate()

    def validate(self) -> None:
        """Check what can be checked without a tokenizer: no two boxes name the same occurrence."""
        seen: dict[tuple[str, int], Box] = {}
        for b in self.boxes:
            if b.occurrence is None:
                continue
            key = (normalize_phrase(b.phrase), b.occurrence)
            if key in seen:
                raise LayoutError(
                    f"duplicate boxes for one token: boxes {seen[key].box} and {b.box} both refer to "
                    f"occurrence {b.occurrence} of phrase {excerpt(b.phrase)}"
                )
            seen[key] = b

    # -- sequence protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.boxes)

    def __iter__(self) -> Iterator[Box]:
        return iter(self.boxes)

    @overload
    def __getitem__(self, index: int) -> Box: ...

    @overload
    def __getitem__(self, index: slice) -> Layout: ...

    def __getitem__(self, index: int | slice) -> Box | Layout:
        if isinstance(index, slice):
            return Layout(self.boxes[index], self.unboxed)
        return self.boxes[index]

    @property
    def phrases(self) -> list[str]:
        return [b.phrase for b in self.boxes]

    @property
    def labels(self) -> list[str]:
        """Each box's phrase as ``--box`` writes it: ``"dog"``, or ``"dog#2"`` for the second "dog".

        A box without ``occurrence`` counts as the first occurrence no earlier box took, as in
        :meth:`resolve_tokens`, so two boxes of one phrase are labelled apart in every picture.
        """
        taken: dict[str, set[int]] = {}
        labels = []
        for b in self.boxes:
            used = taken.setdefault(normalize_phrase(b.phrase), set())
            occurrence = b.occurrence
            if occurrence is None:
                occurrence = min(set(range(len(used) + 1)) - used)
            used.add(occurrence)
            labels.append(b.phrase if occurrence == 0 else f"{b.phrase}#{occurrence + 1}")
        return labels

    # -- construction and I/O ----------------------------------------------------------------------
    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, Sequence[float]]]) -> Layout:
        """``Layout.from_pairs([("dog", (0.1, 0.2, 0.5, 0.9)), ...])``."""
        boxes = []
        for pair in pairs:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise LayoutError(f"expected a (phrase, (x0, y0, x1, y1)) pair, got {excerpt(pair)}")
            phrase, coords = pair
            boxes.append(Box(phrase, coords))
        return cls(tuple(boxes))

    @classmethod
    def from_specs(cls, specs: Iterable[str]) -> Layout:
        """A layout from CLI box specifications (see :meth:`parse_box_spec`)."""
        if isinstance(specs, str):
            specs = [specs]
        return cls(tuple(cls.parse_box_spec(s) for s in specs))

    @classmethod
    def from_dict(cls, data: Mapping) -> Layout:
        """``{"boxes": [{"phrase": str, "box": [x0, y0, x1, y1], "occurrence"?: int}], "unboxed"?: [str],
        "prompt"?: str}``.

        ``occurrence`` is 0-based, as in :class:`Box`. ``prompt`` is allowed (and ignored) so a file
        can carry the prompt its layout was written for; any other key is an error.
        """
        if not isinstance(data, Mapping):
            raise LayoutError(f"a layout must be a mapping with a 'boxes' list, got {excerpt(data)}")
        unknown = set(data) - _LAYOUT_KEYS
        if unknown:
            raise LayoutError(
                f"unknown layout keys {excerpt(sorted(unknown))}; allowed: {sorted(_LAYOUT_KEYS)}"
            )
        if "prompt" in data and not isinstance(data["prompt"], str):
            raise LayoutError(f"layout 'prompt' must be a string, got {excerpt(data['prompt'])}")
        entries = data.get("boxes", [])
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
            raise LayoutError(f"layout 'boxes' must be a list, got {excerpt(entries)}")
        boxes = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise LayoutError(
                    f"layout box #{i} must be a mapping with 'phrase' and 'box', got {excerpt(entry)}"
                )
            missing = {"phrase", "box"} - set(entry)
            if missing:
                raise LayoutError(f"layout box #{i} {excerpt(dict(entry))} lacks {sorted(missing)}")
            unknown = set(entry) - _BOX_KEYS
            if unknown:
                raise LayoutError(
                    f"layout box #{i} {excerpt(dict(entry))} has unknown keys {excerpt(sorted(unknown))}; allowed: {sorted(_BOX_KEYS)}"
                )
            boxes.append(Box(entry["phrase"], entry["box"], entry.get("occurrence")))
        unboxed = data.get("unboxed", [])
        if isinstance(unboxed, (str, bytes, Mapping)) or not isinstance(unboxed, Sequence):
            raise LayoutError(f"layout 'unboxed' must be a list of phrases, got {excerpt(unboxed)}")
        return cls(tuple(boxes), tuple(unboxed))

    def to_dict(self, prompt: str | None = None) -> dict[str, Any]:
        """The JSON-able form read by :meth:`from_dict`; ``prompt`` is stored alongside when given."""
        out: dict[str, Any] = {}
        if prompt is not None:
            out["prompt"] = prompt
        out["boxes"] = [b.to_dict() for b in self.boxes]
        if self.unboxed:
            out["unboxed"] = list(self.unboxed)
        return out

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> Layout:
        """Read a layout from a JSON file path, or from JSON text (a string starting with ``{``).

        A file over :data:`MAX_LAYOUT_BYTES` is refused before it is read; every problem (missing,
        not UTF-8, not JSON, nested too deeply, not a layout) is one :class:`LayoutError` naming the
        file and quoting at most a short excerpt.
        """
        if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
            text, source = path_or_text, "layout JSON text"
            if len(text) > MAX_LAYOUT_BYTES:
                raise LayoutError(f"{source} is {len(text)} characters long; at most {MAX_LAYOUT_BYTES}")
        else:
            source = f"layout file {os.fspath(path_or_text)!r}"
            try:
                text = read_text(path_or_text, what="layout file", max_bytes=MAX_LAYOUT_BYTES)
            except OSError as e:
                raise LayoutError(e.strerror or str(e)) from e
            except ValueError as e:
                raise LayoutError(str(e)) from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayoutError(
                f"invalid {source}, not JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        except RecursionError:
            raise LayoutError(f"{source} is nested too deeply to be a layout (a list of boxes)") from None
        try:
            return cls.from_dict(data)
        except LayoutError as e:
            raise LayoutError(f"{source}: {e}") from None

    def save_json(self, path: str | os.PathLike, prompt: str | None = None) -> None:
        """Write :meth:`to_dict` as JSON, atomically (a failed write leaves ``path`` as it was)."""
        text = json.dumps(self.to_dict(prompt), indent=2, ensure_ascii=False) + "\n"
        atomic_write(path, text)

    @staticmethod
    def parse_box_spec(spec: str) -> Box:
        """Parse the CLI form ``"PHRASE=x0,y0,x1,y1"``, e.g. ``"red car=0.1,0.5,0.6,0.9"``.

        ``"PHRASE#N=..."`` binds the box to the N-th occurrence of the phrase, **1-based** for users:
        ``"dog#2=..."`` is the second "dog" (``Box.occurrence == 1``).
        """
        if not isinstance(spec, str):
            raise LayoutError(f"box spec must be a string of the form {_SPEC_FORM}, got {excerpt(spec)}")
        phrase, sep, coords_text = spec.rpartition("=")
        if not sep or not phrase.strip():
            raise LayoutError(f"invalid box spec {excerpt(spec)}: expected {_SPEC_FORM}")
        occurrence = None
        match = re.fullmatch(r"(.*?)#(\S*)\s*", phrase)
        if match:
            phrase, number = match.group(1), match.group(2)
            if not number.isdigit() or int(number) < 1:
                raise LayoutError(
                    f"invalid occurrence {excerpt(number)} in box spec {excerpt(spec)}: N in 'PHRASE#N' counts from 1"
                )
            occurrence = int(number) - 1
        parts = [p.strip() for p in coords_text.split(",")]
        if len(parts) != 4:
            raise LayoutError(
                f"invalid box spec {excerpt(spec)}: expected 4 comma-separated coordinates, got {len(parts)}; "
                f"expected {_SPEC_FORM}"
            )
        try:
            coords = tuple(float(p) for p in parts)
        except ValueError:
            raise LayoutError(
                f"invalid box spec {excerpt(spec)}: coordinates must be numbers; expected {_SPEC_FORM}"
            ) from None
        return Box(phrase.strip(), coords, occurrence)  # type: ignore[arg-type]

    # -- rasterization and tokens ------------------------------------------------------------------
    def masks(
        self,
        height: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Binary masks ``[K, height, width]``; a cell is inside a box when its center is.

        A box edge is half-open (``x0 <= center < x1``), so boxes that touch share no cell and the mask
        area approximates the box area. A box smaller than a cell still gets the one cell containing
        its center, so small boxes are never dropped at coarse attention resolutions.
        """
        _check_size(height, "height")
        _check_size(width, "width")
        out = torch.zeros(len(self.boxes), height, width, dtype=torch.bool)
        cy = (torch.arange(height, dtype=torch.float64) + 0.5) / height
        cx = (torch.arange(width, dtype=torch.float64) + 0.5) / width
        for k, b in enumerate(self.boxes):
            rows = (cy >= b.y0) & (cy < b.y1)
            cols = (cx >= b.x0) & (cx < b.x1)
            if not rows.any():
                rows[min(int(b.center[1] * height), height - 1)] = True
            if not cols.any():
                cols[min(int(b.center[0] * width), width - 1)] = True
            out[k] = rows[:, None] & cols[None, :]
        return out.to(device=device, dtype=dtype)

    def resolve_tokens(self, tokenizer, prompt: str) -> list[list[int]]:
        """For each box, the positions of its phrase's tokens in ``tokenizer(prompt).input_ids``.

        Position 0 is the BOS token. Boxes are resolved in order; a box without ``occurrence`` takes
        the first match that no earlier box took. Two boxes resolving to a shared token are an error
        (:func:`saltdiff.phrases.resolve_boxes`).
        """
        return resolve_boxes(tokenizer, prompt, self.boxes)


# -- helpers ---------------------------------------------------------------------------------------
def _coerce_coords(coords: Any, phrase: str) -> tuple[float, float, float, float]:
    if isinstance(coords, (str, bytes, Mapping)) or not isinstance(coords, (Sequence, torch.Tensor)):
        raise LayoutError(
            f"box of phrase {excerpt(phrase)} must be 4 numbers (x0, y0, x1, y1), got {excerpt(coords)}"
        )
    values = list(coords.tolist() if isinstance(coords, torch.Tensor) else coords)
    if len(values) != 4:
        raise LayoutError(
            f"box of phrase {excerpt(phrase)} must have 4 coordinates (x0, y0, x1, y1), got {len(values)}: {excerpt(coords)}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise LayoutError(
                f"box {excerpt(coords)} of phrase {excerpt(phrase)} has a non-numeric coordinate {excerpt(v)}"
            )
        if not math.isfinite(v):
            raise LayoutError(
                f"box {excerpt(coords)} of phrase {excerpt(phrase)} has a non-finite coordinate {excerpt(v)} (NaN/inf)"
            )
        out.append(float(v))
    return (out[0], out[1], out[2], out[3])


def _check_size(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"{name} must be a positive integer, got {excerpt(value)}")


def box_coverage(box: Box | Sequence[float], h: int, w: int) -> torch.Tensor:
    """Soft mask ``[h, w]``: the fraction of each cell of an ``h x w`` grid that a normalized box covers.

    ``box`` is a :class:`Box` or its ``(x0, y0, x1, y1)``. Unlike the binary center rule of
    :meth:`Layout.masks`, a cell cut by a box edge counts in proportion to its covered area, so the
    mask sums to the box's area in cells and moves smoothly with the box: the token-grounding loss of
    the trainer (:mod:`saltdiff.training.grounding`) uses it at the coarse 4x4 and 8x8 attention
    resolutions, where a center rule would snap small boxes to whole cells.
    """
    _check_size(h, "h")
    _check_size(w, "w")
    coords = box.box if isinstance(box, Box) else box
    ys = torch.arange(h + 1, dtype=torch.float32) / h
    xs = torch.arange(w + 1, dtype=torch.float32) / w
    cover_y = (
        torch.minimum(ys[1:], torch.tensor(coords[3])) - torch.maximum(ys[:-1], torch.tensor(coords[1]))
    ).clamp(min=0)
    cover_x = (
        torch.minimum(xs[1:], torch.tensor(coords[2])) - torch.maximum(xs[:-1], torch.tensor(coords[0]))
    ).clamp(min=0)
    return (cover_y[:, None] * h) * (cover_x[None, :] * w)
