"""The demo page driven in headless Chromium: draw two boxes with the mouse, label them, generate.

Needs the ``demo`` extra, the ``playwright`` Python package (its own browsers are not used: run
nothing like ``playwright install``) and Debian's ``chromium`` (``SALTDIFF_CHROMIUM`` overrides the
path). Screenshots go to the test's tmp folder; ``SALTDIFF_DEMO_SCREENSHOT=PATH`` also copies the
screenshot taken after the first generation to PATH (the README's ``docs/demo.png``).
"""

import os
import shutil
import socket
import time

import pytest
import torch

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SALTDIFF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Tolerance (normalized units) between the boxes drawn with the mouse and those the pipeline got:
# the component rounds to whole canvas pixels and the page may scale the canvas.
BOX_TOLERANCE = 0.02
TIMEOUT_MS = int(float(os.environ.get("SALTDIFF_BROWSER_TIMEOUT", "240")) * 1000)


def _requirements() -> str | None:
    for module in ("gradio", "gradio_image_annotation", "playwright"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'saltdiff[demo]' playwright)"
    if not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SALTDIFF_CHROMIUM)"
    return None


_missing = _requirements()
if _missing:
    pytest.skip(_missing, allow_module_level=True)


class RecordingPipe:
    """Delegates to a pipeline and records the prompt and layout of every top-level call."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompt, layout=None, **kwargs):
        self.calls.append((prompt, layout, kwargs))
        return self._pipe(prompt, layout, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    from saltdiff.demo.page import build_app, launch_kwargs
    from saltdiff.pipeline import SaltPipeline
    from saltdiff.testing import tiny_sd_pipeline

    torch.manual_seed(0)
    pipe = SaltPipeline.from_pipe(tiny_sd_pipeline())
    pipe.set_progress_bar_config(disable=True)
    recorder = RecordingPipe(pipe)
    # Cheap settings for a CPU: few steps, flat gray reference background, 2 steps per object.
    fast = {"steps": 4, "inversion_steps": 2, "object_steps": 2, "background": "gray"}
    app = build_app(recorder, model_name="tiny test model", defaults=fast)
    port = _free_port()
    kwargs = launch_kwargs("127.0.0.1", port)
    app.launch(**kwargs, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", recorder
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _image_rect(page):
    """The on-screen rectangle (x, y, w, h) of the canvas image inside the annotator's <canvas>."""
    canvas = page.locator("#layout-canvas canvas").first
    canvas.wait_for()
    bb = canvas.bounding_box()
    # The component draws the image centered and scaled to fit its canvas element.
    from saltdiff.demo.requests import CANVAS_SIZE

    scale = min(bb["width"] / CANVAS_SIZE, bb["height"] / CANVAS_SIZE)
    w = h = CANVAS_SIZE * scale
    return bb["x"] + (bb["width"] - w) / 2, bb["y"] + (bb["height"] - h) / 2, w, h


def _draw_box(page, rect, box, label):
    x, y, w, h = rect
    x0, y0, x1, y1 = box
    page.mouse.move(x + x0 * w, y + y0 * h)
    page.mouse.down()
    page.mouse.move(x + x1 * w, y + y1 * h, steps=10)
    page.mouse.up()
    field = page.get_by_label("Label", exact=True)
    field.wait_for(state="visible")
    field.fill(label)
    page.get_by_role("button", name="OK", exact=True).click()
    field.wait_for(state="hidden")


def _set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def _wait_calls(recorder, n, timeout=TIMEOUT_MS / 1000):
    end = time.monotonic() + timeout
    while len(recorder.calls) < n and time.monotonic() < end:
        time.sleep(0.2)
    assert len(recorder.calls) >= n, f"the pipeline got {len(recorder.calls)} call(s), expected {n}"


@pytest.fixture
def page(browser, tmp_path):
    page = browser.new_page(viewport={"width": 1500, "height": 1250})
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.screenshot(path=str(tmp_path / "demo-last.png"), full_page=True)
    page.close()


def test_draw_generate_error_and_recover(server, page, tmp_path):
    url, recorder = server
    page.goto(url, wait_until="networkidle")

    drawn = {"red circle": (0.08, 0.25, 0.45, 0.7), "blue square": (0.55, 0.3, 0.92, 0.8)}
    rect = _image_rect(page)
    for label, box in drawn.items():
        _draw_box(page, rect, box, label)
    page.locator("#prompt textarea").fill("a red circle and a blue square on a white background")
    _set_number(page, "steps", 3)

    # 1. A valid request: the result appears and the drawn boxes reached the pipeline.
    page.locator("#generate").click()
    _wait_calls(recorder, 1)
    page.locator("#status").get_by_text("Done in").wait_for()
    page.locator("#result img").wait_for(state="visible")
    page.locator("#heatmaps img").first.wait_for(state="visible")
    first_src = page.locator("#result img").get_attribute("src")
    prompt, layout, kwargs = recorder.calls[0]
    assert prompt == "a red circle and a blue square on a white background"
    assert kwargs["num_inference_steps"] == 3
    # (the component lists boxes in its own order, not necessarily the drawing order)
    assert sorted(layout.phrases) == sorted(drawn)
    for box in layout:
        assert box.box == pytest.approx(drawn[box.phrase], abs=BOX_TOLERANCE), box
    shot = tmp_path / "demo-after-generation.png"
    page.screenshot(path=str(shot), full_page=True)
    target = os.environ.get("SALTDIFF_DEMO_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)

    # 2. A phrase that is not in the prompt: a readable message, no pipeline call.
    page.locator("#prompt textarea").fill("a red circle on a white background")
    page.locator("#generate").click()
    error = page.get_by_text("phrase 'blue square' not found in prompt").first
    error.wait_for(state="visible")
    page.screenshot(path=str(tmp_path / "demo-error.png"), full_page=True)
    assert len(recorder.calls) == 1

    # 3. The server keeps serving: the next valid request succeeds and replaces the result.
    page.locator("#prompt textarea").fill("a blue square and a red circle")
    page.locator("#generate").click()
    _wait_calls(recorder, 2)
    page.wait_for_function(
        "src => { const img = document.querySelector('#result img'); return img && img.src !== src; }",
        arg=first_src,
    )
    assert recorder.calls[1][0] == "a blue square and a red circle"
    assert sorted(b.phrase for b in recorder.calls[1][1]) == sorted(drawn)


def test_the_fresh_page_says_what_is_missing_once_and_shows_the_examples_boxes(server, page, tmp_path):
    import numpy as np
    from PIL import Image

    from saltdiff.viz import PALETTE

    url, recorder = server
    calls = len(recorder.calls)
    page.goto(url, wait_until="networkidle")
    # every example thumbnail is a loaded picture of its layout: the first box's colour is in it
    thumbs = page.locator("table img")
    thumbs.first.wait_for(state="visible")
    assert thumbs.count() == 3
    for k in range(thumbs.count()):
        shot = tmp_path / f"thumb{k}.png"
        assert thumbs.nth(k).evaluate("img => img.complete && img.naturalWidth > 0")
        thumbs.nth(k).screenshot(path=str(shot))
        pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
        assert (np.abs(pixels - np.array(PALETTE[0])).max(axis=1) < 40).sum() > 5, k

    page.locator("#generate").click()  # nothing typed, nothing drawn
    page.locator("#status").get_by_text("Not generated").wait_for()
    assert "the prompt is empty" in page.locator("#status").inner_text()
    page.get_by_text("the prompt is empty").first.wait_for(state="visible")  # the toast
    page.screenshot(path=str(tmp_path / "demo-fresh-generate.png"), full_page=True)
    assert page.get_by_text("Error", exact=True).count() == 0  # no red badge on each output
    assert len(recorder.calls) == calls
