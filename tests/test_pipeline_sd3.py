"""SaltSD3Pipeline on tiny random SD3 components: diffusers parity, guidance, SALT's flow start."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from saltdiff import GuidanceConfig, SpatialAwareInit
from saltdiff.families import guided_denoiser
from saltdiff.flow_inversion import flow_invert, inversion_sigmas
from saltdiff.guidance import OUTSIDE_PROMPT_STEPS
from saltdiff.pipeline_sd3 import SaltSD3Pipeline
from saltdiff.reference import GeneratedObjects
from saltdiff.testing_flow import tiny_sd3_pipeline

PROMPT = "a cat and a dog"
LAYOUT = [("cat", (0.0, 0.0, 0.5, 1.0)), ("dog", (0.5, 0.0, 1.0, 1.0))]
FAST = dict(height=32, width=32, num_inference_steps=3, guidance_scale=2.0, max_sequence_length=16)


@pytest.fixture(scope="module")
def base():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(base):
    pipe = SaltSD3Pipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image() -> Image.Image:
    """Left half red, right half blue: the cat's box and the dog's box filled."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16, 0] = 220
    pixels[:, 16:, 2] = 220
    return Image.fromarray(pixels)


def test_parity_holds_with_embeds_and_without_cfg(base, pipe):
    embeds, negative, pooled, negative_pooled = base.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=True, max_sequence_length=16
    )
    given = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    )
    expected = base(generator=torch.Generator().manual_seed(2), output_type="latent", **given, **FAST).images
    out = pipe(init="random", guidance="none", seed=2, output_type="latent", **given, **FAST)
    assert torch.equal(out.images, expected)
    kw = {**FAST, "guidance_scale": 1.0}
    expected = base(PROMPT, generator=torch.Generator().manual_seed(2), output_type="latent", **kw).images
    assert torch.equal(
        pipe(PROMPT, init="random", guidance="none", seed=2, output_type="latent", **kw).images, expected
    )


def test_guidance_lowers_its_loss_and_changes_the_image(pipe):
    cfg = GuidanceConfig(
        loss="layout-guidance", guidance_steps=1, guidance_iters=3, loss_threshold=0.0, step_size=200.0
    )
    plain = pipe(PROMPT, LAYOUT, init="random", guidance="none", seed=1, output_type="np", **FAST)
    guided = pipe(
        PROMPT,
        LAYOUT,
        init="random",
        guidance=cfg,
        seed=1,
        output_type="np",
        return_attention_maps=True,
        **FAST,
    )
    history = guided.guidance_losses[0]
    assert len(guided.guidance_losses) == 1 and len(history) == 3 and history[-1] < history[0]
    assert np.abs(guided.images - plain.images).max() > 1e-3
    assert guided.attention_maps.shape == (1, 2, 16, 16)
    assert guided.token_indices == [[2, 77 + 1], [5, 77 + 4]]  # CLIP "<bos> a cat and a dog", T5 after 77
    assert guided.info["guidance"]["outside_prompt_steps"] == OUTSIDE_PROMPT_STEPS  # unset, with CFG: on
    assert plain.info["guidance"]["outside_prompt_steps"] == 0  # no loss: plain sampling


def test_without_cfg_the_unset_outside_prompt_is_off(pipe):
    """``boxed-negative`` replaces the negative branch: at ``guidance_scale=1`` there is none, so the
    default is off (recorded as 0) and the call runs (asking for it is refused in one line:
    ``test_refusals_are_one_line``)."""
    no_cfg = {**FAST, "guidance_scale": 1.0}
    out = pipe(PROMPT, LAYOUT, init="random", guidance=GuidanceConfig(guidance_steps=1), seed=1, **no_cfg)
    assert out.info["guidance"]["outside_prompt_steps"] == 0
    assert pipe.guidance_defaults_for(guidance_scale=1.0) == {
        "outside_prompt_steps": 0,
        "guided_prediction": "guided-pass",
    }
    assert pipe.guidance_defaults_for(guidance_scale=2.0) == {"guided_prediction": "guided-pass"}
    assert out.info["guidance"]["guided_prediction"] == "guided-pass"


def test_refusals_are_one_line(pipe):
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(PROMPT, init="random", guidance="none", height=30, width=32)
    with pytest.raises(ValueError, match=r"this SD3 call has none \(it needs guidance_scale > 1\)"):
        no_cfg = {**FAST, "guidance_scale": 1.0}
        pipe(PROMPT, LAYOUT, init="random", guidance=GuidanceConfig(outside_prompt_steps=2), **no_cfg)
    with pytest.raises(ValueError, match="matches no joint-attention layer"):
        pipe(PROMPT, LAYOUT, init="random", guidance=GuidanceConfig(layers="down"), **FAST)
    with pytest.raises(ValueError, match="inversion_noise_scale"):
        pipe(PROMPT, LAYOUT, init=SpatialAwareInit(inversion_noise_scale=0.1), **FAST)
    long_prompt = "a red cat " * 30 + "and a dog"
    with pytest.raises(ValueError, match="more than the text encoder's limit of 77"):
        pipe(long_prompt, [("dog", (0, 0, 1, 1))], init="random", **FAST)
    with pytest.raises(ValueError, match="also pass the prompt"):
        pipe(
            None,
            LAYOUT,
            prompt_embeds=torch.zeros(1, 93, 32),
            pooled_prompt_embeds=torch.zeros(1, 32),
            **FAST,
        )


def test_salt_init_is_the_flow_inversion_of_the_reference(pipe):
    """Without fresh noise the start is exactly the reference, VAE-encoded with SD3's scaling and shift,
    inverted up the sampler's own sigma grid to its first sigma; with it, the seed renews the latent."""
    from saltdiff.reference import UserImages

    def salt(**fields):
        return SpatialAwareInit(reference=UserImages(image=reference_image()), inversion_steps=2, **fields)

    common = dict(layout=LAYOUT, guidance="none", output_type="np", **FAST)
    kept = pipe(PROMPT, init=salt(noise_outside=0.0), seed=1, **common)
    adapter = pipe.family(max_sequence_length=16)
    with torch.no_grad():
        x0 = adapter.encode(pipe.image_processor.preprocess(kept.reference_image))
        grid = inversion_sigmas(pipe.scheduler, 2)
        expected = flow_invert(guided_denoiser(adapter, adapter.conditions("")), x0, grid)
    assert float(grid[-1]) == float(pipe.scheduler.sigmas[0]) == 1.0  # the sampler's first sigma
    assert kept.info["inversion_sigmas"] == [round(float(s), 6) for s in grid]
    torch.testing.assert_close(kept.init_latent, expected, rtol=0, atol=1e-5)
    # the left (red, "cat") and right (blue, "dog") halves of the reference stay apart in the start
    left, right = expected[..., :8].mean((0, 2, 3)), expected[..., 8:].mean((0, 2, 3))
    assert (left - right).abs().max() > 0.05

    a = pipe(PROMPT, init=salt(), seed=1, **common)
    b = pipe(PROMPT, init=salt(), seed=2, **common)
    again = pipe(PROMPT, init=salt(), seed=1, **common)
    assert a.images.tobytes() == again.images.tobytes()
    assert np.abs(a.images - b.images).max() > 0.05
    assert (a.init_latent - expected).abs().mean() > 0.01  # fresh noise where the feathered keep is < 1


def test_midpoint_inversion_is_chosen_by_the_init_and_recorded(pipe):
    """``inversion_method="midpoint"`` runs the midpoint rule on the same grid (so another z_T*, the
    memo keyed apart) and says so in ``info``; a UNet model refuses it in one line."""
    from saltdiff.reference import UserImages

    def salt(method):
        return SpatialAwareInit(
            reference=UserImages(image=reference_image()),
            inversion_steps=2,
            noise_outside=0.0,
            inversion_method=method,
        )

    common = dict(layout=LAYOUT, guidance="none", output_type="np", **FAST)
    euler = pipe(PROMPT, init=salt("euler"), seed=1, **common)
    mid = pipe(PROMPT, init=salt("midpoint"), seed=1, **common)
    adapter = pipe.family(max_sequence_length=16)
    with torch.no_grad():
        x0 = adapter.encode(pipe.image_processor.preprocess(mid.reference_image))
        grid = inversion_sigmas(pipe.scheduler, 2)
        expected = flow_invert(guided_denoiser(adapter, adapter.conditions("")), x0, grid, method="midpoint")
    assert (euler.info["inversion_method"], mid.info["inversion_method"]) == ("euler", "midpoint")
    torch.testing.assert_close(mid.init_latent, expected, rtol=0, atol=1e-5)
    assert (mid.init_latent - euler.init_latent).abs().max() > 1e-3


def test_midpoint_inversion_is_refused_on_a_unet_model():
    from saltdiff import SaltPipeline
    from saltdiff.testing import tiny_sd_components

    unet_pipe = SaltPipeline(
        **tiny_sd_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    with pytest.raises(ValueError, match="inversion_method='midpoint' is for flow models"):
        unet_pipe(
            PROMPT, layout=LAYOUT, init=SpatialAwareInit(inversion_method="midpoint"), num_inference_steps=2
        )


def test_salt_init_with_generated_objects_differs_by_seed_outside_the_objects(pipe):
    init = SpatialAwareInit(
        reference=GeneratedObjects(background="gray", num_inference_steps=2, cache=False), inversion_steps=2
    )
    layout = [("cat", (0.0, 0.0, 0.5, 0.5))]
    a = pipe(PROMPT, layout, init=init, seed=1, output_type="np", **FAST)
    b = pipe(PROMPT, layout, init=init, seed=2, output_type="np", **FAST)
    assert a.reference_image.size == (32, 32) and a.info["init"] == "salt"
    assert len(a.guidance_losses) == 3  # SALT's budget from z_T*: 3 steps of 1 update
    assert np.abs(a.images - b.images).max() > 0.05
    # the far corner (outside the cat's box) is fresh noise: it differs between seeds
    assert (a.init_latent[..., 12:, 12:] - b.init_latent[..., 12:, 12:]).abs().mean() > 0.5


def test_an_unset_inversion_depth_is_the_flow_default(pipe):
    from saltdiff.flow_init import FLOW_INVERSION_STEPS
    from saltdiff.reference import UserImages

    init = SpatialAwareInit(reference=UserImages(image=reference_image()))
    init.inversion_steps = None  # main's registry leaves it unset by default ("as many as fit")
    out = pipe(PROMPT, LAYOUT, init=init, guidance="none", seed=1, output_type="latent", **FAST)
    assert out.info["inversion_steps"] == FLOW_INVERSION_STEPS == len(out.info["inversion_sigmas"]) - 1


def test_unset_object_steps_and_feather_are_the_flow_defaults_in_the_call_and_the_recipe(pipe, monkeypatch):
    from diffusers import DDIMScheduler

    from saltdiff.init import FEATHER, FLOW_FEATHER, FLOW_OBJECT_STEPS
    from saltdiff.layout import Layout
    from saltdiff.reference import OBJECT_STEPS
    from saltdiff.request import GenerationRequest

    steps = []
    real = pipe.generate_objects

    def spy(prompts, *, num_inference_steps, **kw):
        steps.append(num_inference_steps)
        return real(prompts, num_inference_steps=1, **kw)

    monkeypatch.setattr(pipe, "generate_objects", spy)
    init = SpatialAwareInit(reference=GeneratedObjects(background="gray", cache=False), inversion_steps=1)
    assert init.reference.num_inference_steps is None
    out = pipe(PROMPT, LAYOUT, init=init, guidance="none", seed=1, output_type="latent", **FAST)
    assert steps and set(steps) == {FLOW_OBJECT_STEPS}
    # the start kept z_T* with the flow feather: the same call with it spelled out gives the same start
    assert init.feather is None and FLOW_FEATHER != FEATHER
    for feather, same in ((FLOW_FEATHER, True), (FEATHER, False)):
        init_f = dataclasses.replace(init, feather=feather)
        again = pipe(PROMPT, LAYOUT, init=init_f, guidance="none", seed=1, output_type="latent", **FAST)
        assert torch.equal(again.init_latent, out.init_latent) == same
    # the recipe records the value used: 10 on the flow model, 25 on a UNet model, a set one as set
    request = GenerationRequest(prompt=PROMPT, layout=Layout.from_pairs(LAYOUT), scheduler="flow-euler")
    flow = request.resolved(pipe.scheduler)
    assert flow.reference_params["num_inference_steps"] == FLOW_OBJECT_STEPS
    assert flow.init_params["feather"] == FLOW_FEATHER
    unet = GenerationRequest(prompt=PROMPT, layout=Layout.from_pairs(LAYOUT)).resolved(DDIMScheduler())
    assert (
        unet.reference_params["num_inference_steps"] == OBJECT_STEPS
        and unet.init_params["feather"] == FEATHER
    )
    chosen = GenerationRequest(
        prompt=PROMPT,
        layout=Layout.from_pairs(LAYOUT),
        scheduler="flow-euler",
        reference_params={"num_inference_steps": 3},
    )
    assert chosen.resolved(pipe.scheduler).reference_params["num_inference_steps"] == 3


def test_generate_objects_gives_images_and_their_phrase_maps(pipe):
    made = pipe.generate_objects(
        ["a cat", "a dog"],
        phrases=["cat", "dog"],
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
    )
    assert [m.image.shape for m in made] == [(32, 32, 3)] * 2
    assert made[0].attention.shape == (16, 16) and np.isfinite(made[0].attention).all()
    assert not np.array_equal(made[0].image, made[1].image)


def test_a_vp_scheduler_on_the_pipeline_is_refused(base):
    from diffusers import DDIMScheduler

    pipe = SaltSD3Pipeline.from_pipe(base, scheduler=DDIMScheduler())
    with pytest.raises(
        ValueError, match=r"DDIMScheduler is not a flow-matching sampler: SD3 samples with \['flow-euler'\]"
    ):
        pipe(PROMPT, init="random", guidance="none", **FAST)


def test_from_pipe_refuses_another_family(pipe):
    from saltdiff.testing import tiny_sd_pipeline

    with pytest.raises(ValueError, match="SaltSD3Pipeline"):
        SaltSD3Pipeline.from_pipe(tiny_sd_pipeline())


def test_the_boxed_negative_outside_prompt_is_a_third_row_of_the_cfg_batch(pipe):
    """One step by hand: outside the cat's box the boxed phrase's velocity is the negative branch
    (one [negative; conditional; outside] batch, as SD3 batches CFG); inside, the plain step."""
    from saltdiff.families import Conditions

    layout = [("cat", (0.0, 0.0, 0.5, 1.0))]
    kw = dict(init="random", seed=1, output_type="latent", **{**FAST, "num_inference_steps": 1})
    out = pipe(PROMPT, layout, guidance=GuidanceConfig(loss="none", outside_prompt_steps=1), **kw)
    plain = pipe(PROMPT, layout, guidance="none", **kw)
    x, sigma = out.init_latent, float(pipe.scheduler.sigmas[0])
    adapter = pipe.family(max_sequence_length=16)
    with torch.no_grad():
        rows = Conditions.cat(adapter.conditions(""), adapter.conditions(PROMPT), adapter.conditions("a cat"))
        _, u_prompt, u_boxed = adapter.denoise(torch.cat([x] * 3), sigma, rows).chunk(3)
    expected = x + (float(pipe.scheduler.sigmas[1]) - sigma) * (u_boxed + 2.0 * (u_prompt - u_boxed))
    torch.testing.assert_close(out.images[..., 8:], expected[..., 8:], rtol=0, atol=1e-5)
    assert torch.equal(out.images[..., :8], plain.images[..., :8])
    assert (out.images[..., 8:] - plain.images[..., 8:]).abs().max() > 1e-3


def _cfg_velocity(pipe, x, step: int = 0):
    """The CFG velocity (scale 2) of ``PROMPT`` at ``x`` and the step's sigma, and the step's ``dt``."""
    from saltdiff.families import Conditions

    adapter = pipe.family(max_sequence_length=16)
    sigma = float(pipe.scheduler.sigmas[step])
    rows = Conditions.cat(adapter.conditions(""), adapter.conditions(PROMPT))
    with torch.no_grad():
        negative, text = adapter.denoise(torch.cat([x] * 2), sigma, rows).chunk(2)
    return negative + 2.0 * (text - negative), float(pipe.scheduler.sigmas[step + 1]) - sigma


def test_a_guided_pass_prediction_samples_the_step_with_the_update_added(pipe):
    """``guided_prediction="guided-pass"``, one step by hand. The plain step is ``x + dt v(x)``, the
    guided-pass one ``z' + dt v(x)`` (so their difference is the update ``d = z' - x``), the
    "updated" one ``z' + dt v(z')``: it must be the guided-pass one plus ``dt (v(x + d) - v(x))``.
    The guided-pass run also makes one conditional pass fewer."""
    rows: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    kw = dict(init="random", seed=1, output_type="latent", **{**FAST, "num_inference_steps": 1})
    budget = dict(
        loss="layout-guidance",
        guidance_steps=1,
        guidance_iters=1,
        loss_threshold=0.0,
        step_size=200.0,
        outside_prompt_steps=0,
    )
    try:
        plain = pipe(PROMPT, LAYOUT, guidance="none", **kw)
        rows.clear()
        reused = pipe(PROMPT, LAYOUT, guidance=GuidanceConfig(**budget, guided_prediction="guided-pass"), **kw)
        reused_rows = list(rows)
        rows.clear()
        updated = pipe(PROMPT, LAYOUT, guidance=GuidanceConfig(**budget, guided_prediction="updated"), **kw)
    finally:
        hook.remove()
    assert (reused_rows, rows) == ([1, 1], [1, 2])  # [guided pass, negative] against [guided, CFG]
    x = plain.init_latent
    update = reused.images - plain.images
    assert update.abs().max() > 1e-3
    v_x, dt = _cfg_velocity(pipe, x)
    v_updated, _ = _cfg_velocity(pipe, x + update)
    torch.testing.assert_close(updated.images, reused.images + dt * (v_updated - v_x), rtol=0, atol=1e-5)
    assert reused.info["guidance"]["guided_prediction"] == "guided-pass"
    assert len(reused.layout_losses) == 1 and len(reused.guidance_losses) == 1


def test_a_guided_pass_prediction_keeps_the_diagnostics_and_the_outside_prompt(pipe):
    """With a zero step the guided-pass run is the "updated" run (the same latent everywhere): the
    image, the per-step layout energy and the attention maps agree, with the outside prompt's
    third row on (it then runs beside the negative branch only)."""
    kw = dict(init="random", seed=3, output_type="latent", return_attention_maps=True, **FAST)
    budget = dict(guidance_steps=2, guidance_iters=1, loss_threshold=0.0, step_size=0.0, outside_prompt_steps=2)
    reused = pipe(PROMPT, LAYOUT, guidance=GuidanceConfig(**budget, guided_prediction="guided-pass"), **kw)
    updated = pipe(PROMPT, LAYOUT, guidance=GuidanceConfig(**budget, guided_prediction="updated"), **kw)
    torch.testing.assert_close(reused.images, updated.images, rtol=0, atol=1e-5)
    assert len(reused.layout_losses) == 3
    np.testing.assert_allclose(reused.layout_losses, updated.layout_losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reused.attention_maps, updated.attention_maps, rtol=1e-4, atol=1e-6)


def test_a_local_gradient_changes_only_the_update(pipe):
    """``guided_gradient="local"``: the guided pass computes the same loss (same forward), but its
    update differs from the full gradient's; the recipe records the choice."""
    kw = dict(init="random", seed=2, output_type="latent", **FAST)
    budget = dict(guidance_steps=1, guidance_iters=2, loss_threshold=0.0, step_size=200.0, outside_prompt_steps=0)
    plain = pipe(PROMPT, LAYOUT, guidance="none", **kw)
    full = pipe(PROMPT, LAYOUT, guidance=GuidanceConfig(**budget), **kw)
    local = pipe(PROMPT, LAYOUT, guidance=GuidanceConfig(**budget, guided_gradient="local"), **kw)
    assert local.guidance_losses[0][0] == pytest.approx(full.guidance_losses[0][0], rel=1e-5)
    assert (local.images - plain.images).abs().max() > 1e-3
    assert (local.images - full.images).abs().max() > 1e-4
    assert local.info["guidance"]["guided_gradient"] == "local"


def test_no_grad_after_builds_no_graph_past_its_layer_and_restores_the_grad_mode():
    from saltdiff.denoising import no_grad_after

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    seen = {}
    net[0].register_forward_hook(lambda module, args, output: seen.__setitem__("first", output))
    x = torch.randn(2, 3, requires_grad=True)
    with torch.enable_grad():
        with no_grad_after(net, "0"):
            y = net(x)
        assert torch.is_grad_enabled()
        assert seen["first"].requires_grad and not y.requires_grad
        with pytest.raises(RuntimeError, match="boom"), no_grad_after(net, "0"):
            net(x)
            raise RuntimeError("boom")
        assert torch.is_grad_enabled()
