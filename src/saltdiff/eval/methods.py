"""Named methods of the benchmark: each is an initializer × a guidance configuration.

Every guided method is built from the *same* shared :class:`~saltdiff.guidance.GuidanceConfig`
(guidance steps, iterations, step size, threshold, layers …) and only its ``loss`` differs, so all
methods get the same guidance budget; every ``salt-init`` method uses the same
:class:`~saltdiff.init.SpatialAwareInit`.

=========================== ================= =====================
name                        initial latent    guidance loss
=========================== ================= =====================
``sd``                      random            none
``layout-guidance``         random            layout-guidance (Chen et al.)
``boxdiff``                 random            boxdiff
``random+salt-loss``        random            salt
``salt``                    spatial-aware     salt
``salt-init+layout-guidance`` spatial-aware   layout-guidance
``salt-init+boxdiff``       spatial-aware     boxdiff
=========================== ================= =====================

Studies add variants (:class:`MethodSpec` with overrides), e.g. ``salt-init`` (spatial-aware, no
guidance) with 5 inversion steps.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..guidance import GuidanceConfig
from ..init import RandomInit, SpatialAwareInit
from ..reference import GeneratedObjects

INITS = ("random", "salt")

#: name → (init, guidance loss)
PRESETS: dict[str, tuple[str, str]] = {
    "sd": ("random", "none"),
    "layout-guidance": ("random", "layout-guidance"),
    "boxdiff": ("random", "boxdiff"),
    "random+salt-loss": ("random", "salt"),
    "salt": ("salt", "salt"),
    "salt-init+layout-guidance": ("salt", "layout-guidance"),
    "salt-init+boxdiff": ("salt", "boxdiff"),
}
DEFAULT_METHODS = tuple(PRESETS)
#: Extra names accepted by ``--methods`` (not in the default list).
EXTRA_PRESETS: dict[str, tuple[str, str]] = {"salt-init": ("salt", "none")}


@dataclass(frozen=True)
class MethodSpec:
    """A method variant: ``init`` × guidance ``loss`` plus field overrides on the shared defaults.

    ``guidance``, ``salt_init`` and ``reference`` override fields of ``GuidanceConfig``,
    ``SpatialAwareInit`` and ``GeneratedObjects`` for this variant only.
    """

    name: str
    init: str
    loss: str
    guidance: Mapping[str, Any] = field(default_factory=dict)
    salt_init: Mapping[str, Any] = field(default_factory=dict)
    reference: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.+\-=]+", self.name):
            raise ValueError(f"method name {self.name!r} may only use letters, digits and _ . + - =")
        if self.init not in INITS:
            raise ValueError(f"method {self.name!r}: init must be one of {INITS}, got {self.init!r}")
        if self.init == "random" and (self.salt_init or self.reference):
            raise ValueError(f"method {self.name!r}: inversion/reference options need init 'salt'")


@dataclass(frozen=True)
class Method:
    """A ready method: what ``SaltPipeline.__call__`` receives as ``init`` and ``guidance``."""

    name: str
    init: RandomInit | SpatialAwareInit
    guidance: GuidanceConfig

    @property
    def uses_reference(self) -> bool:
        return isinstance(self.init, SpatialAwareInit)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (stored with every record, checked when a run resumes)."""
        init: dict[str, Any] = {"type": type(self.init).__name__}
        if isinstance(self.init, SpatialAwareInit):
            init.update({k: v for k, v in dataclasses.asdict(self.init).items() if k != "reference"})
            ref = self.init.reference
            init["reference"] = {"type": type(ref).__name__}
            if dataclasses.is_dataclass(ref):
                init["reference"].update(
                    {
                        k: v
                        for k, v in dataclasses.asdict(ref).items()
                        if k not in ("cache", "cache_dir")
                        and isinstance(v, (int, float, str, bool, type(None)))
                    }
                )
        return {"name": self.name, "init": init, "guidance": self.guidance.to_dict()}


def preset(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a preset name (``sd``, ``salt``, …)."""
    table = {**PRESETS, **EXTRA_PRESETS}
    if name not in table:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(table)}")
    init, loss = table[name]
    return MethodSpec(name, init, loss)


def parse_methods(text: str | Sequence[str] | None) -> list[MethodSpec]:
    """``"sd,salt"`` (or a list) → specs; ``None``/``"all"`` → every preset in :data:`DEFAULT_METHODS`."""
    if text is None or text == "all":
        names = list(DEFAULT_METHODS)
    elif isinstance(text, str):
        names = [t.strip() for t in text.split(",") if t.strip()]
    else:
        names = list(text)
    if not names:
        raise ValueError("no methods given (e.g. --methods sd,salt)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"method(s) {dupes} given twice")
    return [preset(n) for n in names]


def build_method(
    spec: MethodSpec,
    *,
    guidance: Mapping[str, Any] | None = None,
    salt_init: Mapping[str, Any] | None = None,
    reference: Mapping[str, Any] | None = None,
) -> Method:
    """The method of ``spec`` on the shared defaults (``guidance``, ``salt_init``, ``reference`` overrides)."""
    shared = dict(guidance or {})
    shared.pop("loss", None)
    config = GuidanceConfig(**{**shared, **dict(spec.guidance), "loss": spec.loss})
    if spec.init == "random":
        return Method(spec.name, RandomInit(), config)
    ref = GeneratedObjects(**{**dict(reference or {}), **dict(spec.reference)})
    init = SpatialAwareInit(reference=ref, **{**dict(salt_init or {}), **dict(spec.salt_init)})
    return Method(spec.name, init, config)
