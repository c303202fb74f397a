"""Compare two benchmark run folders image by image and record by record.

    python scripts/compare_runs.py runs/before runs/after

For every record both runs hold: are the PNGs (and reference PNGs) identical pixel for pixel, and
are the metric fields (detections, IoUs, text alignment, losses) equal? Timing, memory and the
method description are ignored (they may change without the images changing). Exit status 1 when
anything differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

VOLATILE = ("seconds", "peak_mem_mb", "method_config")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def main(before: str, after: str) -> int:
    a, b = Path(before), Path(after)
    same_images = same_records = total = 0
    worst = 0
    for rec_b in sorted((b / "records").glob("*/*.json")):
        rec_a = a / rec_b.relative_to(b)
        if not rec_a.is_file():
            continue
        total += 1
        ra, rb = json.loads(rec_a.read_text()), json.loads(rec_b.read_text())
        images_equal = True
        for key in ("image", "reference"):
            if ra.get(key) is None and rb.get(key) is None:
                continue
            pa, pb = pixels(a / ra[key]), pixels(b / rb[key])
            diff = int(np.abs(pa - pb).max()) if pa.shape == pb.shape else 255
            worst = max(worst, diff)
            images_equal &= diff == 0
        same_images += images_equal
        fields_equal = {k: v for k, v in ra.items() if k not in VOLATILE} == {
            k: v for k, v in rb.items() if k not in VOLATILE
        }
        same_records += fields_equal
        if not (images_equal and fields_equal):
            print(
                f"differs: {rec_b.relative_to(b)} (images equal: {images_equal}, metric fields equal: {fields_equal})"
            )
    print(
        f"{total} records compared: {same_images} with identical images, {same_records} with identical "
        f"metric fields; largest pixel difference {worst}/255"
    )
    return 0 if total and same_images == same_records == total else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
