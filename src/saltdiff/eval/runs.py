"""A run folder's files: where each image and record lives, reading records back (damaged ones too).

Shared by the bench runner (which writes) and the report (which reads), so neither imports the other.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Sequence

from ..fileio import clip, excerpt, is_temporary, read_text

logger = logging.getLogger(__name__)

#: A record is a few kilobytes; anything far bigger is not one.
MAX_RECORD_BYTES = 50_000_000


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jsonable(value):
    return json.loads(json.dumps(value))


def item_stem(layout_id: str, seed: int) -> str:
    return f"{layout_id}_s{seed}"


def record_path(out: str, method: str, layout_id: str, seed: int) -> str:
    return os.path.join(out, "records", method, item_stem(layout_id, seed) + ".json")


def image_path(out: str, method: str, layout_id: str, seed: int, suffix: str = "") -> str:
    return os.path.join(out, "images", method, item_stem(layout_id, seed) + suffix + ".png")


def clean_temporaries(out: str) -> None:
    """Remove the temporary files a killed run left behind, anywhere in the run folder:
    :func:`~saltdiff.fileio.atomic_write`'s ``NAME.tmp-XXXXXXXX`` and the ``NAME.tmpPID`` of the
    bench's earlier writer."""
    for folder, _dirs, files in os.walk(out):
        for name in files:
            if is_temporary(name) or re.search(r"\.tmp\d+(\.npz)?$", name):
                os.remove(os.path.join(folder, name))


def read_json(path: str, what: str = "bench record") -> dict:
    """The JSON object in ``path`` (a record, ``config.json``); ``ValueError`` naming the file when
    it does not parse as one."""
    text = read_text(path, what=what, max_bytes=MAX_RECORD_BYTES)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{what} {path!r} is damaged: {clip(str(exc))}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path!r} is damaged: a JSON object expected, got {excerpt(value)}")
    return value


def read_record(path: str) -> dict:
    """The record at ``path``; ``ValueError`` naming the file when it does not parse as one."""
    return read_json(path, "bench record")


def finished_record(path: str) -> bool:
    """Whether the image of record ``path`` is done: its record exists and parses. A damaged record
    (a run killed by an older saltdiff, a disk error) is removed with one warning, so it is redone."""
    if not os.path.isfile(path):
        return False
    try:
        read_record(path)
    except ValueError as exc:
        logger.warning("%s; redoing its image", exc)
        os.remove(path)
        return False
    return True


def load_records(out: str, layouts: Sequence, seeds: Sequence[int], method: str) -> list[dict]:
    records = []
    missing = []
    for lay in layouts:
        for seed in seeds:
            path = record_path(out, method, lay.id, seed)
            if not os.path.isfile(path):
                missing.append(item_stem(lay.id, seed))
                continue
            records.append(read_record(path))
    if missing:
        raise RuntimeError(f"method {method!r}: {len(missing)} record(s) missing, e.g. {missing[:3]}")
    return records
