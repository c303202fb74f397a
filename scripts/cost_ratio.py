"""Time per image of one method against another from one bench run, cold and warm.

    python scripts/cost_ratio.py runs/s8/fidelity-n200 salt sd [--objects 3]

A layout's first seed is *cold* for ``salt`` (its background scene and objects are generated and
cached, z_T* inverted), its later seeds *warm* (objects from the cache, z_T* reused when the
reference is the same). Both methods ran in the same processes, interleaved by layout, so whatever
else the machine did slowed both alike: the ratio means something where the absolute times do not.
``--objects N`` keeps the layouts with N boxed objects (the costliest, where the budget is stated);
``--unboxed with|without`` the layouts whose prompt names an object without a box, or the others.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def seconds(
    run: Path, method: str, objects: int | None, unboxed: str | None = None
) -> dict[str, list[float]]:
    """``{"cold": [...], "warm": [...]}``: the method's seconds per image by seed position."""
    records = [json.loads(p.read_text()) for p in sorted((run / "records" / method).glob("*.json"))]
    if not records:
        raise SystemExit(f"no records for method {method!r} in {run}")
    first_seed = min(r["seed"] for r in records)
    out: dict[str, list[float]] = {"cold": [], "warm": []}
    for r in records:
        if objects is not None and len(r["boxes"]) != objects:
            continue
        if unboxed is not None and bool(r["unboxed"]) != (unboxed == "with"):
            continue
        out["cold" if r["seed"] == first_seed else "warm"].append(float(r["seconds"]))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("method")
    parser.add_argument("baseline")
    parser.add_argument("--objects", type=int, default=None, help="only layouts with this many boxes")
    parser.add_argument(
        "--unboxed",
        choices=("with", "without"),
        default=None,
        help="only layouts with (without) an unboxed object",
    )
    args = parser.parse_args(argv)
    run = Path(args.run)
    a, b = (
        seconds(run, args.method, args.objects, args.unboxed),
        seconds(run, args.baseline, args.objects, args.unboxed),
    )
    result = {}
    for kind in ("cold", "warm"):
        if not a[kind] or not b[kind]:
            continue
        mean_a, mean_b = sum(a[kind]) / len(a[kind]), sum(b[kind]) / len(b[kind])
        result[kind] = {
            "ratio": mean_a / mean_b,
            args.method: mean_a,
            args.baseline: mean_b,
            "images": len(a[kind]),
        }
        print(
            f"{kind}: {args.method} {mean_a:.2f} s, {args.baseline} {mean_b:.2f} s per image "
            f"({len(a[kind])} images): {mean_a / mean_b:.2f}x"
        )
    return result


if __name__ == "__main__":
    main()
