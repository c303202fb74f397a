"""Pictures a person can look at: boxes over the result, per-phrase attention heat maps, image grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .layout import Box, Layout

PALETTE = [
    (255, 64, 64),
    (64, 160, 255),
    (64, 200, 64),
    (255, 190, 0),
    (200, 80, 255),
    (0, 210, 210),
    (255, 120, 180),
    (160, 160, 160),
]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_boxes(
    image: Image.Image, layout: Layout, *, scale: int = 1, labels: bool = True, width: int | None = None
) -> Image.Image:
    """A copy of ``image`` (upscaled ``scale`` times, nearest) with each box and its phrase drawn."""
    out = image.convert("RGB")
    if scale != 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    line = width or max(1, out.width // 128)
    font = _font(max(10, out.width // 24))
    for k, (box, label) in enumerate(zip(layout, layout.labels)):
        color = PALETTE[k % len(PALETTE)]
        x0, y0, x1, y1 = box.to_pixels(out.width, out.height)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=line)
        if labels:  # "red circle#2" for a repeated phrase's second box
            tw = draw.textlength(label, font=font)
            th = font.size if hasattr(font, "size") else 10
            ty = max(0, y0 - th - 2)
            draw.rectangle([x0, ty, x0 + tw + 4, ty + th + 2], fill=color)
            draw.text((x0 + 2, ty), label, fill=(0, 0, 0), font=font)
    return out


def heatmap(attention: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A [h, w] map, min-max normalized, as a colored (black→red→yellow→white) image of ``size``."""
    a = np.asarray(attention, dtype=np.float32)
    a = (a - a.min()) / (a.max() - a.min() + 1e-8)
    rgb = np.stack([np.clip(3 * a, 0, 1), np.clip(3 * a - 1, 0, 1), np.clip(3 * a - 2, 0, 1)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.BILINEAR)


def overlay_figure(
    image: Image.Image,
    layout: Layout,
    attention_maps: np.ndarray | None = None,
    reference_image: Image.Image | None = None,
    *,
    tile: int = 256,
    placed: Sequence = (),
) -> Image.Image:
    """One picture: result with boxes | reference | one heat map per boxed phrase (with its box).

    ``placed``: the boxes SALT chose for the prompt's unboxed objects (``SaltOutput.info
    ["placed_unboxed"]``, dicts or :class:`~saltdiff.layout.Box`), drawn on the reference in gray.
    """
    scale = max(1, tile // image.width)
    tiles = [draw_boxes(image, layout, scale=scale).resize((tile, tile * image.height // image.width))]
    captions = ["result"]
    th = tiles[0].height
    if reference_image is not None:
        ref = draw_boxes(reference_image, layout, scale=scale, labels=False)
        if placed:
            boxes = [b if isinstance(b, Box) else Box(b["phrase"], b["box"]) for b in placed]
            draw = ImageDraw.Draw(ref)
            for b in boxes:
                x0, y0, x1, y1 = b.to_pixels(ref.width, ref.height)
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(128, 128, 128), width=max(1, ref.width // 128))
        tiles.append(ref.resize((tile, th)))
        captions.append("reference" + (" (gray: unboxed, placed)" if placed else ""))
    if attention_maps is not None:
        for k, (box, label) in enumerate(zip(layout, layout.labels)):
            heat = heatmap(attention_maps[k], (tile, th))
            tiles.append(draw_boxes(heat, Layout((box,)), labels=False))
            captions.append(f"attn: {label}")
    pad = 22
    canvas = Image.new("RGB", (tile * len(tiles) + 4 * (len(tiles) - 1), th + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for i, (t, caption) in enumerate(zip(tiles, captions)):
        x = i * (tile + 4)
        canvas.paste(t, (x, pad))
        draw.text((x + 2, 3), caption, fill=(0, 0, 0), font=font)
    return canvas


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    *,
    pad: int = 2,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Tile images in rows/columns (all resized to the first image's size), with optional labels."""
    first = rows[0][0]
    w, h = first.size
    left = 120 if row_labels else 0
    top = 18 if col_labels else 0
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + ncols * (w + pad), top + len(rows) * (h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * (w + pad) + 2, 2), label, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        if row_labels:
            draw.text((2, top + r * (h + pad) + h // 2 - 6), row_labels[r][:20], fill=(0, 0, 0), font=font)
        for c, img in enumerate(row):
            canvas.paste(img.convert("RGB").resize((w, h)), (left + c * (w + pad), top + r * (h + pad)))
    return canvas
