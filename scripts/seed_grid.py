"""The picture of seeds: 3 held-out layouts × 4 seeds, plain sampling (`sd`) against `salt`, boxes drawn.

    python scripts/seed_grid.py --out docs/seeds.png
    python scripts/seed_grid.py --model builtin:shapes-mmdit --out docs/seeds_mmdit.png

Rows: for each layout, `sd` then `salt`; columns: seeds 0-3. The prompt is written above each pair
of rows. 25 steps of the model's own sampler (DDIM; SD3: flow Euler), CFG 7.5, the bench's presets
with the library defaults otherwise (the family's own where they differ: no outside prompt on SD3).
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from saltdiff.eval.methods import SharedSettings, build_request, for_pipeline, preset
from saltdiff.eval.suites import shapes_suite
from saltdiff.loading import load_pipeline, pipeline_guidance_scale
from saltdiff.samplers import config_family
from saltdiff.viz import draw_boxes

SCALE = 3
METHODS = ("sd", "salt")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/seeds.png")
    parser.add_argument(
        "--model", default="builtin:shapes", help="builtin:NAME, a diffusers folder or hub id"
    )
    parser.add_argument("--layouts", default="2,5,21", help="indices of shapes-suite layouts")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--cfg", type=float, default=None, help="CFG scale (default: the model's, as `saltdiff bench`)"
    )
    parser.add_argument(
        "--object-steps", type=int, default=None, help="steps per reference object (default: 25)"
    )
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, device="cpu")
    cfg = pipeline_guidance_scale(pipe) if args.cfg is None else args.cfg
    pipe.set_progress_bar_config(disable=True)
    specs = [preset(name) for name in METHODS]
    objects = {} if args.object_steps is None else {"num_inference_steps": args.object_steps}
    shared = SharedSettings(reference_params=objects)
    scheduler, shared = for_pipeline(specs, shared, pipe, scheduler=None, steps=args.steps, guidance_scale=cfg)
    suite = shapes_suite(1 + max(int(i) for i in args.layouts.split(",")))
    layouts = [suite[int(i)] for i in args.layouts.split(",")]
    rows = []  # (layout, method, images)
    for lay in layouts:
        for spec in specs:
            images = []
            for seed in range(args.seeds):
                request = build_request(
                    spec,
                    shared,
                    flow=config_family(pipe.scheduler.config) == "flow",  # its own guidance budget
                    guidance_scale=cfg,
                    prompt=lay.prompt,
                    layout=lay.layout,
                    seed=seed,
                    num_inference_steps=args.steps,
                    scheduler=scheduler,
                ).resolved(pipe.scheduler)
                images.append(request.run(pipe, progress=False).images[0])
            rows.append((lay, spec.name, images))
    side = rows[0][2][0].width * SCALE
    label_w, title_h = 60, 18
    block = len(specs) * side + title_h  # one layout: its prompt, then a row per method
    grid = Image.new("RGB", (label_w + side * args.seeds, len(layouts) * block), "white")
    draw = ImageDraw.Draw(grid)
    for i, (lay, name, images) in enumerate(rows):
        r, m = divmod(i, len(specs))
        top = r * block
        if m == 0:
            draw.text((4, top + 3), lay.prompt, fill=(0, 0, 0))
        y = top + title_h + m * side
        draw.text((4, y + side // 2), name, fill=(0, 0, 0))
        for seed, image in enumerate(images):
            grid.paste(draw_boxes(image, lay.layout, scale=SCALE), (label_w + seed * side, y))
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
