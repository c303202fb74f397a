"""Command line of the trainer: one flag per config field, plus ``--plot-loss``.

``python -m saltdiff.training [flags]`` trains the UNet model (:class:`TrainConfig`);
``python -m saltdiff.training mmdit [flags]`` the flow-matching transformer (:class:`MMDiTTrainConfig`).

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


def build_parser(config_cls=TrainConfig, prog: str = "python -m saltdiff.training") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=_package_doc.split("\n")[0])
    for f in dataclasses.fields(config_cls):
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
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mmdit"]:
        _main_mmdit(argv[1:])
        return
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


def _main_mmdit(argv: list[str]) -> None:
    from .mmdit_config import MMDiTTrainConfig

    parser = build_parser(MMDiTTrainConfig, "python -m saltdiff.training mmdit")
    parser.add_argument("--plot-loss", default=None, help="only plot work/log.jsonl into this PNG and exit")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plot = args.pop("plot_loss")
    if plot is not None:
        from .plots import plot_mmdit_curves

        plot_mmdit_curves(Path(args["work"]) / "log.jsonl", plot)
        return
    from .mmdit import train_mmdit

    summary = train_mmdit(MMDiTTrainConfig(**args))
    logger.info("summary: %s", summary)
