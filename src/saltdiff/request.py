"""One generation described once: the request that the CLI, the demo and the bench all build.

A :class:`GenerationRequest` holds the prompt, the layout, registered names with their
hyper-parameters (initializer, reference builder, guidance) and the sampling settings. It builds the
initializer and guidance objects that ``SaltPipeline.__call__`` takes, and it is the PNG recipe: a
saved image carries the request that made it, and :meth:`GenerationRequest.from_png` reads it back,
so ``saltdiff generate``, the demo and every bench image describe a run the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, PngImagePlugin

from . import __version__
from .guidance import GuidanceConfig
from .layout import Layout
from .registry import INITIALIZERS, REFERENCE_BUILDERS, SCHEDULERS, Entry

RECIPE_KEY = "saltdiff"
#: Reference-builder params that change where results are stored, not what is generated.
NON_RECIPE_PARAMS = ("cache", "cache_dir", "batch_size")


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
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

    def run(self, pipe, **extra):
        """``pipe(prompt, layout, ...)`` for this request, with its sampler; ``extra`` adds call options."""
        with self.using_scheduler(pipe):
            return pipe(self.prompt, self.layout, **self.pipeline_kwargs(), **extra)

    def resolved(self, scheduler) -> GenerationRequest:
        """This request with the initializer params it leaves to the sampler filled in, as a run on a
        model whose scheduler is ``scheduler`` sets them (this request's sampler is built from its
        config): an unset ``inversion_steps`` becomes the depth :class:`~saltdiff.init.SpatialAwareInit`
        uses at these steps. Run and save the resolved request, and the recipe records the value used."""
        from .samplers import make_scheduler, scheduler_name

        init = self.build_init()
        resolve = getattr(init, "resolved", None)
        unset = [k for k, v in self.init_entry.resolve(self.init_params).items() if v is None]
        if resolve is None or not unset:
            return self
        if scheduler_name(scheduler) != self.scheduler:
            scheduler = make_scheduler(self.scheduler, scheduler.config)
        concrete = resolve(scheduler, self.num_inference_steps)
        filled = {k: getattr(concrete, k) for k in unset if getattr(concrete, k, None) is not None}
        if not filled:
            return self
        return replace(self, init_params={**self.init_params, **filled})

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
        """Everything needed to make the image again; ``extra`` adds e.g. ``model`` and ``dtype``."""
        return {
            "saltdiff_version": __version__,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "layout": self.layout.to_dict(),
            "seed": self.seed,
            "steps": self.num_inference_steps,
            "cfg": self.guidance_scale,
            "scheduler": self.scheduler,
            "height": self.height,
            "width": self.width,
            **self.method(),
            **extra,
        }

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> GenerationRequest:
        """The request a recipe describes (``model``, ``dtype`` and other extras are ignored)."""
        init = recipe.get("init", "salt")
        init_params = dict(recipe.get("init_params") or {})
        reference = recipe.get("reference") or "objects"
        reference_params = dict(recipe.get("reference_params") or {})
        if "init_config" in recipe:  # written by saltdiff 0.1.0 before the registry
            init_params, reference, reference_params = _legacy_init(init, recipe["init_config"] or {})
        if reference == "image" and not isinstance(reference_params.get("image"), str):
            reference_params["image"] = None
        return cls(
            prompt=recipe["prompt"],
            layout=Layout.from_dict(recipe.get("layout") or {"boxes": []}),
            init=init,
            init_params=init_params,
            reference=reference,
            reference_params=reference_params if INITIALIZERS.get(init).needs else {},
            guidance=GuidanceConfig.from_dict(recipe.get("guidance") or {}),
            num_inference_steps=int(recipe.get("steps", 50)),
            guidance_scale=float(recipe.get("cfg", 7.5)),
            negative_prompt=recipe.get("negative_prompt"),
            seed=int(recipe.get("seed", 0)),
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
        return cls.from_recipe(read_recipe(path_or_image))


def write_png(image: Image.Image, path: str, recipe: Mapping[str, Any]) -> None:
    """Save ``image`` as PNG with ``recipe`` (JSON) in a ``saltdiff`` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
    image.save(path, format="PNG", pnginfo=info)


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
    image.convert("RGB").save(path, format=fmt, exif=exif.tobytes(), **options)


def read_recipe(path_or_image) -> dict[str, Any]:
    """The recipe stored in an image written by saltdiff (PNG text chunk, or JPEG/WebP EXIF)."""
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    text = getattr(image, "text", {}).get(RECIPE_KEY) or image.info.get(RECIPE_KEY)
    if text is None:
        description = image.getexif().get(EXIF_RECIPE_TAG)
        if isinstance(description, str) and description.startswith(f"{RECIPE_KEY}:"):
            text = description[len(RECIPE_KEY) + 1 :]
    if text is None:
        raise ValueError(f"this {image.format or 'image'} carries no saltdiff recipe")
    return json.loads(text)


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
