"""What a method's images get wrong beyond the layout, by kind, split by "the layout names an unboxed object".

    python scripts/extras_breakdown.py runs/s7/val-n200 salt

Reads the bench records (shapes detector) and, per image, classifies what breaks the exact-set match
(:func:`saltdiff.eval.fidelity.match_prompt`): a boxed object missed, an unboxed object missing, and
each kind of extra object. Prints the share of images with each kind (an image can have several).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys

from saltdiff.eval.detectors import DetectedBox
from saltdiff.eval.fidelity import inside, match_prompt


def kinds_of(record: dict) -> set[str]:
    """The kinds of error of one record's image."""
    dets = [DetectedBox.from_dict(d) for d in record["detections"]]
    targets = [(b["phrase"], b["box"]) for b in record["boxes"]]
    unboxed = list(record["unboxed"])
    match = match_prompt(targets, unboxed, dets)
    kinds = set()
    if not all(match["boxes_ok"]):
        kinds.add("a boxed object missed")
    if unboxed and not match["unboxed_ok"]:
        kinds.add("unboxed object missing")
    named = [p for p, _ in targets] + unboxed
    for j in match["extra"]:
        d = dets[j]
        if d.label in unboxed:
            on_box = any(inside(d.box, b) for p, b in targets if p != d.label)
            kinds.add(
                "unboxed object inside another phrase's box" if on_box else "unboxed object once too often"
            )
        elif d.label in named:
            kinds.add("copy of a boxed object outside its box")
        elif any(w in p.split() for p in named for w in d.label.split()):
            kinds.add("unrequested object sharing a colour or shape word")
        else:
            kinds.add("unrequested object, unrelated")
    return kinds


def main(run: str, method: str) -> None:
    counts: collections.Counter = collections.Counter()
    images: collections.Counter = collections.Counter()
    for path in sorted(glob.glob(os.path.join(run, "records", method, "*.json"))):
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        group = "with unboxed" if record["unboxed"] else "no unboxed"
        images[group] += 1
        for kind in kinds_of(record):
            counts[group, kind] += 1
    print(f"{run} {method}: {dict(images)} images")
    print("| kind | no unboxed | with unboxed |\n|---|---:|---:|")
    for kind in sorted({k for _, k in counts}):
        cells = [
            f"{counts[g, kind] / images[g]:.3f}" if images[g] else "–" for g in ("no unboxed", "with unboxed")
        ]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "salt")
