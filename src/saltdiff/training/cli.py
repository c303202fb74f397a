"""Command line of the trainer: one flag per :class:`TrainConfig` field, plus ``--plot-loss``.

Torch is imported only once a run starts, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from . import __doc__ as _package_doc
from .config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saltdiff.training", description=_package_doc.split("\n")[0]
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=_parse_ints, default=default, help="comma-separated integers")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    parser.add_argument("--plot-loss", default=None, help="only plot work/log.jsonl into this PNG and exit")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plot = args.pop("plot_loss")
    if plot is not None:
        from .plots import plot_loss_curves

        plot_loss_curves(Path(args["work"]) / "log.jsonl", plot)
        return
    cfg = TrainConfig(**args)
    from .run import train

    summary = train(cfg)
    logger.info("summary: %s", summary)
