"""The picture of seeds: 3 held-out layouts × 4 seeds, plain sampling (`sd`) against `salt`, boxes drawn.

    python scripts/seed_grid.py --out docs/seeds.png

Rows: for each layout, `sd` then `salt`; columns: seeds 0-3. The prompt is written above each pair
of rows. Built-in model, 25 DDIM steps, CFG 7.5, library defaults otherwise.
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from saltdiff import GuidanceConfig, RandomInit
from saltdiff.eval.suites import shapes_suite
from saltdiff.loading import load_pipeline
from saltdiff.viz import draw_boxes

SCALE = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/seeds.png")
    parser.add_argument("--layouts", default="2,5,21", help="indices of shapes-suite layouts")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()

    pipe = load_pipeline("builtin:shapes", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    suite = shapes_suite(1 + max(int(i) for i in args.layouts.split(",")))
    layouts = [suite[int(i)] for i in args.layouts.split(",")]
    side = 64 * SCALE
    label_w, title_h = 60, 18
    grid = Image.new("RGB", (label_w + side * args.seeds, len(layouts) * (2 * side + title_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, lay in enumerate(layouts):
        top = r * (2 * side + title_h)
        draw.text((4, top + 3), lay.prompt, fill=(0, 0, 0))
        for m, (name, kwargs) in enumerate(
            [("sd", dict(init=RandomInit(), guidance=GuidanceConfig(loss="none"))), ("salt", dict())]
        ):
            y = top + title_h + m * side
            draw.text((4, y + side // 2), name, fill=(0, 0, 0))
            for seed in range(args.seeds):
                out = pipe(
                    lay.prompt, lay.layout, num_inference_steps=25, seed=seed, progress=False, **kwargs
                )
                grid.paste(draw_boxes(out.images[0], lay.layout, scale=SCALE), (label_w + seed * side, y))
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
