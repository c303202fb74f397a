"""Names of checkpoints: ``builtin:NAME`` for the models shipped in the package, hub ids, folders.

Kept apart from :mod:`saltdiff.loading` (which builds pipelines) so that the pipeline can resolve
``builtin:`` names without importing the module that imports it. Standard library only (plus
``huggingface_hub``'s cache lookup, imported when a hub id is checked).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:shapes"
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: The documented SDXL default (``--model`` / ``SaltXLPipeline.from_pretrained``).
SDXL_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


class ModelLoadError(ValueError):
    """A model that cannot be found or loaded: one line that names it."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped in the package as ``models/NAME`` and named ``builtin:NAME``.

    ``world``: the synthetic world it was trained on (its suites are scored with that world's exact
    detector); ``description``: one line for lists and messages; ``guidance_scale``: the CFG scale its
    model card recommends, the command line's ``--cfg`` default for it (5 for both built-in models: chosen
    on the tuning split, ``benchmarks/RESULTS.md``; the UNet model's captions are most often right there).
    """

    name: str
    description: str
    world: str = "shapes"
    guidance_scale: float = 5.0


#: The built-in models, one entry each; an entry is offered (``builtin_models``, the demo's list)
#: once its folder ships with a ``model_index.json``. ``tests/test_builtin_catalogue.py`` checks that every
#: shipped folder has an entry.
BUILTIN_CATALOGUE: tuple[BuiltinModel, ...] = (
    BuiltinModel("shapes", "SD 1.x-structured UNet trained on the shapes world"),
    BuiltinModel("shapes-mmdit", "SD3-structured MMDiT (flow matching) trained on the shapes world"),
)


def builtin_root() -> str:
    """The package folder that holds the built-in models' diffusers folders."""
    return os.path.join(os.path.dirname(__file__), "models")


def builtin_models() -> dict[str, str]:
    """Names of the catalogued built-in models whose folders ship (``builtin:NAME``) → their paths."""
    folders = {entry.name: os.path.join(builtin_root(), entry.name) for entry in BUILTIN_CATALOGUE}
    return {k: v for k, v in folders.items() if os.path.isfile(os.path.join(v, "model_index.json"))}


def builtin_entry(model: str | os.PathLike) -> BuiltinModel | None:
    """The catalogue entry of ``builtin:NAME`` (or of the shipped folder itself), else ``None``."""
    name = str(model)
    if name.startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX) :]
    elif os.path.isdir(name) and os.path.samefile(os.path.dirname(os.path.abspath(name)), builtin_root()):
        name = os.path.basename(os.path.abspath(name))
    else:
        return None
    return next((entry for entry in BUILTIN_CATALOGUE if entry.name == name), None)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """``builtin:NAME`` → the shipped folder; anything else (hub id or folder) is passed through."""
    name = str(name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        models = builtin_models()
        if key not in models:
            available = [BUILTIN_PREFIX + k for k in models]
            if any(entry.name == key for entry in BUILTIN_CATALOGUE):
                raise ModelLoadError(
                    f"built-in model {name!r} is not shipped in this install (no "
                    f"{os.path.join(builtin_root(), key, 'model_index.json')}); available: {available}"
                )
            raise ModelLoadError(f"unknown built-in model {name!r}; available: {available}")
        return models[key]
    return name


def null_components(folder: str | os.PathLike) -> list[str]:
    """Components that a local folder's ``model_index.json`` lists as ``[null, null]``.

    diffusers loads a null component only when the pipeline class declares it optional; SD3's T5
    (``text_encoder_3``) is not declared so, although its pipeline runs without it. Passing these as
    ``None`` lets a folder saved without T5 load as it was saved. ``[]`` for anything but a folder.
    """
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return []
    with open(index, encoding="utf-8") as f:
        entries = json.load(f)
    return [k for k, v in entries.items() if isinstance(v, list) and v and all(x is None for x in v)]


def weights_stamp(model_id: str) -> list:
    """Size and mtime of a local model's weight files: caches keyed on it never serve retrained weights."""
    if not os.path.isdir(model_id):
        return []
    stamp = []
    for sub in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        for path in sorted(Path(model_id, sub).glob("*.safetensors")) + sorted(
            Path(model_id, sub).glob("*.bin")
        ):
            st = path.stat()
            stamp.append([f"{sub}/{path.name}", st.st_size, st.st_mtime_ns])
    return stamp


#: The model families saltdiff runs: name → (what users call it, the pipeline class that runs it).
FAMILIES = {
    "sd": ("Stable Diffusion 1.x/2.x", "SaltPipeline"),
    "sdxl": ("SDXL", "SaltXLPipeline"),
    "sd3": ("Stable Diffusion 3", "SaltSD3Pipeline"),
    "flux": ("FLUX", "SaltFluxPipeline"),
}
#: The sampler (a :data:`saltdiff.registry.SCHEDULERS` name) each family runs unless told otherwise.
DEFAULT_SAMPLERS = {"sd": "ddim", "sdxl": "ddim", "sd3": "flow-euler", "flux": "flow-euler"}
#: Pipeline class-name prefixes of families saltdiff does not run, and what to call them.
UNSUPPORTED_FAMILIES = (
    ("PixArt", "PixArt"),
    ("Kandinsky", "Kandinsky"),
    ("Sana", "Sana"),
    ("HunyuanDiT", "Hunyuan-DiT"),
    ("Lumina", "Lumina"),
    ("AuraFlow", "AuraFlow"),
    ("Wuerstchen", "Würstchen"),
    ("StableCascade", "Stable Cascade"),
    ("IF", "DeepFloyd IF"),
)
SUPPORTED_TEXT = (
    "saltdiff runs Stable Diffusion 1.x/2.x-style checkpoints (one UNet2DConditionModel with one CLIP "
    "text encoder: SD 1.5, SD 2.1, their fine-tunes, LCM) with SaltPipeline and SDXL base-style ones "
    f"(two CLIP text encoders, e.g. {SDXL_MODEL_ID}) with SaltXLPipeline, and Stable Diffusion 3 text-to-image "
    "ones (SD3Transformer2DModel, two CLIP text encoders, optionally T5) with SaltSD3Pipeline, and FLUX "
    "text-to-image ones (FluxTransformer2DModel, CLIP + T5, e.g. black-forest-labs/FLUX.1-dev) with SaltFluxPipeline"
)
_SD_COMPONENTS = {"unet", "text_encoder", "tokenizer"}
_SDXL_COMPONENTS = _SD_COMPONENTS | {"text_encoder_2", "tokenizer_2"}
#: SD3's text-to-image components (``text_encoder_3`` / ``tokenizer_3``, T5, may be left out, as diffusers allows).
_SD3_COMPONENTS = {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
_SD3_CLASSES = ("StableDiffusion3Pipeline", "SaltSD3Pipeline")
#: FLUX's text-to-image components (the IP-Adapter's image encoder is optional, as in diffusers).
_FLUX_COMPONENTS = {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
_FLUX_CLASSES = ("FluxPipeline", "SaltFluxPipeline")


def model_family(class_name: str, components, source: str) -> str:
    """``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` for a pipeline's class name and component names, else one ``ValueError`` line.

    Read from ``model_index.json`` before any weight is loaded, or from a pipeline given to
    ``from_pipe``: a wrong family otherwise fails deep inside diffusers (loaded as SD, SDXL's second
    text encoder is dropped silently and the UNet dies on its missing added conditions).
    """
    names = set(components)
    if class_name.startswith("StableDiffusion3") or class_name == "SaltSD3Pipeline":
        if class_name in _SD3_CLASSES and _SD3_COMPONENTS <= names:
            return "sd3"
        missing = sorted(_SD3_COMPONENTS - names)
        what = f"without {missing}" if missing else "not the text-to-image one"
        raise ModelLoadError(
            f"{source} is a Stable Diffusion 3 ({what}) pipeline ({class_name}): not supported; {SUPPORTED_TEXT}"
        )
    if class_name.startswith("Flux") or class_name == "SaltFluxPipeline":
        if class_name in _FLUX_CLASSES and _FLUX_COMPONENTS <= names:
            return "flux"
        missing = sorted(_FLUX_COMPONENTS - names)
        what = f"without {missing}" if missing else "not the text-to-image one"
        raise ModelLoadError(f"{source} is a FLUX ({what}) pipeline ({class_name}): not supported; {SUPPORTED_TEXT}")
    family = next((label for prefix, label in UNSUPPORTED_FAMILIES if class_name.startswith(prefix)), None)
    if family is None and (class_name.startswith("StableDiffusionXL") or "text_encoder_2" in names):
        if _SDXL_COMPONENTS <= names:
            return "sdxl"
        family = f"SDXL (without {sorted(_SDXL_COMPONENTS - names)}, e.g. the refiner)"
    if family is None and not _SD_COMPONENTS <= names:
        family = class_name or "this"
    if family is not None:
        raise ModelLoadError(
            f"{source} is a {family} pipeline ({class_name}): not supported; {SUPPORTED_TEXT}"
        )
    return "sd"


def check_family(class_name: str, components, source: str, family: str = "sd") -> None:
    """One ``ValueError`` line unless the pipeline is of ``family`` (see :func:`model_family`)."""
    found = model_family(class_name, components, source)
    if found != family:
        label, runner = FAMILIES[found]
        raise ModelLoadError(
            f"{source} is a {label} pipeline ({class_name}): not supported; saltdiff runs {label} with "
            f"{runner}, not {FAMILIES[family][1]} (saltdiff.load_pipeline and --model pick the class)"
        )


def _read_index(path: str, cache_dir=None, revision=None) -> tuple[str, list[str]] | None:
    """``(class name, component names)`` of ``model_index.json`` of a folder or a cached hub id (never
    the network); ``None`` when it is not at hand."""
    if os.path.isdir(path):
        file = os.path.join(path, "model_index.json")
    else:
        from huggingface_hub import try_to_load_from_cache

        file = try_to_load_from_cache(path, "model_index.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(file, str) or not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as fh:
        index = json.load(fh)
    # a component saved as None (e.g. no safety checker) is listed as [null, null]
    components = [k for k, v in index.items() if not k.startswith("_") and v != [None, None]]
    return str(index.get("_class_name", "")), components


def index_family(path: str, name: str, cache_dir=None, revision=None) -> str | None:
    """:func:`model_family` of a folder's or a cached hub id's ``model_index.json``; ``None`` when it is
    not at hand."""
    index = _read_index(path, cache_dir=cache_dir, revision=revision)
    return None if index is None else model_family(*index, name)


def check_model_index(path: str, name: str, cache_dir=None, revision=None, family: str = "sd") -> bool:
    """:func:`check_family` on a folder's or a cached hub id's ``model_index.json`` (never the network);
    ``False`` when it is not at hand."""
    index = _read_index(path, cache_dir=cache_dir, revision=revision)
    if index is None:
        return False
    check_family(*index, name, family=family)
    return True
