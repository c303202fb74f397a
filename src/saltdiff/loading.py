"""Where a model comes from and where it runs: ``builtin:`` names, hub ids, folders, device and dtype.

The CLI, the demo and the benchmark all load through :func:`load_pipeline`, so a missing folder, a
hub id that cannot be reached offline or CUDA asked for on a CPU machine give the same one-line
``ValueError`` everywhere. torch and diffusers are imported inside the functions: ``saltdiff --help``
reads :data:`DEFAULT_MODEL` from here without paying for them.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .checkpoints import (  # noqa: F401  (re-exported: loading is where users look for them)
    BUILTIN_PREFIX,
    DEFAULT_MODEL,
    SD15_MODEL_ID,
    SDXL_MODEL_ID,
    ModelLoadError,
    builtin_entry,
    builtin_models,
    index_family,
    resolve_model,
    weights_stamp,
)
from .preflight import MAX_SIZE_FACTOR, check_trained_size  # noqa: F401  (MAX_SIZE_FACTOR re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import SaltPipeline

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
#: Signs, anywhere in a load error's chain, that the Hub could not be reached (or may not be).
_OFFLINE = re.compile(
    r"Connect(ion)?Error|ConnectTimeout|ReadTimeout|Name or service not known|Temporary failure in name "
    r"resolution|Network is unreachable|OfflineModeIsEnabled|outgoing traffic has been disabled"
)
_NOT_FOUND = re.compile(r"RepositoryNotFoundError|404 Client Error|is not a valid model identifier")


def resolve_device_dtype(
    device: str | None = None, dtype: str | None = None, fallback_device: str | None = None
) -> tuple[str, str]:
    """``(device, dtype name)``: CUDA when available (else CPU), fp16 on CUDA and fp32 elsewhere.

    ``fallback_device`` is used when ``device`` is None (a distributed launcher's per-process device).
    """
    import torch

    if device is None:
        device = fallback_device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device {device!r} is not a device torch knows: use cpu, cuda, cuda:N (a GPU's index) or mps"
        ) from None
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS (Apple GPU) is not available on this machine")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dtype is None:
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return device, dtype


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading chatter off inside the block, their settings restored after.

    Silenced at the source, only while saltdiff imports and loads a pipeline: the per-component
    progress bars, transformers' notes that its image processors fall back without torchvision
    (saltdiff uses none), "Couldn't connect to the Hub ... Will try to load from local cache" (a
    failure becomes one :class:`ModelLoadError` line) and diffusers' "float16 ... cannot run with
    cpu" on ``.to("cpu")`` (it runs: the fast tests do). Errors still show.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, saved):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def load_error_message(model: str, exc: BaseException) -> str:
    """One line for a failed load: no network or no such hub model (and what to do), else the cause."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    folder = "use a local diffusers folder instead (--model /path/to/folder) or builtin:shapes"
    if not os.path.isdir(os.path.expanduser(model)):
        if _NOT_FOUND.search(text):
            return f"cannot load model {model!r}: no such model on the Hugging Face Hub; {folder}"
        if _OFFLINE.search(text):
            return (
                f"cannot load model {model!r}: the Hugging Face Hub cannot be reached (no network, or "
                f"HF_HUB_OFFLINE is set) and no such model is in the local cache; {folder}"
            )
    message = str(exc).replace("Please check out the root cause in the stacktrace above.", "").strip()
    first = message.splitlines()[0] if message else type(exc).__name__
    return f"cannot load model {model!r}: {first}"


#: Seconds :func:`hub_reachable` waits for the Hub to accept a connection.
HUB_PROBE_TIMEOUT = 3.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face Hub's endpoint accepts a TCP connection within ``timeout`` seconds:
    one try, where ``huggingface_hub`` would retry five times over 30 s before failing. ``False``
    under ``HF_HUB_OFFLINE``; ``True`` when a proxy is configured (only the proxy knows)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def offline_message(model: str) -> str:
    """One line for a hub id that is neither cached nor reachable: what to pass instead."""
    return (
        f"cannot load model {model!r}: it is not in the local Hugging Face cache and the Hub cannot be "
        "reached (no network, or HF_HUB_OFFLINE is set); pass a local diffusers folder "
        "(--model /path/to/folder), download it where there is network "
        f"(huggingface-cli download {model}), or use builtin:shapes"
    )


def hub_files_only(model: str) -> bool:
    """For a hub id: whether to load it from the local cache only (the Hub is unreachable and the
    cache holds it); a one-line :class:`ModelLoadError` when it is neither reachable nor cached.
    ``False`` for a folder or a ``builtin:`` name, and for a hub id while the Hub answers."""
    from .preflight import local_model_folder

    path = resolve_model(model)
    if os.path.isdir(os.path.expanduser(path)) or hub_reachable():
        return False
    folder = local_model_folder(model)
    if folder is None or not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ModelLoadError(offline_message(model))
    return True


def model_family_of(model: str) -> str:
    """``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` from the model's ``model_index.json`` (a folder, a cached hub id, or, for a
    hub id not cached yet, that one file fetched first); another family is refused in one line."""
    path = resolve_model(model)
    family = index_family(path, model)
    if family is None and not os.path.isdir(path):
        from huggingface_hub import hf_hub_download

        try:
            hf_hub_download(path, "model_index.json")
        except Exception:  # noqa: BLE001 -- unreachable or no such model: from_pretrained says which
            return "sd"
        family = index_family(path, model)
    return family or "sd"


def pipeline_class_of(family: str):
    """The saltdiff pipeline class of a model family (``model_family_of``)."""
    if family == "sdxl":
        from .pipeline_xl import SaltXLPipeline as pipeline_class
    elif family == "sd3":
        from .pipeline_sd3 import SaltSD3Pipeline as pipeline_class
    elif family == "flux":
        from .pipeline_flux import SaltFluxPipeline as pipeline_class
    else:
        from .pipeline import SaltPipeline as pipeline_class
    return pipeline_class


def _call_default_cfg(pipeline_class) -> float:
    """The ``guidance_scale`` default of the class's call; 7.5 (SD's) for a call that declares none
    (a wrapper taking ``**kwargs``)."""
    param = inspect.signature(pipeline_class.__call__).parameters.get("guidance_scale")
    if param is None or param.default is inspect.Parameter.empty:
        return 7.5
    return float(param.default)


def default_guidance_scale(model: str) -> float:
    """The ``--cfg`` a command uses when none is given, before loading (``bench``, ``study``): a built-in
    model's recommended scale (its catalogue entry, from its model card), else the default of the family's
    pipeline call (diffusers': 7.5 for SD 1.x/2.x, 7.0 for SD3, FLUX's embedded 3.5; SDXL 7.5 as saltdiff's
    SDXL pipeline), the family read as :func:`load_pipeline` reads it (:func:`model_family_of`)."""
    entry = builtin_entry(model)
    if entry is not None:
        return entry.guidance_scale
    with quiet_loading():  # a hub lookup or a pipeline module's import: no library output before saltdiff's
        return _call_default_cfg(pipeline_class_of(model_family_of(model)))


def pipeline_guidance_scale(pipe) -> float:
    """:func:`default_guidance_scale` of a loaded pipeline (``generate`` after loading, the demo's CFG
    control)."""
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or ""
    entry = builtin_entry(source) if source else None
    return entry.guidance_scale if entry is not None else _call_default_cfg(type(pipe))


def load_pipeline(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    fallback_device: str | None = None,
) -> SaltPipeline:
    """A ``SaltPipeline`` (SD 1.x/2.x), ``SaltXLPipeline`` (SDXL), ``SaltSD3Pipeline`` (SD3) or
    ``SaltFluxPipeline`` (FLUX; the family is read from ``model_index.json``)
    for ``model`` on ``device`` in ``dtype``, or a one-line :class:`ModelLoadError`."""
    import torch

    from .components import dtype_keyword

    device, dtype = resolve_device_dtype(device, dtype, fallback_device)
    if model.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    cache_only = hub_files_only(model)  # offline: the local cache at once, no retries
    with quiet_loading():
        pipeline_class = pipeline_class_of(model_family_of(model))

        extra = {"local_files_only": True} if cache_only else {}
        try:
            pipe = pipeline_class.from_pretrained(model, **{dtype_keyword(): getattr(torch, dtype)}, **extra)
        except OSError as exc:
            raise ModelLoadError(load_error_message(model, exc)) from exc
        pipe = pipe.to(device)  # diffusers' "float16 ... cannot run with cpu" is silenced: it runs
    if dtype == "float16" and device == "cpu":
        logger.warning(
            "float16 on the CPU runs, but much slower than float32 (11x for the README's first "
            "command here: 15.9 s against 1.4 s); float32 is the CPU default"
        )
    return pipe


def denoiser(pipe):
    """The pipeline's denoising network (``pipe.denoiser``: the UNet, or SD3's and FLUX's transformer)."""
    return pipe.denoiser


def check_image_size(pipe, height: int | None, width: int | None, *, force: bool = False) -> None:
    """Refuse (``ValueError``) a side more than :data:`MAX_SIZE_FACTOR` times the model's trained size.

    Such a run takes minutes (the cost grows with the pixel count, attention with its square) and
    asks for what the model never saw; ``force=True`` (``--force``) runs it anyway.
    """
    default_size = getattr(pipe, "default_size", None)  # flow pipelines: FLUX's transformer has no sample_size
    trained = default_size() if callable(default_size) else denoiser(pipe).config.sample_size * pipe.vae_scale_factor
    check_trained_size(trained, height, width, force=force)
