"""``saltdiff demo``: the subcommand (building its parser imports neither torch nor gradio)."""

from __future__ import annotations

import re
import sys

from ..cli_args import CliError, HelpFormatter, add_model_args

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_demo_parser(subparsers) -> None:
    """Register ``saltdiff demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="start the interactive web demo (needs the 'demo' extra)",
        description="Start a Gradio page: draw boxes, generate, compare SALT with random init, inspect. "
        "Needs the 'demo' extra: pip install 'saltdiff[demo]'.",
        formatter_class=HelpFormatter,
    )
    add_model_args(parser, scheduler_default=None)
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to bind")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    parser.add_argument(
        "--allow-model-paths",
        action="store_true",
        help="let the page load other models (hub ids or folders on this machine) typed by the user",
    )
    parser.set_defaults(func=cmd_demo)


class GradioDebugFilter:
    """``sys.stdout`` while ``saltdiff demo`` serves: every line passes except gradio's debug print.

    gradio 6 prints ``id=…, environment=client, type=…, file_name=…`` (a bare ``print`` in its
    routes) for every custom-component file a browser fetches, on every page load; they say nothing
    a user can act on. Whole lines are matched; everything else goes through unchanged.
    """

    DEBUG_LINE = re.compile(r"id=[^,\n]*, environment=(client|server), type=[^,\n]*, file_name=[^\n]*")

    def __init__(self, stream) -> None:
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not self.DEBUG_LINE.fullmatch(line):
                self._stream.write(line + "\n")
        if self._pending and not "id=".startswith(self._pending[:3]):
            self._stream.write(self._pending)  # a partial line that cannot be gradio's: no delay
            self._pending = ""
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # encoding, isatty, fileno, … of the real stream
        return getattr(self._stream, name)


def cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401
        import gradio_image_annotation  # noqa: F401
    except ImportError as exc:
        raise CliError(
            f"saltdiff demo needs the 'demo' extra: pip install 'saltdiff[demo]' ({exc})"
        ) from None
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    from .page import build_app, launch_kwargs

    app = build_app(
        args.model,
        allow_model_paths=args.allow_model_paths,
        device=args.device,
        dtype=args.dtype,
        defaults={"scheduler": args.scheduler},
    )
    stdout, sys.stdout = sys.stdout, GradioDebugFilter(sys.stdout)
    try:
        app.launch(**launch_kwargs(args.host, args.port))
    finally:
        sys.stdout = stdout
    return 0
