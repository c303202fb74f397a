"""Object detectors behind one interface: ``detector(image, phrases) -> list[DetectedBox]``.

* ``shapes``: the exact detector of the shapes world (labels ``"<color> <shape>"``; ignores the
  phrases, it finds every colored shape).
* ``owlv2[:MODEL_ID]``: open-vocabulary OWLv2 through transformers (``Owlv2ForObjectDetection``),
  queried with the layout's phrases; labels are the phrases. Default weights
  ``google/owlv2-base-patch16-ensemble``, loaded with ``from_pretrained`` (hub id or folder).
* ``grounding-dino[:MODEL_ID]``: Grounding DINO through transformers
  (``AutoModelForZeroShotObjectDetection``), default ``IDEA-Research/grounding-dino-tiny``.
* ``yolo[:WEIGHTS]``: ultralytics YOLO (COCO classes; optional extra, ``pip install ultralytics``),
  default ``yolov8x.pt``; labels are its class names, so phrases must be COCO category names.

Boxes are normalized ``(x0, y0, x1, y1)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

logger = logging.getLogger(__name__)

DETECTOR_NAMES = ("auto", "shapes", "owlv2", "grounding-dino", "yolo")
OWLV2_DEFAULT = "google/owlv2-base-patch16-ensemble"
GROUNDING_DINO_DEFAULT = "IDEA-Research/grounding-dino-tiny"
YOLO_DEFAULT = "yolov8x.pt"
#: Suites of the shapes world, scored with the exact shapes detector under ``auto``.
SHAPES_WORLD_SUITES = ("shapes", "shapes-val", "shapes-hard", "shapes-hard-val")


@dataclass(frozen=True)
class DetectedBox:
    label: str
    box: tuple[float, float, float, float]
    score: float

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "box": [round(float(v), 6) for v in self.box],
            "score": float(self.score),
        }

    @classmethod
    def from_dict(cls, data: dict) -> DetectedBox:
        return cls(data["label"], tuple(float(v) for v in data["box"]), float(data["score"]))


class Detector(Protocol):
    name: str

    def __call__(self, image: Image.Image, phrases: Sequence[str]) -> list[DetectedBox]: ...


class ShapesDetector:
    """The exact shapes-world detector (:func:`saltdiff.worlds.detector.detect`)."""

    name = "shapes"

    def __call__(self, image: Image.Image, phrases: Sequence[str] = ()) -> list[DetectedBox]:
        from ..worlds.detector import detect

        return [DetectedBox(d.label, tuple(d.box), float(d.score)) for d in detect(image)]


def _normalized(box, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return (
        min(max(x0 / width, 0.0), 1.0),
        min(max(y0 / height, 0.0), 1.0),
        min(max(x1 / width, 0.0), 1.0),
        min(max(y1 / height, 0.0), 1.0),
    )


class Owlv2Detector:
    """OWLv2 open-vocabulary detection, one text query per phrase (``"a photo of a <phrase>"``)."""

    def __init__(self, model_id: str = OWLV2_DEFAULT, device: str = "cpu", threshold: float = 0.1):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        if not 0 <= threshold < 1:
            raise ValueError(f"detector threshold must be in [0, 1), got {threshold!r}")
        self.name = f"owlv2:{model_id}"
        self.device = device
        self.threshold = threshold
        try:
            self.processor = Owlv2Processor.from_pretrained(model_id)
            self.model = Owlv2ForObjectDetection.from_pretrained(model_id).to(device).eval()
        except OSError as exc:
            raise ValueError(f"cannot load OWLv2 detector {model_id!r}: {str(exc).splitlines()[0]}") from exc

    def __call__(self, image: Image.Image, phrases: Sequence[str]) -> list[DetectedBox]:
        import torch

        if not phrases:
            return []
        image = image.convert("RGB")
        queries = [[f"a photo of a {p}" for p in phrases]]
        inputs = self.processor(text=queries, images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        # OWLv2 pads the image to a square: boxes are relative to the padded square.
        side = max(image.width, image.height)
        post = (
            getattr(self.processor, "post_process_grounded_object_detection", None)
            or self.processor.post_process_object_detection
        )
        results = post(outputs, threshold=self.threshold, target_sizes=torch.tensor([[side, side]]))[0]
        return [
            DetectedBox(phrases[int(lbl)], _normalized(box.tolist(), image.width, image.height), float(s))
            for box, s, lbl in zip(results["boxes"], results["scores"], results["labels"])
        ]


class GroundingDinoDetector:
    """Grounding DINO zero-shot detection; the phrases form one text query ``"p1. p2. …"``."""

    def __init__(
        self,
        model_id: str = GROUNDING_DINO_DEFAULT,
        device: str = "cpu",
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
    ):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.name = f"grounding-dino:{model_id}"
        self.device = device
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        try:
            self.processor = AutoProcessor.from_pretrained(model_id)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model_id).to(device).eval()
        except OSError as exc:
            raise ValueError(f"cannot load Grounding DINO {model_id!r}: {str(exc).splitlines()[0]}") from exc

    def __call__(self, image: Image.Image, phrases: Sequence[str]) -> list[DetectedBox]:
        import torch

        if not phrases:
            return []
        image = image.convert("RGB")
        text = ". ".join(p.lower() for p in phrases) + "."
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs.input_ids,
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        labels = result.get("text_labels", result.get("labels"))
        out = []
        for box, score, label in zip(result["boxes"], result["scores"], labels):
            label = str(label).strip()
            # Map the predicted text span back to the phrase it belongs to.
            match = next((p for p in phrases if p.lower() == label), None) or next(
                (p for p in phrases if label and label in p.lower()), None
            )
            if match is not None:
                out.append(
                    DetectedBox(match, _normalized(box.tolist(), image.width, image.height), float(score))
                )
        return out


class YoloDetector:
    """ultralytics YOLO (optional): closed-vocabulary COCO detector; labels are its class names."""

    def __init__(self, weights: str = YOLO_DEFAULT, device: str = "cpu", threshold: float = 0.25):
        try:
            from ultralytics import YOLO
        except ImportError as exc:
            raise ValueError("the yolo detector needs ultralytics: pip install ultralytics") from exc
        self.name = f"yolo:{weights}"
        self.device = device
        self.threshold = threshold
        self.model = YOLO(weights)

    def __call__(self, image: Image.Image, phrases: Sequence[str] = ()) -> list[DetectedBox]:
        result = self.model.predict(
            image.convert("RGB"), conf=self.threshold, device=self.device, verbose=False
        )[0]
        names = result.names
        out = []
        for box, score, cls in zip(
            result.boxes.xyxyn.tolist(), result.boxes.conf.tolist(), result.boxes.cls.tolist()
        ):
            out.append(DetectedBox(str(names[int(cls)]), tuple(float(v) for v in box), float(score)))
        return out


def resolve_detector_name(name: str, *, suite: str, model: str) -> str:
    """``auto`` → ``shapes`` for the shapes suites (``shapes``, ``shapes-hard`` and their ``-val`` splits) or a
    built-in model of the shapes world (``builtin:shapes``, ``builtin:shapes-mmdit``), else ``owlv2``."""
    from ..checkpoints import builtin_entry

    if name != "auto":
        return name
    entry = builtin_entry(model)
    if suite in SHAPES_WORLD_SUITES or (entry is not None and entry.world == "shapes"):
        return "shapes"
    return "owlv2"


def make_detector(name: str, device: str = "cpu") -> Detector:
    """A detector from its name: ``shapes``, ``owlv2[:ID]``, ``grounding-dino[:ID]``, ``yolo[:WEIGHTS]``."""
    kind, _, arg = name.partition(":")
    if kind == "shapes":
        if arg:
            raise ValueError(f"the shapes detector takes no argument, got {name!r}")
        return ShapesDetector()
    if kind == "owlv2":
        return Owlv2Detector(arg or OWLV2_DEFAULT, device=device)
    if kind == "grounding-dino":
        return GroundingDinoDetector(arg or GROUNDING_DINO_DEFAULT, device=device)
    if kind == "yolo":
        return YoloDetector(arg or YOLO_DEFAULT, device=device)
    raise ValueError(f"unknown detector {name!r}; choose from {DETECTOR_NAMES} (optionally NAME:MODEL_ID)")
