"""Files in and out, safely: atomic writes and bounded reads with one-line errors that name the file.

Every file saltdiff writes (the CLI's images, the bench's records and reports, the demo's PNGs, the
object cache) goes through :func:`atomic_write`: the bytes go to a temporary file beside the target
and are renamed over it, so a full disk, an exception or ``kill -9`` leaves either the old file or
the new one, never half of one, and a failed write leaves no temporary behind. Files read from users
(layouts, recipes, records) go through :func:`read_text`, which refuses an oversized file before
reading it and names the file in every error.

This module imports only the standard library, so the library, the CLI, the bench and the demo can
all use it without import cycles.
"""

from __future__ import annotations

import os
import reprlib
import secrets
from collections.abc import Callable
from typing import IO, Any

__all__ = ["TEMP_MARK", "atomic_write", "clip", "excerpt", "is_temporary", "read_text"]

#: Every temporary file of :func:`atomic_write` is named ``NAME{TEMP_MARK}XXXXXXXX`` beside ``NAME``.
TEMP_MARK = ".tmp-"

Writer = Callable[[IO[bytes]], Any]


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer, *, make_dirs: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and ``os.replace``.

    ``data`` is bytes, text (written as UTF-8) or a callable that writes into the binary file object
    it is given (``lambda fh: image.save(fh, format="PNG")``, ``lambda fh: np.savez(fh, ...)``). On
    any failure the temporary file is removed and ``path`` is left as it was; an ``OSError`` (full
    disk, no permission) is raised again as one ``OSError`` with the same ``errno`` whose message
    names ``path``. ``make_dirs`` creates the missing parent folders first.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = f"{path}{TEMP_MARK}{secrets.token_hex(4)}"  # unique per call: threads of one process too
    try:
        if make_dirs:
            os.makedirs(folder, exist_ok=True)
        fh = _open_temporary(tmp)
        try:
            with fh:
                if callable(data):
                    data(fh)
                else:
                    fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        message = f"cannot write {path!r}: {reason}"
        raise (OSError(exc.errno, message) if exc.errno is not None else OSError(message)) from exc


def _open_temporary(path: str) -> IO[bytes]:
    """A new file for writing (``O_EXCL``: never through a file someone else made; mode 0o666, so
    the umask decides, as for any file). Tests replace it to simulate a full disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporaries (left only by ``kill -9``)."""
    return TEMP_MARK in os.path.basename(name)


def read_text(path: str | os.PathLike, *, what: str, max_bytes: int) -> str:
    """The UTF-8 text of ``path``, refused before reading when it is over ``max_bytes``.

    ``what`` names the kind of file in messages (``"layout file"``). Every failure is a
    ``ValueError`` (too big, not UTF-8) or ``OSError`` (missing, unreadable) whose one-line message
    names the file.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise ValueError(_too_big(what, source, size, max_bytes))
            raw = fh.read(max_bytes + 1)  # a pipe or a growing file has no size up front
    except OSError as exc:
        reason = exc.strerror or str(exc)
        message = f"cannot read {what} {source!r}: {reason}"
        raise (OSError(exc.errno, message) if exc.errno is not None else OSError(message)) from exc
    if len(raw) > max_bytes:
        raise ValueError(_too_big(what, source, len(raw), max_bytes, at_least=True))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start : exc.start + 1]
        raise ValueError(
            f"{what} {source!r} is not UTF-8 text: byte {exc.start} (line {line}) is {bad!r}; save it as UTF-8"
        ) from None


def excerpt(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (long strings, big or deep containers)."""
    short = reprlib.Repr()
    short.maxstring = max(limit, 12)
    short.maxother = max(limit, 12)
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit + 3 else text[:limit] + "..."


def clip(text: str, limit: int = 160) -> str:
    """``text`` cut to ``limit`` characters (an exception's message inside one of ours)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _too_big(what: str, source: str, size: int, limit: int, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return f"{what} {source!r} is {more}{_mb(size)}; at most {_mb(limit)} is read (is it the right file?)"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
