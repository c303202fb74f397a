"""``scripts/miss_grid.py`` on a hand-made run folder: each box lands in the kind its IoUs say."""

from __future__ import annotations

import json

from PIL import Image

from test_scripts_sd3 import load_script


def _record(run, stem, boxes, box_ious, ref_box_ious, detections):
    for method in ("salt", "sd"):
        (run / "images" / method).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), "white").save(run / "images" / method / f"{stem}.png")
    Image.new("RGB", (64, 64), "gray").save(run / "images" / "salt" / f"{stem}_ref.png")
    (run / "records" / "salt").mkdir(parents=True, exist_ok=True)
    record = dict(
        image=f"images/salt/{stem}.png", reference=f"images/salt/{stem}_ref.png",
        boxes=[{"phrase": p, "box": b} for p, b in boxes], box_ious=box_ious, ref_box_ious=ref_box_ious,
        detections=detections,
    )  # fmt: skip
    (run / "records" / "salt" / f"{stem}.json").write_text(json.dumps(record))


def test_boxes_are_held_redrawn_or_missing_from_the_reference(tmp_path, capsys):
    left, right = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]
    # held; redrawn as a red circle in place (right colour, other shape)
    _record(tmp_path, "a_s0", [("red square", left), ("red square", right)], [0.8, 0.1], [0.9, 0.7],
            [{"label": "red square", "box": left, "score": 1.0}, {"label": "red circle", "box": right, "score": 1.0}])  # fmt: skip
    # not in the reference but held in the image; not in the reference and nothing in place
    _record(tmp_path, "b_s0", [("blue circle", left), ("green circle", right)], [0.9, 0.0], [0.2, 0.0],
            [{"label": "blue circle", "box": left, "score": 1.0}, {"label": "green circle", "box": [0.9, 0.9, 1.0, 1.0], "score": 1.0}])  # fmt: skip
    out = tmp_path / "misses.png"
    result = load_script("miss_grid").main([str(tmp_path), "--out", str(out), "--rows", "1"])
    assert result["counts"] == {"held": 1, "redrawn": 1, "not in the reference": 2}
    assert result["in_place"]["redrawn"] == {
        "held in the image": 0, "right colour, other shape": 1, "other colour": 0, "nothing in place": 0,
    }  # fmt: skip
    assert result["in_place"]["not in the reference"]["held in the image"] == 1
    assert result["in_place"]["not in the reference"]["nothing in place"] == 1
    # one row per kind of miss, three columns (sd, salt, reference) of 128-pixel images
    assert Image.open(out).size == (120 + 3 * 130, 18 + 2 * 130)
    assert "| redrawn | 1 |" in capsys.readouterr().out
