"""The family contract and the SD3 adapter on tiny real components (against diffusers' own pipeline)."""

from __future__ import annotations

import pytest
import torch

from saltdiff.families import Conditions, FamilyAdapter, check_adapter
from saltdiff.families.sd3 import SD3Family
from saltdiff.flow_inversion import flow_invert, inversion_sigmas
from saltdiff.testing_flow import tiny_sd3_pipeline

LENGTH = 16  # T5 tokens per prompt in these tests


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter(pipe):
    return SD3Family(pipe, max_sequence_length=LENGTH)


def test_sd3_adapter_declares_the_contract(adapter):
    assert isinstance(adapter, FamilyAdapter)
    check_adapter(adapter)
    assert (adapter.name, adapter.noise_family, adapter.size_multiple, adapter.latent_channels) == (
        "sd3",
        "flow",
        4,
        16,
    )


def test_check_adapter_names_what_is_missing():
    class NoDenoise:
        name, noise_family, size_multiple, latent_channels = "x", "flow", 8, 4

    with pytest.raises(ValueError, match="NoDenoise"):
        check_adapter(NoDenoise())


def test_denoise_is_the_velocity_the_pipeline_itself_gets(pipe, adapter):
    """Recorded inside a real StableDiffusion3Pipeline call (no CFG): the adapter, given the same latent
    and the scheduler's sigma, returns the same transformer output -- so its timestep is 1000 sigma
    and its conditions are the pipeline's."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone(), output[0].clone()))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(
            "a red cat",
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=1.0,
            max_sequence_length=LENGTH,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    finally:
        handle.remove()
    conditions = adapter.conditions("a red cat")
    assert conditions.embeds.shape == (1, 77 + LENGTH, 32) and conditions.pooled.shape == (1, 32)
    for (latents, timestep, expected), sigma in zip(calls, pipe.scheduler.sigmas):
        assert float(timestep[0]) == pytest.approx(1000 * float(sigma))
        with torch.no_grad():
            velocity = adapter.denoise(latents, float(sigma), conditions)
        torch.testing.assert_close(velocity, expected, rtol=0, atol=1e-6)


def test_denoise_is_a_direct_transformer_call_per_row_sigma(pipe, adapter):
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 8, 8)
    conditions = adapter.conditions(["a red cat", "a blue dog"])
    sigmas = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        got = adapter.denoise(latents, sigmas, conditions)
        direct = pipe.transformer(
            hidden_states=latents,
            timestep=sigmas * 1000,
            encoder_hidden_states=conditions.embeds,
            pooled_projections=conditions.pooled,
        ).sample
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="1 rows for 2 latents"):
        adapter.denoise(latents, 0.5, conditions.rows(slice(0, 1)))


def test_phrase_tokens_index_clip_and_t5_columns(pipe):
    # CLIP: <bos> a red cat -> 3; T5: a red cat </s> -> 2, after CLIP's 77 columns
    assert SD3Family(pipe, max_sequence_length=LENGTH).phrase_tokens("a red cat", "cat") == [3, 77 + 2]
    assert SD3Family(pipe, text_tokens="clip").phrase_tokens("a red cat", "cat") == [3]
    assert SD3Family(pipe, text_tokens="t5").phrase_tokens("a red cat", "red cat") == [78, 79]
    with pytest.raises(ValueError, match="'sd35'"):
        SD3Family(pipe, text_tokens="sd35")


def test_captured_maps_read_the_phrase_columns(adapter):
    conditions = adapter.conditions("a red cat")
    tokens = adapter.phrase_tokens("a red cat", "cat")
    latents = torch.randn(1, 16, 8, 12)
    assert adapter.attention_layers((8, 12)) == {
        "transformer_blocks.0.attn": (4, 6),
        "transformer_blocks.1.attn": (4, 6),
    }
    with torch.no_grad(), adapter.capture() as store:
        adapter.denoise(latents, 0.5, conditions)
        maps = store.phrase_maps([tokens])
        columns = store.maps["transformer_blocks.0.attn"][..., tokens].mean(-1)
    assert maps.shape == (1, 1, 4, 6)
    assert store.maps["transformer_blocks.0.attn"].shape == (1, 24, 77 + LENGTH)
    torch.testing.assert_close(store.phrase_maps_per_layer([tokens])[0].flatten(), columns.flatten())


def test_flow_inversion_runs_on_the_adapter(pipe, adapter):
    conditions = adapter.conditions("a red cat")
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        x0 = adapter.encode(images)
    sigmas = []

    def velocity(x, sigma):
        sigmas.append(sigma)
        return adapter.denoise(x, sigma, conditions)

    grid = inversion_sigmas(pipe.scheduler, 3)
    inverted = flow_invert(velocity, x0, grid, method="midpoint")
    assert inverted.shape == x0.shape == (1, 16, 16, 16) and torch.isfinite(inverted).all()
    assert len(sigmas) == 4 and (inverted - x0).abs().mean() > 0.1


def test_decode_is_the_pipelines_decode_and_encode_its_inverse_scaling(pipe, adapter):
    call = dict(height=32, width=32, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=LENGTH)
    latents = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **call).images
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    with torch.no_grad():
        decoded = adapter.decode(latents)
        torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=1e-5)
        # encode undoes decode's scaling: decode(encode(x)) is the bare VAE's decode(mean)
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        bare = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        torch.testing.assert_close(adapter.decode(adapter.encode(x)), bare, rtol=0, atol=1e-5)


def test_conditions_validate_and_select_rows():
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        Conditions(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        Conditions(torch.zeros(2, 5, 8), torch.zeros(3, 4))
    cond = Conditions(torch.arange(2.0).view(2, 1, 1), torch.arange(2.0).view(2, 1))
    assert cond.rows(slice(1, 2)).embeds.flatten().tolist() == [1.0]
    assert cond.repeat(2).pooled.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_the_existing_guided_update_works_through_the_seam(adapter):
    """guidance.guided_update, unchanged, on the SD3 adapter: the joint-attention store feeds
    layer_losses, the step is scaled by noise.guided_step_scale("flow", sigma), and the loss of
    moving "cat" into the top-left quarter falls at every iteration (measured 0.819 -> 0.730 -> 0.684
    at the default step size 30, sigma 0.8)."""
    from saltdiff.guidance import GuidanceConfig, GuidanceTargets, guided_update
    from saltdiff.layout import Layout
    from saltdiff.noise import guided_step_scale

    layout = Layout.from_pairs([("cat", (0.0, 0.0, 0.5, 0.5))])
    conditions = adapter.conditions("a red cat")
    targets = GuidanceTargets([adapter.phrase_tokens("a red cat", "cat")], lambda h, w: layout.masks(h, w))
    config = GuidanceConfig(guidance_steps=1, guidance_iters=3, loss_threshold=0.0)
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 8, 8)
    sigma = 0.8
    with adapter.capture() as store:
        result = guided_update(
            lambda z: adapter.denoise(z, sigma, conditions),
            latents,
            store,
            targets,
            config,
            guided_step_scale("flow", sigma),
        )
    assert len(result.losses) == 3 and result.losses[0] > result.losses[1] > result.losses[2], result.losses
    assert not result.skipped and (result.latents - latents).abs().max() > 0.1


def test_sd3_schedule_kwargs_give_the_grid_the_pipeline_ran(pipe, adapter):
    pipe(
        "a cat", height=32, width=32, num_inference_steps=3, max_sequence_length=LENGTH, output_type="latent"
    )
    grid = inversion_sigmas(pipe.scheduler, **adapter.schedule_kwargs(3, (16, 16)))
    torch.testing.assert_close(grid, pipe.scheduler.sigmas.flip(0))


def test_sampling_diffusers_pipeline_from_the_inversion_comes_back(pipe, adapter):
    """End to end: invert a latent through the adapter on the grid of adapter.schedule_kwargs, hand it
    to StableDiffusion3Pipeline as ``latents``, sample the same number of steps: back near the start,
    closer with more steps (measured relative error 0.21 at 4 steps, 0.046 at 16, 0.011 at 64). A
    velocity, timestep or grid that differed from the pipeline's would not converge."""
    conditions = adapter.conditions("a red cat")
    torch.manual_seed(0)
    with torch.no_grad():
        x0 = adapter.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    errors = []
    for steps in (4, 16):
        grid = inversion_sigmas(pipe.scheduler, **adapter.schedule_kwargs(steps, (16, 16)))
        inverted = flow_invert(lambda x, s: adapter.denoise(x, s, conditions), x0, grid)
        back = pipe(
            "a red cat",
            latents=inverted,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=1.0,
            max_sequence_length=LENGTH,
            output_type="latent",
        ).images
        errors.append(float((back - x0).norm() / x0.norm()))
    assert errors[1] < 0.08 and errors[1] < errors[0] / 3, errors


def test_guided_denoiser_is_cfg_in_one_batched_call(pipe, adapter):
    from saltdiff.families import guided_denoiser

    conditions, negative = adapter.conditions("a red cat"), adapter.conditions("")
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        cond, uncond = adapter.denoise(x, 0.6, conditions), adapter.denoise(x, 0.6, negative)
        calls = []
        handle = pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: calls.append(k["hidden_states"].shape[0]), with_kwargs=True
        )
        try:
            guided = guided_denoiser(adapter, conditions, negative, 4.0)(x, 0.6)
            plain = guided_denoiser(adapter, conditions)(x, 0.6)
        finally:
            handle.remove()
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, cond, rtol=0, atol=1e-6)
    assert calls == [2, 1]  # [negative; conditional] in one call, then the conditional row alone
    with pytest.raises(ValueError, match="needs negative"):
        guided_denoiser(adapter, conditions, None, 2.0)
    with pytest.raises(ValueError, match="0.5"):
        guided_denoiser(adapter, conditions, negative, 0.5)


def test_conditions_cat_stacks_rows_and_refuses_mismatched_sequences():
    a = Conditions(torch.zeros(1, 5, 8), torch.zeros(1, 4))
    b = Conditions(torch.ones(2, 5, 8), torch.ones(2, 4))
    both = Conditions.cat(a, b)
    assert both.batch == 3 and both.pooled[:, 0].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"\(5, 8\).*\(6, 8\)"):
        Conditions.cat(a, Conditions(torch.zeros(1, 6, 8), torch.zeros(1, 4)))
    with pytest.raises(ValueError, match="pooled"):
        Conditions.cat(a, Conditions(torch.zeros(1, 5, 8)))


def test_without_t5_the_phrase_is_read_in_clip_only():
    """SD3 runs without its T5 encoder (zeros in the T5 columns): 'both' must not point at them."""
    from diffusers import StableDiffusion3Pipeline

    from saltdiff.testing_flow import tiny_sd3_components

    pipe = StableDiffusion3Pipeline(**{**tiny_sd3_components(), "text_encoder_3": None, "tokenizer_3": None})
    assert SD3Family(pipe).phrase_tokens("a red cat", "cat") == [3]
    with pytest.raises(ValueError, match="text_encoder_3=None"):
        SD3Family(pipe, text_tokens="t5")


def test_joint_attention_kwargs_reach_every_transformer_call(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("joint_attention_kwargs")), with_kwargs=True
    )
    try:
        adapter = SD3Family(pipe, max_sequence_length=LENGTH, joint_attention_kwargs={"scale": 1.0})
        with torch.no_grad():
            adapter.denoise(torch.randn(1, 16, 8, 8), 0.5, adapter.conditions("a cat"))
    finally:
        handle.remove()
    assert seen == [{"scale": 1.0}]
    with pytest.raises(ValueError, match="joint_attention_kwargs must be a dict"):
        SD3Family(pipe, joint_attention_kwargs=[("scale", 1.0)])
