"""Retake docs/demo.png: the demo on builtin:shapes after one real generation (needs Playwright's Chromium).

    python scripts/demo_screenshot.py [OUT_PNG]

It drives the page like the browser tests do (two boxes drawn with the mouse, a prompt, Generate)
and screenshots the whole page once the attention heat maps are shown.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from saltdiff.demo.cli import DEFAULT_HOST  # noqa: E402
from saltdiff.demo.page import build_app, launch_kwargs  # noqa: E402
from test_demo_browser import CHROMIUM, CHROMIUM_ARGS, _draw_box, _free_port, _image_rect  # noqa: E402


def main(out: str = "docs/demo.png") -> None:
    t0 = time.time()
    app = build_app("builtin:shapes", defaults={"steps": 25})
    port = _free_port()
    app.launch(**launch_kwargs(DEFAULT_HOST, port), prevent_thread_lock=True, quiet=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1250})
        page.set_default_timeout(1_500_000)
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        rect = _image_rect(page)
        _draw_box(page, rect, (0.08, 0.3, 0.45, 0.72), "red circle")
        _draw_box(page, rect, (0.55, 0.25, 0.92, 0.65), "blue square")
        page.locator("#prompt textarea").fill("a red circle and a blue square on a white background")
        page.locator("#generate").click()
        page.locator("#status").get_by_text("Done in").wait_for()
        page.locator("#heatmaps img").first.wait_for(state="visible")
        page.wait_for_timeout(1500)
        page.screenshot(path=out, full_page=True)
        print("status:", page.locator("#status").inner_text(), f"({time.time() - t0:.0f} s in all)")
        browser.close()
    app.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
