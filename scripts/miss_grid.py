"""Where a method loses its boxes, counted and drawn: the reference lacked the object, or the image redrew it.

    python scripts/miss_grid.py runs/s17/mmdit6d/fidelity-n200 --method salt --baseline sd --out misses.png

Every box of every ``--method`` record (a bench run folder) falls in one of three groups by its box IoU
(detector against the layout, threshold ``--iou``, 0.5 as for mAP@0.5) in the reference that was
inverted and in the image: *held* (both), *redrawn* (the reference held it, the image did not: the
model drew something else from a start that leaned the right way), *not in the reference* (the model
could not draw it when the reference objects were generated, or the cut-out lost it). The counts go
to standard output as a Markdown table; the picture has ``--rows`` rows of each kind of miss (the
worst box IoU first), columns ``--baseline`` | ``--method`` | reference, the layout's boxes drawn.
A second table says what the image holds in each missed box (the best-filling detection of any
label): an object of the phrase's colour drawn as another shape, one of another colour, or nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from saltdiff.layout import Layout
from saltdiff.viz import draw_boxes, image_grid
from saltdiff.worlds.detector import box_iou

KINDS = ("held", "redrawn", "not in the reference")


def box_kind(image_iou: float, reference_iou: float, threshold: float) -> str:
    if reference_iou < threshold:
        return "not in the reference"
    return "held" if image_iou >= threshold else "redrawn"


def load_records(run: Path, method: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((run / "records" / method).glob("*.json"))]
    if not records:
        raise SystemExit(f"no records for method {method!r} in {run}")
    if any("ref_box_ious" not in r or r.get("reference") is None for r in records):
        raise SystemExit(f"method {method!r} in {run} has no reference boxes: use a method with a reference")
    return records


def in_place_as(detections: list[dict], box, threshold: float) -> str | None:
    """The label of the detection that best fills ``box`` whatever its label, if it does (IoU >= threshold)."""
    best = max(detections, key=lambda d: box_iou(d["box"], box), default=None)
    return best["label"] if best is not None and box_iou(best["box"], box) >= threshold else None


def classify(records: list[dict], threshold: float) -> list[tuple[str, float, dict, int]]:
    """``(kind, box IoU, record, box index)`` for every box."""
    return [
        (box_kind(iou, ref, threshold), iou, r, k)
        for r in records
        for k, (iou, ref) in enumerate(zip(r["box_ious"], r["ref_box_ious"]))
    ]


def missed_in_place(boxes, threshold: float) -> dict[str, dict[str, int]]:
    """Of each kind of miss, how many boxes the image holds anyway (only where the reference lacked
    the object), holds *something* in place (an object of the phrase's colour but another shape, or
    of another colour), or holds nothing."""
    out = {}
    for kind in KINDS[1:]:
        tally = {
            "held in the image": 0,
            "right colour, other shape": 0,
            "other colour": 0,
            "nothing in place": 0,
        }
        for _, iou, record, k in (b for b in boxes if b[0] == kind):
            if iou >= threshold:  # only a box the reference lacked can be held in the image
                tally["held in the image"] += 1
                continue
            phrase = record["boxes"][k]["phrase"]
            label = in_place_as(record["detections"], record["boxes"][k]["box"], threshold)
            if label is None:
                tally["nothing in place"] += 1
            elif label.split()[0] == phrase.split()[0]:
                tally["right colour, other shape"] += 1
            else:
                tally["other colour"] += 1
        out[kind] = tally
    return out


def row_images(run: Path, record: dict, method: str, baseline: str | None) -> list[Image.Image]:
    layout = Layout.from_pairs([(b["phrase"], tuple(b["box"])) for b in record["boxes"]])
    files = [run / record["image"], run / record["reference"]]
    if baseline is not None:
        files.insert(0, run / record["image"].replace(f"images/{method}/", f"images/{baseline}/", 1))
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        out.append(draw_boxes(img, layout, scale=max(1, 128 // img.width), labels=True))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--method", default="salt")
    parser.add_argument("--baseline", default="sd", help="a column beside it ('' for none)")
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--rows", type=int, default=4, help="rows per kind of miss")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    boxes = classify(load_records(args.run, args.method), args.iou)
    counts = {kind: sum(1 for b in boxes if b[0] == kind) for kind in KINDS}
    mean_iou = {kind: sum(b[1] for b in boxes if b[0] == kind) / max(counts[kind], 1) for kind in KINDS}
    print(
        f"| box kind ({args.method}, IoU threshold {args.iou:g}) | boxes | share | mean box IoU in the image |"
    )
    print("|---|---:|---:|---:|")
    for kind in KINDS:
        print(f"| {kind} | {counts[kind]} | {counts[kind] / len(boxes):.3f} | {mean_iou[kind]:.3f} |")
    placed = missed_in_place(boxes, args.iou)
    print()
    print(
        f"| missed box ({args.method}), what the image holds in it | " + " | ".join(placed[KINDS[1]]) + " |"
    )
    print("|---|" + "---:|" * len(placed[KINDS[1]]))
    for kind, tally in placed.items():
        print(f"| {kind} | " + " | ".join(str(v) for v in tally.values()) + " |")
    if args.out is not None:
        baseline = args.baseline or None
        rows, labels = [], []
        for kind in KINDS[1:]:
            worst = sorted((b for b in boxes if b[0] == kind), key=lambda b: (b[1], b[2]["image"]))
            for _, _, record, k in worst[: args.rows]:
                rows.append(row_images(args.run, record, args.method, baseline))
                phrase = record["boxes"][k]["phrase"]
                labels.append(f"{'redrawn' if kind == 'redrawn' else 'no ref'}: {phrase}")
        if not rows:
            raise SystemExit("no missed boxes to draw")
        cols = ([baseline] if baseline else []) + [args.method, "reference"]
        image_grid(rows, row_labels=labels, col_labels=cols).save(args.out)
        print(f"wrote {args.out}")
    return {"counts": counts, "mean_iou": mean_iou, "in_place": placed}


if __name__ == "__main__":
    main()
