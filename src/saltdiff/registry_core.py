"""The machinery of named choices: :class:`Param` (a hyper-parameter: default, help, bounds),
:class:`Entry` (a name, its target, its params and needs) and :class:`Registry` (entries of one kind).

The catalogue of the built-in entries — guidance losses, initializers, reference builders,
samplers — is :mod:`saltdiff.registry`, which re-exports these classes: import them from there.
Standard library only.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Entry", "Param", "Registry", "check_fields"]


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its default, a help line, and the values it accepts.

    ``kind`` is the value type (``int``, ``float``, ``str``, ``bool``; by default the default's
    type); ``optional`` allows ``None``; ``minimum``/``maximum`` bound numbers (``open_minimum`` /
    ``open_maximum`` exclude the bound); ``choices`` lists the allowed strings; ``flag`` overrides
    the CLI flag (``--name-with-dashes`` otherwise). ``accepts`` is a predicate for values a list
    cannot hold (a callable, or ``"module:function"`` imported on first use) and ``accepts_help``
    says in words what it takes (errors and help texts use it).
    """

    name: str
    default: Any
    help: str
    kind: type | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False
    optional: bool = False
    flag: str | None = None
    accepts: Callable[[Any], bool] | str | None = None
    accepts_help: str | None = None

    @property
    def value_type(self) -> type:
        if self.kind is not None:
            return self.kind
        return type(self.default) if self.default is not None else str

    @property
    def cli_flag(self) -> str:
        return "--" + (self.flag or self.name.replace("_", "-"))

    def describe_range(self) -> str:
        if self.accepts_help is not None:
            return self.accepts_help
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        kinds = {int: "an integer", float: "a number", bool: "true or false", object: "a value"}
        kind = kinds.get(self.value_type, "a string")
        if self.minimum is not None and self.maximum is not None:
            lo = "(" if self.open_minimum else "["
            hi = ")" if self.open_maximum else "]"
            return f"{kind} in {lo}{self.minimum:g}, {self.maximum:g}{hi}"
        if self.minimum is not None:
            return f"{kind} {'>' if self.open_minimum else '>='} {self.minimum:g}"
        if self.maximum is not None:
            return f"{kind} {'<' if self.open_maximum else '<='} {self.maximum:g}"
        return kind

    def check(self, value: Any, owner: str = "") -> Any:
        """``value`` if it is acceptable, else a ``ValueError`` naming the owner, the param and the value."""
        if value is None and self.optional:
            return value
        kind = self.value_type
        ok = True
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif kind is float:
            ok = (
                isinstance(value, numbers.Real)
                and not isinstance(value, bool)
                and math.isfinite(float(value))
            )
        elif kind is str:
            ok = isinstance(value, str)
        # kind object: any value (e.g. a path or a PIL image), checked by its owner
        if ok and self.choices is not None:
            ok = value in self.choices
        if ok and self.accepts is not None:
            accepts = self.accepts
            if isinstance(accepts, str):
                module, _, attr = accepts.partition(":")
                accepts = getattr(importlib.import_module(module), attr)
            ok = bool(accepts(value))
        if ok and self.minimum is not None:
            ok = value > self.minimum if self.open_minimum else value >= self.minimum
        if ok and self.maximum is not None:
            ok = value < self.maximum if self.open_maximum else value <= self.maximum
        if not ok:
            prefix = f"{owner}: " if owner else ""
            none = " (or None)" if self.optional else ""
            raise ValueError(f"{prefix}{self.name} must be {self.describe_range()}{none}, got {value!r}")
        return value


@dataclass(frozen=True)
class Entry:
    """A named choice: what it is (``target``), what it does, its params and what it needs.

    ``needs`` maps a need (``"unboxed_tokens"``: the attention of the prompt's other words) to the
    param that switches it on (``None``: always needed). ``bench_names`` names the benchmark presets
    of a guidance loss under random and spatial-aware init (default ``NAME`` and
    ``salt-init+NAME``). ``options`` are fixed keyword arguments that go with the target (a sampler's
    ``use_karras_sigmas=True``), not knobs a user sets.
    """

    name: str
    target: Callable | str | None
    description: str
    params: tuple[Param, ...] = ()
    needs: Mapping[str, str | None] = field(default_factory=dict)
    bench_names: tuple[str, str] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name!r}: params must have distinct names, got {names}")
        for gate in self.needs.values():
            if gate is not None and gate not in names:
                raise ValueError(f"{self.name!r}: a need is switched on by unknown param {gate!r}")

    def load(self) -> Any:
        """The target itself (imports ``"module:attr"`` targets on first use)."""
        if not isinstance(self.target, str):
            return self.target
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, values: Mapping[str, Any] | None, owner: str | None = None) -> dict[str, Any]:
        """Defaults updated with ``values``, each checked; an unknown name lists the valid ones."""
        owner = owner or self.name
        values = dict(values or {})
        unknown = sorted(set(values) - {p.name for p in self.params})
        if unknown:
            valid = [p.name for p in self.params]
            raise ValueError(f"{owner}: unknown option(s) {unknown}; valid: {valid or 'none'}")
        return {p.name: p.check(values.get(p.name, p.default), owner) for p in self.params}

    def requires(self, need: str, params: Mapping[str, Any]) -> bool:
        """Whether this entry, with these (resolved) params, needs ``need``."""
        if need not in self.needs:
            return False
        gate = self.needs[need]
        return gate is None or bool(params[gate])


class Registry:
    """Named entries of one kind, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, entry: Entry, *, replace: bool = False) -> Entry:
        if not isinstance(entry, Entry):
            raise TypeError(f"register an Entry, got {type(entry).__name__}")
        if entry.name in self._entries and not replace:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered (pass replace=True)")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> Entry:
        return self._entries.pop(self.get(name).name)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {list(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)


def check_fields(obj: Any, params: tuple[Param, ...] | list[Param], owner: str) -> None:
    """Check each of ``obj``'s attributes named by ``params`` (config dataclasses' ``__post_init__``)."""
    for p in params:
        p.check(getattr(obj, p.name), owner)
