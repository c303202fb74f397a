"""Reference backgrounds by name: the special canvases, the built-in model's colours, any colour name.

``--background`` takes one of the special values (:data:`SPECIAL_BACKGROUNDS`: a generated scene,
its median colour, flat gray or white, noise), a background colour of the built-in shapes world
("beige", "dark gray", …: the colours its prompts name, with the RGB it was trained on), any
CSS/X11 colour name that Pillow knows ("navy", "lightblue"), or ``#rrggbb``. The registry's
``background`` param checks values with :func:`is_background`, so the CLI, the API and the demo
accept the same ones. Standard library at import; Pillow and the world's table are read on use.
"""

from __future__ import annotations

from .registry import REFERENCE_BACKGROUNDS, REFERENCE_BUILDERS

#: Canvases that are not one colour name: a generated scene, its median colour, flat gray or white, noise.
SPECIAL_BACKGROUNDS = REFERENCE_BACKGROUNDS
#: The special canvases made by the model (a scene of the prompt), not drawn by the builder.
GENERATED_BACKGROUNDS = ("generated", "prompt-color")
#: How the accepted values are described in help texts and errors (the registered param's words).
BACKGROUND_HELP = REFERENCE_BUILDERS.get("objects").param("background").accepts_help


def _normalize(name: str) -> str:
    return " ".join(name.strip().lower().split())


def builtin_background_colors() -> dict[str, tuple[int, int, int]]:
    """The built-in shapes world's background names → the RGB its model was trained on."""
    from .worlds.shapes import BACKGROUND_COLORS

    return dict(BACKGROUND_COLORS)


def background_rgb(name: str) -> tuple[int, int, int] | None:
    """The RGB of a colour background (``None`` for a special canvas); ``ValueError`` if unknown.

    A name of the built-in world wins over Pillow's name ("beige" is the model's beige), then
    Pillow's CSS/X11 names and ``#rrggbb``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"background must be {BACKGROUND_HELP}, got {name!r}")
    if name in SPECIAL_BACKGROUNDS:
        return None
    key = _normalize(name)
    world = builtin_background_colors()
    if key in world:
        return world[key]
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(key.replace(" ", ""))
    except ValueError:
        raise ValueError(f"background must be {BACKGROUND_HELP}, got {name!r}") from None
    return tuple(int(c) for c in rgb[:3])  # type: ignore[return-value]


def is_background(value: object) -> bool:
    """Whether ``value`` names a reference background (special, world colour, colour name, #rrggbb)."""
    if not isinstance(value, str):
        return False
    try:
        background_rgb(value)
    except ValueError:
        return False
    return True


def background_suggestions() -> list[str]:
    """What a page offers in its background list (any other colour name can be typed)."""
    extra = [name for name in builtin_background_colors() if name not in SPECIAL_BACKGROUNDS]
    return [*SPECIAL_BACKGROUNDS, *extra]
