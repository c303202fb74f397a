"""Layout metrics: per-box IoU / mIoU, COCO mAP (pycocotools), text alignment, time and memory.

* **IoU** of a target box: IoU with the best detection of the same label (0 when none); mIoU is
  the mean over all target boxes.
* **mAP@0.5 and mAP@[.5:.95]**: COCO-style through pycocotools, target boxes as ground truth and
  the detector's scored boxes as detections (every label the detector reports, so objects drawn
  where no box asked for them count as false positives), built in memory. The one exception: an
  object the prompt names *without* a box is asked for but has no box to match, so the detections
  that stand for it count neither way, like detections in COCO's ignore regions
  (:func:`map_detections`): for each unboxed phrase at most as many as the prompt names it, the
  highest-scoring ones not inside another phrase's box (:func:`.fidelity.allowed_unboxed`). Every
  other detection of that label (a copy, or one drawn in a boxed phrase's place) is a false positive.
* **Text alignment**: on the shapes world, recall of every object the prompt mentions (boxed or
  not) among the detections (pooled over objects); on real images, CLIP score
  (``100 * max(cos(image, text), 0)``) with a transformers CLIP model.
* **Reference fidelity** (``ref_iou``): the same IoU, computed on the reference image itself.
* **Background accuracy**: of the images whose prompt names a background, the share whose
  background the classifier finds to be that one; **prompt accuracy**: the share of images that hold
  exactly what the prompt asks for; **extra objects**: the mean number of detections per image that
  match nothing asked for, and ``extra_share`` the share of images with any (per-image fields in
  :mod:`.fidelity`; shapes detector only, else ``None``). Seed diversity is aggregated from the images
  by the bench (:mod:`.fidelity`).
* **Intervals**: every headline metric also comes with a 95 % bootstrap interval over layouts
  (``<metric>_ci``; :mod:`.intervals`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import resource
import sys
from collections.abc import Callable, Iterable, Sequence

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


def _coco_evaluator(images: Sequence[dict]):
    """A pycocotools ``COCOeval`` over ``images``, evaluated (per-image matching done), all box sizes in
    one area range; ``None`` without any target, ``False`` without any detection."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
        return None
    if not dts:
        return False
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
        # Only the "all sizes" range: the reported numbers use it, and the bootstrap re-accumulates.
        evaluator.params.areaRng = evaluator.params.areaRng[:1]
        evaluator.params.areaRngLbl = evaluator.params.areaRngLbl[:1]
        evaluator.evaluate()
    return evaluator


def _accumulated_map(evaluator) -> dict[str, float]:
    """``{"map50", "map50_95"}`` from an accumulated evaluator (COCO's stats[1] and stats[0])."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [iou thr, recall, category], 100 detections
    valid50, valid = precision[0] > -1, precision > -1
    return {
        "map50": float(precision[0][valid50].mean()) if valid50.any() else 0.0,
        "map50_95": float(precision[valid].mean()) if valid.any() else 0.0,
    }


def coco_map(images: Iterable[dict]) -> dict[str, float]:
    """``{"map50", "map50_95"}`` over images ``{"width", "height", "targets", "detections"}``.

    ``targets``: ``[(label, box)]``; ``detections``: :class:`DetectedBox` list (normalized boxes).
    Returns NaN when there is no target at all.
    """
    evaluator = _coco_evaluator(list(images))
    if evaluator is None:
        return {"map50": float("nan"), "map50_95": float("nan")}
    if evaluator is False:
        return {"map50": 0.0, "map50_95": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    return _accumulated_map(evaluator)


def coco_map_resampled(images: Sequence[dict], resamples: Sequence[Sequence[int]]) -> dict[str, list[float]]:
    """:func:`coco_map` of each resample of ``images`` (lists of image indices, repeats allowed).

    pycocotools matches detections to targets per image, so the matching is done once and each
    resample only re-accumulates the per-image results in its order (``evalImgs`` rebuilt), which is
    what ``COCOeval.accumulate`` would get from a dataset holding those images.
    """
    evaluator = _coco_evaluator(list(images))
    if evaluator is None or evaluator is False:
        value = float("nan") if evaluator is None else 0.0
        return {"map50": [value] * len(resamples), "map50_95": [value] * len(resamples)}
    params = evaluator.params
    n_cat, n_area, n_img = len(params.catIds), len(params.areaRng), len(params.imgIds)
    original = evaluator.evalImgs
    out: dict[str, list[float]] = {"map50": [], "map50_95": []}
    with contextlib.redirect_stdout(io.StringIO()):
        for picks in resamples:
            picks = list(picks)
            evaluator.evalImgs = [
                original[k * n_area * n_img + a * n_img + j]
                for k in range(n_cat)
                for a in range(n_area)
                for j in picks
            ]
            evaluator._paramsEval.imgIds = evaluator.params.imgIds = list(range(len(picks)))
            evaluator.accumulate()
            for key, value in _accumulated_map(evaluator).items():
                out[key].append(value)
    return out


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
    """The record's detections that mAP scores: all but those that stand for its unboxed objects
    (at most as many per phrase as the prompt names it; see the module docstring)."""
    from .fidelity import allowed_unboxed, match_boxes

    dets = [DetectedBox.from_dict(d) for d in record["detections"]]
    unboxed = list(record.get("unboxed") or ())
    if not unboxed:
        return dets
    targets = _targets(record)
    _, used = match_boxes(targets, dets, 0.5)
    ignored = set(allowed_unboxed(targets, unboxed, dets, used))
    return [d for j, d in enumerate(dets) if j not in ignored]


def map_image(record: dict) -> dict:
    """One record as a :func:`coco_map` image (targets, and the detections mAP scores)."""
    return {
        "width": record["width"],
        "height": record["height"],
        "targets": _targets(record),
        "detections": map_detections(record),
    }


def _text_alignment(r: dict) -> tuple[float, float]:
    if r["text_alignment_kind"] == "object_recall":
        return r["text_found"], r["text_total"]
    return (r["text_alignment"], 1.0) if r["text_alignment"] is not None else (0.0, 0.0)


def _flag(field: str) -> Callable[[dict], tuple[float, float] | None]:
    def ratio(r: dict) -> tuple[float, float] | None:
        value = r.get(field)
        return None if value is None else (float(bool(value)), 1.0)

    return ratio


def _count(field: str, *, any_: bool = False) -> Callable[[dict], tuple[float, float] | None]:
    def ratio(r: dict) -> tuple[float, float] | None:
        value = r.get(field)
        if value is None:
            return None
        return (float(value > 0) if any_ else float(value)), 1.0

    return ratio


def _unboxed_recall(r: dict) -> tuple[float, float] | None:
    if r["text_alignment_kind"] != "object_recall" or not r.get("unboxed"):
        return None
    return r["unboxed_found"], len(r["unboxed"])


#: The headline metrics that are ratios of sums over images: per record ``(numerator, denominator)``
#: (``None``: the record does not count). One definition for the point value (:func:`summarize`) and
#: the bootstrap intervals (:mod:`.intervals`).
RATIO_METRICS: dict[str, Callable[[dict], tuple[float, float] | None]] = {
    "miou": lambda r: (sum(r["box_ious"]), len(r["box_ious"])),
    "text_alignment": _text_alignment,
    "unboxed_recall": _unboxed_recall,
    "background_accuracy": _flag("background_ok"),
    "prompt_accuracy": _flag("prompt_ok"),
    "extra_objects": _count("extra_objects"),
    "extra_share": _count("extra_objects", any_=True),
    "ref_iou": lambda r: (
        None if r.get("ref_box_ious") is None else (sum(r["ref_box_ious"]), len(r["ref_box_ious"]))
    ),
}


def ratio_metric(records: Sequence[dict], name: str) -> float | None:
    """One of :data:`RATIO_METRICS` over ``records`` (``None`` when no record counts)."""
    num = den = 0.0
    for r in records:
        part = RATIO_METRICS[name](r)
        if part is not None:
            num, den = num + part[0], den + part[1]
    return num / den if den else None


def summarize(records: Sequence[dict]) -> dict:
    """Aggregate per-image records of one method (see ``bench.py`` for the record fields)."""
    if not records:
        return {
            **{name: None for name in RATIO_METRICS},
            "map50": None,
            "map50_95": None,
            "sec_per_image": None,
            "peak_mem_mb": None,
            "n_images": 0,
        }
    maps = coco_map(map_image(r) for r in records)
    out = {name: ratio_metric(records, name) for name in RATIO_METRICS}
    out.update(
        {
            "map50": maps["map50"],
            "map50_95": maps["map50_95"],
            "sec_per_image": _mean([r["seconds"] for r in records]),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in records),
            "n_images": len(records),
            "text_alignment_kind": records[0]["text_alignment_kind"],
        }
    )
    final = [r["layout_losses"][-1] for r in records if r.get("layout_losses")]
    out["final_layout_loss"] = _mean(final)
    return out


def summarize_by_objects(records: Sequence[dict]) -> dict[str, dict]:
    """:func:`summarize` per number of boxed objects (keys ``"1"``, ``"2"``, …)."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(int(r["n_objects"]), []).append(r)
    return {str(k): summarize(groups[k]) for k in sorted(groups)}


def summarize_by_unboxed(records: Sequence[dict]) -> dict[str, dict]:
    """:func:`summarize` of the layouts whose prompt names an object without a box (``"yes"``) and of
    the others (``"no"``); a key is absent when no layout falls in it."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault("yes" if r.get("unboxed") else "no", []).append(r)
    return {k: summarize(groups[k]) for k in ("no", "yes") if k in groups}
