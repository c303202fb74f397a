"""Training-free attention guidance: gradient steps on the latent that move boxed tokens' attention.

One guided update (Chen et al. backward guidance, BoxDiff, or SALT's loss) is a small function of
the UNet, the latent and the masks; the pipeline calls it during its first ``guidance_steps``
denoising steps and leaves the sampler itself untouched (guidance by composition, as in
k-diffusion's ``sample_clip_guided``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import losses as L
from .attention import AttentionStore
from .registry import (
    FLOW_GUIDANCE_BUDGETS,
    GUIDANCE_BUDGETS,
    GUIDANCE_LOSSES,
    GUIDANCE_PARAMS,
    check_fields,
)

logger = logging.getLogger(__name__)


#: Steps with the outside prompt when a loss is on and ``outside_prompt_steps`` is unset: from the
#: outside-prompt study (``benchmarks/RESULTS.md``).
OUTSIDE_PROMPT_STEPS = 10


@dataclass
class GuidanceConfig:
    """Every knob of the attention-guidance loop; the CLI maps onto these fields one to one.

    The update is ``z_t <- z_t - step_size * s(t) * grad_z loss`` where ``s(t) = 1 - alpha_bar_t``
    under the ``"sigma"`` schedule (the variance-preserving equivalent of layout-guidance's
    ``sigma_t**2`` scaling in sigma space) and ``s(t) = 1`` under ``"constant"``. ``loss`` names a
    registered guidance loss (:data:`saltdiff.registry.GUIDANCE_LOSSES`) and ``loss_params`` sets
    its own hyper-parameters (e.g. ``{"reg_weight": 0.5}`` for ``"salt"``); unset ones take the
    registered defaults. The shared knobs and their bounds are declared in
    :data:`saltdiff.registry.GUIDANCE_PARAMS`.

    The budget (``guidance_steps``, ``guidance_iters``, ``loss_threshold``) left as ``None``
    follows the start (:meth:`for_start`, :data:`saltdiff.registry.GUIDANCE_BUDGETS`): SALT's z_T*
    needs 3 steps of 1 update, always taken; random noise 10 steps of up to 5, until the loss is
    under 0.2. The pipeline fills it in once the initial latent is made.
    """

    loss: str = "salt"
    guidance_steps: int | None = None
    guidance_iters: int | None = None
    step_size: float = 30.0
    step_size_schedule: str = "sigma"
    loss_threshold: float | None = None
    outside_prompt_steps: int | None = None
    outside_prompt: str = "boxed-negative"
    guided_prediction: str | None = None
    guided_gradient: str = "full"
    placed_unboxed: str = "guide"
    layers: str | tuple[str, ...] = "default"
    max_grad_norm: float | None = None
    loss_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        entry = GUIDANCE_LOSSES.get(self.loss) if isinstance(self.loss, str) else None
        if entry is None:
            raise ValueError(f"guidance loss must be a name, got {self.loss!r}")
        check_fields(self, [p for p in GUIDANCE_PARAMS if p.name != "layers"], "guidance")
        if not isinstance(self.layers, (str, tuple, list)) or not self.layers:
            raise ValueError(
                f"guidance: layers must be a selector string or a tuple of names, got {self.layers!r}"
            )
        if not isinstance(self.loss_params, Mapping):
            raise ValueError(
                f"guidance: loss_params must be a mapping, got {type(self.loss_params).__name__}"
            )
        entry.resolve(self.loss_params, owner=f"guidance loss {self.loss!r}")

    @property
    def enabled(self) -> bool:
        return self.loss != "none" and self.guidance_steps != 0 and self.guidance_iters != 0

    def for_start(self, from_reference: bool, flow: bool = False) -> GuidanceConfig:
        """This config with its unset budget filled in for the start: z_T* inverted from a layout
        reference (``from_reference``) or anything else (random noise, a user's latent); ``flow``:
        on a flow-matching model, whose budget may differ (:data:`FLOW_GUIDANCE_BUDGETS`)."""
        start = "reference" if from_reference else "noise"
        budget = (FLOW_GUIDANCE_BUDGETS if flow else {}).get(start, GUIDANCE_BUDGETS[start])
        return self.with_unset(budget)

    def with_unset(self, values: Mapping[str, Any]) -> GuidanceConfig:
        """This config with each field it leaves unset (``None``) taken from ``values``: a start's
        budget, a model family's defaults (``FlowSaltMixin.guidance_defaults_for``)."""
        unset = {name: value for name, value in values.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self

    @property
    def outside_steps(self) -> int:
        """``outside_prompt_steps``, or when unset :data:`OUTSIDE_PROMPT_STEPS` with a loss and 0
        without one: ``guidance="none"`` stays plain sampling."""
        if self.outside_prompt_steps is not None:
            return self.outside_prompt_steps
        return OUTSIDE_PROMPT_STEPS if self.loss != "none" else 0

    @property
    def prediction_kind(self) -> str:
        """``guided_prediction``, or ``"updated"`` when unset: a flow call fills in its family's value
        first (``FlowSaltMixin.guidance_defaults``), so unset here means a UNet model's only kind."""
        return self.guided_prediction or "updated"

    @property
    def params(self) -> dict[str, Any]:
        """The loss's hyper-parameters: registered defaults updated with ``loss_params``."""
        return GUIDANCE_LOSSES.get(self.loss).resolve(self.loss_params)

    @property
    def needs_unboxed_tokens(self) -> bool:
        """Whether the loss, with these params, looks at the attention of the prompt's other words."""
        return GUIDANCE_LOSSES.get(self.loss).requires("unboxed_tokens", self.params)

    def to_dict(self) -> dict:
        data = {p.name: getattr(self, p.name) for p in GUIDANCE_PARAMS}
        data = {
            "loss": self.loss,
            **data,
            "outside_prompt_steps": self.outside_steps,
            "guided_prediction": self.prediction_kind,
            "loss_params": self.params,
        }
        if isinstance(data["layers"], tuple):
            data["layers"] = list(data["layers"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> GuidanceConfig:
        """The inverse of :meth:`to_dict`; also reads recipes written before ``loss_params`` existed."""
        data = dict(data)
        loss = data.get("loss", "salt")
        legacy = {"reg_weight": "reg_weight", "unboxed_weight": "unboxed_weight"}
        legacy["boxdiff_topk_fraction"] = "topk_fraction"
        params = dict(data.pop("loss_params", None) or {})
        for old, new in legacy.items():
            if old in data:
                value = data.pop(old)
                if loss in GUIDANCE_LOSSES and new in GUIDANCE_LOSSES.get(loss).defaults():
                    params.setdefault(new, value)
        if data.get("outside_prompt_steps") and "outside_prompt" not in data:
            data["outside_prompt"] = "without-boxed"  # the only kind before 0.3
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown guidance option(s) {sorted(unknown)}; valid: {sorted(known)}")
        if isinstance(data.get("layers"), list):
            data["layers"] = tuple(data["layers"])
        return cls(**data, loss_params=params)

    def loss_fn(self) -> Callable[..., torch.Tensor]:
        """The loss as ``(maps [B,K,h,w], masks [K,h,w], unboxed_maps, unboxed_reference) -> scalar``."""
        entry = GUIDANCE_LOSSES.get(self.loss)
        if entry.target is None:
            raise ValueError(f"guidance loss {self.loss!r} has no loss function")
        fn = entry.load()
        params = self.params
        if "unboxed_tokens" in entry.needs:
            return _with_unboxed(fn, params)
        return _without_unboxed(fn, params)


def _without_unboxed(fn, params):
    def loss(maps, masks, unboxed_maps=None, unboxed_reference=None):
        return fn(maps, masks, **params)

    return loss


def _with_unboxed(fn, params):
    def loss(maps, masks, unboxed_maps=None, unboxed_reference=None):
        return fn(maps, masks, unboxed_maps=unboxed_maps, unboxed_reference=unboxed_reference, **params)

    return loss


@dataclass
class GuidanceTargets:
    """What the loss looks at: token positions of boxed phrases (and of other words) and the layout."""

    token_indices: list[list[int]]
    layout_masks: Callable[[int, int], torch.Tensor]
    unboxed_indices: list[int] = field(default_factory=list)


def layer_losses(
    store: AttentionStore,
    targets: GuidanceTargets,
    loss_fn: Callable[..., torch.Tensor],
    unboxed_references: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over captured layers of ``loss_fn`` at each layer's own resolution (no resizing).

    ``unboxed_references`` holds, per layer, the unboxed tokens' attention mass that SALT's
    unboxed term protects; an empty list is filled from the current maps (first iteration).
    """
    per_layer = store.phrase_maps_per_layer(targets.token_indices)
    if not per_layer:
        raise RuntimeError("no cross-attention was captured: check the selected layers")
    unboxed = None
    if targets.unboxed_indices:
        unboxed = store.phrase_maps_per_layer([[i] for i in targets.unboxed_indices])
        if unboxed_references is not None and not unboxed_references:
            unboxed_references.extend(L.attention_mass(u).detach() for u in unboxed)
    total = 0.0
    for k, maps in enumerate(per_layer):
        h, w = maps.shape[-2:]
        masks = targets.layout_masks(h, w).to(device=maps.device, dtype=maps.dtype)
        if unboxed is None:
            total = total + loss_fn(maps, masks)
        else:
            ref = unboxed_references[k] if unboxed_references else L.attention_mass(unboxed[k]).detach()
            total = total + loss_fn(maps, masks, unboxed[k], ref)
    return total / len(per_layer)


def step_scale(noise_variance: float, schedule: str) -> float:
    """``s`` of the update: the latent's noise variance ``c_noise^2`` at this step ("sigma"; VP:
    :func:`saltdiff.noise.vp_noise_variance` = ``1 - alpha_bar_t``, flow: ``sigma^2``) or 1 ("constant")."""
    if schedule == "constant":
        return 1.0
    return float(noise_variance)


@dataclass
class GuidedUpdateResult:
    """The updated latent; ``prediction``: what the last guided pass returned (detached), and
    ``predicted_at`` the latent it ran on (``None`` when ``denoiser_fn`` returns nothing or the
    update was skipped)."""

    latents: torch.Tensor
    losses: list[float]
    skipped: bool = False
    prediction: torch.Tensor | None = None
    predicted_at: torch.Tensor | None = None


def guided_update(
    denoiser_fn: Callable[[torch.Tensor], torch.Tensor | None],
    latents: torch.Tensor,
    store: AttentionStore,
    targets: GuidanceTargets,
    config: GuidanceConfig,
    scale: float,
) -> GuidedUpdateResult:
    """Up to ``guidance_iters`` gradient steps on ``latents`` for one denoising timestep.

    ``denoiser_fn(z)`` runs the *conditional* branch of the denoiser (a UNet, a joint-attention
    transformer) on ``z`` (the store records its attention to the text with autograd); what it
    returns of its last call comes back as ``prediction`` (a loop that samples with it saves a
    pass). Stops early once the loss is under ``loss_threshold``. A
    non-finite loss or gradient skips the update (with a warning) instead of poisoning the image.
    """
    loss_fn = config.loss_fn()
    references: list[torch.Tensor] = []
    history: list[float] = []
    z = latents.detach()
    prediction = predicted_at = None
    for _ in range(config.guidance_iters):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            store.reset()
            out = denoiser_fn(z)
            if out is not None:
                prediction, predicted_at = out.detach(), z.detach()
            loss = layer_losses(store, targets, loss_fn, references)
            value = float(loss.detach())
            history.append(value)
            if not math.isfinite(value):
                logger.warning("guidance loss is %s; skipping the update at this step", value)
                store.reset()
                return GuidedUpdateResult(latents.detach(), history, skipped=True)
            if value < config.loss_threshold:
                break
            (grad,) = torch.autograd.grad(loss, z)
        store.reset()
        grad = grad.float()
        if not torch.isfinite(grad).all():
            logger.warning("guidance gradient is not finite; skipping the update at this step")
            return GuidedUpdateResult(latents.detach(), history, skipped=True)
        if config.max_grad_norm is not None:
            norm = grad.norm()
            if norm > config.max_grad_norm:
                grad = grad * (config.max_grad_norm / norm)
        z = (z.detach().float() - config.step_size * scale * grad).to(latents.dtype)
    store.reset()
    return GuidedUpdateResult(z.detach(), history, prediction=prediction, predicted_at=predicted_at)
