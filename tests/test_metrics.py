"""Metrics on hand-made detections with known answers."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from saltdiff.eval.detectors import DetectedBox, ShapesDetector, make_detector, resolve_detector_name
from saltdiff.eval.metrics import (
    box_iou,
    box_ious,
    coco_map,
    map_detections,
    object_recall,
    peak_memory_mb,
    summarize,
)

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


def _map_record(dets, boxes, unboxed):
    return {
        "width": 64,
        "height": 64,
        "boxes": [{"phrase": p, "box": list(b)} for p, b in boxes],
        "detections": [d.to_dict() for d in dets],
        "unboxed": list(unboxed),
    }


def _map50(*records):
    return coco_map(
        {
            "width": 64,
            "height": 64,
            "targets": [(b["phrase"], b["box"]) for b in r["boxes"]],
            "detections": map_detections(r),
        }
        for r in records
    )["map50"]


def test_map_ignores_objects_the_prompt_names_without_a_box_but_not_other_extras():
    def record(dets, unboxed):
        return _map_record(dets, [("red circle", A)], unboxed)

    right = DetectedBox("red circle", A, 0.5)
    green = DetectedBox("green square", B, 0.9)  # a confident detection no box asks for
    copy = DetectedBox("red circle", B, 0.9)  # a second red circle, outside the red circle's box
    # "green square" is a target class elsewhere, so an unasked-for one is a false positive there
    other = _map_record([DetectedBox("green square", B, 0.1)], [("green square", B)], [])
    map50 = _map50

    perfect = map50(record([right], []), other)
    assert perfect == pytest.approx(1.0)
    assert map50(record([right, green], ["green square"]), other) == pytest.approx(perfect)  # asked for
    assert map50(record([right, green], []), other) < 0.9  # not asked for: a false positive
    # a phrase named once more without a box stands for one more object: one copy is asked for ...
    assert map50(record([right, copy], ["red circle"]), other) == pytest.approx(perfect)
    # ... a second is not, and neither is a copy with no unboxed mention
    copy2 = DetectedBox("red circle", (0.55, 0.55, 0.95, 0.95), 0.8)
    assert map50(record([right, copy, copy2], ["red circle"]), other) < 0.9
    assert map50(record([right, copy], []), other) < 0.9


def test_map_ignores_only_as_many_unboxed_detections_as_the_prompt_names():
    """The probes of the numbers issue, by hand. One layout: a red circle boxed at A, "green square"
    named without a box. A correct image has the red circle at A and one green square elsewhere."""
    boxes, unboxed = [("red circle", A)], ["green square"]
    red = DetectedBox("red circle", A, 0.9)
    green = DetectedBox("green square", B, 0.9)
    # COCO averages AP over the classes with a target, so a second layout boxes a green square
    # (found with a low score): green squares nobody asked for are false positives of that class.
    other = _map_record([DetectedBox("green square", B, 0.1)], [("green square", B)], [])
    correct = _map_record([red, green], boxes, unboxed)
    assert _map50(correct, other) == pytest.approx(1.0)
    # Three confident green squares, one inside the red circle's box: only the best one outside any
    # other phrase's box is ignored; the other two are false positives ranked above the one true green
    # square (0.95 > 0.1): green-square AP 1/3, red-circle AP 1, mAP 2/3.
    extras = [
        DetectedBox("green square", (0.55, 0.55, 0.95, 0.95), 0.95),
        DetectedBox("green square", (0.15, 0.15, 0.45, 0.45), 0.95),  # inside the red circle's box
    ]
    probe = _map_record([red, green, *extras], boxes, unboxed)
    assert _map50(probe, other) == pytest.approx(2 / 3, abs=0.01)
    # The ignored one is the highest-scoring eligible detection: here an extra at 0.95 (not B at 0.9).
    kept = map_detections(probe)
    assert sorted(d.box for d in kept if d.label == "green square") == sorted([B, extras[1].box])
    # The boxed red circle drawn as a green square in its own box: not ignored (it lies inside another
    # phrase's box), so it is a false positive above the true green square (green-square AP 1/2) and
    # the red circle is missed (AP 0): mAP 1/4.
    swapped = _map_record([DetectedBox("green square", A, 0.9)], boxes, unboxed)
    assert [d.label for d in map_detections(swapped)] == ["green square"]
    assert _map50(swapped, other) == pytest.approx(0.25, abs=0.01)


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


# -- whole-prompt fidelity and seed diversity -------------------------------------------------------------
def _scene(background="white", style="plain", seed=0, objects=None):
    from saltdiff.worlds.shapes import SceneObject, render_objects

    if objects is None:
        objects = [SceneObject("red", "circle", A), SceneObject("blue", "square", B)]
    return render_objects(objects, background=background, background_style=style, seed=seed)


def _layout(background=None, unboxed=()):
    from saltdiff.eval.suites import EvalLayout

    return EvalLayout(
        "x",
        "a red circle and a blue square",
        (("red circle", A), ("blue square", B)),
        tuple(unboxed),
        background,
    )


def test_prompt_ok_needs_every_object_on_its_box_and_the_named_background():
    from saltdiff.eval.fidelity import prompt_fields
    from saltdiff.worlds.shapes import SceneObject

    detector = ShapesDetector()
    good = _scene("gray")
    fields = prompt_fields(good, _layout("gray"), detector(good), shapes=True)
    assert fields == {
        "background_named": "gray",
        "background_found": "gray",
        "background_ok": True,
        "prompt_ok": True,
        "extra_objects": 0,
        "extra_labels": [],
    }
    # Unnamed background: nothing to get wrong, still reported.
    fields = prompt_fields(good, _layout(None), detector(good), shapes=True)
    assert fields["background_ok"] is None and fields["background_found"] == "gray" and fields["prompt_ok"]
    # The named background is another one.
    fields = prompt_fields(good, _layout("dark gray"), detector(good), shapes=True)
    assert fields["background_ok"] is False and fields["prompt_ok"] is False
    # One object off its box (IoU 1/3 < 0.5): not the whole prompt.
    moved = _scene(
        "gray", objects=[SceneObject("red", "circle", (0.3, 0.1, 0.7, 0.5)), SceneObject("blue", "square", B)]
    )
    assert prompt_fields(moved, _layout("gray"), detector(moved), shapes=True)["prompt_ok"] is False
    # An unboxed object that is not drawn.
    assert (
        prompt_fields(good, _layout("gray", ["green triangle"]), detector(good), shapes=True)["prompt_ok"]
        is False
    )
    # Other detectors: no background classifier, no whole-prompt verdict.
    assert prompt_fields(good, _layout("gray"), detector(good), shapes=False) == {
        "background_named": "gray",
        "background_found": None,
        "background_ok": None,
        "prompt_ok": None,
        "extra_objects": None,
        "extra_labels": None,
    }


def test_prompt_ok_is_the_exact_set_and_extra_objects_are_counted():
    """Copies of boxed objects, unasked-for objects and unboxed objects on another phrase's box all
    break the whole prompt and count as extras; an unboxed object where it is free does not."""
    from saltdiff.eval.fidelity import prompt_fields
    from saltdiff.worlds.shapes import SceneObject

    detector = ShapesDetector()
    red, blue = SceneObject("red", "circle", A), SceneObject("blue", "square", B)
    free = (0.1, 0.6, 0.35, 0.9)  # on neither box

    def fields(objects, unboxed=()):
        img = _scene("gray", objects=objects)
        return prompt_fields(img, _layout("gray", unboxed), detector(img), shapes=True)

    base = fields([red, blue])
    assert base["prompt_ok"] and base["extra_objects"] == 0
    # The unboxed green triangle drawn where nothing is boxed: exactly what was asked.
    ok = fields([red, blue, SceneObject("green", "triangle", free)], ["green triangle"])
    assert ok["prompt_ok"] and ok["extra_objects"] == 0
    # A copy of the boxed red circle outside its box.
    copy = fields([red, blue, SceneObject("red", "circle", free)])
    assert not copy["prompt_ok"] and copy["extra_objects"] == 1 and copy["extra_labels"] == ["red circle"]
    # An object the prompt does not name.
    unasked = fields([red, blue, SceneObject("purple", "triangle", free)])
    assert not unasked["prompt_ok"] and unasked["extra_labels"] == ["purple triangle"]
    # The unboxed object named once, drawn twice: one is an extra.
    twice = fields(
        [
            red,
            blue,
            SceneObject("green", "triangle", free),
            SceneObject("green", "triangle", (0.4, 0.6, 0.55, 0.8)),
        ],
        ["green triangle"],
    )
    assert not twice["prompt_ok"] and twice["extra_objects"] == 1
    # The unboxed object drawn in the red circle's box instead of the red circle: the red circle is
    # missing and the triangle, inside another phrase's box, stands for nothing asked.
    took_box = fields([SceneObject("green", "triangle", A), blue], ["green triangle"])
    assert not took_box["prompt_ok"] and took_box["extra_labels"] == ["green triangle"]


def test_boxes_matched_is_one_to_one():
    from saltdiff.eval.fidelity import boxes_matched

    one = [DetectedBox("red circle", A, 0.9)]
    assert boxes_matched([("red circle", A), ("red circle", A)], one) == [True, False]
    assert boxes_matched([("red circle", A)], [DetectedBox("red circle", (0.3, 0.1, 0.7, 0.5), 0.9)]) == [
        False
    ]
    assert boxes_matched([("red circle", A)], [DetectedBox("blue circle", A, 0.9)]) == [False]


def test_seed_diversity_separates_copies_noise_and_other_pictures():
    from saltdiff.eval.fidelity import layout_pairs, pair_stats, summarize_seed_pairs
    from saltdiff.worlds.shapes import SceneObject

    boxes = [A, B]
    img = _scene("white")
    same = pair_stats(img, img.copy(), boxes)
    assert same == {"outside": 0.0, "image": 0.0, "identical": True}
    off_by_one = np.clip(img.astype(int) + 1, 0, 255).astype(np.uint8)
    assert (
        pair_stats(img, off_by_one, boxes)["identical"]
        and pair_stats(img, off_by_one, boxes)["outside"] == 0.0
    )
    off_by_two = np.clip(img.astype(int) - 2, 0, 255).astype(np.uint8)
    assert not pair_stats(img, off_by_two, boxes)["identical"]
    # Another background, every background pair (the closest: light gray vs beige).
    for a, b in [("white", "light gray"), ("light gray", "beige"), ("white", "beige"), ("gray", "dark gray")]:
        assert pair_stats(_scene(a), _scene(b), boxes)["outside"] > 0.9, (a, b)
        assert pair_stats(_scene(a, "gradient", 1), _scene(b, "texture", 2), boxes)["outside"] > 0.3, (a, b)
    # Same background, another seed of its texture or gradient: not a different picture.
    for bg in ("white", "beige", "gray"):
        assert pair_stats(_scene(bg, "texture", 1), _scene(bg, "texture", 2), boxes)["outside"] < 0.05
        assert pair_stats(_scene(bg, "gradient", 1), _scene(bg, "plain"), boxes)["outside"] < 0.1
    # An object that moves inside its box changes the image but not the pixels outside every box.
    inside = _scene(
        objects=[SceneObject("red", "circle", (0.1, 0.1, 0.4, 0.4)), SceneObject("blue", "square", B)]
    )
    moved = pair_stats(img, inside, boxes)
    assert moved["outside"] == 0.0 and moved["image"] > 0.01
    # An extra object outside the boxes counts.
    extra = _scene(
        objects=[
            SceneObject("red", "circle", A),
            SceneObject("blue", "square", B),
            SceneObject("green", "triangle", (0.1, 0.6, 0.45, 0.95)),
        ]
    )
    assert pair_stats(img, extra, boxes)["outside"] > 0.05

    pairs = layout_pairs([img, img.copy(), _scene("dark gray")], boxes)
    assert len(pairs) == 3 and sum(p["identical"] for p in pairs) == 1
    summary = summarize_seed_pairs(pairs)
    assert summary["seed_pairs"] == 3 and summary["identical_seed_pairs"] == 1
    assert summary["seed_diversity"] == pytest.approx(2 / 3, abs=0.01)
    assert 0 < summary["seed_diversity_image"] < summary["seed_diversity"]  # the objects stay put
    assert summarize_seed_pairs([]) == {
        "seed_diversity": None,
        "seed_diversity_image": None,
        "identical_seed_pairs": None,
        "seed_pairs": 0,
    }
    full = pair_stats(img, _scene("dark gray"), [(0.0, 0.0, 1.0, 1.0)])
    assert full["outside"] is None and full["image"] > 0.5
    with pytest.raises(ValueError, match="shapes"):
        pair_stats(img, img[:32], boxes)


def test_lab_conversion_known_values():
    from saltdiff.eval.fidelity import srgb_to_lab

    np.testing.assert_allclose(srgb_to_lab(np.array([255.0, 255.0, 255.0])), [100.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(srgb_to_lab(np.array([0.0, 0.0, 0.0])), [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(srgb_to_lab(np.array([255.0, 0.0, 0.0])), [53.24, 80.09, 67.20], atol=0.1)


def test_summarize_background_and_prompt_accuracy():
    base = {
        "box_ious": [1.0],
        "width": 64,
        "height": 64,
        "boxes": [{"phrase": "red circle", "box": list(A)}],
        "detections": [DetectedBox("red circle", A, 0.9).to_dict()],
        "text_alignment_kind": "object_recall",
        "text_found": 1,
        "text_total": 1,
        "ref_box_ious": None,
        "seconds": 1.0,
        "peak_mem_mb": 10.0,
        "n_objects": 1,
        "unboxed": [],
    }
    flags = [(True, True), (False, False), (None, True), (None, False)]
    records = [{**base, "background_ok": b, "prompt_ok": p} for b, p in flags]
    s = summarize(records)
    assert s["background_accuracy"] == 0.5  # only the images whose prompt names a background
    assert s["prompt_accuracy"] == 0.5
    real = summarize(
        [{**base, "background_ok": None, "prompt_ok": None}, base]
    )  # other detector; old records
    assert real["background_accuracy"] is None and real["prompt_accuracy"] is None
    assert summarize([])["prompt_accuracy"] is None
