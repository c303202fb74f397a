"""Command-line flags derived from the registry, shared by ``generate``, ``bench``, ``study`` and ``demo``.

Every registered hyper-parameter becomes one flag (``reg_weight`` → ``--reg-weight``, or the
``Param.flag`` it declares) with its help and default, and every registered name becomes a choice
(``--init``, ``--guidance``, ``--reference-builder``). Nothing here imports torch, so ``--help`` is
instant; :func:`method_options` turns the parsed flags back into registered names and params, and
refuses a flag that does not apply to the chosen name instead of ignoring it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .loading import DEFAULT_MODEL, DTYPES, SD15_MODEL_ID, SDXL_MODEL_ID
from .registry import (
    GUIDANCE_LOSSES,
    GUIDANCE_PARAMS,
    INITIALIZERS,
    REFERENCE_BUILDERS,
    SCHEDULERS,
    Param,
    Registry,
)

#: (registry, argparse dest prefix, the flag that chooses the name)
_GROUPS: tuple[tuple[Registry, str, str], ...] = (
    (GUIDANCE_LOSSES, "loss", "--guidance"),
    (INITIALIZERS, "init", "--init"),
    (REFERENCE_BUILDERS, "reference", "--reference-builder"),
)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that points at ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default where it has one (never "default: None" for an unset registry param)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or not action.option_strings:
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if action.default == []:
            return text
        return f"{text} (default: %(default)s)"


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _arg_type(param: Param):
    kind = param.value_type
    if kind is bool:
        return _parse_bool
    return kind if kind in (int, float, str) else str


def add_param_flags(
    group, params: Iterable[Param], dest_prefix: str, owners: dict[str, list[str]] | None = None
):
    """One flag per param (default ``None``: only flags the user gives are applied)."""
    for p in params:
        only = f"{', '.join(owners[p.name])} only" if owners and p.name in owners else ""
        if "(default" in p.help:  # the help says its default in its own words: once is enough
            note = f" ({only})" if only else ""
        else:
            note = f" (default: {_user_value(p.default)}{'; ' + only if only else ''})"
        group.add_argument(
            p.cli_flag,
            dest=f"{dest_prefix}.{p.name}",
            type=_arg_type(p),
            choices=p.choices,
            default=None,
            metavar=_metavar(p),
            help=p.help + note,
        )


def _user_value(value: Any) -> str:
    """A default as a user types it: ``off`` for None, ``true``/``false`` for booleans."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _metavar(p: Param) -> str | None:
    """What a flag's value is, in user words (``N``, ``X``, ``{true,false}``), not a field name."""
    if p.choices:
        return None
    return {bool: "{true,false}", int: "N", float: "X"}.get(p.value_type, p.name.upper())


def _params_of(registry: Registry) -> tuple[list[Param], dict[str, list[str]]]:
    """Each param name once (first declaration wins for help and default) and the entries that have it."""
    params: dict[str, Param] = {}
    owners: dict[str, list[str]] = {}
    for entry in registry:
        for p in entry.params:
            params.setdefault(p.name, p)
            owners.setdefault(p.name, []).append(entry.name)
    return list(params.values()), owners


def add_method_args(parser: argparse.ArgumentParser, *, choose: bool = True) -> None:
    """Flags for guidance, initializer and reference builder, with their registered params.

    ``choose=False`` (the bench) leaves out the flags that pick a name: there, each method names
    its own initializer and loss, and the params are shared defaults for all of them.
    """
    guidance = parser.add_argument_group("guidance options (every loss)")
    if choose:
        guidance.add_argument(
            "--guidance",
            dest="loss",
            default="salt",
            choices=GUIDANCE_LOSSES.names(),
            help="guidance loss: " + "; ".join(f"{e.name}: {e.description}" for e in GUIDANCE_LOSSES),
        )
    add_param_flags(guidance, GUIDANCE_PARAMS, "guidance")
    for registry, prefix, flag in _GROUPS:
        params, owners = _params_of(registry)
        if registry is GUIDANCE_LOSSES:
            title = "loss options"
        elif registry is INITIALIZERS:
            title = "initializer options"
            if choose:
                parser.add_argument(
                    "--init",
                    default="salt",
                    choices=INITIALIZERS.names(),
                    help="initial latent: " + "; ".join(f"{e.name}: {e.description}" for e in INITIALIZERS),
                )
        else:
            title = "reference options (initializers that use a reference image)"
            if choose:
                parser.add_argument(
                    flag,
                    dest="reference_builder",
                    default=None,
                    choices=REFERENCE_BUILDERS.names(),
                    help="how the reference image is made (default: objects; 'image' when --reference "
                    "is given): " + "; ".join(f"{e.name}: {e.description}" for e in REFERENCE_BUILDERS),
                )
        if params:
            add_param_flags(parser.add_argument_group(title), params, prefix, owners)


def given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The params of group ``prefix`` that the user set on the command line."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in vars(args).items() if k.startswith(start) and v is not None}


def _flag(registry: Registry, name: str) -> str:
    for entry in registry:
        for p in entry.params:
            if p.name == name:
                return p.cli_flag
    return "--" + name.replace("_", "-")


def _owners(registry: Registry, name: str) -> list[str]:
    return [e.name for e in registry if any(p.name == name for p in e.params)]


def check_applies(registry: Registry, chosen: Iterable[str], values: dict[str, Any], what: str) -> None:
    """Refuse a flag that none of the ``chosen`` entries has (it would be silently ignored)."""
    chosen = list(chosen)
    known = {p.name for name in chosen for p in registry.get(name).params}
    for name in values:
        if name not in known:
            owners = _owners(registry, name)
            raise CliError(f"{_flag(registry, name)} applies to {what} {owners}, not {chosen}")


@dataclass
class MethodOptions:
    """Registered names and params chosen on the command line (what a request is built from)."""

    loss: str | None
    guidance: dict[str, Any] = field(default_factory=dict)
    loss_params: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    init_params: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    reference_params: dict[str, Any] = field(default_factory=dict)


def method_options(args: argparse.Namespace) -> MethodOptions:
    """The parsed flags of :func:`add_method_args` as names and params, each flag checked to apply."""
    loss = getattr(args, "loss", None)
    init = getattr(args, "init", None)
    options = MethodOptions(
        loss=loss,
        guidance=given(args, "guidance"),
        loss_params=given(args, "loss"),
        init=init,
        init_params=given(args, "init"),
        reference_params=given(args, "reference"),
    )
    if loss is not None:
        check_applies(GUIDANCE_LOSSES, [loss], options.loss_params, "the guidance loss(es)")
    if init is None:
        return options
    check_applies(INITIALIZERS, [init], options.init_params, "the initializer(s)")
    builder = getattr(args, "reference_builder", None)
    image = options.reference_params.get("image")
    if builder is None:
        builder = "image" if image is not None else "objects"
    uses_reference = "reference" in INITIALIZERS.get(init).needs
    if not uses_reference:
        if options.reference_params or getattr(args, "reference_builder", None):
            flags = [_flag(REFERENCE_BUILDERS, n) for n in options.reference_params] or [
                "--reference-builder"
            ]
            uses = [e.name for e in INITIALIZERS if "reference" in e.needs]
            raise CliError(f"{', '.join(flags)} need an initializer that uses a reference: --init {uses}")
        return options
    if builder == "image" and image is None:
        raise CliError("--reference-builder image needs --reference IMG")
    if builder != "image" and image is not None:
        raise CliError(f"--reference IMG uses the 'image' reference builder, not {builder!r}")
    check_applies(REFERENCE_BUILDERS, [builder], options.reference_params, "the reference builder(s)")
    options.reference = builder
    return options


def add_model_args(parser: argparse.ArgumentParser, *, scheduler_default: str | None = "ddim") -> None:
    """``--model``, ``--scheduler``, ``--device``, ``--dtype``; ``scheduler_default=None``: the model's
    own family's sampler (:func:`saltdiff.samplers.default_sampler`), chosen once it is loaded."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, local diffusers folder, or builtin:NAME (default: {DEFAULT_MODEL}; real "
        f"checkpoints are e.g. {SD15_MODEL_ID} and, SDXL, {SDXL_MODEL_ID}: the family is read from "
        "its model_index.json)",
    )
    parser.add_argument(
        "--scheduler",
        default=scheduler_default,
        choices=SCHEDULERS.names(),
        help="sampler, built from the model's scheduler config; SALT's start is converted into its noise space"
        + (
            " (default: ddim for SD/SDXL, flow-euler for SD3 and FLUX; a sampler of the other noise family is refused)"
            if scheduler_default is None
            else ""
        ),
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weights dtype (default: float16 on cuda, float32 on cpu)",
    )
