"""Metrics on hand-made detections with known answers."""

import math
import os
import subprocess
import sys

import pytest
import torch

from saltdiff.eval.detectors import DetectedBox, ShapesDetector, make_detector, resolve_detector_name
from saltdiff.eval.metrics import box_iou, box_ious, coco_map, object_recall, peak_memory_mb, summarize

A = (0.1, 0.1, 0.5, 0.5)
B = (0.6, 0.2, 0.9, 0.8)


def test_box_iou_known_values():
    assert box_iou(A, A) == pytest.approx(1.0)
    assert box_iou(A, (0.5, 0.5, 0.9, 0.9)) == 0.0
    # Half of A shifted right by half its width: intersection 0.08, union 0.24.
    assert box_iou(A, (0.3, 0.1, 0.7, 0.5)) == pytest.approx(1 / 3)


def test_box_ious_best_same_label_and_missed_is_zero():
    dets = [
        DetectedBox("red circle", (0.3, 0.1, 0.7, 0.5), 0.9),
        DetectedBox("red circle", A, 0.2),  # lower score but exact: the best IoU counts
        DetectedBox("green square", B, 0.9),  # wrong label for the blue square
    ]
    ious = box_ious([("red circle", A), ("blue square", B)], dets)
    assert ious == [pytest.approx(1.0), 0.0]


def test_object_recall_counts_repeats():
    dets = [DetectedBox("red circle", A, 1.0), DetectedBox("blue square", B, 1.0)]
    assert object_recall(["red circle", "blue square", "green triangle"], dets) == (2, 3)
    assert object_recall(["red circle", "red circle"], dets) == (1, 2)


def _image(targets, dets):
    return {"width": 64, "height": 64, "targets": targets, "detections": dets}


def test_perfect_detector_gives_map_one():
    images = [
        _image(
            [("red circle", A), ("blue square", B)],
            [DetectedBox("red circle", A, 0.9), DetectedBox("blue square", B, 0.8)],
        ),
        _image([("red circle", B)], [DetectedBox("red circle", B, 0.7)]),
    ]
    result = coco_map(images)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] == pytest.approx(1.0)


def test_missed_object_and_false_positive_lower_map():
    missed = coco_map([_image([("red circle", A), ("blue square", B)], [DetectedBox("red circle", A, 0.9)])])
    # red circle AP 1, blue square AP 0 → mean 0.5.
    assert missed["map50"] == pytest.approx(0.5)
    shifted = coco_map([_image([("red circle", A)], [DetectedBox("red circle", (0.3, 0.1, 0.7, 0.5), 0.9)])])
    assert shifted["map50"] == 0.0  # IoU 1/3 < 0.5
    assert coco_map([_image([("red circle", A)], [])]) == {"map50": 0.0, "map50_95": 0.0}
    assert math.isnan(coco_map([_image([], [])])["map50"])


def test_summarize_pools_boxes_and_recall():
    def record(ious, found, total, dets, n):
        return {
            "box_ious": ious,
            "width": 64,
            "height": 64,
            "boxes": [{"phrase": p, "box": list(b)} for p, b in [("red circle", A), ("blue square", B)][:n]],
            "detections": [d.to_dict() for d in dets],
            "text_alignment_kind": "object_recall",
            "text_found": found,
            "text_total": total,
            "ref_box_ious": None,
            "seconds": 1.0,
            "peak_mem_mb": 10.0,
            "n_objects": n,
            "unboxed": [],
            "layout_losses": [0.5, 0.25],
        }

    records = [
        record([1.0, 0.0], 1, 2, [DetectedBox("red circle", A, 0.9)], 2),
        record([0.5], 1, 1, [DetectedBox("red circle", A, 0.9)], 1),
    ]
    s = summarize(records)
    assert s["miou"] == pytest.approx(0.5)  # mean over the three boxes
    assert s["text_alignment"] == pytest.approx(2 / 3)
    assert s["ref_iou"] is None and s["n_images"] == 2 and s["final_layout_loss"] == pytest.approx(0.25)


def test_shapes_detector_interface_on_a_rendered_scene():
    from saltdiff.worlds.shapes import SceneObject, render_objects

    img = render_objects([SceneObject("red", "circle", A), SceneObject("blue", "square", B)], size=64)
    from PIL import Image

    dets = ShapesDetector()(Image.fromarray(img), ["red circle", "blue square"])
    assert box_ious([("red circle", A), ("blue square", B)], dets) == [pytest.approx(1.0, abs=0.1)] * 2


def test_detector_names():
    assert resolve_detector_name("auto", suite="shapes", model="x") == "shapes"
    assert resolve_detector_name("auto", suite="coco", model="builtin:shapes") == "shapes"
    assert resolve_detector_name("auto", suite="coco", model="sd") == "owlv2"
    with pytest.raises(ValueError, match="unknown detector 'foo'"):
        make_detector("foo")
    with pytest.raises(ValueError, match="no argument"):
        make_detector("shapes:x")


_PEAK_SCRIPT = """
import numpy as np
from saltdiff.eval.metrics import peak_memory_mb
before = peak_memory_mb("cpu")
block = np.ones({mib} * 2**20, dtype=np.uint8)  # written, hence resident
after = peak_memory_mb("cpu")
print(before, after, int(block[-1]))
"""
# Linux's ru_maxrss starts from the peak of the address space a process was exec'd from (the
# parent's, under vfork): launch the measured process from a small intermediate Python, not pytest.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"


def test_cpu_peak_memory_rises_by_a_resident_allocation():
    """In a fresh process (whose peak is about its current size), writing 128 MiB raises the
    measured peak by about 128 MiB: the right counter (this process, not its children), in MiB."""
    mib = 128
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, _PEAK_SCRIPT.format(mib=mib)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    before, after, last = out.stdout.split()
    assert last == "1"
    assert 0.9 * mib <= float(after) - float(before) <= mib + 32  # measured 128.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_counts_an_allocation():
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = peak_memory_mb("cuda")
    block = torch.ones(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert peak_memory_mb("cuda") - base == pytest.approx(64, abs=0.5)
    del block
