"""The benchmark harness end to end on the tiny pipeline: suites, methods, CLI, resume, kill -9, studies."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from saltdiff.cli import main
from saltdiff.eval.methods import SharedSettings, build_request, default_methods, parse_methods, presets
from saltdiff.eval.suites import coco_suite, jsonl_suite, load_suite, shapes_suite

LAYOUTS = [
    {
        "prompt": "a red circle and a blue square on a gray background",
        "background": "gray",
        "boxes": [
            {"phrase": "red circle", "box": [0.05, 0.3, 0.45, 0.7]},
            {"phrase": "blue square", "box": [0.55, 0.3, 0.95, 0.7]},
        ],
    },
    {
        "id": "tri",
        "prompt": "a green triangle and a yellow circle",
        "boxes": [{"phrase": "green triangle", "box": [0.1, 0.1, 0.6, 0.6]}],
        "unboxed": ["yellow circle"],
    },
]
# Tiny and fast: 2 steps, one guided step with one iteration, one inversion step, flat reference background.
FAST = [
    "--steps", "2", "--guidance-steps", "1", "--guidance-iters", "1", "--inversion-steps", "1",
    "--object-steps", "1", "--background", "gray", "--detector", "shapes", "--device", "cpu",
    "--dtype", "float32", "-q", "--bootstrap", "100",
]  # fmt: skip
METHODS = "sd,layout-guidance,salt"
QUALITY = ("miou", "map50", "map50_95", "text_alignment", "ref_iou", "n_images")


@pytest.fixture(scope="module")
def layouts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "layouts.jsonl"
    path.write_text("# two layouts\n" + "\n".join(json.dumps(x) for x in LAYOUTS) + "\n\n")
    return str(path)


def bench_args(layouts_file, model, out, methods=METHODS, seeds="1"):
    return [
        "bench",
        "--suite",
        layouts_file,
        "--model",
        model,
        "--methods",
        methods,
        "--seeds",
        seeds,
        "--out",
        str(out),
        *FAST,
    ]


@pytest.fixture(scope="module")
def clean_run(tiny_pipe_dir, layouts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clean"
    assert main(bench_args(layouts_file, tiny_pipe_dir, out)) == 0
    return out


def load_records(out):
    records = {}
    for method in os.listdir(out / "records"):
        for name in os.listdir(out / "records" / method):
            with open(out / "records" / method / name) as fh:
                record = json.load(fh)
            for volatile in ("seconds", "peak_mem_mb", "method_config"):
                record.pop(volatile)
            records[(method, name)] = record
    return records


def quality(metrics):
    return {name: {k: m[k] for k in QUALITY} for name, m in metrics["methods"].items()}


# -- suites and methods ------------------------------------------------------------------------------------
def test_shapes_suite_is_deterministic_with_unboxed_objects():
    suite = shapes_suite(8)
    assert [lay.id for lay in suite] == [f"shapes-test-{i:04d}" for i in range(8)]
    assert suite == shapes_suite(8)
    assert all(1 <= lay.n_objects <= 3 for lay in suite)
    assert sum(bool(lay.unboxed) for lay in suite) == 4  # half of the prompts
    assert all(u in lay.prompt for lay in suite for u in lay.unboxed)
    assert [lay.id for lay in shapes_suite(2, "val")] == ["shapes-val-0000", "shapes-val-0001"]


@pytest.mark.parametrize("name", ["shapes", "shapes-hard"])
def test_tuning_and_test_splits_come_from_disjoint_seeds(name):
    """Every built-in suite has a tuning split from other generator seeds than its test split, and the
    tuning split holds the layouts that earlier defaults were chosen on."""
    from saltdiff.eval.suites import TUNING_SPLIT, WORLD_SUITES
    from saltdiff.worlds import shapes

    val, test = load_suite(TUNING_SPLIT[name], 200), load_suite(name, 200)
    assert {lay.meta["seed"] for lay in val}.isdisjoint({lay.meta["seed"] for lay in test})
    seeds = shapes.HELDOUT_SPLIT_SEEDS if name == "shapes" else shapes.HARD_HELDOUT_SPLIT_SEEDS
    assert seeds["val"].stop <= seeds["test"].start  # the whole ranges, not only the first 200
    for other in (shapes.TRAIN_SEEDS, shapes.VAL_SEEDS):
        assert all(r.stop <= other.start or other.stop <= r.start for r in seeds.values())
    assert {WORLD_SUITES[name][1], WORLD_SUITES[TUNING_SPLIT[name]][1]} == {"test", "val"}
    # every layout of the shapes suites' splits: at least 40 % name an object without a box
    if name == "shapes":
        for suite in (val, test):
            assert sum(bool(lay.unboxed) for lay in suite) >= 0.4 * len(suite)


def test_shapes_suite_names_backgrounds_and_unboxed_objects():
    """About 60 % of the prompts name the background, half an object without a box."""
    suite = shapes_suite(200)
    named = [lay for lay in suite if lay.background is not None]
    assert 0.5 <= len(named) / len(suite) <= 0.7  # 115 of 200
    assert sum(bool(lay.unboxed) for lay in suite) == 0.5 * len(suite)
    for lay in suite:
        scene_bg = lay.meta["scene_background"]
        if lay.background is None:
            assert not re.search(rf"\b{scene_bg}\b", lay.prompt), lay
        else:
            assert lay.background == scene_bg and re.search(rf"\b{scene_bg}\b", lay.prompt), lay


def test_jsonl_suite_and_errors(tmp_path, layouts_file):
    suite = jsonl_suite(layouts_file)
    assert [lay.id for lay in suite] == ["line-0", "tri"]
    assert suite[1].mentioned == ["green triangle", "yellow circle"]
    assert suite[0].background == "gray" and suite[1].background is None
    assert suite[0].to_dict()["background"] == "gray" and "background" not in suite[1].to_dict()
    assert len(load_suite(layouts_file, 1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a dog", "boxes": [{"phrase": "dog", "box": [0.5, 0.5, 0.2, 0.9]}]}\n')
    with pytest.raises(ValueError, match="empty"):
        jsonl_suite(bad)
    bad.write_text('{"prompt": "a dog", "boxes": []}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        jsonl_suite(bad)
    bad.write_text('{"prompt": "a dog", "boxs": []}\n')
    with pytest.raises(ValueError, match="unknown key"):
        jsonl_suite(bad)
    bad.write_text('{"prompt": "a dog", "boxes": [], "background": 3}\n')
    with pytest.raises(ValueError, match="'background' must be"):
        jsonl_suite(bad)
    with pytest.raises(ValueError, match="not found"):
        load_suite(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="suite must be one of"):
        load_suite("imagenet")


def test_coco_suite_selection(tmp_path):
    def img(i, w=100, h=100):
        return {"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"}

    def ann(aid, image_id, cat, bbox, crowd=0):
        return {
            "id": aid,
            "image_id": image_id,
            "category_id": cat,
            "bbox": bbox,
            "iscrowd": crowd,
            "area": 1,
        }

    instances = {
        "images": [img(4), img(1), img(2), img(3), img(5)],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "tv"}],
        "annotations": [
            ann(10, 1, 1, [10, 20, 40, 30]),  # image 1: dog + cat, cat not in the caption
            ann(11, 1, 2, [50, 50, 30, 30]),
            ann(12, 1, 3, [0, 0, 5, 5]),  # too small (0.25 % < 2 %): dropped
            ann(20, 2, 1, [0, 0, 50, 50]),  # image 2: two dogs → skipped (ambiguous phrase)
            ann(21, 2, 1, [50, 50, 50, 50]),
            ann(30, 3, 3, [0, 0, 2, 2]),  # image 3: nothing large enough → skipped
            ann(40, 4, 1, [0, 0, 20, 20]),  # image 4: one dog
            ann(41, 4, 2, [0, 0, 90, 90], crowd=1),  # crowd: ignored
            *[ann(50 + k, 5, 1 + k % 3, [k, k, 20, 20]) for k in range(5)],  # image 5: 5 objects → skipped
        ],
    }
    captions = {
        "images": instances["images"],
        "annotations": [
            {"id": 2, "image_id": 1, "caption": "A dog  sleeps on a sofa."},
            {"id": 1, "image_id": 1, "caption": "A Dog on a couch."},  # lowest id wins
            {"id": 3, "image_id": 4, "caption": "a hotdog stand"},  # "dog" is not a whole word here
            {"id": 4, "image_id": 2, "caption": "two dogs"},
        ],
    }
    ipath, cpath = tmp_path / "instances.json", tmp_path / "captions.json"
    ipath.write_text(json.dumps(instances))
    cpath.write_text(json.dumps(captions))
    suite = coco_suite(ipath, cpath, n=10)
    assert [lay.id for lay in suite] == ["coco-1", "coco-4"]
    assert suite[0].prompt == "A Dog on a couch with a cat"
    assert suite[0].boxes == (("dog", (0.1, 0.2, 0.5, 0.5)), ("cat", (0.5, 0.5, 0.8, 0.8)))
    assert suite[1].prompt == "a hotdog stand with a dog"
    assert coco_suite(ipath, cpath, n=1) == suite[:1]
    small = coco_suite(ipath, cpath, n=10, min_area=0.0001)  # the tv of image 1 is kept too
    assert small[0].prompt == "A Dog on a couch with a cat and a tv" and small[0].n_objects == 3
    assert [lay.id for lay in coco_suite(ipath, cpath, n=10, max_objects=1)] == ["coco-4"]
    with pytest.raises(ValueError, match="not found"):
        coco_suite(tmp_path / "nope.json", cpath)


def test_methods_share_one_guidance_budget():
    specs = parse_methods("all")
    assert [s.name for s in specs] == list(default_methods())
    shared = SharedSettings(
        guidance={"guidance_steps": 3, "guidance_iters": 2}, loss_params={"reg_weight": 1.5}
    )
    requests = {s.name: build_request(s, shared, prompt="a red circle") for s in specs}
    guided = [r for r in requests.values() if r.guidance.enabled]
    assert {r.guidance.loss for r in guided} == {"salt", "layout-guidance", "boxdiff"}
    assert {(r.guidance.guidance_steps, r.guidance.guidance_iters) for r in guided} == {(3, 2)}
    # a loss param goes to the methods whose loss has it, and only to them
    assert requests["salt"].guidance.params["reg_weight"] == 1.5
    assert requests["boxdiff"].guidance.params == {"topk_fraction": 0.2}
    assert not requests["sd"].guidance.enabled and not requests["sd"].uses_reference
    assert requests["salt"].uses_reference and requests["salt-init+boxdiff"].uses_reference
    assert not requests["random+salt-loss"].uses_reference
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        parse_methods("sd,magic")
    with pytest.raises(ValueError, match="given twice"):
        parse_methods("sd,sd")
    with pytest.raises(ValueError, match=r"loss option\(s\) \['reg_weight'\] apply to none of the methods"):
        SharedSettings(loss_params={"reg_weight": 1.0}).check_applies(parse_methods("sd,boxdiff"))


def test_presets_derive_from_the_registered_losses():
    from saltdiff.registry import GUIDANCE_LOSSES, Entry

    assert presets()["salt"] == ("salt", "salt") and presets()["random+salt-loss"] == ("random", "salt")
    GUIDANCE_LOSSES.register(Entry("toy", lambda maps, masks: maps.sum() * 0, "a toy loss"))
    try:
        assert presets()["toy"] == ("random", "toy")
        assert presets()["salt-init+toy"] == ("salt", "toy")
        assert "salt-init+toy" in default_methods()
    finally:
        GUIDANCE_LOSSES.unregister("toy")
    assert "toy" not in presets()


# -- end to end --------------------------------------------------------------------------------------------
def test_bench_outputs_match_schema(clean_run):
    metrics = json.loads((clean_run / "metrics.json").read_text())
    assert {"suite", "model", "n_layouts", "seeds", "methods"} <= set(metrics)
    assert metrics["n_layouts"] == 2 and metrics["seeds"] == [0]
    assert list(metrics["methods"]) == METHODS.split(",")
    for name, m in metrics["methods"].items():
        for key in (
            "miou",
            "map50",
            "map50_95",
            "text_alignment",
            "ref_iou",
            "sec_per_image",
            "peak_mem_mb",
            "n_images",
        ):
            assert key in m, (name, key)
        assert m["n_images"] == 2
        assert 0 <= m["miou"] <= 1 and 0 <= m["map50"] <= 1 and 0 <= m["text_alignment"] <= 1
        records = [
            json.loads((clean_run / "records" / name / f"{i}_s0.json").read_text()) for i in ("line-0", "tri")
        ]
        assert m["sec_per_image"] == pytest.approx(sum(r["seconds"] for r in records) / 2)
        assert m["peak_mem_mb"] == max(r["peak_mem_mb"] for r in records)
        assert set(m["by_objects"]) == {"1", "2"}
        assert (m["ref_iou"] is None) == (name != "salt")
        # One layout names a background: the accuracy is that image's verdict; no seed pairs with one seed.
        assert m["background_accuracy"] == float(records[0]["background_ok"])
        assert m["prompt_accuracy"] == sum(r["prompt_ok"] for r in records) / 2
        assert m["seed_diversity"] is None and m["seed_diversity_image"] is None
        assert m["identical_seed_pairs"] is None and m["seed_pairs"] == 0
        assert records[0]["background_named"] == "gray" and records[1]["background_named"] is None
        for r in records:
            assert r["background_found"] in ("white", "light gray", "gray", "dark gray", "beige", "unknown")
            assert isinstance(r["prompt_ok"], bool)
            assert r["extra_objects"] == len(r["extra_labels"]) >= 0
        assert m["extra_objects"] == sum(r["extra_objects"] for r in records) / 2
        assert m["extra_share"] == sum(r["extra_objects"] > 0 for r in records) / 2
        # intervals over layouts, holding the point value; the two layouts split by unboxed objects
        for key in ("miou", "map50", "prompt_accuracy", "extra_objects"):
            low, high = m[f"{key}_ci"]
            assert low <= m[key] + 1e-9 and m[key] <= high + 1e-9, (name, key)
        assert set(m["by_unboxed"]) == {"no", "yes"}
        assert m["by_unboxed"]["yes"]["n_images"] == 1 and m["by_unboxed"]["yes"]["miou"] == records[1]["iou"]
        assert m["by_unboxed"]["no"]["miou"] == records[0]["iou"]
        assert records[1]["background_ok"] is None
        assert isinstance(records[0]["background_ok"], bool)
    with open(clean_run / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3
    assert {"background_ok", "prompt_ok", "extra_objects"} <= set(rows[0])
    assert {(r["method"], r["layout_id"]) for r in rows} == {
        (m, i) for m in METHODS.split(",") for i in ("line-0", "tri")
    }
    report = (clean_run / "report.md").read_text()
    assert "| salt |" in report and "plots/losses.png" in report
    assert "| bg acc. | prompt acc. | extra obj. | seed div. |" in report and "no pairs to compare" in report
    assert "95 % bootstrap intervals over layouts" in report and ", with unboxed |" in report
    for f in (
        "plots/metrics_by_method.png",
        "plots/by_object_count.png",
        "plots/losses.png",
        "grids/grid_00.png",
    ):
        assert (clean_run / f).is_file(), f
    assert (clean_run / "images" / "salt" / "tri_s0_ref.png").is_file()
    record = json.loads((clean_run / "records" / "salt" / "tri_s0.json").read_text())
    assert (
        record["n_objects"] == 1
        and record["unboxed"] == ["yellow circle"]
        and len(record["layout_losses"]) == 2
    )


def test_two_seeds_give_seed_diversity(tiny_pipe_dir, layouts_file, tmp_path):
    """Seed diversity and identical pairs from the saved images, per method and per object count."""
    import numpy as np
    from PIL import Image

    from saltdiff.eval.fidelity import pair_stats

    out = tmp_path / "seeds"
    args = bench_args(layouts_file, tiny_pipe_dir, out, methods="sd,salt", seeds="2")
    assert main([*args, "--n", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    boxes = [b["box"] for b in LAYOUTS[0]["boxes"]]
    for name, m in metrics["methods"].items():
        images = [
            np.asarray(Image.open(out / "images" / name / f"line-0_s{s}.png").convert("RGB")) for s in (0, 1)
        ]
        expected = pair_stats(*images, boxes)
        assert m["seed_pairs"] == 1 and m["by_objects"]["2"]["seed_pairs"] == 1
        assert m["seed_diversity"] == pytest.approx(expected["outside"])
        assert m["seed_diversity_image"] == pytest.approx(expected["image"])
        assert m["identical_seed_pairs"] == int(expected["identical"])
        assert m["by_objects"]["2"]["seed_diversity"] == m["seed_diversity"]
    # Random initial noise: the two seeds of plain SD give visibly different pictures.
    assert metrics["methods"]["sd"]["identical_seed_pairs"] == 0
    assert metrics["methods"]["sd"]["seed_diversity"] > 0.1
    report = (out / "report.md").read_text()
    assert "## Seed diversity" in report and "| identical pairs |" in report


def test_rerun_skips_finished_records(clean_run, tiny_pipe_dir, layouts_file):
    before = {
        p: os.stat(clean_run / "records" / p).st_mtime_ns for p in ("sd/line-0_s0.json", "salt/tri_s0.json")
    }
    metrics = json.loads((clean_run / "metrics.json").read_text())
    os.remove(clean_run / "records" / "salt" / "line-0_s0.json")
    assert main(bench_args(layouts_file, tiny_pipe_dir, clean_run)) == 0
    after = {p: os.stat(clean_run / "records" / p).st_mtime_ns for p in before}
    assert after == before  # finished records untouched
    assert (clean_run / "records" / "salt" / "line-0_s0.json").is_file()  # the missing one redone
    assert quality(json.loads((clean_run / "metrics.json").read_text())) == quality(metrics)


def test_rescore_scores_finished_images_again(clean_run, tiny_pipe_dir, layouts_file, tmp_path):
    """--rescore re-runs the detector and the metric definitions on the saved images, and leaves the
    generation fields alone: a record scored under an older definition comes back as a fresh one."""
    import shutil

    run = tmp_path / "rescored"
    shutil.copytree(clean_run, run)
    path = run / "records" / "salt" / "tri_s0.json"
    fresh = json.loads(path.read_text())
    stale = dict(fresh, prompt_ok=not fresh["prompt_ok"], box_ious=[0.0], seconds=123.0)
    del stale["extra_objects"]
    path.write_text(json.dumps(stale))
    before = os.stat(run / "images" / "salt" / "tri_s0.png").st_mtime_ns
    assert main([*bench_args(layouts_file, tiny_pipe_dir, run), "--rescore", "--bootstrap", "0"]) == 0
    again = json.loads(path.read_text())
    assert {k: again[k] for k in ("prompt_ok", "box_ious", "extra_objects", "detections")} == {
        k: fresh[k] for k in ("prompt_ok", "box_ious", "extra_objects", "detections")
    }
    assert again["seconds"] == 123.0  # generation fields kept
    assert os.stat(run / "images" / "salt" / "tri_s0.png").st_mtime_ns == before  # no image redone
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["bootstrap"] == 0 and "miou_ci" not in metrics["methods"]["salt"]


def test_a_damaged_record_is_redone_and_the_metrics_equal_a_clean_run(
    clean_run, tiny_pipe_dir, layouts_file, caplog, capsys, full_disk
):
    metrics = json.loads((clean_run / "metrics.json").read_text())
    records = load_records(clean_run)
    victim = clean_run / "records" / "salt" / "tri_s0.json"
    text = victim.read_text()
    victim.write_text(text[: len(text) // 2])  # killed while an older saltdiff wrote it in place
    untouched = clean_run / "records" / "sd" / "tri_s0.json"
    stamp = os.stat(untouched).st_mtime_ns
    with caplog.at_level("WARNING", logger="saltdiff"):
        # Was: exit 2, "Unterminated string starting at: line 1 column 683".
        assert main(bench_args(layouts_file, tiny_pipe_dir, clean_run)) == 0
    warnings = [r.getMessage() for r in caplog.records if "bench record" in r.getMessage()]
    assert len(warnings) == 1 and str(victim) in warnings[0] and warnings[0].endswith("redoing its image")
    assert os.stat(untouched).st_mtime_ns == stamp
    assert load_records(clean_run) == records
    assert quality(json.loads((clean_run / "metrics.json").read_text())) == quality(metrics)

    os.remove(victim)  # a disk full while the record's image is written: nothing half-written is left
    full_disk(0, skip=1)  # room for config.json only
    capsys.readouterr()
    assert main(bench_args(layouts_file, tiny_pipe_dir, clean_run)) == 2
    err = capsys.readouterr().err
    assert "images/salt/tri_s0.png" in err and "No space left on device" in err
    assert not victim.exists()
    assert not [f for _, _, fs in os.walk(clean_run) for f in fs if ".tmp" in f]
    full_disk(None)
    assert main(bench_args(layouts_file, tiny_pipe_dir, clean_run)) == 0
    assert load_records(clean_run) == records
    assert quality(json.loads((clean_run / "metrics.json").read_text())) == quality(metrics)


def test_resume_refuses_other_settings(clean_run, tiny_pipe_dir, layouts_file, capsys):
    args = bench_args(layouts_file, tiny_pipe_dir, clean_run)
    args[args.index("--steps") + 1] = "3"
    assert main(args) == 2
    assert "steps=2" in capsys.readouterr().err


def test_bench_user_errors(tiny_pipe_dir, tmp_path, capsys, layouts_file):
    assert main(bench_args(layouts_file, tiny_pipe_dir, tmp_path / "o", methods="sd,nope")) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(bench_args(layouts_file, tiny_pipe_dir, tmp_path / "o", seeds="x")) == 2
    assert "--seeds" in capsys.readouterr().err
    bad = tmp_path / "dog.jsonl"
    bad.write_text('{"prompt": "a dog", "boxes": [{"phrase": "zebra", "box": [0, 0, 1, 1]}]}\n')
    assert main(bench_args(str(bad), tiny_pipe_dir, tmp_path / "o")) == 2
    assert "layout 'line-0'" in capsys.readouterr().err
    bad.write_text(
        '{"prompt": "a red circle", "background": "sky", "boxes": [{"phrase": "red circle", "box": [0, 0, 1, 1]}]}\n'
    )
    assert main(bench_args(str(bad), tiny_pipe_dir, tmp_path / "o")) == 2
    assert "names background 'sky', which the shapes detector cannot classify" in capsys.readouterr().err
    too_big = [*bench_args(layouts_file, tiny_pipe_dir, tmp_path / "o"), "--height", "1024"]
    assert main(too_big) == 2  # the tiny model is trained at 32: 1024 is over 4x
    assert "height 1024 is more than 4x" in capsys.readouterr().err
    assert not (tmp_path / "o" / "records").exists()  # refused before any image


def _env():
    """The child processes use the thread count of this process's runs (conftest), so that their float
    sums, and records, are the same bit for bit whatever OMP_NUM_THREADS the caller has."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = os.environ.get("SALTDIFF_TEST_THREADS", "1")
    return env


@pytest.mark.slow  # a fresh interpreter: ~150 s on 2 busy cores
def test_kill_9_then_resume_equals_clean_run(clean_run, tiny_pipe_dir, layouts_file, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "saltdiff", *bench_args(layouts_file, tiny_pipe_dir, out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    records = out / "records"
    try:
        while time.time() < deadline and proc.poll() is None:
            if records.is_dir() and any(f.endswith(".json") for _, _, fs in os.walk(records) for f in fs):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = sum(f.endswith(".json") for _, _, fs in os.walk(records) for f in fs)
    assert 1 <= done < 6 and not (out / "metrics.json").exists()
    assert main(bench_args(layouts_file, tiny_pipe_dir, out)) == 0
    assert quality(json.loads((out / "metrics.json").read_text())) == quality(
        json.loads((clean_run / "metrics.json").read_text())
    )
    assert load_records(out) == load_records(clean_run)
    assert not [f for d in ("records", "images") for _, _, fs in os.walk(out / d) for f in fs if ".tmp" in f]


@pytest.mark.slow  # three fresh interpreters: ~190 s on 2 busy cores
def test_accelerate_two_processes_equal_single_process(clean_run, tiny_pipe_dir, layouts_file, tmp_path):
    out = tmp_path / "dist"
    # On a CPU-only machine accelerate's --cpu launcher starts one process; --multi_gpu uses
    # torch.distributed.run, and the bench puts the processes in MULTI_CPU (gloo) mode with --device cpu.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        "-m", "saltdiff", *bench_args(layouts_file, tiny_pipe_dir, out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out / "object_cache")) == ["rank0", "rank1"]  # both processes worked
    assert quality(json.loads((out / "metrics.json").read_text())) == quality(
        json.loads((clean_run / "metrics.json").read_text())
    )
    assert load_records(out) == load_records(clean_run)
    assert proc.stdout.count("| salt |") == 1  # only the main process reports


def test_study_spatial_awareness(tiny_pipe_dir, layouts_file, tmp_path):
    out = tmp_path / "study"
    args = [
        "study",
        "spatial-awareness",
        "--suite",
        layouts_file,
        "--model",
        tiny_pipe_dir,
        "--n",
        "1",
        "--values",
        "1,2",
        "--out",
        str(out),
        *FAST,
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["random", "inv=1", "inv=2"]
    described = json.loads((out / "config.json").read_text())["methods"]
    assert all(m["guidance"]["loss"] == "none" for m in described.values())
    assert described["inv=2"]["init"] == "salt" and described["inv=2"]["init_params"]["inversion_steps"] == 2
    assert (out / "study.png").is_file() and "| inv=2 |" in (out / "study.md").read_text()


def test_every_study_builds_valid_methods():
    from saltdiff.eval.studies import STUDIES, parse_values

    for name, study in STUDIES.items():
        variants = study.variants(study.default_values, study.default_loss)
        names = [v.spec.name for v in variants]
        assert len(set(names)) == len(names), name
        requests = [build_request(v.spec, SharedSettings(), prompt="a red circle") for v in variants]
        assert all(r.guidance.loss == v.spec.loss for r, v in zip(requests, variants))
    budget = STUDIES["guidance-budget"].variants((2, 5), "salt", (1, 3))
    assert len(budget) == 2 * 2 * 2
    assert {(v.spec.guidance["guidance_steps"], v.spec.guidance["guidance_iters"]) for v in budget} == {
        (2, 1),
        (5, 1),
        (2, 3),
        (5, 3),
    }
    assert parse_values(STUDIES["background"], "gray,white") == ("gray", "white")
    with pytest.raises(ValueError, match="takes int values"):
        parse_values(STUDIES["inversion-steps"], "1,x")
