"""Attention-guidance losses on cross-attention maps: pure, differentiable tensor functions.

Conventions shared by every loss:

* ``maps`` ``[B, K, h, w]``: cross-attention probabilities of the K boxed phrases at one resolution,
  averaged over heads and over each phrase's tokens. They are *not* normalized spatially (a pixel's
  softmax runs over the text tokens), so a map's spatial sum is the phrase's attention "mass".
* ``masks`` ``[K, h, w]`` or ``[B, K, h, w]``: {0, 1} box masks at the same resolution
  (:meth:`saltdiff.layout.Layout.masks`); ``M_k`` is box ``k``'s mask, ``A_k`` its map.
* Each loss returns a scalar: the mean over the batch and the boxes (the papers sum over boxes; a
  mean keeps step sizes independent of the number of boxes). With ``K = 0`` the loss is
  ``maps.sum() * 0``: zero, on the maps' device and dtype, and still differentiable.

Nothing here knows about devices, pipelines or tokenizers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention_mass",
    "boxdiff_loss",
    "gaussian_blur",
    "layout_guidance_loss",
    "salt_loss",
    "salt_loss_terms",
]


def layout_guidance_loss(maps: torch.Tensor, masks: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Backward-guidance energy of Chen et al. 2023 ("Training-Free Layout Control with Cross-Attention
    Guidance", Eq. 3), averaged over batch and boxes:

        L_layout = mean_{b,k} ( 1 - sum_u A_k(u) M_k(u) / sum_u A_k(u) )^2

    0 when all of a phrase's attention lies in its box, 1 when none does, 0.25 at half/half.
    """
    maps, masks = _check(maps, masks)
    if maps.shape[1] == 0:
        return maps.sum() * 0
    return _layout_per_box(maps, masks, eps).mean()


def boxdiff_loss(
    maps: torch.Tensor,
    masks: torch.Tensor,
    *,
    topk_fraction: float = 0.2,
    inner_weight: float = 1.0,
    outer_weight: float = 1.0,
    corner_weight: float = 1.0,
    corner_width: int = 1,
    smooth_sigma: float = 0.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """BoxDiff's spatial constraints (Xie et al., ICCV 2023, "BoxDiff: Text-to-Image Synthesis with
    Training-Free Box-Constrained Diffusion", Sec. 3.2–3.4), averaged over batch and boxes.

    Each map is first smoothed with a Gaussian (``smooth_sigma`` in cells, 3×3 kernel at the default
    0.5 as in Attend-and-Excite/BoxDiff; ``0`` disables it) and divided by its maximum, so
    ``Â_k ∈ [0, 1]`` and only the *shape* of the map counts. With ``topk(x, P)`` the mean of the
    largest ``P`` values, ``P_in = ceil(topk_fraction · |M_k|)``, ``P_out = ceil(topk_fraction · |1 - M_k|)``:

        inner  (Eq. 5)  L_IB = 1 - topk(Â_k ⊙ M_k, P_in)           — the box must hold high responses
        outer  (Eq. 6)  L_OB = topk(Â_k ⊙ (1 - M_k), P_out)         — no high responses outside it
        corner (Eq. 8)  L_CC = mean_{j ∈ C_x} |max_y Â_k(·, j) - s_x(j)| + mean_{i ∈ C_y} |max_x Â_k(i, ·) - s_y(i)|

    where ``s_x = max_y M_k`` and ``s_y = max_x M_k`` are the mask's projections onto the axes and
    ``C_x``, ``C_y`` the positions within ``corner_width`` cells of the box's first and last
    column/row (the "corner" neighbourhoods of the paper; BoxDiff's default L = 1). BoxDiff averages
    the corner L1 over the whole axis; we average over the corner positions so the term does not
    shrink with resolution. Total: ``inner_weight·L_IB + outer_weight·L_OB + corner_weight·L_CC``.
    """
    maps, masks = _check(maps, masks)
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction!r}")
    if corner_width < 0:
        raise ValueError(f"corner_width must be >= 0, got {corner_width!r}")
    if smooth_sigma < 0:
        raise ValueError(f"smooth_sigma must be >= 0, got {smooth_sigma!r}")
    if maps.shape[1] == 0:
        return maps.sum() * 0

    a = gaussian_blur(maps, smooth_sigma)
    a = a / (a.amax(dim=(-2, -1), keepdim=True) + eps)

    inner = 1.0 - _topk_mean(a * masks, masks, topk_fraction)
    outer = _topk_mean(a * (1.0 - masks), 1.0 - masks, topk_fraction)

    proj_x, gt_x = a.amax(dim=-2), masks.amax(dim=-2)  # [B, K, w]
    proj_y, gt_y = a.amax(dim=-1), masks.amax(dim=-1)  # [B, K, h]
    corner = _corner_l1(proj_x, gt_x, corner_width) + _corner_l1(proj_y, gt_y, corner_width)

    total = inner_weight * inner + outer_weight * outer + corner_weight * corner
    return total.mean()


def salt_loss_terms(
    maps: torch.Tensor,
    masks: torch.Tensor,
    *,
    reg_weight: float = 1.0,
    unboxed_maps: torch.Tensor | None = None,
    unboxed_reference: torch.Tensor | float | None = None,
    unboxed_weight: float = 1.0,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """The unweighted terms of :func:`salt_loss` and their weighted sum, for guidance and logging.

    Returns ``{"layout": L_layout, "outside": L_out, "unboxed": L_unb, "total": L}`` (scalars); see
    :func:`salt_loss` for the formulas. ``"unboxed"`` is 0 when ``unboxed_maps`` is None.
    """
    maps, masks = _check(maps, masks)
    if reg_weight < 0 or unboxed_weight < 0:
        raise ValueError(
            f"reg_weight and unboxed_weight must be >= 0, got {reg_weight!r}, {unboxed_weight!r}"
        )
    zero = maps.sum() * 0
    if maps.shape[1] == 0:
        layout = outside = zero
    else:
        layout = _layout_per_box(maps, masks, eps).mean()
        peak = maps.amax(dim=(-2, -1), keepdim=True)
        normalized = maps / (peak + eps)
        n_out = (1.0 - masks).sum(dim=(-2, -1)).clamp_min(1.0)
        outside = ((normalized * (1.0 - masks)) ** 2).sum(dim=(-2, -1)).div(n_out).mean()

    unboxed = zero
    if unboxed_maps is not None:
        unboxed = _unboxed_term(maps, unboxed_maps, unboxed_reference, eps)
    elif unboxed_reference is not None:
        raise ValueError("unboxed_reference was given without unboxed_maps")

    total = layout + reg_weight * outside + unboxed_weight * unboxed
    return {"layout": layout, "outside": outside, "unboxed": unboxed, "total": total}


def salt_loss(
    maps: torch.Tensor,
    masks: torch.Tensor,
    *,
    reg_weight: float = 1.0,
    unboxed_maps: torch.Tensor | None = None,
    unboxed_reference: torch.Tensor | float | None = None,
    unboxed_weight: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """SALT's attention-guidance loss: the layout term plus two regularizers (mean over batch b,
    boxes k, unboxed tokens j; pixels u; ``B̄_k`` = cells outside box k):

        L = L_layout + reg_weight · L_out + unboxed_weight · L_unb

        L_layout = mean_{b,k} ( 1 - sum_u A_k(u) M_k(u) / sum_u A_k(u) )^2          (Chen et al.)
        L_out    = mean_{b,k} (1/|B̄_k|) sum_{u ∈ B̄_k} ( A_k(u) / max_v A_k(v) )^2
        L_unb    = mean_{b,j} relu( 1 - m_j / ρ_j )^2,   m_j = mean_u U_j(u)

    ``L_out`` suppresses stray hot spots of a boxed phrase outside its box: the ratio term's gradient
    fades as the in-box fraction nears 1 (it is quadratic around 0) and ignores *where* the remaining
    outside mass sits, while the peak-normalized square is scale-free and, for a fixed outside mass,
    largest when that mass is concentrated in a hot spot (a second copy of the object).
    ``L_unb`` keeps the unboxed tokens' attention (``unboxed_maps`` ``U``, ``[B, J, h, w]``, e.g. the
    prompt's other words) from collapsing while guidance pushes the boxed tokens up: a hinge that
    is 0 while each unboxed token keeps at least its reference mass ``ρ_j`` and grows to 1 as its
    mass vanishes. ``unboxed_reference`` gives ``ρ`` (a tensor broadcastable to ``[B, J]`` or a
    float), typically ``attention_mass(unboxed_maps).detach()`` measured before the first guidance
    update of the step; it is required with ``unboxed_maps`` because a sensible absolute level depends
    on the model. With ``reg_weight = 0`` and no ``unboxed_maps``, ``salt_loss == layout_guidance_loss``.
    """
    return salt_loss_terms(
        maps,
        masks,
        reg_weight=reg_weight,
        unboxed_maps=unboxed_maps,
        unboxed_reference=unboxed_reference,
        unboxed_weight=unboxed_weight,
        eps=eps,
    )["total"]


def attention_mass(maps: torch.Tensor) -> torch.Tensor:
    """Mean attention probability of each map over the image, ``[B, K, h, w] -> [B, K]``."""
    if maps.ndim != 4:
        raise ValueError(f"maps must be [B, K, h, w], got shape {tuple(maps.shape)}")
    return maps.mean(dim=(-2, -1))


# -- helpers ---------------------------------------------------------------------------------------
def _check(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return ``masks`` as ``[B, K, h, w]`` on the maps' device and dtype."""
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4:
        raise ValueError(f"maps must be a [B, K, h, w] tensor, got {_shape(maps)}")
    if not isinstance(masks, torch.Tensor) or masks.ndim not in (3, 4):
        raise ValueError(f"masks must be a [K, h, w] or [B, K, h, w] tensor, got {_shape(masks)}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a floating-point tensor, got dtype {maps.dtype}")
    b, k, h, w = maps.shape
    given = tuple(masks.shape)
    if masks.ndim == 3:
        masks = masks.unsqueeze(0)
    if masks.shape[1:] != (k, h, w) or masks.shape[0] not in (1, b):
        raise ValueError(
            f"masks of shape {given} do not match maps of shape {tuple(maps.shape)}: "
            f"expected [{k}, {h}, {w}] or [{b}, {k}, {h}, {w}] (one mask per box, at the maps' resolution)"
        )
    masks = masks.to(device=maps.device, dtype=maps.dtype).expand(b, k, h, w)
    return maps, masks


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(type(x).__name__)


def _layout_per_box(maps: torch.Tensor, masks: torch.Tensor, eps: float) -> torch.Tensor:
    inside = (maps * masks).sum(dim=(-2, -1))
    total = maps.sum(dim=(-2, -1))
    return (1.0 - inside / (total + eps)) ** 2


def _topk_mean(values: torch.Tensor, region: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``ceil(fraction·|region|)`` (at least 1) values of each ``[h, w]`` map."""
    flat = values.flatten(-2)
    k = torch.ceil(region.flatten(-2).sum(-1) * fraction).clamp_min(1.0)  # [B, K]
    top = flat.sort(dim=-1, descending=True).values
    rank = torch.arange(flat.shape[-1], device=flat.device, dtype=flat.dtype)
    keep = (rank < k.unsqueeze(-1)).to(flat.dtype)
    return (top * keep).sum(-1) / k


def _corner_l1(proj: torch.Tensor, gt: torch.Tensor, width: int) -> torch.Tensor:
    """Mean |proj - gt| over positions within ``width`` of the first and last 1 of ``gt`` ([B, K, n])."""
    n = gt.shape[-1]
    idx = torch.arange(n, device=gt.device)
    on = gt > 0.5
    first = torch.where(on, idx, n).amin(-1, keepdim=True)
    last = torch.where(on, idx, -1).amax(-1, keepdim=True)
    near = ((idx - first).abs() <= width) | ((idx - last).abs() <= width)
    near = (near & on.any(-1, keepdim=True)).to(proj.dtype)
    return ((proj - gt).abs() * near).sum(-1) / near.sum(-1).clamp_min(1.0)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 2.0) -> torch.Tensor:
    """Separable Gaussian blur of each ``[h, w]`` map of ``[..., h, w]``, edges replicated.

    The kernel's radius is ``max(1, ceil(truncate · sigma))`` cells; ``sigma <= 0`` returns the maps.
    """
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(truncate * sigma))
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    h, w = maps.shape[-2:]
    flat = maps.reshape(-1, 1, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, g.view(1, 1, 1, -1))
    flat = F.conv2d(flat, g.view(1, 1, -1, 1))
    return flat.reshape(maps.shape)


def _unboxed_term(
    maps: torch.Tensor, unboxed_maps: torch.Tensor, reference: torch.Tensor | float | None, eps: float
) -> torch.Tensor:
    if not isinstance(unboxed_maps, torch.Tensor) or unboxed_maps.ndim != 4:
        raise ValueError(f"unboxed_maps must be a [B, J, h, w] tensor, got {_shape(unboxed_maps)}")
    b, _, h, w = maps.shape
    if unboxed_maps.shape[0] != b or unboxed_maps.shape[2:] != (h, w):
        raise ValueError(
            f"unboxed_maps of shape {tuple(unboxed_maps.shape)} do not match maps of shape {tuple(maps.shape)}: "
            f"expected [{b}, J, {h}, {w}]"
        )
    if reference is None:
        raise ValueError(
            "unboxed_reference is required with unboxed_maps: pass the unboxed tokens' attention mass "
            "before guidance, e.g. attention_mass(unboxed_maps).detach() at the step's first iteration"
        )
    if unboxed_maps.shape[1] == 0:
        return unboxed_maps.sum() * 0 + maps.sum() * 0
    mass = attention_mass(unboxed_maps)  # [B, J]
    ref = torch.as_tensor(reference, device=mass.device, dtype=mass.dtype)
    try:
        ref = ref.expand_as(mass)
    except RuntimeError:
        raise ValueError(
            f"unboxed_reference of shape {tuple(ref.shape)} does not broadcast to [B, J] = {list(mass.shape)}"
        ) from None
    return (torch.relu(1.0 - mass / (ref + eps)) ** 2).mean()
