"""Named methods of the benchmark: each is an initializer × a guidance loss, built as a request.

The presets are derived from the registry (:mod:`saltdiff.registry`): ``sd`` (random init, no
guidance), ``salt-init`` (spatial-aware init, no guidance), and for every registered guidance loss
one method under random init and one under spatial-aware init, named by the loss's
``bench_names`` (``NAME`` and ``salt-init+NAME`` unless it declares others; SALT's loss gives
``random+salt-loss`` and ``salt``). With the built-in losses:

=========================== ================= =====================
name                        initial latent    guidance loss
=========================== ================= =====================
``sd``                      random            none
``random+salt-loss``        random            salt
``layout-guidance``         random            layout-guidance (Chen et al.)
``boxdiff``                 random            boxdiff
``salt``                    spatial-aware     salt
``salt-init+layout-guidance`` spatial-aware   layout-guidance
``salt-init+boxdiff``       spatial-aware     boxdiff
=========================== ================= =====================

Every guided method gets the same shared guidance settings (step size, layers, loss params …;
what the command line sets), and every spatial-aware method the same initializer and reference
settings. The guidance budget the command line leaves unset follows the start, as in the pipeline:
each method runs at the budget that is best for its start (guidance-budget study in
``benchmarks/RESULTS.md``), and its records say which. Studies add variants (:class:`MethodSpec`
with overrides).
This module imports no torch: ``saltdiff bench --help`` lists the presets from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..registry import GUIDANCE_LOSSES, INITIALIZERS

RANDOM_INIT = "random"
SALT_INIT = "salt"


def presets() -> dict[str, tuple[str, str]]:
    """Every preset name → (initializer, guidance loss), derived from the registered losses."""
    table = {"sd": (RANDOM_INIT, "none")}
    guided = [e for e in GUIDANCE_LOSSES if e.target is not None]
    for entry in guided:
        table[(entry.bench_names or (entry.name, ""))[0]] = (RANDOM_INIT, entry.name)
    for entry in guided:
        table[(entry.bench_names or ("", f"salt-init+{entry.name}"))[1]] = (SALT_INIT, entry.name)
    table["salt-init"] = (SALT_INIT, "none")
    return table


def default_methods() -> tuple[str, ...]:
    """The methods of ``--methods all``: every preset except the unguided ``salt-init``."""
    return tuple(name for name in presets() if name != "salt-init")


@dataclass(frozen=True)
class MethodSpec:
    """A method variant: ``init`` × guidance ``loss`` plus overrides of the shared settings.

    ``guidance`` overrides ``GuidanceConfig`` fields (the loss's own params go in ``loss_params``),
    ``init_params`` the initializer's params and ``reference_params`` the reference builder's, for
    this variant only.
    """

    name: str
    init: str
    loss: str
    guidance: Mapping[str, Any] = field(default_factory=dict)
    loss_params: Mapping[str, Any] = field(default_factory=dict)
    init_params: Mapping[str, Any] = field(default_factory=dict)
    reference_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.+\-=]+", self.name):
            raise ValueError(f"method name {self.name!r} may only use letters, digits and _ . + - =")
        entry = INITIALIZERS.get(self.init)
        GUIDANCE_LOSSES.get(self.loss)
        if "reference" not in entry.needs and self.reference_params:
            raise ValueError(f"method {self.name!r}: reference options need a spatial-aware init")

    @property
    def uses_reference(self) -> bool:
        return "reference" in INITIALIZERS.get(self.init).needs


@dataclass(frozen=True)
class SharedSettings:
    """What every method of a run shares: guidance knobs, loss params, init and reference params.

    A loss param applies to the methods whose loss has it, an init param to the methods whose
    initializer has it; a setting that applies to no method of the run is an error.
    """

    guidance: Mapping[str, Any] = field(default_factory=dict)
    loss_params: Mapping[str, Any] = field(default_factory=dict)
    init_params: Mapping[str, Any] = field(default_factory=dict)
    reference: str = "objects"
    reference_params: Mapping[str, Any] = field(default_factory=dict)

    def check_applies(self, specs: Sequence[MethodSpec]) -> None:
        for kind, values, names in (
            ("loss", self.loss_params, {p.name for s in specs for p in GUIDANCE_LOSSES.get(s.loss).params}),
            ("init", self.init_params, {p.name for s in specs for p in INITIALIZERS.get(s.init).params}),
        ):
            unused = sorted(set(values) - names)
            if unused:
                raise ValueError(
                    f"{kind} option(s) {unused} apply to none of the methods {[s.name for s in specs]}"
                )
        if self.reference_params and not any(s.uses_reference for s in specs):
            raise ValueError(
                f"reference option(s) {sorted(self.reference_params)} apply to none of the methods "
                f"{[s.name for s in specs]} (none uses a spatial-aware init)"
            )


def preset(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a preset name (``sd``, ``salt``, …)."""
    table = presets()
    if name not in table:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(table)}")
    init, loss = table[name]
    return MethodSpec(name, init, loss)


def parse_methods(text: str | Sequence[str] | None) -> list[MethodSpec]:
    """``"sd,salt"`` (or a list) → specs; ``None``/``"all"`` → :func:`default_methods`."""
    if text is None or text == "all":
        names = list(default_methods())
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


def _own(params: Mapping[str, Any], names: set[str]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k in names}


def build_request(spec: MethodSpec, shared: SharedSettings, *, flow: bool = False, **sampling: Any):
    """The :class:`~saltdiff.request.GenerationRequest` of ``spec`` on the shared settings.

    ``sampling`` holds the per-image fields (``prompt``, ``layout``, ``seed``, steps, CFG, size);
    ``flow``: the model is a flow-matching one (its guidance budget may differ).
    """
    from ..guidance import GuidanceConfig
    from ..request import GenerationRequest

    loss_names = {p.name for p in GUIDANCE_LOSSES.get(spec.loss).params}
    init_names = {p.name for p in INITIALIZERS.get(spec.init).params}
    uses_reference = spec.uses_reference
    guidance = GuidanceConfig(
        loss=spec.loss,
        **{**dict(shared.guidance), **dict(spec.guidance)},
        loss_params={**_own(shared.loss_params, loss_names), **dict(spec.loss_params)},
    ).for_start(uses_reference, flow=flow)  # records show the budget each method ran with
    return GenerationRequest(
        init=spec.init,
        init_params={**_own(shared.init_params, init_names), **dict(spec.init_params)},
        reference=shared.reference,
        reference_params={**dict(shared.reference_params), **dict(spec.reference_params)}
        if uses_reference
        else {},
        guidance=guidance,
        **sampling,
    )


def describe(
    spec: MethodSpec, shared: SharedSettings, model_scheduler=None, **sampling: Any
) -> dict[str, Any]:
    """A JSON-able description of the method (stored with every record, checked when a run resumes).

    With the model's scheduler (``model_scheduler``) and the run's ``sampling`` settings (steps,
    sampler name), the params a run leaves to the sampler are filled in as the run sets them (an
    unset ``inversion_steps``)."""
    from ..samplers import config_family

    flow = model_scheduler is not None and config_family(model_scheduler.config) == "flow"
    request = build_request(spec, shared, prompt="-", flow=flow, **sampling)
    if model_scheduler is not None:
        request = request.resolved(model_scheduler)
    return {"name": spec.name, **request.method()}


def for_pipeline(
    specs: Sequence[MethodSpec],
    shared: SharedSettings,
    pipe,
    *,
    scheduler: str | None,
    steps: int,
    guidance_scale: float,
) -> tuple[str, SharedSettings]:
    """A run's sampler and shared settings as ``pipe``'s family runs them, checked before any image is
    made: an unset ``scheduler`` is the family's own (:func:`saltdiff.samplers.default_sampler`: ddim,
    SD3 flow-euler; one of the other noise family is one line), the guidance fields whose unset value
    means something else there are filled in for every method
    (:func:`saltdiff.request.family_guidance_defaults` at the run's CFG ``guidance_scale``, so records
    say what ran), and a method with an option the family does not run
    (:meth:`saltdiff.request.GenerationRequest.for_pipeline`) is one line naming the method."""
    from ..request import family_guidance_defaults
    from ..samplers import config_family, default_sampler, make_scheduler

    scheduler = default_sampler(pipe.scheduler) if scheduler is None else scheduler
    make_scheduler(scheduler, pipe.scheduler.config)  # a VP sampler on a flow model: one line
    defaults = family_guidance_defaults(pipe, guidance_scale=guidance_scale)
    shared = replace(shared, guidance={**defaults, **shared.guidance})
    flow = config_family(pipe.scheduler.config) == "flow"
    for spec in specs:
        request = build_request(
            spec, shared, prompt="-", flow=flow, num_inference_steps=steps, scheduler=scheduler
        )
        try:
            request.for_pipeline(pipe)
        except ValueError as exc:
            raise ValueError(f"method {spec.name!r}: {exc}") from exc
    return scheduler, shared
