"""A run folder's files: atomic writes, where each image and record lives, reading records back.

Shared by the bench runner (which writes) and the report (which reads), so neither imports the other.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Sequence


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (never half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    """Remove the temporary files a killed run left behind."""
    for path in glob.glob(os.path.join(out, "*", "*", "*.tmp*")):
        os.remove(path)


def load_records(out: str, layouts: Sequence, seeds: Sequence[int], method: str) -> list[dict]:
    records = []
    missing = []
    for lay in layouts:
        for seed in seeds:
            path = record_path(out, method, lay.id, seed)
            if not os.path.isfile(path):
                missing.append(item_stem(lay.id, seed))
                continue
            with open(path, encoding="utf-8") as fh:
                records.append(json.load(fh))
    if missing:
        raise RuntimeError(f"method {method!r}: {len(missing)} record(s) missing, e.g. {missing[:3]}")
    return records
