"""Layout metrics: per-box IoU / mIoU, COCO mAP (pycocotools), text alignment, time and memory.

* **IoU** of a target box: IoU with the best detection of the same label (0 when none); mIoU is
  the mean over all target boxes.
* **mAP@0.5 and mAP@[.5:.95]**: COCO-style through pycocotools, target boxes as ground truth and
  the detector's scored boxes as detections (every label the detector reports, so objects drawn
  where no box asked for them count as false positives), built in memory. The one exception: an
  object the prompt names *without* a box (an unboxed phrase that is not also boxed in that image)
  is asked for but has no box to match, so its detections count neither way, like detections in
  COCO's ignore regions (:func:`map_detections`). Counting them as false positives made mAP punish
  a method for drawing what the prompt asks for (default ``salt`` at N = 200: 0.751 that way,
  0.813 this way).
* **Text alignment**: on the shapes world, recall of every object the prompt mentions (boxed or
  not) among the detections (pooled over objects); on real images, CLIP score
  (``100 * max(cos(image, text), 0)``) with a transformers CLIP model.
* **Reference fidelity** (``ref_iou``): the same IoU, computed on the reference image itself.
* **Background accuracy**: of the images whose prompt names a background, the share whose
  background the classifier finds to be that one; **prompt accuracy**: the share of images where
  everything the prompt asks for is right (per-image fields in :mod:`.fidelity`; shapes detector only,
  else ``None``). Seed diversity is aggregated from the images by the bench (:mod:`.fidelity`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import resource
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from ..worlds.detector import box_iou  # noqa: F401  (one IoU for the world's detector and the metrics)
from .detectors import DetectedBox

logger = logging.getLogger(__name__)


def box_ious(
    targets: Sequence[tuple[str, Sequence[float]]], detections: Sequence[DetectedBox]
) -> list[float]:
    """Per target ``(phrase, box)``: IoU with the best same-label detection, 0 when none."""
    out = []
    for phrase, box in targets:
        same = [box_iou(d.box, box) for d in detections if d.label == phrase]
        out.append(max(same) if same else 0.0)
    return out


def object_recall(mentioned: Sequence[str], detections: Sequence[DetectedBox]) -> tuple[int, int]:
    """``(found, total)``: how many mentioned phrases have at least one detection with that label.

    A phrase mentioned ``k`` times needs ``k`` detections.
    """
    labels = [d.label for d in detections]
    found = 0
    for phrase in set(mentioned):
        found += min(labels.count(phrase), list(mentioned).count(phrase))
    return found, len(mentioned)


def coco_map(images: Iterable[dict]) -> dict[str, float]:
    """``{"map50", "map50_95"}`` over images ``{"width", "height", "targets", "detections"}``.

    ``targets``: ``[(label, box)]``; ``detections``: :class:`DetectedBox` list (normalized boxes).
    Returns NaN when there is no target at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = list(images)
    labels: dict[str, int] = {}

    def cat(label: str) -> int:
        return labels.setdefault(label, len(labels) + 1)

    def to_xywh(box, width, height):
        x0, y0, x1, y1 = box
        return [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]

    gt_images, gt_anns, dts = [], [], []
    for i, img in enumerate(images, start=1):
        w, h = int(img["width"]), int(img["height"])
        gt_images.append({"id": i, "width": w, "height": h})
        for label, box in img["targets"]:
            xywh = to_xywh(box, w, h)
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,
                    "image_id": i,
                    "category_id": cat(label),
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
        for d in img["detections"]:
            xywh = to_xywh(d.box, w, h)
            if xywh[2] <= 0 or xywh[3] <= 0:
                continue
            dts.append({"image_id": i, "category_id": cat(d.label), "bbox": xywh, "score": float(d.score)})
    if not gt_anns:
        return {"map50": float("nan"), "map50_95": float("nan")}
    if not dts:
        return {"map50": 0.0, "map50_95": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports on stdout
        gt = COCO()
        gt.dataset = {
            "images": gt_images,
            "annotations": gt_anns,
            "categories": [{"id": v, "name": k} for k, v in labels.items()],
        }
        gt.createIndex()
        dt = gt.loadRes(dts)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map50_95": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0)}


class ClipScorer:
    """CLIP score of an image and its prompt: ``100 * max(cos(image_emb, text_emb), 0)``."""

    def __init__(self, model_id: str = "openai/clip-vit-large-patch14", device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.name = model_id
        self.device = device
        try:
            self.processor = CLIPProcessor.from_pretrained(model_id)
            self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        except OSError as exc:
            raise ValueError(f"cannot load CLIP model {model_id!r}: {str(exc).splitlines()[0]}") from exc

    def __call__(self, image, prompt: str) -> float:
        import torch

        inputs = self.processor(
            text=[prompt], images=image.convert("RGB"), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            )
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float()).item()
        return 100.0 * max(cos, 0.0)


def reset_peak_memory(device: str) -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated since the last reset (CUDA), else the process's peak RSS."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _share(flags: Sequence[bool | None]) -> float | None:
    """Share of ``True`` among the flags that are not ``None`` (``None`` when all are)."""
    known = [bool(f) for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def _targets(record: dict) -> list[tuple[str, list[float]]]:
    return [(b["phrase"], b["box"]) for b in record["boxes"]]


def map_detections(record: dict) -> list[DetectedBox]:
    """The record's detections that mAP scores: all but those of its unboxed-only phrases."""
    boxed = {b["phrase"] for b in record["boxes"]}
    ignored = set(record.get("unboxed") or ()) - boxed
    return [DetectedBox.from_dict(d) for d in record["detections"] if d["label"] not in ignored]


def summarize(records: Sequence[dict]) -> dict:
    """Aggregate per-image records of one method (see ``bench.py`` for the record fields)."""
    if not records:
        return {
            "miou": None,
            "map50": None,
            "map50_95": None,
            "text_alignment": None,
            "ref_iou": None,
            "sec_per_image": None,
            "peak_mem_mb": None,
            "n_images": 0,
            "background_accuracy": None,
            "prompt_accuracy": None,
        }
    ious = [v for r in records for v in r["box_ious"]]
    maps = coco_map(
        {
            "width": r["width"],
            "height": r["height"],
            "targets": _targets(r),
            "detections": map_detections(r),
        }
        for r in records
    )
    kind = records[0]["text_alignment_kind"]
    if kind == "object_recall":
        found = sum(r["text_found"] for r in records)
        total = sum(r["text_total"] for r in records)
        text = found / total if total else None
    else:
        text = _mean([r["text_alignment"] for r in records])
    ref = [v for r in records if r.get("ref_box_ious") is not None for v in r["ref_box_ious"]]
    out = {
        "miou": _mean(ious),
        "map50": maps["map50"],
        "map50_95": maps["map50_95"],
        "text_alignment": text,
        "ref_iou": _mean(ref),
        "sec_per_image": _mean([r["seconds"] for r in records]),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in records),
        "n_images": len(records),
        "text_alignment_kind": kind,
    }
    unboxed = [r for r in records if r.get("unboxed")]
    if kind == "object_recall" and unboxed:
        found = sum(r["unboxed_found"] for r in unboxed)
        total = sum(len(r["unboxed"]) for r in unboxed)
        out["unboxed_recall"] = found / total if total else None
    out["background_accuracy"] = _share([r.get("background_ok") for r in records])
    out["prompt_accuracy"] = _share([r.get("prompt_ok") for r in records])
    final = [r["layout_losses"][-1] for r in records if r.get("layout_losses")]
    out["final_layout_loss"] = _mean(final)
    return out


def summarize_by_objects(records: Sequence[dict]) -> dict[str, dict]:
    """:func:`summarize` per number of boxed objects (keys ``"1"``, ``"2"``, …)."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(int(r["n_objects"]), []).append(r)
    return {str(k): summarize(groups[k]) for k in sorted(groups)}
