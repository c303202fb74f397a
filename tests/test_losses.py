import pytest
import torch

from saltdiff.layout import Layout
from saltdiff.losses import (
    attention_mass,
    boxdiff_loss,
    layout_guidance_loss,
    salt_loss,
    salt_loss_terms,
)

LOSSES = [layout_guidance_loss, boxdiff_loss, salt_loss]


def box_mask(h=8, w=8, box=(0.25, 0.25, 0.75, 0.75)):
    return Layout.from_pairs([("x", box)]).masks(h, w)  # [1, h, w]


def maps_from(*planes):
    """Stack [h, w] planes into maps [1, K, h, w]."""
    return torch.stack(planes)[None]


def test_layout_loss_analytic():
    m = box_mask()
    inside, outside = m[0] * 0.3, (1 - m[0]) * 0.3
    assert layout_guidance_loss(maps_from(inside), m).item() == pytest.approx(0.0, abs=1e-6)
    assert layout_guidance_loss(maps_from(outside), m).item() == pytest.approx(1.0)
    half = inside / m[0].sum() + outside / (1 - m[0]).sum()  # equal mass inside and outside
    assert layout_guidance_loss(maps_from(half), m).item() == pytest.approx(0.25)
    # Mean over boxes.
    two = maps_from(inside, outside)
    assert layout_guidance_loss(two, torch.cat([m, m])).item() == pytest.approx(0.5)


def test_losses_batch_and_mask_shapes():
    torch.manual_seed(0)
    masks = Layout.from_pairs([("a", (0, 0, 0.5, 0.5)), ("b", (0.25, 0.5, 1, 1))]).masks(8, 16)
    maps = torch.rand(3, 2, 8, 16)
    for loss in LOSSES:
        shared = loss(maps, masks)
        per_sample = loss(maps, masks.expand(3, -1, -1, -1))
        assert shared.shape == () and torch.allclose(shared, per_sample)
        # Mean over the batch: equal to the mean of single-sample losses.
        singles = torch.stack([loss(maps[i : i + 1], masks) for i in range(3)])
        assert torch.allclose(shared, singles.mean(), atol=1e-6)


def test_per_sample_masks_are_used():
    m = box_mask()
    maps = maps_from(m[0]).expand(2, -1, -1, -1)
    masks = torch.stack([m, 1 - m])  # [2, 1, h, w]: sample 1's box is the complement
    assert layout_guidance_loss(maps, masks).item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_boxes(loss):
    maps = torch.rand(2, 0, 8, 8, requires_grad=True)
    value = loss(maps, torch.zeros(0, 8, 8))
    assert value.item() == 0.0
    value.backward()  # still part of the graph: guidance on a layout without boxes must not crash
    assert torch.equal(maps.grad, torch.zeros_like(maps))


@pytest.mark.parametrize("loss", LOSSES)
def test_dtype_and_exact_gradient(loss):
    """The analytic gradient matches finite differences (float64, maps away from ties and zeros)."""
    torch.manual_seed(0)
    maps = (torch.rand(1, 2, 6, 6, dtype=torch.float64) + 0.1).requires_grad_(True)
    masks = torch.stack([box_mask(6, 6)[0], 1 - box_mask(6, 6)[0]]).bool()  # bool masks are accepted
    assert loss(maps, masks).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda m: loss(m, masks), (maps,))


@pytest.mark.parametrize("loss", LOSSES)
def test_shape_errors(loss):
    with pytest.raises(ValueError, match=r"maps must be .*\[B, K, h, w\].*\(2, 8, 8\)"):
        loss(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(
        ValueError, match=r"masks of shape \(1, 4, 4\) do not match maps of shape \(1, 1, 8, 8\)"
    ):
        loss(torch.rand(1, 1, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"masks of shape \(2, 8, 8\)"):
        loss(torch.rand(1, 1, 8, 8), torch.zeros(2, 8, 8))


@pytest.mark.parametrize(
    "loss, kwargs",
    [
        (layout_guidance_loss, {}),
        (boxdiff_loss, {}),
        (boxdiff_loss, {"smooth_sigma": 0.0}),
        (salt_loss, {}),
        (salt_loss, {"reg_weight": 5.0}),
    ],
)
def test_gradient_descent_moves_mass_into_box(loss, kwargs):
    torch.manual_seed(0)
    masks = Layout.from_pairs([("a", (0.0, 0.0, 0.5, 0.5)), ("b", (0.5, 0.375, 1.0, 1.0))]).masks(16, 16)
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)

    def attention():
        # Positive maps with realistic magnitudes (a phrase's share of the token softmax).
        return 0.1 * 256 * torch.softmax(logits.flatten(-2), -1).view_as(logits)

    def inside_fraction():
        a = attention()
        return ((a * masks).sum((-2, -1)) / a.sum((-2, -1))).detach()

    start_fraction, start_loss = inside_fraction(), loss(attention(), masks, **kwargs).item()
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        loss(attention(), masks, **kwargs).backward()
        opt.step()
    end_fraction, end_loss = inside_fraction(), loss(attention(), masks, **kwargs).item()
    assert end_loss < 0.5 * start_loss
    assert (end_fraction > start_fraction).all()
    assert (end_fraction > 0.75).all()


# -- BoxDiff -----------------------------------------------------------------------------------------------
def test_boxdiff_map_equal_to_mask():
    m = box_mask(16, 16)
    exact = maps_from(m[0])
    assert boxdiff_loss(exact, m, smooth_sigma=0).item() == pytest.approx(0.0, abs=1e-6)
    # Scale-free: each map is divided by its maximum.
    assert boxdiff_loss(0.01 * exact, m, smooth_sigma=0).item() == pytest.approx(0.0, abs=1e-5)
    smoothed = boxdiff_loss(exact, m).item()  # the blur spills a little over the box edge
    outside = boxdiff_loss(maps_from(1 - m[0]), m).item()
    assert smoothed < 0.5 and outside > 2.0 and outside > 5 * smoothed


def test_boxdiff_terms_and_weights():
    m = box_mask(16, 16)
    outside = maps_from(1 - m[0])
    off = {"inner_weight": 0.0, "outer_weight": 0.0, "corner_weight": 0.0, "smooth_sigma": 0.0}
    assert boxdiff_loss(outside, m, **off).item() == 0.0
    # Inner term: nothing inside the box -> 1.
    assert boxdiff_loss(outside, m, **{**off, "inner_weight": 1.0}).item() == pytest.approx(1.0)
    # Outer term: top-k of the outside all at the peak -> 1.
    assert boxdiff_loss(outside, m, **{**off, "outer_weight": 1.0}).item() == pytest.approx(1.0)
    # Corner term: x and y projections are 1 everywhere, the mask's is 0 just outside the edges.
    # The box spans columns (and rows) 4..11; corner positions 3, 4, 5, 10, 11, 12 per axis, the
    # error is 1 at 3 and 12 only: 2/6 per axis.
    corner = boxdiff_loss(outside, m, **{**off, "corner_weight": 1.0}).item()
    assert corner == pytest.approx(2 / 3)
    # A hot spot outside the box costs its share of the top-k outside cells: one cell at the peak
    # among ceil(0.2 * 192) = 39, or among all 192 with topk_fraction=1.
    spot = m[0].clone()
    spot[0, 0] = 1.0
    assert boxdiff_loss(maps_from(spot), m, **{**off, "outer_weight": 1.0}).item() == pytest.approx(1 / 39)
    small = boxdiff_loss(maps_from(spot), m, **{**off, "outer_weight": 1.0}, topk_fraction=1.0).item()
    assert small == pytest.approx(1 / 192)


def test_boxdiff_full_image_box_and_argument_errors():
    full = torch.ones(1, 8, 8)
    assert boxdiff_loss(torch.ones(1, 1, 8, 8), full, smooth_sigma=0).item() == pytest.approx(0.0, abs=1e-6)
    maps = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="topk_fraction .* 0"):
        boxdiff_loss(maps, full, topk_fraction=0.0)
    with pytest.raises(ValueError, match="smooth_sigma .* -1"):
        boxdiff_loss(maps, full, smooth_sigma=-1)
    with pytest.raises(ValueError, match="corner_width .* -2"):
        boxdiff_loss(maps, full, corner_width=-2)


def test_boxdiff_single_cell_box():
    m = Layout.from_pairs([("bird", (0.3, 0.3, 0.32, 0.32))]).masks(8, 8)
    on = maps_from(m[0])
    assert boxdiff_loss(on, m, smooth_sigma=0).item() == pytest.approx(0.0, abs=1e-6)
    assert boxdiff_loss(torch.roll(on, 3, dims=-1), m, smooth_sigma=0).item() > 1.0


# -- SALT --------------------------------------------------------------------------------------------------
def test_salt_loss_reduces_to_layout_guidance():
    torch.manual_seed(0)
    masks = Layout.from_pairs([("a", (0, 0, 0.5, 0.5)), ("b", (0.25, 0.5, 1, 1))]).masks(8, 8)
    maps = torch.rand(2, 2, 8, 8)
    assert torch.equal(salt_loss(maps, masks, reg_weight=0.0), layout_guidance_loss(maps, masks))
    terms = salt_loss_terms(maps, masks)
    assert set(terms) == {"layout", "outside", "unboxed", "total"}
    assert torch.equal(terms["layout"], layout_guidance_loss(maps, masks))
    assert terms["unboxed"].item() == 0.0
    assert torch.allclose(terms["total"], terms["layout"] + terms["outside"])
    assert torch.allclose(salt_loss(maps, masks, reg_weight=2.0), terms["layout"] + 2 * terms["outside"])


def test_salt_outside_term_analytic():
    m = box_mask()  # 16 of 64 cells inside
    n_out = 48
    inside_only = maps_from(m[0] * 0.2)
    assert salt_loss_terms(inside_only, m)["outside"].item() == pytest.approx(0.0)
    # One hot spot outside, as high as the peak inside: (1 / 48) * 1^2.
    spot = m[0] * 0.2
    spot[0, 0] = 0.2
    assert salt_loss_terms(maps_from(spot), m)["outside"].item() == pytest.approx(1 / n_out)
    # Scale-free (peak-normalized).
    assert salt_loss_terms(maps_from(10 * spot), m)["outside"].item() == pytest.approx(1 / n_out)
    # Same outside mass spread over 4 cells at a quarter of the height costs 4 times less.
    spread = m[0] * 0.2
    spread[0, :4] = 0.05
    assert salt_loss_terms(maps_from(spread), m)["outside"].item() == pytest.approx(4 * (0.25**2) / n_out)
    # Everything outside, flat: each outside cell at the peak -> 1.
    assert salt_loss_terms(maps_from(1 - m[0]), m)["outside"].item() == pytest.approx(1.0)


def test_salt_outside_term_sees_hot_spot_that_ratio_barely_sees():
    m = box_mask(16, 16)
    base = m[0] * 1.0
    spot = base.clone()
    spot[0, 0] = 1.0  # 1 cell of 64 inside-cells' worth of mass: in/total stays ~0.985
    layout_gain = layout_guidance_loss(maps_from(spot), m) - layout_guidance_loss(maps_from(base), m)
    outside_gain = (
        salt_loss_terms(maps_from(spot), m)["outside"] - salt_loss_terms(maps_from(base), m)["outside"]
    )
    assert layout_gain.item() < 5e-4
    assert outside_gain.item() > 10 * layout_gain.item()


def test_salt_unboxed_term():
    torch.manual_seed(0)
    m = box_mask()
    maps = torch.rand(2, 1, 8, 8)
    unboxed = torch.rand(2, 3, 8, 8)
    reference = attention_mass(unboxed)
    assert reference.shape == (2, 3)
    kept = salt_loss_terms(maps, m, unboxed_maps=unboxed, unboxed_reference=reference)
    assert kept["unboxed"].item() == pytest.approx(0.0, abs=1e-6)
    # More mass than the reference costs nothing (hinge).
    more = salt_loss_terms(maps, m, unboxed_maps=2 * unboxed, unboxed_reference=reference)
    assert more["unboxed"].item() == 0.0
    # Half the reference mass: relu(1 - 0.5)^2 = 0.25; none left: 1.
    half = salt_loss_terms(maps, m, unboxed_maps=0.5 * unboxed, unboxed_reference=reference)
    assert half["unboxed"].item() == pytest.approx(0.25)
    gone = salt_loss_terms(maps, m, unboxed_maps=0 * unboxed, unboxed_reference=reference)
    assert gone["unboxed"].item() == pytest.approx(1.0)
    # Weighted into the total; a scalar reference broadcasts.
    total = salt_loss(maps, m, unboxed_maps=0.5 * unboxed, unboxed_reference=reference, unboxed_weight=2.0)
    assert torch.allclose(total, half["layout"] + half["outside"] + 0.5)
    scalar = salt_loss_terms(maps, m, unboxed_maps=unboxed, unboxed_reference=float(reference.max()) * 2)
    assert 0.0 < scalar["unboxed"].item() < 1.0


def test_salt_unboxed_gradient_restores_mass():
    m = box_mask()
    maps = maps_from(m[0] * 0.5)
    unboxed = torch.full((1, 2, 8, 8), 0.1, requires_grad=True)
    reference = torch.tensor([[0.2, 0.05]])  # token 0 lost half its mass, token 1 has more than needed
    salt_loss(maps, m, unboxed_maps=unboxed, unboxed_reference=reference).backward()
    assert (unboxed.grad[0, 0] < 0).all()  # descent raises token 0's attention
    assert (unboxed.grad[0, 1] == 0).all()
    # d/dU of (1 - mean(U) / rho)^2 / J: every cell of token 0 gets -2 (1 - 0.5) / (0.2 * 64 * 2)
    torch.testing.assert_close(unboxed.grad[0, 0], torch.full((8, 8), -2 * 0.5 / (0.2 * 64 * 2)))


def test_salt_unboxed_errors():
    m = box_mask()
    maps = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unboxed_reference is required"):
        salt_loss(maps, m, unboxed_maps=torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="without unboxed_maps"):
        salt_loss(maps, m, unboxed_reference=1.0)
    with pytest.raises(ValueError, match=r"unboxed_maps of shape \(1, 2, 4, 4\)"):
        salt_loss(maps, m, unboxed_maps=torch.rand(1, 2, 4, 4), unboxed_reference=1.0)
    with pytest.raises(ValueError, match=r"unboxed_reference of shape \(3,\)"):
        salt_loss(maps, m, unboxed_maps=torch.rand(1, 2, 8, 8), unboxed_reference=torch.ones(3))
    with pytest.raises(ValueError, match="reg_weight"):
        salt_loss(maps, m, reg_weight=-1.0)
    # No unboxed tokens: zero term.
    empty = salt_loss_terms(maps, m, unboxed_maps=torch.rand(1, 0, 8, 8), unboxed_reference=1.0)
    assert empty["unboxed"].item() == 0.0
