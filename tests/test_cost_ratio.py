"""``scripts/cost_ratio.py`` on hand-made records: cold is the first seed, warm the others, filters apply."""

from __future__ import annotations

import json

import pytest

from test_scripts_sd3 import load_script


def _write(run, method, layout, seed, seconds, unboxed):
    folder = run / "records" / method
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "seed": seed,
        "seconds": seconds,
        "boxes": [{"phrase": "a", "box": [0, 0, 1, 1]}],
        "unboxed": unboxed,
    }
    (folder / f"{layout}_s{seed}.json").write_text(json.dumps(record))


def test_warm_ratio_by_layouts_with_and_without_an_unboxed_object(tmp_path):
    for layout, unboxed, warm in (("plain", [], 3.0), ("extra", ["green circle"], 5.0)):
        _write(tmp_path, "sd", layout, 0, 2.0, unboxed)
        _write(tmp_path, "sd", layout, 1, 2.0, unboxed)
        _write(tmp_path, "salt", layout, 0, 8.0, unboxed)
        _write(tmp_path, "salt", layout, 1, warm, unboxed)
    main = load_script("cost_ratio").main
    assert main([str(tmp_path), "salt", "sd"])["warm"]["ratio"] == pytest.approx(2.0)
    assert main([str(tmp_path), "salt", "sd", "--unboxed", "without"])["warm"]["ratio"] == pytest.approx(1.5)
    assert main([str(tmp_path), "salt", "sd", "--unboxed", "with"])["warm"]["ratio"] == pytest.approx(2.5)
    assert main([str(tmp_path), "salt", "sd", "--unboxed", "with"])["cold"]["ratio"] == pytest.approx(4.0)
