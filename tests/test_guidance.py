"""Attention guidance: the guided update against an independently computed gradient, clipping,
step-size schedules, the non-finite skip, the unboxed-token path, the config and its registry.

Most tests drive :func:`guided_update` with :class:`FakeUNet`, a differentiable stand-in that
writes cross-attention probabilities into a real :class:`AttentionStore` the way the capture
processor does. The same maps are computed a second time, without the store, by
:func:`oracle_maps`, so every expected value below (losses, gradients, updates) is derived
independently of ``layer_losses`` and ``phrase_maps_per_layer``.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from saltdiff import losses as L
from saltdiff.attention import AttentionStore, capture_cross_attention
from saltdiff.guidance import GuidanceConfig, GuidanceTargets, guided_update, layer_losses, step_scale
from saltdiff.layout import Layout
from saltdiff.registry import GUIDANCE_LOSSES, Entry, Param
from saltdiff.testing import tiny_sd_components

CHANNELS, TOKENS = 4, 6
LAYER_SIZES = {"fine": (8, 8), "coarse": (4, 4)}
LAYOUT = Layout.from_pairs([("a", (0.0, 0.0, 0.5, 0.5)), ("b", (0.5, 0.25, 1.0, 1.0))])
BOXED = [[1], [2, 3]]  # phrase "b" spans two tokens
UNBOXED = [0, 5]
STEP, SCALE = 3.0, 0.7


class _InfGrad(torch.autograd.Function):
    """Identity whose backward is infinite (a stand-in for an overflowing fp16 backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def _probs(z: torch.Tensor, proj: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, h, w, T]`` softmax over tokens of a linear map of the pooled latent."""
    x = F.adaptive_avg_pool2d(z.float(), hw)
    return torch.einsum("bchw,ct->bhwt", x, proj).softmax(-1)


class FakeUNet:
    """``unet_fn`` of :func:`guided_update`: records ``[B, 1 head, h*w, T]`` maps of two layers."""

    def __init__(
        self, store: AttentionStore, seed: int = 0, nan_from_call: int | None = None, inf_grad=False
    ):
        self.store = store
        self.proj = torch.randn(CHANNELS, TOKENS, generator=torch.Generator().manual_seed(seed))
        self.nan_from_call = nan_from_call
        self.inf_grad = inf_grad
        self.calls = 0

    def __call__(self, z: torch.Tensor) -> None:
        if self.inf_grad:
            z = _InfGrad.apply(z)
        for name, (h, w) in LAYER_SIZES.items():
            probs = _probs(z, self.proj, (h, w))
            if self.nan_from_call is not None and self.calls >= self.nan_from_call:
                probs = probs * float("nan")
            self.store.maps[name] = probs.reshape(z.shape[0], 1, h * w, TOKENS)
            self.store.layer_hw[name] = (h, w)
        self.calls += 1


def oracle_maps(z: torch.Tensor, proj: torch.Tensor, groups) -> list[torch.Tensor]:
    """Per layer, ``[B, K, h, w]``: each group's token probabilities averaged, without the store."""
    out = []
    for h, w in LAYER_SIZES.values():
        p = _probs(z, proj, (h, w))
        out.append(torch.stack([p[..., g].mean(-1) for g in groups], dim=1))
    return out


def oracle_loss(z, proj, loss=L.salt_loss, reference=None, **params) -> torch.Tensor:
    """Mean over layers of ``loss`` on :func:`oracle_maps`, with the unboxed term when ``reference``."""
    total = 0.0
    boxed = oracle_maps(z, proj, BOXED)
    unboxed = oracle_maps(z, proj, [[i] for i in UNBOXED]) if reference is not None else [None] * len(boxed)
    for k, (maps, unb) in enumerate(zip(boxed, unboxed)):
        masks = LAYOUT.masks(*maps.shape[-2:])
        if unb is None:
            total = total + loss(maps, masks, **params)
        else:
            total = total + loss(maps, masks, unboxed_maps=unb, unboxed_reference=reference[k], **params)
    return total / len(boxed)


def oracle_step(z, proj, step=STEP, scale=SCALE, **kwargs):
    """``(loss(z), grad, z - step * scale * grad)``."""
    z = z.detach().requires_grad_(True)
    loss = oracle_loss(z, proj, **kwargs)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.item(), grad, (z - step * scale * grad).detach()


def _latents(seed=0):
    return torch.randn(1, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(seed))


def _targets(unboxed=()):
    return GuidanceTargets(BOXED, LAYOUT.masks, list(unboxed))


def _config(**kwargs):
    kwargs.setdefault("loss_threshold", 0.0)
    kwargs.setdefault("step_size", STEP)
    return GuidanceConfig(**kwargs)


def _run(config, z, unet=None, store=None, targets=None, scale=SCALE):
    store = store or AttentionStore()
    unet = unet or FakeUNet(store)
    return guided_update(unet, z, store, targets or _targets(), config, scale), unet, store


# -- guided_update ---------------------------------------------------------------------------------
def test_one_iteration_is_minus_step_size_times_scale_times_the_gradient():
    torch.manual_seed(0)
    z = _latents()
    result, unet, store = _run(_config(guidance_iters=1), z)
    loss, grad, expected = oracle_step(z, unet.proj, reg_weight=0.5)
    assert grad.norm() > 1e-3  # the update below is not trivially zero
    torch.testing.assert_close(result.latents, expected, rtol=1e-5, atol=1e-6)
    assert result.losses == [pytest.approx(loss, rel=1e-5)]
    assert result.skipped is False and unet.calls == 1
    assert store.maps == {}  # the autograd graph of the last forward is released
    assert not result.latents.requires_grad and torch.equal(z, _latents())  # the input is untouched


def test_iterations_follow_gradient_descent_and_the_loss_decreases():
    torch.manual_seed(0)
    z = _latents()
    result, unet, _ = _run(_config(guidance_iters=4, loss="layout-guidance", step_size=30.0), z)
    expected, history = z, []
    for _ in range(4):
        loss, _, expected = oracle_step(expected, unet.proj, step=30.0, loss=L.layout_guidance_loss)
        history.append(loss)
    assert unet.calls == 4 and len(result.losses) == 4  # guidance_iters caps the iterations
    assert result.losses == pytest.approx(history, rel=1e-4)
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-5)
    assert all(b < a for a, b in zip(result.losses, result.losses[1:]))
    final = oracle_loss(result.latents, unet.proj, loss=L.layout_guidance_loss).item()
    assert final < 0.5 * result.losses[0]  # measured 0.44 -> 0.14


def test_scale_and_step_size_multiply_the_update():
    torch.manual_seed(0)
    z = _latents()
    base = _run(_config(guidance_iters=1), z, scale=1.0)[0].latents - z
    doubled = _run(_config(guidance_iters=1), z, scale=2.0)[0].latents - z
    tripled = _run(_config(guidance_iters=1, step_size=3 * STEP), z, scale=1.0)[0].latents - z
    assert base.abs().max() > 1e-2
    torch.testing.assert_close(doubled, 2 * base, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tripled, 3 * base, rtol=1e-4, atol=1e-6)


def test_early_stop_below_loss_threshold():
    torch.manual_seed(0)
    z = _latents()
    proj = FakeUNet(AttentionStore()).proj
    h0, _, z1 = oracle_step(z, proj, reg_weight=0.5)
    h1, _, z2 = oracle_step(z1, proj, reg_weight=0.5)
    h2 = oracle_loss(z2, proj, reg_weight=0.5).item()
    assert h0 > h1 > h2
    # stop once the loss of the current latent is below the threshold: two updates, three losses
    result, unet, store = _run(_config(guidance_iters=10, loss_threshold=(h1 + h2) / 2), z)
    assert len(result.losses) == 3 and unet.calls == 3
    assert store.maps == {}  # the graph of the last forward is released on an early stop too
    assert result.losses == pytest.approx([h0, h1, h2], rel=1e-4)
    torch.testing.assert_close(result.latents, z2, rtol=1e-4, atol=1e-5)
    assert result.skipped is False
    # already below the threshold: no update at all
    result, unet, _ = _run(_config(guidance_iters=10, loss_threshold=h0 + 1.0), z)
    assert len(result.losses) == 1 and unet.calls == 1
    assert torch.equal(result.latents, z)
    # no iterations: no UNet call
    result, unet, _ = _run(_config(guidance_iters=0), z)
    assert result.losses == [] and unet.calls == 0 and torch.equal(result.latents, z)


def test_latent_dtype_is_kept():
    torch.manual_seed(0)
    z = _latents().double()
    result, unet, _ = _run(_config(guidance_iters=1), z)
    assert result.latents.dtype == torch.float64
    torch.testing.assert_close(result.latents.float(), oracle_step(z.float(), unet.proj, reg_weight=0.5)[2])


# -- gradient clipping -----------------------------------------------------------------------------
def test_max_grad_norm_caps_the_update_norm():
    torch.manual_seed(0)
    z = _latents()
    proj = FakeUNet(AttentionStore()).proj
    _, grad, unclipped = oracle_step(z, proj, reg_weight=0.5)
    norm = grad.norm().item()

    clipped = _run(_config(guidance_iters=1, max_grad_norm=norm / 4), z)[0].latents - z
    assert clipped.norm().item() == pytest.approx(STEP * SCALE * norm / 4, rel=1e-5)
    torch.testing.assert_close(clipped, -STEP * SCALE * grad / 4, rtol=1e-5, atol=1e-7)  # same direction

    loose = _run(_config(guidance_iters=1, max_grad_norm=norm * 4), z)[0].latents
    torch.testing.assert_close(loose, unclipped, rtol=1e-5, atol=1e-6)


# -- step-size schedules ---------------------------------------------------------------------------
def test_step_scale_schedules():
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    from saltdiff.noise import vp_noise_variance, vp_schedule

    alphas = vp_schedule(scheduler)
    for t in (0, 1, 500, 981, 999):
        variance = vp_noise_variance(alphas, t)
        assert step_scale(variance, "sigma") == pytest.approx(1.0 - alphas[t].item(), rel=1e-6)
        assert vp_noise_variance(alphas, torch.tensor(t)) == variance
        assert vp_noise_variance(alphas, t + 0.4) == variance  # Euler-type float timesteps round
        assert step_scale(variance, "constant") == 1.0
    # noisier timesteps take larger steps: 1 - alpha_bar rises from ~0.001 to ~0.995
    assert vp_noise_variance(alphas, 0) < 0.002 and vp_noise_variance(alphas, 999) > 0.99


# -- non-finite skip -------------------------------------------------------------------------------
@pytest.mark.parametrize("nan_from_call", [0, 1], ids=["first-iteration", "after-an-update"])
def test_nan_loss_skips_the_whole_step(caplog, nan_from_call):
    torch.manual_seed(0)
    z = _latents()
    store = AttentionStore()
    unet = FakeUNet(store, nan_from_call=nan_from_call)
    with caplog.at_level(logging.WARNING, logger="saltdiff.guidance"):
        result, _, _ = _run(_config(guidance_iters=5), z, unet=unet, store=store)
    assert result.skipped is True
    assert torch.equal(result.latents, z)  # the input latent, not a partially updated one
    assert len(result.losses) == nan_from_call + 1 and math.isnan(result.losses[-1])
    assert unet.calls == nan_from_call + 1 and store.maps == {}
    assert any(r.levelname == "WARNING" and "guidance loss is nan" in r.getMessage() for r in caplog.records)


def test_infinite_gradient_skips_the_step(caplog):
    torch.manual_seed(0)
    z = _latents()
    store = AttentionStore()
    unet = FakeUNet(store, inf_grad=True)
    with caplog.at_level(logging.WARNING, logger="saltdiff.guidance"):
        result, _, _ = _run(_config(guidance_iters=5), z, unet=unet, store=store)
    assert result.skipped is True and torch.equal(result.latents, z)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0]) and unet.calls == 1
    assert any(
        r.levelname == "WARNING" and "gradient is not finite" in r.getMessage() for r in caplog.records
    )


# -- unboxed tokens --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loss", "params", "needed"),
    [
        ("salt", {"unboxed_weight": 0.5}, True),
        ("salt", {"unboxed_weight": 0.0}, False),
        ("salt", {}, False),
        ("layout-guidance", {}, False),
        ("boxdiff", {"topk_fraction": 0.5}, False),
        ("none", {}, False),
    ],
)
def test_needs_unboxed_tokens(loss, params, needed):
    assert GuidanceConfig(loss=loss, loss_params=params).needs_unboxed_tokens is needed


def test_layer_losses_passes_unboxed_maps_and_a_reference_captured_once():
    torch.manual_seed(0)
    store = AttentionStore()
    unet = FakeUNet(store)
    z = _latents().requires_grad_(True)  # as in guided_update: the maps carry a graph
    unet(z)
    calls = []

    def spy(maps, masks, unboxed_maps=None, unboxed_reference=None):
        calls.append((maps, masks, unboxed_maps, unboxed_reference))
        return maps.sum() * 0 + len(calls)

    references: list[torch.Tensor] = []
    value = layer_losses(store, _targets(UNBOXED), spy, references)
    assert value.item() == pytest.approx((1 + 2) / 2)  # mean over the two layers
    expected_unboxed = oracle_maps(z, unet.proj, [[i] for i in UNBOXED])
    assert len(references) == 2 and len(calls) == 2
    for (maps, masks, unboxed, ref), boxed, unb, ref_k in zip(
        calls, oracle_maps(z, unet.proj, BOXED), expected_unboxed, references
    ):
        torch.testing.assert_close(maps, boxed)
        torch.testing.assert_close(unboxed, unb)
        assert torch.equal(masks, LAYOUT.masks(*boxed.shape[-2:]))
        assert ref is ref_k and not ref.requires_grad
        torch.testing.assert_close(ref, L.attention_mass(unb))

    # a later iteration reuses the references, although the maps moved
    first = [r.clone() for r in references]
    calls.clear()
    store.reset()
    unet(z + 3.0 * torch.randn_like(z))
    layer_losses(store, _targets(UNBOXED), spy, references)
    assert len(references) == 2 and all(torch.equal(a, b) for a, b in zip(references, first))
    assert all(c[3] is r for c, r in zip(calls, references))
    assert not torch.allclose(L.attention_mass(calls[0][2]), references[0])

    # without a list, the reference is the current mass; without unboxed tokens, no extra arguments
    calls.clear()
    layer_losses(store, _targets(UNBOXED), spy)
    torch.testing.assert_close(calls[0][3], L.attention_mass(calls[0][2]))
    assert calls[0][2].requires_grad and not calls[0][3].requires_grad
    calls.clear()
    layer_losses(store, _targets(), spy, references)
    assert all(c[2] is None and c[3] is None for c in calls)


def test_guided_update_keeps_the_first_iterations_unboxed_reference():
    torch.manual_seed(0)
    z = _latents()
    params = {"reg_weight": 0.5, "unboxed_weight": 20.0}
    config = _config(guidance_iters=3, step_size=10.0, loss_params=params)
    assert config.needs_unboxed_tokens
    result, unet, _ = _run(config, z, targets=_targets(UNBOXED))

    reference = [L.attention_mass(m) for m in oracle_maps(z, unet.proj, [[i] for i in UNBOXED])]
    expected, remeasured, history = z, [], []
    for _ in range(3):
        current = [L.attention_mass(m) for m in oracle_maps(expected, unet.proj, [[i] for i in UNBOXED])]
        remeasured.append(oracle_loss(expected, unet.proj, reference=current, **params).item())
        loss, _, expected = oracle_step(expected, unet.proj, step=10.0, reference=reference, **params)
        history.append(loss)
    assert result.losses == pytest.approx(history, rel=1e-4)
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-5)
    # the guard is active: the unboxed mass fell below the first iteration's reference (measured
    # +0.018 at the third iteration); a reference re-measured at every iteration would not see it
    assert history[2] - remeasured[2] > 1e-2


# -- the config ------------------------------------------------------------------------------------
def test_loss_fn_forwards_the_registered_params():
    torch.manual_seed(0)
    maps, masks = torch.rand(2, 2, 8, 8), LAYOUT.masks(8, 8)
    unboxed, ref = torch.rand(2, 2, 8, 8), torch.full((2, 2), 0.8)
    salt = GuidanceConfig(loss_params={"reg_weight": 2.0, "unboxed_weight": 3.0}).loss_fn()
    expected = L.salt_loss(
        maps, masks, reg_weight=2.0, unboxed_maps=unboxed, unboxed_reference=ref, unboxed_weight=3.0
    )
    torch.testing.assert_close(salt(maps, masks, unboxed, ref), expected)
    torch.testing.assert_close(salt(maps, masks), L.salt_loss(maps, masks, reg_weight=2.0))
    default = GuidanceConfig().loss_fn()  # registered default 0.5, not salt_loss's own 1.0
    torch.testing.assert_close(default(maps, masks), L.salt_loss(maps, masks, reg_weight=0.5))
    boxdiff = GuidanceConfig(loss="boxdiff", loss_params={"topk_fraction": 0.6}).loss_fn()
    torch.testing.assert_close(boxdiff(maps, masks), L.boxdiff_loss(maps, masks, topk_fraction=0.6))
    assert not torch.allclose(boxdiff(maps, masks), L.boxdiff_loss(maps, masks))
    layout = GuidanceConfig(loss="layout-guidance").loss_fn()
    torch.testing.assert_close(layout(maps, masks, unboxed, ref), L.layout_guidance_loss(maps, masks))
    with pytest.raises(ValueError, match="'none' has no loss function"):
        GuidanceConfig(loss="none").loss_fn()


def test_enabled():
    assert GuidanceConfig().enabled
    assert not GuidanceConfig(loss="none").enabled
    assert not GuidanceConfig(guidance_steps=0).enabled
    assert not GuidanceConfig(guidance_iters=0).enabled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(step_size=-1.0), r"guidance: step_size must be a number >= 0, got -1\.0"),
        (dict(step_size=float("nan")), r"step_size .*nan"),
        (
            dict(loss="nope"),
            r"unknown guidance loss 'nope'; choose from \['salt', 'layout-guidance', 'boxdiff'",
        ),
        (dict(loss=3), "guidance loss must be a name, got 3"),
        (
            dict(loss_params={"reg_wieght": 1.0}),
            r"guidance loss 'salt': unknown option\(s\) \['reg_wieght'\]; valid: \['reg_weight', 'unboxed_weight'\]",
        ),
        (dict(loss="layout-guidance", loss_params={"reg_weight": 1.0}), r"\['reg_weight'\]; valid: none"),
        (dict(loss_params={"reg_weight": -0.5}), r"reg_weight must be a number >= 0, got -0\.5"),
        (
            dict(loss="boxdiff", loss_params={"topk_fraction": 0.0}),
            r"topk_fraction must be .*\(0, 1\], got 0\.0",
        ),
        (dict(loss_params=[("reg_weight", 1.0)]), "loss_params must be a mapping, got list"),
        (
            dict(step_size_schedule="linear"),
            r"step_size_schedule must be one of \['sigma', 'constant'\], got 'linear'",
        ),
        (dict(guidance_iters=2.5), r"guidance_iters must be an integer >= 0 \(or None\), got 2\.5"),
        (dict(guidance_steps=-1), "guidance_steps must be an integer >= 0 \\(or None\\), got -1"),
        (dict(loss_threshold=-0.1), r"loss_threshold .*-0\.1"),
        (dict(max_grad_norm=0.0), r"max_grad_norm must be a number > 0 \(or None\), got 0\.0"),
        (dict(layers=""), "layers must be a selector string"),
    ],
)
def test_config_errors_name_the_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceConfig(**kwargs)


def test_to_dict_lists_every_field_with_resolved_loss_params():
    assert GuidanceConfig().to_dict() == {
        "loss": "salt",
        "guidance_steps": None,
        "guidance_iters": None,
        "step_size": 30.0,
        "step_size_schedule": "sigma",
        "loss_threshold": None,
        "outside_prompt_steps": 10,
        "outside_prompt": "boxed-negative",
        "guided_prediction": "updated",
        "guided_gradient": "full",
        "placed_unboxed": "guide",
        "layers": "default",
        "max_grad_norm": None,
        "loss_params": {"reg_weight": 0.5, "unboxed_weight": 0.0},
    }


def test_an_unset_budget_follows_the_start_and_a_set_one_is_kept():
    from_reference = GuidanceConfig().for_start(True)
    assert (from_reference.guidance_steps, from_reference.guidance_iters, from_reference.loss_threshold) == (
        3,
        1,
        0.0,
    )
    from_noise = GuidanceConfig().for_start(False)
    assert (from_noise.guidance_steps, from_noise.guidance_iters, from_noise.loss_threshold) == (10, 5, 0.2)
    mixed = GuidanceConfig(guidance_steps=7, loss_threshold=0.1).for_start(True)
    assert (mixed.guidance_steps, mixed.guidance_iters, mixed.loss_threshold) == (7, 1, 0.1)
    assert (
        GuidanceConfig.from_dict(from_noise.to_dict()).to_dict() == from_noise.to_dict()
    )  # recipes keep the numbers
    assert GuidanceConfig(guidance_steps=0).enabled is False and GuidanceConfig().enabled is True


@pytest.mark.parametrize(
    "config",
    [
        GuidanceConfig(
            guidance_steps=3,
            guidance_iters=2,
            step_size=7.5,
            step_size_schedule="constant",
            loss_threshold=0.05,
            layers=("mid_block.attentions.0.transformer_blocks.0.attn2", "up"),
            max_grad_norm=1.5,
            loss_params={"unboxed_weight": 2.0},
        ),
        GuidanceConfig(loss="boxdiff", layers="x2", loss_params={"topk_fraction": 0.4}),
        GuidanceConfig(loss="layout-guidance"),
    ],
    ids=["salt", "boxdiff", "layout-guidance"],
)
def test_dict_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    back = GuidanceConfig.from_dict(data)
    assert back.to_dict() == config.to_dict()
    assert back.params == config.params and back.layers == config.layers
    assert isinstance(back.layers, type(config.layers))  # a JSON list of layers comes back as a tuple


def test_the_outside_prompt_is_on_by_default_with_a_loss_and_off_without_one():
    assert GuidanceConfig().outside_steps == 10
    assert GuidanceConfig(loss="none").outside_steps == 0  # guidance="none" stays plain sampling
    assert GuidanceConfig(loss="none", outside_prompt_steps=3).outside_steps == 3  # asked for: honoured
    assert GuidanceConfig(outside_prompt_steps=0).outside_steps == 0
    assert GuidanceConfig(loss="none").to_dict()["outside_prompt_steps"] == 0  # recipes hold the number
    with pytest.raises(ValueError, match=r"outside_prompt_steps must be an integer >= 0 \(or None\), got -1"):
        GuidanceConfig(outside_prompt_steps=-1)


def test_from_dict_reads_recipes_from_before_the_outside_prompt_kinds():
    # an outside prompt used to be the prompt without its boxed phrases, the only kind there was
    assert GuidanceConfig.from_dict({"outside_prompt_steps": 3}).outside_prompt == "without-boxed"
    assert GuidanceConfig.from_dict({"outside_prompt_steps": 0}).outside_prompt == "boxed-negative"
    assert GuidanceConfig.from_dict({}).outside_prompt == "boxed-negative"


def test_from_dict_reads_legacy_flat_keys():
    old = {
        "loss": "salt",
        "reg_weight": 0.2,
        "unboxed_weight": 1.0,
        "boxdiff_topk_fraction": 0.3,
        "step_size": 5.0,
    }
    config = GuidanceConfig.from_dict(old)
    assert config.params == {"reg_weight": 0.2, "unboxed_weight": 1.0} and config.step_size == 5.0
    assert config.needs_unboxed_tokens
    boxdiff = GuidanceConfig.from_dict({"loss": "boxdiff", "boxdiff_topk_fraction": 0.3, "reg_weight": 0.5})
    assert boxdiff.params == {"topk_fraction": 0.3}
    assert GuidanceConfig.from_dict({"reg_weight": 0.1}).params == {"reg_weight": 0.1, "unboxed_weight": 0.0}
    # loss_params wins over a legacy key; a bad legacy value is still checked
    both = GuidanceConfig.from_dict({"reg_weight": 0.1, "loss_params": {"reg_weight": 0.9}})
    assert both.params["reg_weight"] == 0.9
    with pytest.raises(ValueError, match=r"reg_weight must be a number >= 0, got -1"):
        GuidanceConfig.from_dict({"reg_weight": -1})
    with pytest.raises(ValueError, match=r"unknown guidance option\(s\) \['step'\]; valid: .*'step_size'"):
        GuidanceConfig.from_dict({"step": 1.0})


# -- adding a loss: one function, one registration ------------------------------------------------
def _outside_share(maps, masks, *, power):
    """Mean over boxes of (share of a phrase's attention outside its box) ** power."""
    inside = (maps * masks).sum((-2, -1)) / maps.sum((-2, -1))
    return ((1.0 - inside) ** power).mean()


@pytest.fixture
def toy_loss():
    GUIDANCE_LOSSES.register(
        Entry(
            "toy-outside",
            _outside_share,
            "share of attention outside the box, to a power",
            params=(Param("power", 2.0, "exponent of the outside share", minimum=1),),
        )
    )
    try:
        yield "toy-outside"
    finally:
        GUIDANCE_LOSSES.unregister("toy-outside")
    assert "toy-outside" not in GUIDANCE_LOSSES


def test_a_registered_loss_drives_guided_update(toy_loss):
    torch.manual_seed(0)
    config = _config(loss=toy_loss, loss_params={"power": 3.0}, guidance_iters=1)
    assert config.params == {"power": 3.0} and not config.needs_unboxed_tokens
    assert GuidanceConfig.from_dict(config.to_dict()).params == {"power": 3.0}
    z = _latents()
    result, unet, _ = _run(config, z)
    loss, _, expected = oracle_step(z, unet.proj, loss=_outside_share, power=3.0)
    assert result.losses == [pytest.approx(loss, rel=1e-5)]
    torch.testing.assert_close(result.latents, expected, rtol=1e-5, atol=1e-6)
    squared = oracle_step(z, unet.proj, loss=_outside_share, power=2.0)[2]
    assert not torch.allclose(result.latents, squared)  # the param reached the loss
    with pytest.raises(
        ValueError, match=r"guidance loss 'toy-outside': power must be a number >= 1, got 0\.5"
    ):
        GuidanceConfig(loss=toy_loss, loss_params={"power": 0.5})
    with pytest.raises(ValueError, match=r"valid: \['power'\]"):
        GuidanceConfig(loss=toy_loss, loss_params={"reg_weight": 0.5})


# -- the real tiny UNet ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    components = tiny_sd_components()
    prompt = "a red circle and a blue square"
    layout = Layout.from_pairs([("red circle", (0.0, 0.0, 0.5, 0.5)), ("blue square", (0.5, 0.5, 1.0, 1.0))])
    tokenizer = components["tokenizer"]
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        embeds = components["text_encoder"](ids.input_ids)[0]
    targets = GuidanceTargets(layout.resolve_tokens(tokenizer, prompt), layout.masks)
    return components["unet"], embeds, targets


def test_guided_update_on_the_tiny_unet(tiny):
    unet, embeds, targets = tiny
    torch.manual_seed(0)
    z = torch.randn(1, 4, 16, 16)
    t, step = 801, 1e3  # the random tiny UNet's maps are nearly flat: gradient norm 0.024

    def unet_fn(latents):
        unet(latents, t, encoder_hidden_states=embeds)

    with capture_cross_attention(unet) as store:
        # the gradient, computed independently of guided_update / layer_losses
        x = z.clone().requires_grad_(True)
        unet_fn(x)
        per_layer = store.phrase_maps_per_layer(targets.token_indices)
        loss = sum(L.salt_loss(m, targets.layout_masks(*m.shape[-2:]), reg_weight=0.5) for m in per_layer)
        (grad,) = torch.autograd.grad(loss / len(per_layer), x)
        store.reset()

        one = guided_update(unet_fn, z, store, targets, _config(guidance_iters=1, step_size=step), 0.5)
        several = guided_update(unet_fn, z, store, targets, _config(guidance_iters=4, step_size=step), 0.5)
    assert grad.norm() > 1e-2
    torch.testing.assert_close(one.latents, z - step * 0.5 * grad, rtol=1e-4, atol=1e-5)
    assert one.losses[0] == pytest.approx((loss / len(per_layer)).item(), rel=1e-5)
    assert len(several.losses) == 4 and all(b < a for a, b in zip(several.losses, several.losses[1:]))
    assert several.losses[-1] < 0.95 * several.losses[0]  # measured 0.754 -> 0.656


def test_a_flow_model_gets_its_own_budget_from_a_reference_only():
    from saltdiff.guidance import GuidanceConfig
    from saltdiff.registry import FLOW_GUIDANCE_BUDGETS, GUIDANCE_BUDGETS

    flow_ref = GuidanceConfig().for_start(True, flow=True)
    assert (flow_ref.guidance_steps, flow_ref.guidance_iters) == (
        FLOW_GUIDANCE_BUDGETS["reference"]["guidance_steps"],
        FLOW_GUIDANCE_BUDGETS["reference"]["guidance_iters"],
    ) != (GUIDANCE_BUDGETS["reference"]["guidance_steps"], GUIDANCE_BUDGETS["reference"]["guidance_iters"])
    assert GuidanceConfig().for_start(False, flow=True) == GuidanceConfig().for_start(False)
    assert GuidanceConfig(guidance_steps=2).for_start(True, flow=True).guidance_steps == 2  # a set value stays
