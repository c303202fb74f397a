"""Pictures: each box is labelled with what the user typed, repeated phrases apart."""

import numpy as np
from PIL import Image, ImageDraw

from saltdiff.layout import Layout
from saltdiff.viz import draw_boxes, overlay_figure


def test_overlay_labels_a_repeated_phrase_distinctly(monkeypatch):
    written = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        written.append(text)
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    layout = Layout.from_specs(["red circle=0.05,0.3,0.45,0.7", "red circle#2=0.55,0.3,0.95,0.7"])
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    overlay_figure(image, layout, maps, image)
    assert written.count("red circle") == 1 and written.count("red circle#2") == 1
    assert "attn: red circle" in written and "attn: red circle#2" in written
    written.clear()
    draw_boxes(image, Layout.from_pairs([("dog", (0, 0, 0.5, 0.5)), ("dog", (0.5, 0.5, 1, 1))]))
    assert written == ["dog", "dog#2"]
