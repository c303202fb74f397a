"""The FLUX adapter on tiny real components, against what diffusers' own FluxPipeline does."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from saltdiff.families import check_adapter
from saltdiff.families.flux import FluxFamily, image_ids, pack_latents, unpack_latents
from saltdiff.flow_inversion import flow_invert, inversion_sigmas
from saltdiff.testing_flow import tiny_flux_pipeline

LENGTH = 16


@pytest.fixture(scope="module", params=[False, True], ids=["schnell-like", "guidance-embeds"])
def pipe(request):
    pipe = tiny_flux_pipeline(guidance_embeds=request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _recorded_call(pipe, height=32, width=48, steps=2):
    """Run FluxPipeline and record each transformer call's kwargs and output."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append(
            ({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone())
        )

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(
            "a red cat",
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=LENGTH,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    finally:
        handle.remove()
    return calls


def test_pack_unpack_and_ids_are_fluxs_own():
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 6, 8)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, (6, 8)), latents, rtol=0, atol=0)
    # FluxPipeline unpacks from the pixel size: 6x8 latent at vae_scale_factor 2 is a 12x16 image
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 12, 16, 2), latents, rtol=0, atol=0)
    torch.testing.assert_close(
        image_ids((6, 8)), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    )
    with pytest.raises(ValueError, match="5x8"):
        pack_latents(torch.zeros(1, 16, 5, 8))


def test_flux_adapter_declares_the_contract(pipe):
    adapter = FluxFamily(pipe, max_sequence_length=LENGTH)
    check_adapter(adapter)
    assert (adapter.name, adapter.noise_family, adapter.size_multiple, adapter.latent_channels) == (
        "flux",
        "flow",
        4,
        16,
    )


def test_denoise_is_the_velocity_the_pipeline_itself_gets(pipe):
    """Same packed latent, sigma and prompt as inside FluxPipeline: same output (timestep = sigma,
    img_ids on the packed grid, guidance only for a guidance-embeds transformer)."""
    adapter = FluxFamily(pipe, max_sequence_length=LENGTH, guidance_scale=3.5)
    calls = _recorded_call(pipe)
    conditions = adapter.conditions("a red cat")
    assert conditions.embeds.shape == (1, LENGTH, 32) and conditions.pooled.shape == (1, 32)
    assert len(calls) == 2
    for (kwargs, expected), sigma in zip(calls, pipe.scheduler.sigmas):
        assert float(kwargs["timestep"][0]) == pytest.approx(float(sigma))
        assert (kwargs["guidance"] is not None) == pipe.transformer.config.guidance_embeds
        latents = unpack_latents(kwargs["hidden_states"], (16, 24))
        with torch.no_grad():
            velocity = adapter.denoise(latents, float(sigma), conditions)
        torch.testing.assert_close(velocity, unpack_latents(expected, (16, 24)), rtol=0, atol=1e-6)


def test_schedule_kwargs_give_the_grid_the_pipeline_ran(pipe):
    """FLUX's sigmas depend on the image's token count through mu: the inversion grid built from the
    adapter's schedule_kwargs is the sampler's grid of that very call, reversed."""
    adapter = FluxFamily(pipe, max_sequence_length=LENGTH)
    _recorded_call(pipe, height=32, width=48, steps=3)
    ran = pipe.scheduler.sigmas.clone()
    grid = inversion_sigmas(pipe.scheduler, **adapter.schedule_kwargs(3, (16, 24)))
    torch.testing.assert_close(grid, ran.flip(0))
    other = inversion_sigmas(pipe.scheduler, **adapter.schedule_kwargs(3, (64, 64)))
    assert (other - grid).abs().max() > 1e-3  # another size, another mu


def test_phrase_tokens_are_t5_columns_and_capture_reads_them(pipe):
    adapter = FluxFamily(pipe, max_sequence_length=LENGTH)
    tokens = adapter.phrase_tokens("a red cat", "red cat")
    assert tokens == [1, 2]
    conditions = adapter.conditions("a red cat")
    assert set(adapter.attention_layers((8, 12)).values()) == {(4, 6)}
    with torch.no_grad(), adapter.capture() as store:
        adapter.denoise(torch.randn(1, 16, 8, 12), 0.7, conditions)
        maps = store.phrase_maps([tokens])
    assert list(store.maps) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert store.maps["single_transformer_blocks.0.attn"].shape == (1, 24, LENGTH)
    assert maps.shape == (1, 1, 4, 6)
    with pytest.raises(ValueError, match="max_sequence_length=2"):
        FluxFamily(pipe, max_sequence_length=2).phrase_tokens("a red cat", "cat")


def test_sampling_diffusers_pipeline_from_the_inversion_comes_back(pipe):
    """End to end, as for SD3: FluxPipeline takes the inverted latent *packed* as ``latents`` and its
    output packed; the round trip converges (measured 1.6 at 4 steps, 0.47 at 16, 0.12 at 64 on the
    schnell-like tiny model, whose random velocity field is large)."""
    adapter = FluxFamily(pipe, max_sequence_length=LENGTH)
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
            latents=pack_latents(inverted),
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=LENGTH,
            output_type="latent",
        ).images
        errors.append(float((unpack_latents(back, (16, 16)) - x0).norm() / x0.norm()))
    assert errors[1] < errors[0] / 3, errors
