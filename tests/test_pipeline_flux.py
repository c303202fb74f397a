"""SaltFluxPipeline on tiny random FLUX components: diffusers parity, guidance, SALT's flow start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from saltdiff import GuidanceConfig, SpatialAwareInit
from saltdiff.families import guided_denoiser
from saltdiff.families.flux import pack_latents, unpack_latents
from saltdiff.flow_inversion import flow_invert, inversion_sigmas
from saltdiff.pipeline_flux import SaltFluxPipeline
from saltdiff.reference import GeneratedObjects, UserImages
from saltdiff.testing_flow import tiny_flux_pipeline

PROMPT = "a cat and a dog"
LAYOUT = [("cat", (0.0, 0.0, 0.5, 1.0)), ("dog", (0.5, 0.0, 1.0, 1.0))]
FAST = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16)
TRUE_CFG = dict(negative_prompt="a red square", true_cfg_scale=2.0)


@pytest.fixture(scope="module", params=[False, True], ids=["schnell-like", "guidance-embeds"])
def base(request):
    pipe = tiny_flux_pipeline(guidance_embeds=request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(base):
    pipe = SaltFluxPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image() -> Image.Image:
    """Left half red, right half blue: the cat's box and the dog's box filled."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16, 0] = 220
    pixels[:, 16:, 2] = 220
    return Image.fromarray(pixels)


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["no-cfg", "true-cfg"])
def test_random_init_without_guidance_is_diffusers_bit_for_bit(base, pipe, cfg):
    """Both transformers (embedded guidance or none), with and without true CFG, the capture
    processors running (layout energy is recorded): still the same bytes. (The family contract,
    tests/test_contract.py, holds the embedded-guidance transformer without a layout and more.)"""
    kw = dict(guidance_scale=4.0, **cfg, **FAST)
    expected = base(PROMPT, generator=torch.Generator().manual_seed(1), output_type="np", **kw).images
    out = pipe(PROMPT, LAYOUT, init="random", guidance="none", seed=1, output_type="np", **kw)
    assert out.images.tobytes() == expected.tobytes()
    assert len(out.layout_losses) == 3 and out.guidance_losses == []
    assert out.reference_image is None and out.init_latent.shape == (1, 16, 16, 16)
    assert out.info["family"] == "flux"
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"FluxAttnProcessor"}


def test_parity_with_embeds_packed_latents_and_joint_attention_kwargs(base, pipe):
    """diffusers' packed ``latents`` in, packed latents out (``output_type="latent"``), given
    embeddings and a ``joint_attention_kwargs`` scale: the same tensors as FluxPipeline."""
    embeds, pooled, _ = base.encode_prompt(PROMPT, None, max_sequence_length=16)
    negative, negative_pooled, _ = base.encode_prompt("a red square", None, max_sequence_length=16)
    given = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        true_cfg_scale=3.0,
        joint_attention_kwargs={"scale": 1.0},
    )
    torch.manual_seed(0)
    start = torch.randn(1, 64, 64)  # 16x16 latent: 8x8 tokens of 2x2x16
    expected = base(latents=start, output_type="latent", **given, **FAST).images
    out = pipe(latents=start, guidance="none", output_type="latent", **given, **FAST)
    assert out.images.shape == (1, 64, 64) and torch.equal(out.images, expected)
    assert out.info["init"] == "tensor"


def test_guidance_lowers_its_loss_and_reads_t5_columns(pipe):
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
    assert guided.token_indices == [[1], [4]]  # T5 pieces "▁a ▁cat ▁and ▁a ▁dog </s>": no BOS, no CLIP block


def test_a_guided_pass_stops_after_its_last_captured_block(pipe):
    """layers = the double block only: the guided pass never reaches the single block or the output
    projection; the three sampling calls do."""
    calls = {"single": 0, "out": 0}
    hooks = [
        pipe.transformer.single_transformer_blocks[0].register_forward_hook(
            lambda *a: calls.__setitem__("single", calls["single"] + 1)
        ),
        pipe.transformer.proj_out.register_forward_hook(
            lambda *a: calls.__setitem__("out", calls["out"] + 1)
        ),
    ]
    cfg = GuidanceConfig(
        loss="layout-guidance",
        guidance_steps=2,
        guidance_iters=1,
        loss_threshold=0.0,
        layers="transformer_blocks",
    )
    try:
        out = pipe(PROMPT, LAYOUT, init="random", guidance=cfg, seed=1, output_type="latent", **FAST)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(out.guidance_losses) == 2
    assert calls == {"single": 3, "out": 3}


def test_refusals_are_one_line(pipe):
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(PROMPT, init="random", guidance="none", height=30, width=32)
    with pytest.raises(ValueError, match="this FLUX call has none \\(it needs true CFG"):
        pipe(PROMPT, LAYOUT, init="random", guidance=GuidanceConfig(outside_prompt_steps=2), **FAST)
    with pytest.raises(ValueError, match="true_cfg_scale=2.0 needs negative_prompt"):
        pipe(PROMPT, init="random", true_cfg_scale=2.0, **FAST)
    with pytest.raises(ValueError, match="negative_prompt has no effect on FLUX with true_cfg_scale=1"):
        pipe(PROMPT, init="random", negative_prompt="blurry", **FAST)
    with pytest.raises(ValueError, match="true_cfg_scale must be"):
        pipe(PROMPT, init="random", true_cfg_scale=0.5, **FAST)
    with pytest.raises(ValueError, match="matches no joint-attention layer"):
        pipe(PROMPT, LAYOUT, init="random", guidance=GuidanceConfig(layers="down"), **FAST)
    with pytest.raises(ValueError, match="inversion_noise_scale"):
        pipe(PROMPT, LAYOUT, init=SpatialAwareInit(inversion_noise_scale=0.1), **FAST)
    with pytest.raises(ValueError, match="past max_sequence_length=4"):
        pipe(PROMPT, [("dog", (0, 0, 1, 1))], init="random", **{**FAST, "max_sequence_length": 4})
    long_prompt = "a red cat " * 30 + "and a dog"  # past CLIP's 77 tokens, not T5's 128: fine on FLUX
    long = pipe(
        long_prompt,
        [("dog", (0, 0, 1, 1))],
        init="random",
        guidance="none",
        **{**FAST, "max_sequence_length": 128},
    )
    assert long.token_indices == [[92]]
    with pytest.raises(ValueError, match="init latent has shape"):
        pipe(PROMPT, latents=torch.zeros(1, 60, 64), **FAST)


def test_salt_init_is_the_flow_inversion_on_the_shifted_sigmas(pipe):
    """Without fresh noise the start is exactly the reference, VAE-encoded with FLUX's scaling and
    shift, inverted up the sampler's own (mu-shifted) sigma grid to its first sigma; with fresh
    noise, seeds 1 and 2 differ and the same seed repeats."""

    def salt(**fields):
        return SpatialAwareInit(reference=UserImages(image=reference_image()), inversion_steps=2, **fields)

    common = dict(layout=LAYOUT, guidance="none", output_type="np", **FAST)
    kept = pipe(PROMPT, init=salt(noise_outside=0.0), seed=1, **common)
    adapter = pipe.family(max_sequence_length=16)
    kwargs = adapter.schedule_kwargs(2, (16, 16))
    with torch.no_grad():
        x0 = adapter.encode(pipe.image_processor.preprocess(kept.reference_image))
        grid = inversion_sigmas(pipe.scheduler, **kwargs)
        expected = flow_invert(guided_denoiser(adapter, adapter.conditions("")), x0, grid)
    unshifted = inversion_sigmas(pipe.scheduler, sigmas=kwargs["sigmas"], mu=0.0)
    assert (grid - unshifted).abs().max() > 1e-3  # FLUX's shift is in the grid
    assert float(grid[-1]) == float(pipe.scheduler.sigmas[0])  # the sampler's first sigma
    assert kept.info["inversion_sigmas"] == [round(float(s), 6) for s in grid]
    torch.testing.assert_close(kept.init_latent, expected, rtol=0, atol=1e-5)
    left, right = expected[..., :8].mean((0, 2, 3)), expected[..., 8:].mean((0, 2, 3))
    assert (left - right).abs().max() > 0.05

    a = pipe(PROMPT, init=salt(), seed=1, **common)
    b = pipe(PROMPT, init=salt(), seed=2, **common)
    again = pipe(PROMPT, init=salt(), seed=1, **common)
    assert a.images.tobytes() == again.images.tobytes()
    assert np.abs(a.images - b.images).max() > 0.05


def test_salt_with_generated_objects_and_true_cfg(pipe):
    """The full SALT run (objects generated by the pipeline, inversion, guidance) with true CFG on:
    the guidance budget from z_T*, the start differs by seed outside the object."""
    init = SpatialAwareInit(
        reference=GeneratedObjects(background="gray", num_inference_steps=2, cache=False), inversion_steps=2
    )
    layout = [("cat", (0.0, 0.0, 0.5, 0.5))]
    a = pipe(PROMPT, layout, init=init, seed=1, output_type="np", **TRUE_CFG, **FAST)
    b = pipe(PROMPT, layout, init=init, seed=2, output_type="np", **TRUE_CFG, **FAST)
    assert a.reference_image.size == (32, 32) and a.info["init"] == "salt"
    assert len(a.guidance_losses) == 3  # SALT's budget from z_T*: 3 steps of 1 update
    assert a.info["guidance"]["outside_prompt_steps"] == 0  # unset: no outside prompt on FLUX
    assert np.abs(a.images - b.images).max() > 0.05
    assert (a.init_latent[..., 12:, 12:] - b.init_latent[..., 12:, 12:]).abs().mean() > 0.5


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


def test_a_vp_scheduler_and_another_family_are_refused(base):
    from diffusers import DDIMScheduler

    from saltdiff.testing_flow import tiny_sd3_pipeline

    pipe = SaltFluxPipeline.from_pipe(base, scheduler=DDIMScheduler())
    with pytest.raises(
        ValueError, match=r"DDIMScheduler is not a flow-matching sampler: FLUX samples with \['flow-euler'\]"
    ):
        pipe(PROMPT, init="random", guidance="none", **FAST)
    with pytest.raises(ValueError, match="SaltFluxPipeline"):
        SaltFluxPipeline.from_pipe(tiny_sd3_pipeline())


def test_packed_latent_output_round_trips_as_init(pipe):
    """``output_type="latent"`` is packed as diffusers returns it, and a packed tensor is a valid
    ``init``: it is unpacked to the same ``[B, 16, h, w]`` start."""
    out = pipe(PROMPT, init="random", guidance="none", seed=3, output_type="latent", **FAST)
    again = pipe(PROMPT, init=out.images, guidance="none", output_type="latent", **FAST)
    torch.testing.assert_close(pack_latents(again.init_latent), out.images, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "cfg"),
    [("boxed-negative", TRUE_CFG), ("without-boxed", {})],
    ids=["boxed-negative", "without-boxed"],
)
def test_the_outside_prompt_replaces_one_branch_outside_the_boxes(pipe, kind, cfg):
    """One step by hand: inside the cat's box the step is the plain one; outside it, the boxed
    phrases' velocity is the true-CFG negative branch ("boxed-negative"), or the prompt without its
    boxed phrases is the conditional branch ("without-boxed", no negative branch needed)."""
    layout = [("cat", (0.0, 0.0, 0.5, 1.0))]
    kw = dict(init="random", seed=1, output_type="latent", **{**FAST, "num_inference_steps": 1}, **cfg)
    outside = GuidanceConfig(loss="none", outside_prompt_steps=1, outside_prompt=kind)
    out = pipe(PROMPT, layout, guidance=outside, **kw)
    plain = pipe(PROMPT, layout, guidance="none", **kw)
    x, sigma = out.init_latent, float(pipe.scheduler.sigmas[0])
    adapter = pipe.family(max_sequence_length=16)
    with torch.no_grad():
        u_prompt = adapter.denoise(x, sigma, adapter.conditions(PROMPT))
        if kind == "boxed-negative":
            u_boxed = adapter.denoise(x, sigma, adapter.conditions("a cat"))
            velocity = u_boxed + 2.0 * (u_prompt - u_boxed)
        else:
            velocity = adapter.denoise(x, sigma, adapter.conditions("a dog"))
    got, untouched = unpack_latents(out.images, (16, 16)), unpack_latents(plain.images, (16, 16))
    expected = x + (float(pipe.scheduler.sigmas[1]) - sigma) * velocity
    torch.testing.assert_close(got[..., 8:], expected[..., 8:], rtol=0, atol=1e-5)
    assert torch.equal(got[..., :8], untouched[..., :8])
    assert (got[..., 8:] - untouched[..., 8:]).abs().max() > 1e-3
    assert out.info["guidance"]["outside_prompt_steps"] == 1


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["no-cfg", "true-cfg"])
def test_a_guided_pass_prediction_with_a_zero_step_is_the_updated_run(pipe, cfg):
    """FLUX calls each branch on its own: with ``guided_prediction="guided-pass"`` the guided pass
    gives the conditional one and only the negative (and outside) branches run again. With a zero
    step that is the "updated" run, layout energy included; with a real step the images differ."""
    kw = dict(init="random", seed=2, output_type="latent", return_attention_maps=True, **FAST, **cfg)
    budget = dict(
        loss="layout-guidance", guidance_steps=2, guidance_iters=1, loss_threshold=0.0, outside_prompt_steps=0
    )
    runs = {
        (prediction, step): pipe(
            PROMPT,
            LAYOUT,
            guidance=GuidanceConfig(**budget, step_size=step, guided_prediction=prediction),
            **kw,
        )
        for prediction in ("updated", "guided-pass")
        for step in (0.0, 200.0)
    }
    torch.testing.assert_close(
        runs["guided-pass", 0.0].images, runs["updated", 0.0].images, rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        runs["guided-pass", 0.0].layout_losses, runs["updated", 0.0].layout_losses, rtol=1e-4, atol=1e-6
    )
    assert (runs["guided-pass", 200.0].images - runs["updated", 200.0].images).abs().max() > 1e-4
    assert (runs["guided-pass", 200.0].images - runs["guided-pass", 0.0].images).abs().max() > 1e-3
