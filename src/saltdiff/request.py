"""One generation described once: the request that the CLI, the demo and the bench all build.

A :class:`GenerationRequest` holds the prompt, the layout, registered names with their
hyper-parameters (initializer, reference builder, guidance) and the sampling settings. It builds the
initializer and guidance objects that ``SaltPipeline.__call__`` takes, and it is the PNG recipe: a
saved image carries the request that made it, and :meth:`GenerationRequest.from_png` reads it back,
so ``saltdiff generate``, the demo and every bench image describe a run the same way.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from . import __version__
from .fileio import atomic_write, clip, excerpt
from .guidance import GuidanceConfig
from .layout import Layout
from .registry import INITIALIZERS, REFERENCE_BUILDERS, SCHEDULERS, Entry

RECIPE_KEY = "saltdiff"
#: Reference-builder params that change where results are stored, not what is generated.
NON_RECIPE_PARAMS = ("cache", "cache_dir", "batch_size")
#: The largest height or width a request takes: 16x the largest trained size of any supported model
#: (1024), far above what ``--force`` is for; a bigger number in a recipe is damage, not a wish.
MAX_IMAGE_SIDE = 16384
#: Fields a recipe holds besides the request's own: where and with what it was made.
RECIPE_EXTRAS = ("saltdiff_version", "model", "dtype")
#: Every field :meth:`GenerationRequest.recipe` writes and :meth:`GenerationRequest.from_recipe`
#: reads; ``init_config`` is the one of saltdiff 0.1.0. Any other field is refused when read: a
#: recipe promises the same image, and a field this version does not know (a newer saltdiff's
#: setting) could change it, so it is not dropped silently.
RECIPE_FIELDS = (
    "prompt",
    "negative_prompt",
    "layout",
    "seed",
    "steps",
    "cfg",
    "true_cfg_scale",
    "scheduler",
    "height",
    "width",
    "init",
    "init_params",
    "reference",
    "reference_params",
    "guidance",
    "init_config",
    *RECIPE_EXTRAS,
)


#: Method options a flow-matching pipeline (``SaltSD3Pipeline``, ``SaltFluxPipeline``) does not run
#: yet: (part, name) → the only value it takes there and why. The pipeline refuses the others when
#: called; :meth:`GenerationRequest.for_pipeline` says so before any image is made.
FLOW_LIMITS: dict[tuple[str, str], tuple[Any, str]] = {
    ("init", "inversion_noise_scale"): (0.0, "flow inversion is deterministic: no SDE-style noise yet"),
}


def check_steps(value: Any, name: str = "num_inference_steps") -> None:
    """An integer >= 1 (``bool`` and ``2.5`` refused: nothing is rounded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {excerpt(value)}")


def check_cfg(value: Any, name: str = "guidance_scale") -> None:
    """A finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {excerpt(value)}")


def check_true_cfg(value: Any, name: str = "true_cfg_scale") -> None:
    """A finite number >= 1 (1: off)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 1
    ):
        raise ValueError(f"{name} must be a finite number >= 1 (1 = off), got {excerpt(value)}")


def check_seed(value: Any, name: str = "seed") -> None:
    """A non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {excerpt(value)}")


def check_side(value: Any, name: str) -> None:
    """``None`` (the model's size) or an integer in [1, :data:`MAX_IMAGE_SIDE`]; the multiple a model
    needs is checked by the call, which knows the model."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGE_SIDE:
        raise ValueError(f"{name} must be an integer in [1, {MAX_IMAGE_SIDE}] or None, got {excerpt(value)}")


def family_guidance_defaults(pipe, *, guidance_scale: float, true_cfg_scale: float = 1.0) -> dict[str, Any]:
    """The guidance fields ``pipe``'s family fills in when unset, for a call with these scales: a flow
    pipeline's :meth:`~saltdiff.flow_pipeline.FlowSaltMixin.guidance_defaults_for`, else its
    ``guidance_defaults`` (none on the UNet pipelines)."""
    if hasattr(pipe, "guidance_defaults_for"):
        return pipe.guidance_defaults_for(guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale)
    return dict(getattr(pipe, "guidance_defaults", {}))


@dataclass
class GenerationRequest:
    """What to generate and how; every name is a registered one and every param is checked.

    ``init`` names an initializer (:data:`~saltdiff.registry.INITIALIZERS`) and ``init_params`` sets
    its hyper-parameters; when that initializer uses a reference image, ``reference`` names the
    builder (:data:`~saltdiff.registry.REFERENCE_BUILDERS`) and ``reference_params`` sets its
    params (``{"image": path_or_PIL}`` for ``"image"``). Unset params take the registered defaults.
    """

    prompt: str
    layout: Layout = field(default_factory=Layout)
    init: str = "salt"
    init_params: Mapping[str, Any] = field(default_factory=dict)
    reference: str = "objects"
    reference_params: Mapping[str, Any] = field(default_factory=dict)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    seed: int = 0
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None
    #: FLUX's true classifier-free guidance (a second transformer call per step on ``negative_prompt``);
    #: 1 = off. Only pipelines whose call takes it (``SaltFluxPipeline``) accept another value.
    true_cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt is empty: describe the whole image, including the boxed phrases")
        if not isinstance(self.layout, Layout):
            raise TypeError(f"layout must be a Layout, got {type(self.layout).__name__}")
        if not isinstance(self.guidance, GuidanceConfig):
            raise TypeError(f"guidance must be a GuidanceConfig, got {type(self.guidance).__name__}")
        entry = INITIALIZERS.get(self.init)
        entry.resolve(self.init_params, owner=f"init {self.init!r}")
        if self.uses_reference:
            REFERENCE_BUILDERS.get(self.reference).resolve(self.reference_params, owner=self._ref_owner)
        elif self.reference_params:
            raise ValueError(
                f"reference options {sorted(self.reference_params)} apply only to an initializer that "
                f"uses a reference image ({[e.name for e in INITIALIZERS if 'reference' in e.needs]}), "
                f"not init {self.init!r}"
            )
        check_seed(self.seed)
        check_steps(self.num_inference_steps)
        check_cfg(self.guidance_scale)
        check_true_cfg(self.true_cfg_scale)
        check_side(self.height, "height")
        check_side(self.width, "width")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string or None, got {excerpt(self.negative_prompt)}")
        SCHEDULERS.get(self.scheduler)

    @property
    def _ref_owner(self) -> str:
        return f"reference builder {self.reference!r}"

    @property
    def init_entry(self) -> Entry:
        return INITIALIZERS.get(self.init)

    @property
    def uses_reference(self) -> bool:
        return self.init_entry.requires("reference", self.init_entry.resolve(self.init_params))

    # -- what the pipeline takes ---------------------------------------------------------------------
    def build_reference(self):
        """The reference builder object (``None`` when the initializer uses no reference)."""
        if not self.uses_reference:
            return None
        entry = REFERENCE_BUILDERS.get(self.reference)
        return entry.load()(**entry.resolve(self.reference_params, owner=self._ref_owner))

    def build_init(self):
        """The initializer object that ``SaltPipeline.__call__(init=...)`` takes."""
        entry = self.init_entry
        params = entry.resolve(self.init_params, owner=f"init {self.init!r}")
        if self.uses_reference:
            params["reference"] = self.build_reference()
        return entry.load()(**params)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pipe(prompt, layout, **kwargs)`` for this request."""
        return {
            "init": self.build_init(),
            "guidance": self.guidance,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
            **({"true_cfg_scale": self.true_cfg_scale} if self.true_cfg_scale != 1.0 else {}),
        }

    @contextlib.contextmanager
    def using_scheduler(self, pipe):
        """``pipe`` with this request's sampler (built from its own scheduler config), restored after."""
        from .samplers import make_scheduler, scheduler_name

        original = pipe.scheduler
        if scheduler_name(original) != self.scheduler:
            pipe.scheduler = make_scheduler(self.scheduler, original.config)
        try:
            yield pipe
        finally:
            pipe.scheduler = original

    def for_pipeline(self, pipe) -> GenerationRequest:
        """This request as ``pipe``'s family runs it: unset guidance fields whose default differs there
        (:func:`family_guidance_defaults`: on SD3 the outside prompt only with CFG, on FLUX none unless
        asked; recorded as the steps that run) filled in, and one
        ``ValueError`` line for a sampler of the other noise family or an option the family does not run
        yet (:data:`FLOW_LIMITS`), before any work."""
        from .samplers import config_family, make_scheduler

        make_scheduler(self.scheduler, pipe.scheduler.config)  # a VP sampler on a flow model: one line
        if self.true_cfg_scale != 1.0 and "true_cfg_scale" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(
                f"true_cfg_scale={self.true_cfg_scale} is FLUX's true CFG; {type(pipe).__name__} has none "
                "(its guidance_scale, --cfg, is classifier-free guidance already): leave it at 1"
            )
        request = self
        guidance = self.guidance.with_unset(
            family_guidance_defaults(
                pipe, guidance_scale=self.guidance_scale, true_cfg_scale=self.true_cfg_scale
            )
        )
        if guidance is not self.guidance:
            request = replace(self, guidance=guidance)
        if config_family(pipe.scheduler.config) != "flow":
            return request
        values = {
            "guidance": request.guidance.to_dict(),
            "init": request.init_entry.resolve(request.init_params),
        }
        for (part, name), (allowed, why) in FLOW_LIMITS.items():
            value = values[part].get(name, allowed)
            if value != allowed:
                raise ValueError(
                    f"{name}={value!r} does not run on {type(pipe).__name__} ({why}): use {allowed!r}"
                )
        return request

    def run(self, pipe, **extra):
        """``pipe(prompt, layout, ...)`` for this request, with its sampler; ``extra`` adds call options."""
        with self.using_scheduler(pipe):
            return pipe(self.prompt, self.layout, **self.pipeline_kwargs(), **extra)

    def resolved(self, scheduler) -> GenerationRequest:
        """This request with the initializer params it leaves to the sampler filled in, as a run on a
        model whose scheduler is ``scheduler`` sets them (this request's sampler is built from its
        config): an unset ``inversion_steps`` becomes the depth :class:`~saltdiff.init.SpatialAwareInit`
        uses at these steps, unset object steps the family's (:meth:`~saltdiff.init.SpatialAwareInit.builder`).
        Run and save the resolved request, and the recipe records the values used."""
        from .samplers import make_scheduler, scheduler_name

        init = self.build_init()
        resolve = getattr(init, "resolved", None)
        unset = [k for k, v in self.init_entry.resolve(self.init_params).items() if v is None]
        unset_ref = []
        if self.uses_reference:
            ref = REFERENCE_BUILDERS.get(self.reference).resolve(self.reference_params)
            unset_ref = [k for k, v in ref.items() if v is None]
        if resolve is None or not (unset or unset_ref):
            return self
        if scheduler_name(scheduler) != self.scheduler:
            scheduler = make_scheduler(self.scheduler, scheduler.config)
        concrete = resolve(scheduler, self.num_inference_steps)
        filled = {k: getattr(concrete, k) for k in unset if getattr(concrete, k, None) is not None}
        builder = getattr(concrete, "reference", None)
        filled_ref = {k: getattr(builder, k) for k in unset_ref if getattr(builder, k, None) is not None}
        if not (filled or filled_ref):
            return self
        return replace(
            self,
            init_params={**self.init_params, **filled},
            reference_params={**self.reference_params, **filled_ref},
        )

    # -- the recipe ----------------------------------------------------------------------------------
    def method(self) -> dict[str, Any]:
        """The method part of the recipe (initializer, reference, guidance) with every default filled."""
        init = self.init_entry.resolve(self.init_params)
        out: dict[str, Any] = {"init": self.init, "init_params": init}
        if self.uses_reference:
            ref = REFERENCE_BUILDERS.get(self.reference).resolve(self.reference_params)
            ref = {k: _jsonable(v) for k, v in ref.items() if k not in NON_RECIPE_PARAMS}
            out.update(reference=self.reference, reference_params=ref)
        out["guidance"] = self.guidance.to_dict()
        return out

    def recipe(self, **extra: Any) -> dict[str, Any]:
        """Everything needed to make the image again; ``extra`` adds ``model`` and ``dtype`` (or sets
        ``height`` and ``width``): only fields :meth:`from_recipe` reads, so every recipe reads back."""
        unknown = sorted(set(extra) - set(RECIPE_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown recipe field(s) {unknown}; extras a recipe holds: {list(RECIPE_EXTRAS)}"
            )
        return {
            "saltdiff_version": __version__,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "layout": self.layout.to_dict(),
            "seed": self.seed,
            "steps": self.num_inference_steps,
            "cfg": self.guidance_scale,
            "true_cfg_scale": self.true_cfg_scale,
            "scheduler": self.scheduler,
            "height": self.height,
            "width": self.width,
            **self.method(),
            **extra,
        }

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any], source: str | None = None) -> GenerationRequest:
        """The request a recipe describes, checked as the CLI and the call check their arguments.

        ``model``, ``dtype`` and ``saltdiff_version`` are recorded, not part of the request; any field
        not in :data:`RECIPE_FIELDS` is refused (it could be a newer saltdiff's setting that changes the
        image). Every problem is one ``ValueError`` naming the field (and ``source``, the file, when
        given); no value is rounded or converted.
        """
        where = "recipe" if source is None else f"recipe of {source!r}"
        if not isinstance(recipe, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {excerpt(recipe)}")
        unknown = sorted(set(recipe) - set(RECIPE_FIELDS))
        if unknown:
            version = recipe.get("saltdiff_version")
            by = f" (written by saltdiff {clip(str(version), 20)}, this is {__version__})" if version else ""
            raise ValueError(
                f"{where} has unknown field(s) {excerpt(unknown)}{by}; it may set something this version "
                f"cannot, so it is not run. Known fields: {', '.join(RECIPE_FIELDS)}"
            )
        try:
            return cls._from_checked_recipe(recipe)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def _from_checked_recipe(cls, recipe: Mapping[str, Any]) -> GenerationRequest:
        if "prompt" not in recipe:
            raise ValueError("field 'prompt' is missing")
        for name in ("prompt", "init", "scheduler", "saltdiff_version", "dtype"):
            if name in recipe and not isinstance(recipe[name], str):
                raise ValueError(f"field {name!r} must be a string, got {excerpt(recipe[name])}")
        for name in ("negative_prompt", "reference", "model"):
            value = recipe.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"field {name!r} must be a string or null, got {excerpt(value)}")
        for name in ("layout", "init_params", "reference_params", "guidance", "init_config"):
            value = recipe.get(name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"field {name!r} must be a JSON object, got {excerpt(value)}")
        check_steps(recipe.get("steps", 50), "field 'steps'")
        check_cfg(recipe.get("cfg", 7.5), "field 'cfg'")
        check_true_cfg(recipe.get("true_cfg_scale", 1.0), "field 'true_cfg_scale'")
        check_seed(recipe.get("seed", 0), "field 'seed'")
        check_side(recipe.get("height"), "field 'height'")
        check_side(recipe.get("width"), "field 'width'")
        init = recipe.get("init", "salt")
        init_params = dict(recipe.get("init_params") or {})
        reference = recipe.get("reference") or "objects"
        reference_params = dict(recipe.get("reference_params") or {})
        if "init_config" in recipe:  # written by saltdiff 0.1.0 before the registry
            init_params, reference, reference_params = _legacy_init(init, recipe["init_config"] or {})
        if reference == "image" and not isinstance(reference_params.get("image"), str):
            reference_params["image"] = None
        # Recipes list every option; one without these was written before unboxed objects were placed
        # (December 2026), and replays as it ran: objects left to the prompt, guidance on the boxes only.
        if reference == "objects" and reference_params and "unboxed" not in reference_params:
            reference_params["unboxed"] = "ignore"
        guidance_data = dict(recipe.get("guidance") or {})
        if guidance_data and "placed_unboxed" not in guidance_data:
            guidance_data["placed_unboxed"] = "free"
        try:
            layout = Layout.from_dict(recipe.get("layout") or {"boxes": []})
        except ValueError as exc:
            raise ValueError(f"field 'layout': {exc}") from None
        try:
            guidance = GuidanceConfig.from_dict(guidance_data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"field 'guidance': {exc}") from None
        return cls(
            prompt=recipe["prompt"],
            layout=layout,
            init=init,
            init_params=init_params,
            reference=reference,
            reference_params=reference_params if INITIALIZERS.get(init).needs else {},
            guidance=guidance,
            num_inference_steps=recipe.get("steps", 50),
            guidance_scale=recipe.get("cfg", 7.5),
            true_cfg_scale=recipe.get("true_cfg_scale", 1.0),  # not recorded before: off
            negative_prompt=recipe.get("negative_prompt"),
            seed=recipe.get("seed", 0),
            scheduler=recipe.get("scheduler", "ddim"),  # not recorded before; the built-in model used DDIM
            height=recipe.get("height"),
            width=recipe.get("width"),
        )

    def save_png(self, image: Image.Image, path: str, **extra: Any) -> dict[str, Any]:
        """Save ``image`` with this request's recipe (plus ``extra``); returns it. The format is the
        extension's (:func:`write_image`: PNG, or JPEG / lossless WebP with the recipe in EXIF)."""
        recipe = self.recipe(**{"height": image.height, "width": image.width, **extra})
        write_image(image, path, recipe)
        return recipe

    @classmethod
    def from_png(cls, path_or_image) -> GenerationRequest:
        """The request stored in a PNG that saltdiff wrote (a path or an open image), checked as
        :meth:`from_recipe` checks; every problem is one ``ValueError`` naming the file."""
        source = _source_name(path_or_image)
        return cls.from_recipe(read_recipe(path_or_image), source=source)


def write_png(image: Image.Image, path: str | os.PathLike, recipe: Mapping[str, Any]) -> None:
    """Save ``image`` as PNG with ``recipe`` (JSON) in a ``saltdiff`` text chunk, atomically: on a
    full disk or any error ``path`` keeps what it held and the ``OSError`` names it."""
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
    atomic_write(path, lambda fh: image.save(fh, format="PNG", pnginfo=info))


#: Output formats by file extension (:func:`write_image`).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: The EXIF tag (ImageDescription) that holds the recipe in a JPEG or WebP file.
EXIF_RECIPE_TAG = 0x010E


def image_format(path: str) -> str:
    """The format ``path``'s extension names (:data:`IMAGE_FORMATS`), or a one-line ``ValueError``."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(
            f"cannot write {str(path)!r}: its extension {ext or '(none)'!r} is not one of "
            f"{', '.join(IMAGE_FORMATS)} (the format follows the extension)"
        )
    return IMAGE_FORMATS[ext]


def write_image(image: Image.Image, path: str, recipe: Mapping[str, Any]) -> None:
    """Save ``image`` in the format of ``path``'s extension with ``recipe``: PNG (text chunk), JPEG
    (quality 95, no chroma subsampling) or WebP (lossless), both with the recipe in EXIF ImageDescription."""
    fmt = image_format(path)
    if fmt == "PNG":
        write_png(image, path, recipe)
        return
    exif = Image.Exif()
    exif[EXIF_RECIPE_TAG] = f"{RECIPE_KEY}:{json.dumps(recipe, sort_keys=True)}"  # ASCII: JSON escapes
    options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {"lossless": True}
    rgb = image.convert("RGB")
    atomic_write(path, lambda fh: rgb.save(fh, format=fmt, exif=exif.tobytes(), **options))


def read_recipe(path_or_image) -> dict[str, Any]:
    """The recipe (a JSON object) stored in an image written by saltdiff (PNG text chunk, or JPEG/WebP
    EXIF ImageDescription); a path or an open image.

    ``ValueError`` naming the file when it is not an image, a format that holds no recipe, has no
    recipe, or its recipe is not a JSON object; ``OSError`` (naming it) when it cannot be read.
    """
    source = _source_name(path_or_image)
    if isinstance(path_or_image, Image.Image):
        return _recipe_of(path_or_image, source)
    try:
        with Image.open(path_or_image) as image:
            return _recipe_of(image, source)
    except UnidentifiedImageError:
        raise ValueError(
            f"{source!r} is not an image; a saltdiff recipe is read from the PNG, JPEG or WebP it made"
        ) from None


def _recipe_of(image: Image.Image, source: str) -> dict[str, Any]:
    kind = image.format or "image"
    if kind not in set(IMAGE_FORMATS.values()) and RECIPE_KEY not in image.info:
        raise ValueError(
            f"{source!r} is a {kind} file, which carries no saltdiff recipe: saltdiff stores the recipe "
            "in the PNG, JPEG or WebP it writes (--out x.png)"
        )
    text = getattr(image, "text", {}).get(RECIPE_KEY) if kind == "PNG" else None
    text = text or image.info.get(RECIPE_KEY)
    if text is None and kind != "PNG":
        description = image.getexif().get(EXIF_RECIPE_TAG)
        if isinstance(description, str) and description.startswith(f"{RECIPE_KEY}:"):
            text = description[len(RECIPE_KEY) + 1 :]
    if text is None:
        raise ValueError(
            f"{source!r} carries no saltdiff recipe (not made by saltdiff, or its metadata was removed)"
        )
    try:
        recipe = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"the saltdiff recipe in {source!r} is not valid JSON: {clip(str(exc))}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"the saltdiff recipe in {source!r} must be a JSON object, got {excerpt(recipe)}")
    return recipe


def _source_name(path_or_image) -> str:
    if isinstance(path_or_image, Image.Image):
        return getattr(path_or_image, "filename", "") or "the image"
    if isinstance(path_or_image, (str, os.PathLike)):
        return os.fspath(path_or_image)
    return getattr(path_or_image, "name", None) or "the file"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Image.Image):
        return f"<image {value.width}x{value.height}>"
    return str(value)


def _legacy_init(init: str, config: Mapping[str, Any]) -> tuple[dict, str, dict]:
    params = {k: v for k, v in config.items() if k != "reference"}
    ref = dict(config.get("reference") or {})
    kind = ref.pop("type", "GeneratedObjects")
    name = "image" if kind == "UserImages" else "objects"
    known = set(REFERENCE_BUILDERS.get(name).defaults())
    ref = {k: v for k, v in ref.items() if k in known}
    if name == "image" and not isinstance(ref.get("image"), str):
        ref["image"] = None
    known_init = set(INITIALIZERS.get(init).defaults())
    return {k: v for k, v in params.items() if k in known_init}, name, ref
