"""Training-free attention guidance: gradient steps on the latent that move boxed tokens' attention.

One guided update (Chen et al. backward guidance, BoxDiff, or SALT's loss) is a small function of
the UNet, the latent and the masks; the pipeline calls it during its first ``guidance_steps``
denoising steps and leaves the sampler itself untouched (guidance by composition, as in
k-diffusion's ``sample_clip_guided``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch

from . import losses as L
from .attention import AttentionStore

logger = logging.getLogger(__name__)

GUIDANCE_LOSSES = ("salt", "layout-guidance", "boxdiff", "none")
STEP_SIZE_SCHEDULES = ("sigma", "constant")


@dataclass
class GuidanceConfig:
    """Every knob of the attention-guidance loop; the CLI maps onto these fields one to one.

    The update is ``z_t <- z_t - step_size * s(t) * grad_z loss`` where ``s(t) = 1 - alpha_bar_t``
    under the ``"sigma"`` schedule (the variance-preserving equivalent of layout-guidance's
    ``sigma_t**2`` scaling in sigma space) and ``s(t) = 1`` under ``"constant"``.
    """

    loss: str = "salt"
    guidance_steps: int = 10
    guidance_iters: int = 5
    step_size: float = 30.0
    step_size_schedule: str = "sigma"
    loss_threshold: float = 0.2
    layers: str | tuple[str, ...] = "default"
    reg_weight: float = 0.5
    unboxed_weight: float = 0.0
    boxdiff_topk_fraction: float = 0.2
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.loss not in GUIDANCE_LOSSES:
            raise ValueError(f"guidance loss must be one of {GUIDANCE_LOSSES}, got {self.loss!r}")
        if self.step_size_schedule not in STEP_SIZE_SCHEDULES:
            raise ValueError(
                f"step_size_schedule must be one of {STEP_SIZE_SCHEDULES}, got {self.step_size_schedule!r}"
            )
        for name in ("guidance_steps", "guidance_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("step_size", "loss_threshold", "reg_weight", "unboxed_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < self.boxdiff_topk_fraction <= 1:
            raise ValueError(f"boxdiff_topk_fraction must be in (0, 1], got {self.boxdiff_topk_fraction!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")

    @property
    def enabled(self) -> bool:
        return self.loss != "none" and self.guidance_steps > 0 and self.guidance_iters > 0

    def to_dict(self) -> dict:
        data = asdict(self)
        if isinstance(data["layers"], tuple):
            data["layers"] = list(data["layers"])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GuidanceConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown guidance option(s) {sorted(unknown)}; valid: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("layers"), list):
            data["layers"] = tuple(data["layers"])
        return cls(**data)

    def loss_fn(self) -> Callable[..., torch.Tensor]:
        """The loss as a function ``(maps [B,K,h,w], masks [K,h,w], unboxed_maps) -> scalar``."""
        if self.loss == "salt":
            return partial(_salt, reg_weight=self.reg_weight, unboxed_weight=self.unboxed_weight)
        if self.loss == "boxdiff":
            return partial(_boxdiff, topk_fraction=self.boxdiff_topk_fraction)
        return _layout_guidance


def _layout_guidance(maps, masks, unboxed_maps=None, unboxed_reference=None):
    return L.layout_guidance_loss(maps, masks)


def _boxdiff(maps, masks, unboxed_maps=None, unboxed_reference=None, *, topk_fraction):
    return L.boxdiff_loss(maps, masks, topk_fraction=topk_fraction)


def _salt(maps, masks, unboxed_maps=None, unboxed_reference=None, *, reg_weight, unboxed_weight):
    return L.salt_loss(
        maps,
        masks,
        reg_weight=reg_weight,
        unboxed_maps=unboxed_maps,
        unboxed_reference=unboxed_reference,
        unboxed_weight=unboxed_weight,
    )


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


def step_scale(alphas_cumprod: torch.Tensor, timestep: int | torch.Tensor, schedule: str) -> float:
    """``s(t)`` of the update: ``1 - alpha_bar_t`` ("sigma") or 1 ("constant")."""
    if schedule == "constant":
        return 1.0
    t = int(timestep)
    return float(1.0 - alphas_cumprod[t])


@dataclass
class GuidedUpdateResult:
    latents: torch.Tensor
    losses: list[float]
    skipped: bool = False


def guided_update(
    unet_fn: Callable[[torch.Tensor], None],
    latents: torch.Tensor,
    store: AttentionStore,
    targets: GuidanceTargets,
    config: GuidanceConfig,
    scale: float,
) -> GuidedUpdateResult:
    """Up to ``guidance_iters`` gradient steps on ``latents`` for one denoising timestep.

    ``unet_fn(z)`` runs the *conditional* branch of the UNet on ``z`` (the store records its
    cross-attention with autograd). Stops early once the loss is under ``loss_threshold``. A
    non-finite loss or gradient skips the update (with a warning) instead of poisoning the image.
    """
    loss_fn = config.loss_fn()
    references: list[torch.Tensor] = []
    history: list[float] = []
    z = latents.detach()
    for _ in range(config.guidance_iters):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            store.reset()
            unet_fn(z)
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
    return GuidedUpdateResult(z.detach(), history)
