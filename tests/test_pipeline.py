import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saltdiff import GuidanceConfig, Layout, LayoutError, SpatialAwareInit
from saltdiff.pipeline import SaltPipeline, resolve_model
from saltdiff.reference import GeneratedObject, GeneratedObjects, UserImages
from saltdiff.samplers import sampler_start_timestep

PROMPT = "a red circle and a blue square"
LAYOUT = [("red circle", (0.0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1.0, 0.75))]
FAST = dict(num_inference_steps=4, height=32, width=32)


def gray_reference_init(steps=3):
    return SpatialAwareInit(
        reference=GeneratedObjects(background="gray", num_inference_steps=2, cache=False),
        inversion_steps=steps,
    )


@pytest.mark.parametrize("guidance", ["salt", "layout-guidance", "boxdiff", "none"])
def test_every_guidance_runs_and_reports_losses(tiny_pipe, guidance):
    cfg = GuidanceConfig(loss=guidance, guidance_steps=2, guidance_iters=2, loss_threshold=0.0)
    out = tiny_pipe(PROMPT, LAYOUT, init="random", guidance=cfg, seed=0, **FAST)
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (32, 32)
    assert len(out.layout_losses) == 4
    assert all(0.0 <= v <= 1.0 for v in out.layout_losses)
    assert len(out.guidance_losses) == (0 if guidance == "none" else 2)
    assert out.token_indices == [[2, 3], [6, 7]]


def test_guidance_lowers_its_loss_within_a_step(tiny_pipe):
    cfg = GuidanceConfig(
        loss="layout-guidance", guidance_steps=1, guidance_iters=4, loss_threshold=0.0, step_size=200.0
    )
    out = tiny_pipe(PROMPT, LAYOUT, init="random", guidance=cfg, seed=1, **FAST)
    history = out.guidance_losses[0]
    assert len(history) == 4
    assert history[-1] < history[0]


def test_the_images_of_one_batch_differ(tiny_pipe):
    """(Same seed same bytes, another seed another image: tests/test_contract.py, every family.)"""
    kwargs = dict(
        init=gray_reference_init(), guidance=GuidanceConfig(guidance_steps=1, guidance_iters=1), **FAST
    )
    batch = tiny_pipe(PROMPT, LAYOUT, seed=3, output_type="np", num_images_per_prompt=2, **kwargs).images
    assert np.abs(batch[0] - batch[1]).max() > 0.05  # and the images of one batch differ


def test_user_latent_is_used_as_is(tiny_pipe):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = tiny_pipe(PROMPT, LAYOUT, init=z, guidance="none", **FAST)
    assert torch.equal(out.init_latent, z)
    out2 = tiny_pipe(PROMPT, LAYOUT, latents=z, guidance="none", **FAST)
    assert torch.equal(out2.init_latent, z)
    with pytest.raises(ValueError, match="init latent has shape"):
        tiny_pipe(PROMPT, LAYOUT, init=torch.zeros(1, 4, 8, 8), **FAST)


def test_salt_init_returns_reference_and_inverts_to_sampler_start(tiny_pipe):
    timesteps = []
    hook = tiny_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(int(args[1] if len(args) > 1 else kwargs["timestep"])),
        with_kwargs=True,
    )
    try:
        out = tiny_pipe(
            PROMPT,
            LAYOUT,
            init=gray_reference_init(),
            guidance="none",
            seed=0,
            return_attention_maps=True,
            **FAST,
        )
    finally:
        hook.remove()
    assert out.reference_image.size == (32, 32)
    assert out.attention_maps.shape == (1, 2, 16, 16)
    assert out.info["init"] == "salt" and out.info["inversion_steps"] == 3
    # UNet calls: 2 object steps, then 3 inversion steps (DDIM inversion evaluates at each target
    # timestep, the last one being where z_T* is), then the 4 sampling steps from that same timestep
    sampling = [int(t) for t in tiny_pipe.scheduler.timesteps]
    assert len(timesteps) == 2 + 3 + 4 and timesteps[-4:] == sampling
    inversion = timesteps[2:5]
    assert inversion == sorted(inversion) and inversion[-1] == sampling[0] == 751
    assert sampler_start_timestep(tiny_pipe.scheduler, 4) == sampling[0]


@pytest.mark.parametrize(("steps", "depth"), [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (25, 5)])
def test_unset_inversion_steps_follow_the_sampling_steps(tiny_pipe, steps, depth):
    from saltdiff.testing import UNetCalls

    # SD's "leading" 4-step sampler starts at 751, too low for 5 inversion steps of 200: 4 of 250
    reference = Image.new("RGB", (32, 32), (128, 128, 128))
    with UNetCalls(tiny_pipe.unet) as calls:
        out = tiny_pipe(
            PROMPT,
            LAYOUT,
            reference_image=reference,
            guidance="none",
            seed=0,
            output_type="np",
            **{**FAST, "num_inference_steps": steps},
        )
    assert out.info["inversion_steps"] == depth
    assert len(calls.calls) == depth + steps  # the inversion ran that deep, then sampling
    explicit = SpatialAwareInit(reference=UserImages(image=reference), inversion_steps=depth + 1)
    if steps < 5:  # an explicit depth that cannot end at the first timestep keeps its one-line error
        with pytest.raises(ValueError, match=f"inversion_steps={depth + 1} cannot end .* <= {depth} "):
            tiny_pipe(PROMPT, LAYOUT, init=explicit, **{**FAST, "num_inference_steps": steps})


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_the_default_inversion_depth_is_5_at_usual_step_counts(tiny_pipe, spacing, steps):
    from diffusers import DDIMScheduler

    from saltdiff.init import DEFAULT_INVERSION_STEPS

    scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, timestep_spacing=spacing)
    assert SpatialAwareInit().depth(scheduler, steps) == DEFAULT_INVERSION_STEPS == 5
    assert SpatialAwareInit(inversion_steps=2).depth(scheduler, steps) == 2


def test_user_reference_image(tiny_pipe, tmp_path):
    ref = Image.new("RGB", (64, 64), (128, 128, 128))
    path = tmp_path / "ref.png"
    ref.save(path)
    out = tiny_pipe(
        PROMPT, LAYOUT, reference_image=str(path), inversion_steps=2, guidance="none", seed=0, **FAST
    )
    assert out.reference_image.size == (32, 32)
    with pytest.raises(ValueError, match="not found"):
        tiny_pipe(PROMPT, LAYOUT, reference_image=str(tmp_path / "missing.png"), inversion_steps=2, **FAST)


def test_user_object_images_are_pasted_into_boxes(tiny_pipe):
    red = np.full((32, 32, 3), 255, np.uint8)
    red[8:24, 8:24] = (255, 0, 0)
    ref = UserImages(objects={"red circle": Image.fromarray(red), "blue square": Image.fromarray(red)})
    built = ref.build(
        tiny_pipe.object_generator(), PROMPT, Layout.from_pairs(LAYOUT), height=32, width=32, generator=None
    )
    arr = np.asarray(built.image)
    assert built.object_masks[0][12, 4] and not built.object_masks[0][12, 20]
    assert tuple(arr[16, 8]) == (255, 0, 0)
    with pytest.raises(ValueError, match="no object image given"):
        UserImages(objects={"red circle": red}).build(
            tiny_pipe, PROMPT, Layout.from_pairs(LAYOUT), height=32, width=32, generator=None
        )


def test_generated_objects_are_cached(tiny_pipe, tmp_path, monkeypatch):
    builder = GeneratedObjects(background="gray", num_inference_steps=2, cache_dir=str(tmp_path))
    monkeypatch.setattr(type(tiny_pipe), "name_or_path", "tiny-test-model", raising=False)
    layout = Layout.from_pairs(LAYOUT)
    first = builder.build(tiny_pipe.object_generator(), PROMPT, layout, height=32, width=32, generator=None)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    second = builder.build(tiny_pipe.object_generator(), PROMPT, layout, height=32, width=32, generator=None)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))


def test_generated_background_of_a_prompt_made_only_of_boxed_phrases(tiny_pipe):
    # Nothing is left once the phrases are removed: the background is an unconditional sample.
    generator = tiny_pipe.object_generator()
    asked = []

    class Recording:
        identity = generator.identity

        def __call__(self, prompts, **kwargs):
            asked.append(list(prompts))
            return generator(prompts, **kwargs)

    recording = Recording()
    builder = GeneratedObjects(background="generated", num_inference_steps=2, cache=False)
    layout = Layout.from_pairs(LAYOUT)
    built = builder.build(recording, PROMPT, layout, height=32, width=32, generator=None)
    assert asked[0] == [""]  # the background: the empty prompt
    assert asked[1] == ["a red circle on a white background", "a blue square on a white background"]
    (unconditional,) = generator([""], height=32, width=32, num_inference_steps=2, guidance_scale=7.5, seed=0)
    expected = np.clip(unconditional.image, 0, 1)
    outside = ~built.object_masks.any(0)  # what no object covers is that unconditional sample
    assert outside.any()
    pixels = np.asarray(built.image, dtype=np.float32)[outside] / 255
    np.testing.assert_allclose(pixels, expected[outside], atol=1 / 255 + 1e-6)


def test_non_finite_loss_skips_update_and_warns(tiny_pipe, caplog):
    z = torch.full((1, 4, 16, 16), float("nan"))
    with caplog.at_level(logging.WARNING):
        out = tiny_pipe(
            PROMPT, LAYOUT, init=z, guidance=GuidanceConfig(guidance_steps=1), output_type="np", **FAST
        )
    assert "skipping the update" in caplog.text
    assert out.guidance_losses[0] and not np.isfinite(out.guidance_losses[0][0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(layout=[("green dog", (0.1, 0.1, 0.5, 0.5))]), LayoutError, "green dog"),
        (dict(layout=[("red circle", (0.5, 0.1, 0.2, 0.5))]), LayoutError, "red circle"),
        (dict(height=30), ValueError, "height must be a positive multiple of 4"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(guidance="magic"), ValueError, r"unknown guidance loss 'magic'; choose from \['salt'"),
        (dict(init="zeros"), ValueError, r"unknown initializer 'zeros'; choose from \['salt', 'random'\]"),
        (dict(height=0), ValueError, "height must be a positive multiple of 4 for this model, got 0"),
        (dict(width=-8), ValueError, "width must be a positive multiple"),
        (dict(latents=torch.zeros(1, 4, 8, 8), init="random"), ValueError, "either `latents` or `init`"),
        (
            dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"]),
            ValueError,
            r"\['noise_pred'\] are not available; choose from \['latents', 'prompt_embeds'",
        ),
        (dict(output_type="jpeg"), ValueError, "output_type must be one of"),
        (dict(prompt=["a", "b"]), TypeError, "prompt must be a string"),
        (dict(prompt="   "), ValueError, "prompt is empty"),
        (dict(prompt="   ", layout=None, height=30), ValueError, "height"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_pipe, kwargs, error, match):
    args = dict(prompt=PROMPT, layout=LAYOUT, num_inference_steps=2, height=32, width=32)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        tiny_pipe(**args)


def test_from_pretrained_folder_and_builtin_resolution(tiny_pipe, tiny_pipe_dir):
    pipe = SaltPipeline.from_pretrained(tiny_pipe_dir)  # the folder tiny_pipe was saved to
    assert type(pipe) is SaltPipeline
    for name in ("unet", "vae", "text_encoder"):  # the saved weights, not a fresh initialization
        saved = getattr(tiny_pipe, name).state_dict()
        loaded = getattr(pipe, name).state_dict()
        assert loaded.keys() == saved.keys(), name
        assert all(torch.equal(loaded[k], v) for k, v in saved.items()), name
    assert pipe.tokenizer("red circle").input_ids == tiny_pipe.tokenizer("red circle").input_ids
    assert type(pipe.scheduler) is type(tiny_pipe.scheduler)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.scheduler.config) == public(tiny_pipe.scheduler.config)
    images = dict(init="random", guidance="none", seed=0, output_type="np", **FAST)
    np.testing.assert_array_equal(
        pipe(PROMPT, LAYOUT, **images).images, tiny_pipe(PROMPT, LAYOUT, **images).images
    )
    builtin = SaltPipeline.from_pretrained("builtin:shapes")  # shipped fp16, loaded whole in fp32
    assert {builtin.unet.dtype, builtin.text_encoder.dtype, builtin.vae.dtype} == {torch.float32}
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_model("builtin:nope")
    assert (
        resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
        == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def test_spatial_aware_init_validates():
    with pytest.raises(ValueError, match="inversion_steps"):
        SpatialAwareInit(inversion_steps=0)
    with pytest.raises(ValueError, match="inversion_prompt"):
        SpatialAwareInit(inversion_prompt="cat")
    with pytest.raises(ValueError, match="background"):
        GeneratedObjects(background="plaid")
    with pytest.raises(ValueError, match=r"fit must be one of \['stretch', 'contain'\], got 'crop'"):
        UserImages(image="x.png", fit="crop")
    with pytest.raises(ValueError, match="attention_threshold must be a number in"):
        GeneratedObjects(attention_threshold=1.5)


def test_fresh_noise_renews_z_t_outside_or_inside_the_kept_region(tiny_pipe):
    # The random tiny model draws noise: the border-colour cut-out of it is not the whole image (the
    # attention cut-outs take all of it), so the pasted object leaves part of its box uncovered.
    ref = GeneratedObjects(background="gray", num_inference_steps=2, cache=False, cutout="foreground")
    layout = Layout.from_pairs([("red circle", (0.0, 0.0, 0.5, 0.5))])

    def start(seed=0, **knobs):
        init = SpatialAwareInit(reference=ref, inversion_steps=3, **knobs)
        gen = torch.Generator().manual_seed(seed)
        ctx = tiny_pipe.init_context()
        return init(ctx, PROMPT, layout, gen, height=32, width=32, num_inference_steps=4).latents

    plain = start(noise_outside=0.0)
    assert torch.equal(plain, start(seed=5, noise_outside=0.0))  # no fresh noise: the seed does nothing
    outside = start(noise_outside=1.0, keep_region="boxes", feather=0.0)
    assert torch.equal(outside[..., :8, :8], plain[..., :8, :8])  # the box keeps z_T*
    assert not torch.allclose(outside[..., 8:, 8:], plain[..., 8:, 8:])
    assert not torch.allclose(start(seed=1, noise_outside=1.0, keep_region="boxes", feather=0.0), outside)
    assert torch.equal(
        outside, start(noise_outside=1.0, keep_region="boxes", feather=0.0)
    )  # same seed, same z_T
    inside = start(noise_outside=0.0, noise_inside=1.0, keep_region="boxes", feather=0.0)
    assert torch.equal(inside[..., 8:, 8:], plain[..., 8:, 8:]) and not torch.allclose(
        inside[..., :8, :8], plain[..., :8, :8]
    )
    # keep_region="objects": only where the reference pasted an object (not the box's corners)
    objects = start(noise_outside=1.0, keep_region="objects", feather=0.0)
    init = SpatialAwareInit(reference=ref, keep_region="objects", feather=0.0)
    reference = ref.build(tiny_pipe.object_generator(), PROMPT, layout, height=32, width=32, generator=None)
    kept = init.kept_region(layout, reference, (16, 16))
    assert 0 < float(kept.sum()) < 64 and bool((kept == 1).any())  # part of its 8x8-cell box
    assert torch.equal(objects[..., kept == 1], plain[..., kept == 1])
    assert not torch.allclose(objects[..., kept == 0], plain[..., kept == 0])


def test_object_cache_key_changes_when_local_weights_change(tiny_pipe, tiny_pipe_dir, tmp_path, monkeypatch):
    import os

    builder = GeneratedObjects(cache_dir=str(tmp_path))
    monkeypatch.setattr(type(tiny_pipe), "name_or_path", tiny_pipe_dir, raising=False)
    before = builder._cache_path(tiny_pipe.object_generator(), "a red circle", 32, 32)
    weights = next((Path(tiny_pipe_dir) / "unet").glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert builder._cache_path(tiny_pipe.object_generator(), "a red circle", 32, 32) != before


class _FakeObjects:
    """An ObjectGenerator that records its calls: a white image with a centred square, and a radial
    attention map that falls from 1 at the centre to 0 at the corners."""

    identity = None

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, *, phrases=None, height, width, num_inference_steps, guidance_scale, seed):
        self.calls.append(list(prompts))
        image = np.ones((height, width, 3), dtype=np.float32)
        image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (1.0, 0.0, 0.0)
        yy, xx = np.mgrid[:8, :8]
        attention = 1.0 - np.hypot(yy - 3.5, xx - 3.5) / np.hypot(3.5, 3.5)
        return [GeneratedObject(image.copy(), attention.astype(np.float32)) for _ in prompts]


def test_generated_objects_come_in_batches_and_a_repeated_phrase_once():
    fake = _FakeObjects()
    layout = Layout.from_pairs(
        [
            ("red circle", (0, 0, 0.3, 0.3)),
            ("blue square", (0.4, 0, 0.7, 0.3)),
            ("red circle", (0.7, 0.7, 1, 1)),
            ("cat", (0, 0.5, 0.3, 0.8)),
        ]
    )
    GeneratedObjects(batch_size=2, background="white", cache=False).build(
        fake, "x", layout, height=32, width=32, generator=None
    )
    assert fake.calls == [
        ["a red circle on a white background", "a blue square on a white background"],
        ["a cat on a white background"],
    ]


def test_attention_cutout_honours_its_threshold():
    layout = Layout.from_pairs([("red circle", (0.0, 0.0, 1.0, 1.0))])
    red = []  # the cut-out is cropped and stretched to the box: a tighter cut keeps less white border
    for threshold in (0.2, 0.5, 0.8):
        builder = GeneratedObjects(cutout="attention", attention_threshold=threshold, cache=False)
        ref = builder.build(_FakeObjects(), "x", layout, height=32, width=32, generator=None)
        pixels = np.asarray(ref.image)[ref.object_masks[0]]
        red.append(float(((pixels[:, 0] > 200) & (pixels[:, 1] < 60)).mean()))
    assert red[0] < red[1] < red[2]
    foreground = GeneratedObjects(cache=False).build(
        _FakeObjects(), "x", layout, height=32, width=32, generator=None
    )
    assert foreground.object_masks[0].sum() == 32 * 32  # the red square (cropped, stretched to the box)


def test_the_same_layout_with_another_seed_reuses_its_inversion(tiny_pipe_dir, tiny_pipe, tmp_path):
    from saltdiff.init import SpatialAwareInit, inversion_memo_key
    from saltdiff.testing import UNetCalls

    pipe = SaltPipeline.from_pretrained(tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    layout = [("red circle", (0.0, 0.25, 0.5, 0.75))]
    fast = dict(num_inference_steps=4, height=32, width=32, output_type="np", guidance="none")

    def run(init, seed):
        with UNetCalls(pipe.unet) as calls:
            out = pipe("a red circle", layout, init=init, seed=seed, **fast)
        return out, len(calls.calls)

    init = SpatialAwareInit(reference=GeneratedObjects(cache_dir=str(tmp_path)), inversion_steps=2)
    first, calls_first = run(init, 0)  # objects, inversion, sampling
    second, calls_second = run(init, 1)  # objects and z_T* reused: sampling only
    assert calls_second == 4 and calls_first > calls_second + 2
    pipe.inversion_memo.clear()
    fresh, _ = run(init, 1)
    np.testing.assert_array_equal(second.images, fresh.images)  # the reused z_T* is the same
    # anything z_T* depends on misses: other inversion steps, the builder's cache off
    assert run(dataclasses.replace(init, inversion_steps=1), 1)[1] == 4 + 1
    uncached = dataclasses.replace(init, reference=GeneratedObjects(cache=False))
    assert run(uncached, 1)[1] > 4 + 2
    # an in-memory model has no identity: nothing is kept
    assert inversion_memo_key(init, tiny_pipe.init_context(), first.reference_image, "", 4) is None
    assert inversion_memo_key(init, pipe.init_context(), first.reference_image, "", 4) is not None


@pytest.mark.parametrize("field, value", [("guided_prediction", "guided-pass"), ("guided_gradient", "local")])
def test_flow_only_guidance_options_are_refused_on_a_unet_model(tiny_pipe, field, value):
    with pytest.raises(ValueError, match=rf"{field}='{value}' is for flow-matching models"):
        tiny_pipe(
            "a cat and a dog",
            [("cat", (0.0, 0.0, 0.5, 1.0))],
            init="random",
            guidance=GuidanceConfig(**{field: value}),
            num_inference_steps=2,
            height=32,
            width=32,
        )
