"""Bootstrap intervals over layouts, pycocotools mAP re-accumulated per resample, paired comparisons."""

import contextlib
import io
import json

import numpy as np
import pytest

from saltdiff.eval.detectors import DetectedBox
from saltdiff.eval.intervals import (
    compare_table,
    method_records,
    metric_intervals,
    paired_difference,
    percentile_interval,
    resample_layouts,
)
from saltdiff.eval.metrics import coco_map, coco_map_resampled, map_image, summarize

A = (0.1, 0.1, 0.5, 0.5)


def _record(layout: int, seed: int, iou: float, prompt_ok: bool, extra: int = 0, unboxed=()) -> dict:
    """A bench record whose red circle is detected shifted so that its IoU with the box is ``iou``."""
    x1 = 0.1 + 0.4 * iou  # same height, width scaled: IoU = width ratio
    return {
        "layout_id": f"L{layout:03d}",
        "seed": seed,
        "width": 64,
        "height": 64,
        "boxes": [{"phrase": "red circle", "box": list(A)}],
        "unboxed": list(unboxed),
        "detections": [DetectedBox("red circle", (0.1, 0.1, x1, 0.5), 0.9).to_dict()] if iou > 0 else [],
        "box_ious": [iou],
        "text_alignment_kind": "object_recall",
        "text_found": int(iou > 0),
        "text_total": 1,
        "unboxed_found": 0,
        "background_ok": None,
        "prompt_ok": prompt_ok,
        "extra_objects": extra,
        "seconds": 1.0,
        "peak_mem_mb": 1.0,
        "ref_box_ious": None,
    }


def _records(n_layouts: int, rng: np.random.Generator, shift: float = 0.0) -> list[dict]:
    out = []
    for i in range(n_layouts):
        base = rng.uniform(0.2, 0.9)
        for seed in (0, 1):
            iou = float(np.clip(base + shift + rng.normal(0, 0.05), 0.05, 1.0))
            out.append(_record(i, seed, iou, iou > 0.5, extra=int(rng.random() < 0.2)))
    return out


def test_resamples_are_reproducible_and_percentiles_central():
    assert np.array_equal(resample_layouts(10, 5, seed=3), resample_layouts(10, 5, seed=3))
    assert resample_layouts(10, 5).shape == (5, 10)
    assert percentile_interval(np.arange(1001) / 1000) == pytest.approx([0.025, 0.975])
    assert percentile_interval([None, float("nan")]) is None
    with pytest.raises(ValueError, match="at least one"):
        resample_layouts(3, 0)


def test_resampled_map_is_pycocotools_map_of_the_resampled_dataset():
    """Re-accumulating pycocotools' per-image matches in a resample's order gives the mAP that
    pycocotools computes on a dataset made of those images (repeats included)."""
    rng = np.random.default_rng(0)
    images = [map_image(r) for r in _records(12, rng)]
    identity = list(range(len(images)))
    picks = [identity, [0, 0, 3, 5, 5, 5, 7, 11, 2, 2, 9, 1], [4] * 12]
    resampled = coco_map_resampled(images, picks)
    for row, m50, m5095 in zip(picks, resampled["map50"], resampled["map50_95"]):
        direct = coco_map([images[j] for j in row])
        assert m50 == pytest.approx(direct["map50"]) and m5095 == pytest.approx(direct["map50_95"])
    # and coco_map itself is COCOeval's own summary (stats[1], stats[0])
    from pycocotools.coco import COCO  # noqa: F401  (the eval extra is installed with the tests)

    from saltdiff.eval.metrics import _coco_evaluator

    evaluator = _coco_evaluator(images)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    assert coco_map(images)["map50"] == pytest.approx(evaluator.stats[1])
    assert coco_map(images)["map50_95"] == pytest.approx(evaluator.stats[0])


def test_intervals_hold_the_point_value_and_narrow_with_more_layouts():
    rng = np.random.default_rng(1)
    small, large = _records(20, rng), _records(320, rng)
    widths = {}
    for name, records in (("small", small), ("large", large)):
        point = summarize(records)
        cis = metric_intervals(records, n_boot=300)
        for metric in ("miou", "map50", "prompt_accuracy", "extra_objects", "text_alignment"):
            low, high = cis[f"{metric}_ci"]
            assert low <= point[metric] <= high, (name, metric)
        widths[name] = cis["miou_ci"][1] - cis["miou_ci"][0]
    # 16x the layouts: about a quarter of the width
    assert 0.15 < widths["large"] / widths["small"] < 0.4
    # the layout is the unit: two seeds of one layout always travel together
    one = [r for r in small if r["layout_id"] == "L000"]
    assert metric_intervals(one, n_boot=50)["miou_ci"][0] == pytest.approx(summarize(one)["miou"])


def test_paired_difference_tells_noise_from_a_real_difference():
    rng = np.random.default_rng(2)
    a = _records(60, rng)
    same = paired_difference(a, a, ["miou", "map50"], n_boot=200)
    assert same["miou"]["difference"] == 0 and same["miou"]["ci"] == [0.0, 0.0]
    assert not same["miou"]["beyond_noise"] and not same["map50"]["beyond_noise"]
    # B better by 0.05 IoU everywhere: tiny against the spread between layouts, beyond noise once paired
    better = [dict(r, box_ious=[min(1.0, r["box_ious"][0] + 0.05)]) for r in a]
    result = paired_difference(a, better, ["miou"], n_boot=200)
    assert result["miou"]["difference"] == pytest.approx(0.05, abs=0.005)
    assert result["miou"]["beyond_noise"] and result["miou"]["ci"][0] > 0
    # an unpaired interval of either set is far wider than the difference
    lo, hi = metric_intervals(a, n_boot=200)["miou_ci"]
    assert hi - lo > 0.1
    # only the (layout, seed) pairs both hold are compared
    half = [r for r in better if r["layout_id"] < "L030"]
    assert paired_difference(a, half, ["miou"], n_boot=50)["miou"]["n_layouts"] == 30
    with pytest.raises(ValueError, match="share no"):
        paired_difference(a, [dict(r, layout_id="other") for r in a], ["miou"], n_boot=10)
    with pytest.raises(ValueError, match="not in both"):
        paired_difference(a, a, ["unboxed_recall"], n_boot=10)
    table = compare_table("x:sd", "x:salt", result)
    assert "| miou |" in table and "| yes |" in table


def test_method_records_reads_a_run_folder(tmp_path):
    rng = np.random.default_rng(3)
    for method in ("sd", "salt"):
        folder = tmp_path / "records" / method
        folder.mkdir(parents=True)
        for r in _records(3, rng):
            (folder / f"{r['layout_id']}_s{r['seed']}.json").write_text(json.dumps(r))
    label, records = method_records(f"{tmp_path}:salt")
    assert label.endswith(":salt") and len(records) == 6
    with pytest.raises(ValueError, match="name one"):
        method_records(str(tmp_path))
    with pytest.raises(ValueError, match="no method 'boxdiff'"):
        method_records(f"{tmp_path}:boxdiff")
    with pytest.raises(ValueError, match="not a bench run folder"):
        method_records(f"{tmp_path / 'nowhere'}:sd")


def test_saltdiff_compare_prints_the_paired_table(tmp_path, capsys):
    """The CLI: two methods of one run folder, the default metrics less those the records lack."""
    from saltdiff.cli import main

    rng = np.random.default_rng(4)
    base = _records(30, rng)
    runs = {"sd": base, "salt": [dict(r, box_ious=[min(1.0, r["box_ious"][0] + 0.05)]) for r in base]}
    for method, records in runs.items():
        folder = tmp_path / "records" / method
        folder.mkdir(parents=True)
        for r in records:
            (folder / f"{r['layout_id']}_s{r['seed']}.json").write_text(json.dumps(r))
    assert main(["compare", f"{tmp_path}:sd", f"{tmp_path}:salt", "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "30 layouts in common" in out
    row = next(line for line in out.splitlines() if line.startswith("| miou |"))
    assert row.endswith("| yes |") and "+0.050" in row
    assert "| unboxed_recall |" not in out  # no record names an unboxed object
    assert main(["compare", f"{tmp_path}:sd", f"{tmp_path}:salt", "--metrics", "nope"]) == 2
