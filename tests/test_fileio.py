"""The shared file helpers: atomic writes (full disk, failing writers, threads) and bounded reads."""

import errno
import os
import threading

import numpy as np
import pytest
from PIL import Image

from saltdiff.fileio import atomic_write, clip, excerpt, is_temporary, read_text


def leftovers(folder):
    return [name for name in os.listdir(folder) if is_temporary(name) or ".tmp" in name]


def test_atomic_write_takes_bytes_text_and_a_writer(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "héllo")
    atomic_write(tmp_path / "c.png", lambda fh: Image.new("RGB", (4, 3), "red").save(fh, format="PNG"))
    atomic_write(tmp_path / "sub" / "d.npz", lambda fh: np.savez(fh, x=np.arange(3)))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert Image.open(tmp_path / "c.png").size == (4, 3)
    assert np.load(tmp_path / "sub" / "d.npz")["x"].tolist() == [0, 1, 2]
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


@pytest.mark.parametrize("budget", [0, 5])
def test_a_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, full_disk, budget):
    target = tmp_path / "full.png"
    target.write_bytes(b"the old image")
    full_disk(budget)
    with pytest.raises(OSError) as info:
        atomic_write(target, b"x" * 100)
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and "No space left on device" in str(info.value)
    assert target.read_bytes() == b"the old image"  # not truncated, not half-written
    assert leftovers(tmp_path) == []  # and no temporary file behind
    with pytest.raises(OSError, match="full.npz"):  # a writer that fails half way too
        atomic_write(tmp_path / "full.npz", lambda fh: np.savez(fh, x=np.zeros(1000)))
    assert sorted(os.listdir(tmp_path)) == ["full.png"]


def test_a_failing_writer_leaves_nothing_and_its_error_unchanged(tmp_path):
    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("encoder broke")

    with pytest.raises(RuntimeError, match="encoder broke"):
        atomic_write(tmp_path / "x.png", broken)
    assert os.listdir(tmp_path) == []


def test_unwritable_places_are_named(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OSError, match="dir.png"):
        atomic_write(tmp_path / "dir.png", b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="file/x.png"):  # its folder is a file
        atomic_write(tmp_path / "file" / "x.png", b"x")
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "file"]


def test_threads_writing_one_path_never_mix_their_files(tmp_path):
    target = tmp_path / "same.bin"
    payloads = [bytes([k]) * 50_000 for k in range(6)]

    def write(payload):
        for _ in range(10):
            atomic_write(target, payload)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert leftovers(tmp_path) == []


def test_read_text_refuses_big_and_non_utf8_files_naming_them(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(b"{" + b" " * 2000 + b"}")
    assert read_text(path, what="layout file", max_bytes=5000).startswith("{")
    with pytest.raises(ValueError, match=r"layout file '.*big.json' is 2002 bytes; at most 1000 bytes"):
        read_text(path, what="layout file", max_bytes=1000)
    path.write_bytes(b'{\n"phrase": "caf' + b"\xe9" + b'"}')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"'.*big.json' is not UTF-8 text: byte 16 \(line 2\) is b'\\xe9'"):
        read_text(path, what="layout file", max_bytes=1000)
    with pytest.raises(OSError, match=r"cannot read layout file '.*missing.json': No such file"):
        read_text(tmp_path / "missing.json", what="layout file", max_bytes=1000)


def test_excerpts_stay_short_for_long_and_deep_values():
    assert len(excerpt("x" * 10_000)) < 100
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert len(excerpt(deep)) < 100  # no RecursionError either
    assert len(excerpt({"phrase": "y" * 10_000, "box": [0, 0, 1, 1]})) < 100
    assert clip("a\nb " + "z" * 500, 20) == "a b " + "z" * 16 + "..."
