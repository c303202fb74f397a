"""diffusers parity on tiny components: prompt_embeds, cross_attention_kwargs, PipelineCallbacks
and num_timesteps, IP-Adapter, LCM's timestep_cond, the safety checker. (Plain sampling, step
callbacks and interrupt are the family contract: tests/test_contract.py, every family.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saltdiff import GuidanceConfig
from saltdiff.pipeline import SaltPipeline
from saltdiff.testing import (
    UNetCalls,
    add_tiny_ip_adapter,
    check_ip_adapter_conditions_sampling,
    tiny_sd_components,
    tiny_sd_pipeline,
)

PROMPT = "a red circle and a blue square"
LAYOUT = [("red circle", (0.0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1.0, 0.75))]
FAST = dict(num_inference_steps=4, height=32, width=32, seed=0, output_type="np")
GUIDED = GuidanceConfig(loss="layout-guidance", guidance_steps=2, guidance_iters=1, loss_threshold=0.0)


def _pipe(**component_overrides):
    """A fresh tiny SaltPipeline (tests here change its components)."""
    pipe = SaltPipeline.from_pipe(tiny_sd_pipeline())
    for name, value in component_overrides.items():
        setattr(pipe, name, value)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompt_embeds_give_the_same_image_as_the_prompt(tiny_pipe):
    embeds, negative = tiny_pipe.encode_prompt(PROMPT, tiny_pipe.device, 1, True, "a cat")
    by_text = tiny_pipe(PROMPT, LAYOUT, init="random", guidance=GUIDED, negative_prompt="a cat", **FAST)
    by_embeds = tiny_pipe(
        PROMPT,
        LAYOUT,
        init="random",
        guidance=GUIDED,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        **FAST,
    )
    np.testing.assert_allclose(by_embeds.images, by_text.images, atol=1e-5)
    # without boxes and with a random start, no prompt text is needed at all
    plain = tiny_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, init="random", **FAST)
    assert plain.images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="also pass the prompt it encodes"):
        tiny_pipe(None, LAYOUT, prompt_embeds=embeds, **FAST)
    with pytest.raises(ValueError, match=r"prompt_embeds must be a \[1, T, D\] tensor"):
        tiny_pipe(PROMPT, LAYOUT, prompt_embeds=embeds[0], **FAST)
    with pytest.raises(ValueError, match="either negative_prompt or negative_prompt_embeds"):
        tiny_pipe(PROMPT, negative_prompt="x", negative_prompt_embeds=negative, **FAST)


def test_cross_attention_kwargs_reach_every_unet_call_and_scale_a_lora():
    from peft import LoraConfig

    reference = _pipe()(PROMPT, LAYOUT, init="random", guidance=GUIDED, **FAST).images
    pipe = _pipe()
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    pipe.unet.add_adapter(lora)
    with UNetCalls(pipe.unet) as calls:
        off = pipe(
            PROMPT, LAYOUT, init="random", guidance=GUIDED, cross_attention_kwargs={"scale": 0.0}, **FAST
        )
    assert len(calls.calls) > 4  # sampling passes plus guided passes
    assert all(c.kwargs.get("cross_attention_kwargs") == {"scale": 0.0} for c in calls.calls)
    np.testing.assert_allclose(off.images, reference, atol=1e-5)  # LoRA at scale 0: the base model
    on = pipe(PROMPT, LAYOUT, init="random", guidance=GUIDED, cross_attention_kwargs={"scale": 1.0}, **FAST)
    assert np.abs(on.images - reference).max() > 1e-3


def test_diffusers_cfg_cutoff_callback_and_num_timesteps():
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = _pipe()
    with UNetCalls(pipe.unet) as calls:
        out = pipe(
            PROMPT,
            LAYOUT,
            init="random",
            guidance="none",
            callback_on_step_end=SDCFGCutoffCallback(0.5),
            **FAST,
        )
    assert pipe.num_timesteps == 4
    batches = [c.batch for c in calls.calls]
    # the callback cuts CFG at the end of step int(4 * 0.5) = 2: conditional rows only afterwards
    assert batches == [2, 2, 2, 1]
    assert np.isfinite(out.images).all()


def test_ip_adapter_conditions_sampling_and_capture_keeps_its_attention():
    pipe = add_tiny_ip_adapter(_pipe())
    image_embeds = check_ip_adapter_conditions_sampling(pipe, PROMPT, LAYOUT, **FAST)
    guided = pipe(
        PROMPT, LAYOUT, ip_adapter_image_embeds=image_embeds, init="random", guidance=GUIDED, **FAST
    )
    assert len(guided.guidance_losses) == 2


def test_ip_adapter_leaves_the_reference_and_its_inversion_alone(tiny_pipe):
    """The UNet refuses calls without image embeddings once an IP-Adapter is loaded: object generation
    and inversion run without the adapter (text alone, as without one), and it is back for sampling."""
    from saltdiff import SpatialAwareInit
    from saltdiff.reference import GeneratedObjects

    pipe = add_tiny_ip_adapter(_pipe())
    image_embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(0))]
    salt = SpatialAwareInit(
        reference=GeneratedObjects(num_inference_steps=2, background="gray", cache=False), inversion_steps=1
    )
    adapted = pipe(PROMPT, LAYOUT, ip_adapter_image_embeds=image_embeds, init=salt, guidance="none", **FAST)
    without = tiny_pipe(PROMPT, LAYOUT, init=salt, guidance="none", **FAST)
    torch.testing.assert_close(adapted.init_latent, without.init_latent)
    assert np.abs(adapted.images - without.images).max() > 1e-3
    assert pipe.unet.encoder_hid_proj is not None
    assert all(hasattr(p, "to_k_ip") for n, p in pipe.unet.attn_processors.items() if "attn2" in n)


def test_lcm_unet_gets_timestep_cond_and_no_cfg_batch():
    components = tiny_sd_components()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(components["unet"].config, time_cond_proj_dim=8)
    pipe = _pipe(unet=unet)
    with UNetCalls(pipe.unet) as calls:
        pipe(PROMPT, LAYOUT, init="random", guidance=GUIDED, guidance_scale=4.0, **FAST)
    assert all(c.batch == 1 for c in calls.calls)  # the guidance scale goes in as w, not as a CFG batch
    conds = [c.kwargs.get("timestep_cond") for c in calls.calls]
    assert all(c is not None and c.shape == (1, 8) for c in conds)
    expected = pipe.get_guidance_scale_embedding(torch.tensor([3.0]), embedding_dim=8)
    torch.testing.assert_close(conds[0], expected)


class FlagEverything(torch.nn.Module):
    """A safety checker that flags every image and blacks it out, as diffusers' does for NSFW ones."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.dummy.device

    @property
    def dtype(self):
        return self.dummy.dtype

    def forward(self, images, clip_input):
        return torch.zeros_like(images), [True] * len(images)


class PixelMean:
    def __call__(self, images, return_tensors="pt"):
        from types import SimpleNamespace

        values = torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) for im in images]))
        return SimpleNamespace(pixel_values=values, to=lambda device: SimpleNamespace(pixel_values=values))


def test_safety_checker_runs_as_in_the_parent_pipeline(tiny_pipe):
    pipe = _pipe()
    pipe.register_modules(safety_checker=FlagEverything(), feature_extractor=PixelMean())
    out = pipe(PROMPT, LAYOUT, init="random", guidance="none", **FAST)
    assert out.nsfw_content_detected == [True]
    assert out.images.max() == 0.0  # blacked out, not denormalized to gray
    assert tiny_pipe(PROMPT, LAYOUT, init="random", guidance="none", **FAST).nsfw_content_detected is None


def test_return_dict_false_gives_images_and_nsfw_flags_as_diffusers_does():
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = _pipe()
    pipe.register_modules(safety_checker=FlagEverything(), feature_extractor=PixelMean())
    reference = Image.new("RGB", (32, 32), (128, 128, 128))  # SALT's start: there is a reference
    salt = dict(reference_image=reference, guidance="none", **FAST)
    output = pipe(PROMPT, LAYOUT, **salt)
    assert output.reference_image is not None and output.nsfw_content_detected == [True]
    images, nsfw = pipe(PROMPT, LAYOUT, return_dict=False, **salt)
    np.testing.assert_array_equal(images, output.images)
    assert nsfw == [True]  # the safety checker's flags, not the reference image
    parent = StableDiffusionPipeline(**pipe.components)
    parent.set_progress_bar_config(disable=True)
    theirs = parent(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np", return_dict=False)
    assert len(theirs) == 2 and theirs[1] == [True]  # diffusers' tuple: (images, nsfw_content_detected)
    plain = _pipe()(PROMPT, LAYOUT, init="random", return_dict=False, **{**FAST, "output_type": "pil"})
    assert len(plain) == 2 and plain[1] is None and plain[0][0].size == (32, 32)  # no checker: None


@pytest.mark.parametrize("mode", ["boxed-negative", "without-boxed"])
def test_outside_prompt_adds_a_row_on_the_first_steps(mode):
    from saltdiff.phrases import boxed_phrases_prompt, strip_phrases

    pipe = _pipe()
    prompt = PROMPT + " on the left"
    guidance = GuidanceConfig(loss="none", outside_prompt_steps=2, outside_prompt=mode)
    with UNetCalls(pipe.unet) as calls:
        pipe(prompt, LAYOUT, init="random", guidance=guidance, **FAST)
    assert [c.batch for c in calls.calls] == [3, 3, 2, 2]  # uncond, cond, outside; then plain CFG
    phrases = [p for p, _ in LAYOUT]
    text = boxed_phrases_prompt(phrases) if mode == "boxed-negative" else strip_phrases(prompt, phrases)
    assert text == ("a red circle and a blue square" if mode == "boxed-negative" else "on the left")
    expected, _ = pipe.encode_prompt(text, pipe.device, 1, False)
    torch.testing.assert_close(calls.calls[0].kwargs["encoder_hidden_states"][2:], expected)


def test_boxed_negative_outside_prompt_replaces_the_negative_prompt_there_and_needs_cfg():
    pipe = _pipe()
    guidance = GuidanceConfig(loss="none", outside_prompt_steps=2)
    with UNetCalls(pipe.unet) as calls:
        pipe(PROMPT, LAYOUT, init="random", guidance=guidance, negative_prompt="black cat", **FAST)
    negative, _ = pipe.encode_prompt("black cat", pipe.device, 1, False)
    torch.testing.assert_close(calls.calls[0].kwargs["encoder_hidden_states"][:1], negative)
    # the same outside row whether the negative prompt came as text or as embeds
    expected, _ = pipe.encode_prompt("a red circle and a blue square", pipe.device, 1, False)
    torch.testing.assert_close(calls.calls[0].kwargs["encoder_hidden_states"][2:], expected)
    # guidance="none" is plain sampling: no outside row
    with UNetCalls(pipe.unet) as calls:
        pipe(PROMPT, LAYOUT, init="random", guidance="none", **FAST)
    assert [c.batch for c in calls.calls] == [2, 2, 2, 2]
    # without CFG there is no negative row to replace: no third row either
    with UNetCalls(pipe.unet) as calls:
        pipe(PROMPT, LAYOUT, init="random", guidance=guidance, **{**FAST, "guidance_scale": 1.0})
    assert [c.batch for c in calls.calls] == [1, 1, 1, 1]


def test_boxed_negative_outside_prompt_is_the_negative_prediction_outside_the_boxes():
    """One step by hand: eps = neg' + s (cond - neg') with neg' = eps(boxed phrases) outside the boxes."""
    from saltdiff.phrases import boxed_phrases_prompt

    pipe = _pipe()
    steps = dict(FAST, num_inference_steps=1)
    guidance = GuidanceConfig(loss="none", outside_prompt_steps=1)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = pipe(
        PROMPT,
        LAYOUT[:1],
        latents=latents.clone(),
        guidance=guidance,
        output_type="latent",
        **{k: v for k, v in steps.items() if k != "output_type"},
    )
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    encode = lambda text: pipe.encode_prompt(text, pipe.device, 1, False)[0]  # noqa: E731
    eps = lambda text: pipe.unet(latents, t, encoder_hidden_states=encode(text)).sample  # noqa: E731
    inside = torch.zeros(16, 16)
    inside[4:12, 0:8] = 1.0  # "red circle" at (0, .25, .5, .75) of 16 x 16 latent cells
    negative = eps("") * inside + eps(boxed_phrases_prompt(["red circle"])) * (1 - inside)
    noise = negative + 7.5 * (eps(PROMPT) - negative)
    expected = pipe.scheduler.step(noise, t, latents).prev_sample
    torch.testing.assert_close(out.images, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["boxed-negative", "without-boxed"])
def test_outside_prompt_changes_nothing_inside_a_box_that_covers_the_image(mode):
    pipe = _pipe()
    whole = [("red circle", (0.0, 0.0, 1.0, 1.0))]
    plain = pipe(PROMPT, whole, init="random", guidance="none", **FAST).images
    regional = pipe(
        PROMPT,
        whole,
        init="random",
        guidance=GuidanceConfig(loss="none", outside_prompt_steps=4, outside_prompt=mode),
        **FAST,
    ).images
    np.testing.assert_allclose(regional, plain, atol=1e-4)
    half = pipe(
        PROMPT,
        LAYOUT[:1],
        init="random",
        guidance=GuidanceConfig(loss="none", outside_prompt_steps=4, outside_prompt=mode),
        **FAST,
    ).images
    assert np.abs(half - pipe(PROMPT, LAYOUT[:1], init="random", guidance="none", **FAST).images).max() > 1e-3


@pytest.mark.parametrize("replaces, outside_row", [("negative", 0.0), ("conditional", 1.0)])
def test_outside_rows_copy_the_image_and_added_conditions_of_the_row_they_replace(replaces, outside_row):
    from saltdiff.denoising import OutsidePrompt, UNetExtras

    pair = torch.tensor([[0.0], [1.0]])  # [negative; conditional]
    extras = UNetExtras(
        image_embeds=[pair], image_embeds_cfg=True, added_cond={"time_ids": pair}, added_cond_cfg=True
    )
    outside = OutsidePrompt(
        torch.zeros(1, 1, 1), lambda h, w: None, 1, {"text_embeds": torch.tensor([[5.0]])}, replaces
    )
    added = extras.kwargs(True, outside)["added_cond_kwargs"]
    assert added["image_embeds"][0].flatten().tolist() == [0.0, 1.0, outside_row]
    assert added["time_ids"].flatten().tolist() == [0.0, 1.0, outside_row]


def test_a_zero_threshold_skips_the_pass_it_would_throw_away():
    pipe = _pipe()
    runs = {}
    for threshold in (0.0, 1e-12):  # both always step on this model; only 0 is known to up front
        guidance = GuidanceConfig(
            guidance_steps=2, guidance_iters=1, loss_threshold=threshold, outside_prompt_steps=0
        )
        with UNetCalls(pipe.unet) as calls:
            out = pipe(PROMPT, LAYOUT, init="random", guidance=guidance, **FAST)
        assert all(loss[0] > 1e-12 for loss in out.guidance_losses)
        runs[threshold] = (out.images, [c.batch for c in calls.calls])
    np.testing.assert_array_equal(runs[0.0][0], runs[1e-12][0])
    # per guided step: [uncond; cond] pass (skipped at 0), gradient pass, [uncond; cond] pass again
    assert runs[1e-12][1] == [2, 1, 2, 2, 1, 2, 2, 2]
    assert runs[0.0][1] == [1, 2, 1, 2, 2, 2]
