"""SDXL on a tiny SDXL-structured model (two text encoders, text-time added conditioning, random weights):
loading and family detection, added conditioning on every UNet call, phrase tokens with both
tokenizers, the VAE in fp32, the memory-aware default layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saltdiff import GuidanceConfig, SpatialAwareInit
from saltdiff.layout import LayoutError
from saltdiff.phrases import boxed_phrases_prompt, strip_phrases
from saltdiff.pipeline import SaltPipeline
from saltdiff.pipeline_xl import SaltXLPipeline
from saltdiff.reference import GeneratedObjects
from saltdiff.testing import (
    UNetCalls,
    add_tiny_ip_adapter,
    check_ip_adapter_conditions_sampling,
    tiny_sdxl_pipeline,
)

PROMPT = "a red circle and a blue square"
LAYOUT = [("red circle", (0.0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1.0, 0.75))]
FAST = dict(num_inference_steps=3, height=32, width=32, seed=0, output_type="np")
GUIDED = GuidanceConfig(
    loss="salt", guidance_steps=2, guidance_iters=1, loss_threshold=0.0, outside_prompt_steps=0
)
SALT = SpatialAwareInit(
    reference=GeneratedObjects(num_inference_steps=2, background="gray", cache=False), inversion_steps=1
)


@pytest.fixture(scope="module")
def xl_pipe():
    """A SaltXLPipeline over tiny SDXL components (shared; tests must not mutate it)."""
    pipe = SaltXLPipeline.from_pipe(tiny_sdxl_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pooled(pipe, text, n=1):
    return pipe.encode_prompt(text, device="cpu", num_images_per_prompt=n, do_classifier_free_guidance=False)[
        2
    ]


def test_pooled_embeds_and_time_ids_reach_every_unet_call(xl_pipe):
    """Object generation (CFG, one row per object), inversion (empty prompt), sampling (CFG) and the
    guided passes (conditional row, with gradients): each call gets its rows' own pooled embeddings."""
    with UNetCalls(xl_pipe.unet) as recorder:
        out = xl_pipe(PROMPT, LAYOUT, init=SALT, guidance=GUIDED, **FAST)
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    calls = [(c.grad, c.batch, c.kwargs.get("added_cond_kwargs")) for c in recorder.calls]
    assert all(added is not None for _, _, added in calls)
    for _, batch, added in calls:
        assert added["text_embeds"].shape == (batch, 16)
        assert added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch
    objects = [c for c in calls if c[1] == 4]  # two objects under CFG
    inversion = [c for c in calls if c[1] == 1 and not c[0]]
    sampling = [c for c in calls if c[1] == 2]
    guided = [c for c in calls if c[0]]
    assert len(objects) == 2 and len(inversion) == 1 and len(guided) == 2
    assert len(sampling) == 3  # every step once: at threshold 0 only the pass after each update runs
    assert len(calls) == len(objects) + len(inversion) + len(sampling) + len(guided)
    object_prompts = [SALT.reference.object_prompt.format(phrase=p) for p, _ in LAYOUT]
    torch.testing.assert_close(objects[0][2]["text_embeds"][2:], _pooled(xl_pipe, object_prompts))
    assert not objects[0][2]["text_embeds"][:2].any()  # SDXL's zeroed negative for an empty negative prompt
    torch.testing.assert_close(inversion[0][2]["text_embeds"], _pooled(xl_pipe, ""))
    for _, _, added in sampling:
        torch.testing.assert_close(added["text_embeds"][1:], _pooled(xl_pipe, PROMPT))
    for _, _, added in guided:
        torch.testing.assert_close(added["text_embeds"], _pooled(xl_pipe, PROMPT))
    assert len(out.guidance_losses) == 2 and out.token_indices == [[2, 3], [6, 7]]


@pytest.mark.parametrize("mode", ["boxed-negative", "without-boxed"])
def test_outside_prompt_rows_get_the_outside_prompts_pooled_embeds(xl_pipe, mode):
    guidance = GuidanceConfig(loss="none", outside_prompt_steps=1, outside_prompt=mode)
    with UNetCalls(xl_pipe.unet) as recorder:
        xl_pipe(PROMPT + " on grass", LAYOUT, init="random", guidance=guidance, **FAST)
    batches = [c.batch for c in recorder.calls]
    assert batches == [3, 2, 2]  # [uncond; cond; outside] on the first step only
    rows = recorder.calls[0].kwargs["added_cond_kwargs"]["text_embeds"]
    torch.testing.assert_close(rows[1:2], _pooled(xl_pipe, PROMPT + " on grass"))
    outside = strip_phrases(PROMPT + " on grass", ["red circle", "blue square"])
    assert "circle" not in outside and "grass" in outside
    if mode == "boxed-negative":
        outside = boxed_phrases_prompt(["red circle", "blue square"])
    torch.testing.assert_close(rows[2:], _pooled(xl_pipe, outside))


def test_phrase_tokens_with_both_tokenizers(xl_pipe):
    import tempfile

    from saltdiff.testing import TINY_WORDS
    from saltdiff.tokenization import build_clip_tokenizer

    assert xl_pipe._resolve_tokens(xl_pipe_layout(), PROMPT) == [[2, 3], [6, 7]]
    # a second tokenizer that splits "circle" into pieces puts the phrases elsewhere: one clear line
    other = build_clip_tokenizer([w for w in TINY_WORDS if w != "circle"], tempfile.mkdtemp())
    assert len(other(PROMPT).input_ids) > len(xl_pipe.tokenizer(PROMPT).input_ids)
    pipe = SaltXLPipeline.from_pipe(xl_pipe, tokenizer_2=other)
    with pytest.raises(
        LayoutError, match=r"SDXL's two tokenizers put the boxed phrases .* at different token"
    ):
        pipe(PROMPT, LAYOUT, init="random", guidance="none", **FAST)


def xl_pipe_layout():
    from saltdiff.layout import Layout

    return Layout.from_pairs(LAYOUT)


def test_vae_encodes_and_decodes_in_fp32_and_is_restored(xl_pipe):
    pipe = SaltXLPipeline.from_pipe(tiny_sdxl_pipeline()).to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    dtypes = []
    for part in (pipe.vae.encoder, pipe.vae.decoder):
        part.register_forward_pre_hook(lambda m, args: dtypes.append((m is pipe.vae.encoder, args[0].dtype)))
    out = pipe(PROMPT, LAYOUT, init=SALT, guidance="none", **FAST)
    assert np.isfinite(out.images).all()
    assert (True, torch.float32) in dtypes and (False, torch.float32) in dtypes
    assert all(dtype == torch.float32 for _, dtype in dtypes)
    assert pipe.vae.dtype == torch.float16 and pipe.unet.dtype == torch.float16
    # without force_upcast the fp16 VAE runs in fp16
    pipe.vae.register_to_config(force_upcast=False)
    dtypes.clear()
    pipe(PROMPT, LAYOUT, init="random", guidance="none", **FAST)
    assert dtypes == [(False, torch.float16)]


def test_default_layers_are_the_memory_aware_ones(xl_pipe):
    from diffusers import UNet2DConditionModel

    from saltdiff.attention import cross_attention_layers, default_capture_layers
    from saltdiff.testing import SDXL_UNET_CONFIG

    assert default_capture_layers(xl_pipe.unet) == [
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.1.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.1.attn2",
    ]
    with torch.device("meta"):  # the full SDXL UNet's structure, no weights
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    layers = cross_attention_layers(unet)
    default = default_capture_layers(unet)
    assert len(layers) == 70 and sorted(set(layers.values())) == [2, 4]
    assert len(default) == 20 and {layers[name] for name in default} == {4}
    assert [n for n in default if n.startswith("mid_block.")] == [
        f"mid_block.attentions.0.transformer_blocks.{i}.attn2" for i in range(10)
    ]
    assert [n for n in default if n.startswith("up_blocks.")] == [
        f"up_blocks.0.attentions.0.transformer_blocks.{i}.attn2" for i in range(10)
    ]


def test_from_pretrained_load_pipeline_and_cli_detect_sdxl(xl_pipe, tmp_path):
    from saltdiff.checkpoints import weights_stamp
    from saltdiff.cli import main
    from saltdiff.loading import load_pipeline
    from saltdiff.request import read_recipe

    folder = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    pipe = SaltXLPipeline.from_pretrained(str(folder))
    assert type(pipe) is SaltXLPipeline and pipe.text_encoder_2 is not None
    assert type(load_pipeline(str(folder), device="cpu")) is SaltXLPipeline
    # object caches are keyed on both text encoders' weights too
    assert {entry[0].split("/")[0] for entry in weights_stamp(str(folder))} == {
        "unet",
        "text_encoder",
        "text_encoder_2",
    }
    with pytest.raises(
        ValueError, match=r"is a SDXL pipeline .*: not supported; saltdiff runs SDXL with SaltXLPipeline"
    ):
        SaltPipeline.from_pretrained(str(folder))
    out = tmp_path / "xl.png"
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--out", str(out), "--quiet"]
    args += ["--box", "red circle=0,0.25,0.5,0.75", "--box", "blue square=0.5,0.25,1,0.75"]
    args += [
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--object-steps",
        "2",
        "--inversion-steps",
        "1",
    ]
    args += [
        "--guidance-steps",
        "1",
        "--guidance-iters",
        "1",
        "--background",
        "gray",
        "--object-cache",
        "false",
    ]
    assert main(args) == 0
    assert read_recipe(str(out))["init"] == "salt"


def test_from_pipe_checks_the_family(xl_pipe, tiny_pipe):
    from diffusers import StableDiffusionXLPipeline

    assert isinstance(xl_pipe, StableDiffusionXLPipeline)
    with pytest.raises(
        ValueError, match=r"is a SDXL pipeline .*saltdiff runs SDXL with SaltXLPipeline, not SaltPipeline"
    ):
        SaltPipeline.from_pipe(xl_pipe)
    with pytest.raises(
        ValueError, match=r"is a Stable Diffusion 1.x/2.x pipeline .* with SaltPipeline, not SaltXLPipeline"
    ):
        SaltXLPipeline.from_pipe(tiny_pipe)


def test_prompt_embeds_with_pooled_embeds_give_the_same_image_as_the_prompt(xl_pipe, tiny_pipe):
    embeds, negative, pooled, negative_pooled = xl_pipe.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt="a cat"
    )
    by_text = xl_pipe(PROMPT, LAYOUT, init="random", guidance=GUIDED, negative_prompt="a cat", **FAST)
    by_embeds = xl_pipe(
        PROMPT,
        LAYOUT,
        init="random",
        guidance=GUIDED,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        **FAST,
    )
    np.testing.assert_allclose(by_embeds.images, by_text.images, atol=1e-5)
    with pytest.raises(ValueError, match="SDXL needs prompt_embeds and pooled_prompt_embeds together"):
        xl_pipe(PROMPT, init="random", guidance="none", prompt_embeds=embeds, **FAST)
    with pytest.raises(ValueError, match="pooled_prompt_embeds are SDXL's"):
        tiny_pipe(PROMPT, init="random", guidance="none", pooled_prompt_embeds=pooled, **FAST)


def test_guided_passes_stop_after_the_last_captured_layer(xl_pipe, monkeypatch):
    """The gradient step runs the UNet only up to its last captured layer (the rest would only store
    activations): the later blocks never run with gradients, and the image is bit-identical to the one
    made with whole forwards."""
    import contextlib

    import saltdiff.denoising as denoising

    guided_tail = []
    tail = xl_pipe.unet.up_blocks[-1]  # after up_blocks.0.attentions.0, the last default layer
    handle = tail.register_forward_pre_hook(lambda m, args: guided_tail.append(torch.is_grad_enabled()))
    try:
        cut = xl_pipe(PROMPT, LAYOUT, init="random", guidance=GUIDED, **FAST)
        assert guided_tail and not any(guided_tail)
        guided_tail.clear()
        monkeypatch.setattr(denoising, "stop_after", lambda unet, layer: contextlib.nullcontext())
        whole = xl_pipe(PROMPT, LAYOUT, init="random", guidance=GUIDED, **FAST)
        assert any(guided_tail)
    finally:
        handle.remove()
    assert cut.guidance_losses == whole.guidance_losses
    np.testing.assert_array_equal(cut.images, whole.images)


def test_diffusers_sdxl_cfg_cutoff_callback_ends_cfg_with_its_added_conditions(xl_pipe):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    with UNetCalls(xl_pipe.unet) as recorder:
        out = xl_pipe(
            PROMPT,
            LAYOUT,
            init="random",
            guidance="none",
            callback_on_step_end=SDXLCFGCutoffCallback(0.0),
            **FAST,
        )
    # cut at the end of step 0: CFG there, then the conditional rows with their own added conditions
    assert [c.batch for c in recorder.calls] == [2, 1, 1]
    added = [c.kwargs["added_cond_kwargs"] for c in recorder.calls]
    torch.testing.assert_close(added[1]["text_embeds"], added[0]["text_embeds"][1:])
    torch.testing.assert_close(added[2]["time_ids"], added[0]["time_ids"][1:])
    assert np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="add_text_embeds"):  # SD 1.x/2.x has no added conditions
        from saltdiff.pipeline import SaltPipeline
        from saltdiff.testing import tiny_sd_pipeline

        SaltPipeline.from_pipe(tiny_sd_pipeline())(
            PROMPT, LAYOUT, callback_on_step_end=SDXLCFGCutoffCallback(0.0), **FAST
        )


def test_ip_adapter_conditions_sampling_next_to_the_added_conditioning(xl_pipe):
    """A tiny IP-Adapter on SDXL: its image embeddings ride in ``added_cond_kwargs`` next to the pooled
    embeddings and time ids on every sampling call and guided pass; capture keeps its image attention;
    the image changes the result; the reference and its inversion are text alone, as without it."""
    pipe = add_tiny_ip_adapter(SaltXLPipeline.from_pipe(tiny_sdxl_pipeline()))
    pipe.set_progress_bar_config(disable=True)
    image_embeds = check_ip_adapter_conditions_sampling(pipe, PROMPT, LAYOUT, **FAST)

    with UNetCalls(pipe.unet) as recorder:
        out = pipe(PROMPT, LAYOUT, ip_adapter_image_embeds=image_embeds, init=SALT, guidance=GUIDED, **FAST)
    assert len(out.guidance_losses) == 2
    sampling = [c for c in recorder.calls if "image_embeds" in c.kwargs["added_cond_kwargs"]]
    assert (
        len(sampling) == 3 + 2
    )  # every step once (threshold 0: only the pass after each update), the guided passes
    assert len(recorder.calls) - len(sampling) == 2 + 1  # two objects and the inversion: text alone
    for call in sampling:
        added = call.kwargs["added_cond_kwargs"]
        assert added.keys() == {"text_embeds", "time_ids", "image_embeds"}
        rows = image_embeds[0] if call.batch == 2 else image_embeds[0][1:]  # CFG, or the conditional row
        torch.testing.assert_close(added["image_embeds"][0], rows)
    without = xl_pipe(PROMPT, LAYOUT, init=SALT, guidance=GUIDED, **FAST)
    torch.testing.assert_close(out.init_latent, without.init_latent)
    assert np.abs(out.images - without.images).max() > 1e-3
    assert pipe.unet.encoder_hid_proj is not None  # the adapter is back after the reference
    assert all(hasattr(p, "to_k_ip") for n, p in pipe.unet.attn_processors.items() if "attn2" in n)
