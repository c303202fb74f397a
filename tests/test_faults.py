"""Faults that used to leave a user stuck (issue #23, #22 items 10-11): a full disk while writing
outputs, a damaged object-cache entry, and hostile layout files. The full disk is simulated by the
``full_disk`` fixture: the temporary file's own write raises ``OSError(ENOSPC)``."""

import json
import logging
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from saltdiff.cli import main
from saltdiff.layout import MAX_LAYOUT_BYTES, Layout, LayoutError
from saltdiff.reference import GeneratedObjects

PROMPT = "a red circle and a blue square"
LAYOUT = [("red circle", (0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1, 0.75))]
FAST = [
    "--steps", "2", "--height", "32", "--width", "32", "--quiet", "--object-steps", "1",
    "--guidance-steps", "1", "--guidance-iters", "1", "--inversion-steps", "1", "--background", "gray",
]  # fmt: skip


def generate(model, out, *extra, layout=None):
    boxes = ["--layout", str(layout)] if layout else ["--box", "red circle=0,0.25,0.5,0.75"]
    return main(["generate", "--prompt", PROMPT, *boxes, "--model", model, "--out", str(out), *FAST, *extra])


def files(folder):
    return sorted(os.listdir(folder))


# -- outputs on a full disk ------------------------------------------------------------------------
def test_generate_on_a_full_disk_keeps_the_old_image_and_names_the_path(
    tiny_pipe_dir, tmp_path, full_disk, capsys
):
    out = tmp_path / "full.png"
    out.write_bytes(b"an image from yesterday")
    full_disk(0)
    assert generate(tiny_pipe_dir, out, "--overlay", "--object-cache", "false") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {str(out)!r}: No space left on device" in err
    assert out.read_bytes() == b"an image from yesterday"  # not truncated to 0 bytes
    assert files(tmp_path) == ["full.png"]  # no overlay, no reference, no temporary file

    full_disk(0, skip=1)  # room for the image, not for its overlay
    assert generate(tiny_pipe_dir, out, "--overlay", "--object-cache", "false") == 2
    err = capsys.readouterr().err
    assert "full-overlay.png" in err and "No space left on device" in err
    assert files(tmp_path) == ["full.png"] and out.read_bytes().startswith(b"\x89PNG")


def test_layout_save_json_on_a_full_disk(tmp_path, full_disk):
    path = tmp_path / "layout.json"
    Layout.from_pairs(LAYOUT).save_json(path, prompt=PROMPT)
    before = path.read_bytes()
    full_disk(10)
    with pytest.raises(OSError, match=r"cannot write '.*layout.json': No space left on device"):
        Layout.from_pairs(LAYOUT[:1]).save_json(path)
    assert path.read_bytes() == before and files(tmp_path) == ["layout.json"]
    assert Layout.from_json(path) == Layout.from_pairs(LAYOUT)


def test_the_demo_on_a_full_disk_names_the_png_and_leaves_nothing(tiny_pipe, tmp_path, full_disk):
    from saltdiff.demo.requests import CANVAS_SIZE, run_generation, user_message, validate_request

    canvas = {
        "image": np.zeros((CANVAS_SIZE, CANVAS_SIZE, 3), dtype=np.uint8),
        "boxes": [
            {"label": "red circle", "xmin": 32, "ymin": 128, "xmax": 224, "ymax": 384, "color": (0, 0, 0)}
        ],
        "orientation": 0,
    }
    req = validate_request(
        PROMPT, canvas, init="random", num_inference_steps=1, tokenizer=tiny_pipe.tokenizer, guidance="none"
    )
    full_disk(0)
    with pytest.raises(OSError) as info:
        run_generation(tiny_pipe, req, model="tiny", out_dir=str(tmp_path))
    message = user_message(info.value)  # what the page shows
    assert str(tmp_path / "saltdiff-random-seed0.png") in message and "No space left on device" in message
    assert files(tmp_path) == []


# -- the object cache ------------------------------------------------------------------------------
@pytest.fixture
def cached_builder(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(type(tiny_pipe), "name_or_path", "tiny-test-model", raising=False)
    return GeneratedObjects(background="gray", num_inference_steps=1, cache_dir=str(tmp_path / "cache"))


def build(builder, pipe):
    return builder.build(
        pipe.object_generator(), PROMPT, Layout.from_pairs(LAYOUT), height=32, width=32, generator=None
    )


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-arrays"])
def test_a_damaged_cache_entry_is_discarded_and_made_again(
    cached_builder, tiny_pipe, tmp_path, caplog, damage
):
    first = build(cached_builder, tiny_pipe)
    entries = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(entries) == 2
    victim = entries[0]
    size = victim.stat().st_size
    if damage == "truncate":  # a run killed by saltdiff before atomic cache writes
        victim.write_bytes(victim.read_bytes()[: size // 2])
    elif damage == "garbage":
        victim.write_bytes(b"not an npz")
    else:
        np.savez(victim, something=np.zeros(3))
    with caplog.at_level(logging.WARNING, logger="saltdiff"):
        again = build(cached_builder, tiny_pipe)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and victim.name in warnings[0] and "generating the object again" in warnings[0]
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert victim.stat().st_size == size  # regenerated and written whole
    caplog.clear()
    build(cached_builder, tiny_pipe)
    assert not caplog.records  # and read back without a word


def test_a_cache_write_on_a_full_disk_warns_and_leaves_nothing(
    cached_builder, tiny_pipe, tmp_path, caplog, full_disk
):
    full_disk(100)
    with caplog.at_level(logging.WARNING, logger="saltdiff"):
        built = build(cached_builder, tiny_pipe)
    assert built.image.size == (32, 32)  # the run goes on: the objects are in memory
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("No space left on device" in w and ".npz" in w for w in warnings)
    assert files(tmp_path / "cache") == []  # no 0-byte *.tmp*.npz


def test_generate_after_a_damaged_cache_entry(tiny_pipe_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache_args = ("--object-cache-dir", str(cache))
    assert generate(tiny_pipe_dir, tmp_path / "a.png", *cache_args) == 0
    (entry,) = cache.glob("*.npz")  # one boxed object on a flat background
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="saltdiff"):
        assert generate(tiny_pipe_dir, tmp_path / "b.png", *cache_args) == 0  # was: exit 1, BadZipFile
    assert [r.getMessage() for r in caplog.records] == [
        f"object cache entry {entry} is unreadable (BadZipFile: File is not a zip file); "
        "removing it and generating the object again"
    ]
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    assert np.load(entry)["image"].shape == (32, 32, 3)


# -- layout files ----------------------------------------------------------------------------------
def layout_error(path) -> str:
    with pytest.raises(LayoutError) as info:
        Layout.from_json(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_deeply_nested_layout_file_is_one_line(tmp_path, tiny_pipe_dir, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in layout_error(path)
    path.write_text('{"boxes": ' + "[" * 500 + "]" * 500 + "}")  # parses, but is no list of boxes
    assert len(layout_error(path)) < 300
    assert generate(tiny_pipe_dir, tmp_path / "x.png", layout=path) == 2  # was: exit 1, RecursionError
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deep.json" in err


def test_a_layout_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"boxes": [{"phrase": "café", "box": [0, 0, 1, 1]}]}'.encode("latin-1"))
    assert "is not UTF-8 text: byte 26 (line 1)" in layout_error(path)


def test_long_phrases_give_short_messages(tmp_path, tiny_pipe_dir, capsys):
    long = "red " * 2500
    cases = [
        {"boxes": [{"phrase": long, "box": [0, 0, 2, 1]}]},  # outside the image
        {"boxes": [{"phrase": long, "box": [0, 0, 1, 1], "x" * 5000: 1}]},  # unknown key
        {"boxes": [{"phrase": long}]},  # no box
        {"boxes": [long]},
        {"boxes": [{"phrase": "red circle", "box": [0, 0, 1, 1]}], "prompt": ["p" * 9000]},
    ]
    path = tmp_path / "long.json"
    for case in cases:
        path.write_text(json.dumps(case))
        assert len(layout_error(path)) < 400
    path.write_text(json.dumps({"boxes": [{"phrase": long, "box": [0, 0, 1, 1]}]}))
    assert generate(tiny_pipe_dir, tmp_path / "x.png", layout=path) == 2  # not in the prompt
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 600 and "not found in prompt" in err


def test_a_huge_layout_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as fh:  # sparse: 50 MB without using the disk
        fh.truncate(50_000_000)
    tracemalloc.start()
    try:
        message = layout_error(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"is 50.0 MB; at most {MAX_LAYOUT_BYTES / 1e6:.1f} MB" in message
    assert peak < 1_000_000  # was: the whole file read, then parsed
    with pytest.raises(LayoutError, match="layout JSON text is .* characters long"):
        Layout.from_json("{" + " " * MAX_LAYOUT_BYTES + "}")
