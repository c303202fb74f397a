"""The UNet (SD 1.x/2.x) adapter: the VP side of the family contract, against diffusers and saltdiff's own code."""

from __future__ import annotations

import pytest
import torch

from saltdiff import noise as N
from saltdiff.families import check_adapter
from saltdiff.families.unet import UNetFamily
from saltdiff.guidance import step_scale
from saltdiff.inversion import ddim_invert
from saltdiff.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter(pipe):
    return UNetFamily(pipe)


def test_unet_adapter_declares_the_contract(adapter):
    check_adapter(adapter)
    assert (adapter.name, adapter.noise_family, adapter.size_multiple, adapter.latent_channels) == (
        "unet",
        "vp",
        2,
        4,
    )


def test_sdxl_is_refused_by_name():
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        UNetFamily(tiny_sdxl_pipeline())


def test_denoise_at_a_timesteps_sigma_is_the_pipelines_unet_call(pipe, adapter):
    """Recorded inside StableDiffusionPipeline (DDIM, no CFG): at sigma = vp_sigma(alphas_cumprod[t])
    the adapter calls the UNet at t exactly and returns the same epsilon."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((args[0].clone(), args[1], output[0].clone()))  # return_dict=False: a tuple

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(
            "a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="latent"
        )
    finally:
        handle.remove()
    conditions = adapter.conditions("a red cat")
    assert len(calls) == 2
    for latents, t, expected in calls:
        sigma = N.vp_sigma(pipe.scheduler.alphas_cumprod[int(t)].double())
        with torch.no_grad():
            got = adapter.denoise(latents, sigma, conditions)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_vp_inversion_step_through_the_adapter_is_ddim_invert(pipe, adapter):
    """noise.vp_inversion_step with the adapter's epsilon at the target level reproduces inversion.py's
    one-step DDIM inversion (from the clean level alphas_cumprod[0], set_alpha_to_one=False)."""
    torch.manual_seed(0)
    x0 = torch.randn(1, 4, 16, 16)
    conditions = adapter.conditions("a red cat")
    alphas = pipe.scheduler.alphas_cumprod.double()
    t = 999
    with torch.no_grad():
        expected = ddim_invert(
            pipe.unet, pipe.scheduler, x0, conditions.embeds, num_inference_steps=1, end_timestep=t
        )
        eps = adapter.denoise(x0, N.vp_sigma(alphas[t]), conditions)
    got = N.vp_inversion_step(x0.double(), eps.double(), N.vp_sigma(alphas[0]), N.vp_sigma(alphas[t]))
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-4)


def test_layers_grids_and_capture_through_the_adapter(adapter):
    layers = adapter.attention_layers((16, 12))
    assert set(layers.values()) == {(16, 12), (8, 6)}
    conditions = adapter.conditions("a red cat")
    tokens = adapter.phrase_tokens("a red cat", "cat")
    assert tokens == [3]
    with torch.no_grad(), adapter.capture() as store:
        adapter.denoise(torch.randn(1, 4, 16, 12), 2.0, conditions)
        maps = store.phrase_maps_per_layer([tokens])
    assert {name: store.layer_hw[name] for name in store.maps} == {name: layers[name] for name in store.maps}
    assert all(m.shape[:2] == (1, 1) for m in maps)
    assert not adapter.unet._forward_pre_hooks and store.latent_hw == (16, 12)


def test_the_vp_guided_update_through_the_adapter_is_todays_scaling(pipe, adapter):
    """guided_update through the adapter with guided_step_scale("vp", sigma): the same scale as
    guidance.step_scale at that timestep, and the loss falls."""
    from saltdiff.guidance import GuidanceConfig, GuidanceTargets, guided_update
    from saltdiff.layout import Layout

    alphas = pipe.scheduler.alphas_cumprod
    t = 801
    sigma = float(N.vp_sigma(alphas[t].double()))
    scale = N.guided_step_scale("vp", sigma)
    assert scale == pytest.approx(step_scale(N.vp_noise_variance(alphas, t), "sigma"), rel=1e-5)
    layout = Layout.from_pairs([("cat", (0.0, 0.0, 0.5, 0.5))])
    targets = GuidanceTargets([adapter.phrase_tokens("a red cat", "cat")], lambda h, w: layout.masks(h, w))
    conditions = adapter.conditions("a red cat")
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    config = GuidanceConfig(guidance_steps=1, guidance_iters=3, loss_threshold=0.0)
    with adapter.capture() as store:
        result = guided_update(
            lambda z: adapter.denoise(z, sigma, conditions), latents, store, targets, config, scale
        )
    assert result.losses[0] > result.losses[-1], result.losses


def test_decode_is_the_pipelines_decode(pipe, adapter):
    call = dict(height=32, width=32, num_inference_steps=1, guidance_scale=1.0)
    latents = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **call).images
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    with torch.no_grad():
        decoded = (adapter.decode(latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, images, rtol=0, atol=1e-5)
