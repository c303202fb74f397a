"""Where a model comes from and where it runs: ``builtin:`` names, hub ids, folders, device and dtype.

The CLI, the demo and the benchmark all load through :func:`load_pipeline`, so a missing folder, a
hub id that cannot be reached offline or CUDA asked for on a CPU machine give the same one-line
``ValueError`` everywhere. torch and diffusers are imported inside the functions: ``saltdiff --help``
reads :data:`DEFAULT_MODEL` from here without paying for them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .checkpoints import (  # noqa: F401  (re-exported: loading is where users look for them)
    BUILTIN_PREFIX,
    DEFAULT_MODEL,
    SD15_MODEL_ID,
    ModelLoadError,
    builtin_models,
    resolve_model,
    weights_stamp,
)

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import SaltPipeline

DTYPES = ("float32", "float16", "bfloat16")


def resolve_device_dtype(
    device: str | None = None, dtype: str | None = None, fallback_device: str | None = None
) -> tuple[str, str]:
    """``(device, dtype name)``: CUDA when available (else CPU), fp16 on CUDA and fp32 elsewhere.

    ``fallback_device`` is used when ``device`` is None (a distributed launcher's per-process device).
    """
    import torch

    if device is None:
        device = fallback_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dtype is None:
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return device, dtype


def load_pipeline(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    fallback_device: str | None = None,
) -> SaltPipeline:
    """A ``SaltPipeline`` for ``model`` on ``device`` in ``dtype``, or a one-line :class:`ModelLoadError`."""
    import torch

    from .pipeline import SaltPipeline

    device, dtype = resolve_device_dtype(device, dtype, fallback_device)
    if model.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    try:
        pipe = SaltPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {model!r}: {first}") from exc
    return pipe.to(device)
