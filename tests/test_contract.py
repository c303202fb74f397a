"""The family contract, the same tests on every family's tiny components (issue #20).

SD 1.x (epsilon), SD 2.x (v-prediction), SDXL, SD3 and FLUX (guidance-distilled, embedded
guidance), each a saltdiff pipeline built ``from_pipe`` over diffusers' own pipeline on tiny random
components (the same modules: the comparison is of the loops, not of two copies of the weights):

- **parity**: random init, no guidance, same seed: the image is diffusers' own, bit for bit;
- **callbacks**: called once per step with the tensors diffusers' pipeline hands its callbacks
  (every name its ``_callback_tensor_inputs`` lists), equal to diffusers' at every step;
- **interrupt**: ``pipe._interrupt`` set from a callback stops the loop after that step, as in
  diffusers (the same network calls, the same image), and the next call starts afresh;
- **attention processors** are the same objects after a guided call and after an exception raised
  mid-call from a step callback;
- **recipe**: a :class:`~saltdiff.request.GenerationRequest` with SALT's initialization written into a
  PNG and read back makes the same image (same seed, same bytes); another seed another image.

Family-specific behaviour (SD3's embeds and CFG-less parity, FLUX's true CFG and packed latents,
SDXL's added conditions, UNet samplers) stays in the family's own test file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from saltdiff import GuidanceConfig
from saltdiff.layout import Layout
from saltdiff.request import GenerationRequest, family_guidance_defaults
from saltdiff.samplers import default_sampler

PROMPT = "a cat and a dog"
LAYOUT = [("cat", (0.0, 0.0, 0.5, 1.0)), ("dog", (0.5, 0.0, 1.0, 1.0))]
SIZE = dict(height=32, width=32, num_inference_steps=3)
#: a short guided run: one update on each of the first two steps, always taken
GUIDED = GuidanceConfig(loss="layout-guidance", guidance_steps=2, guidance_iters=1, loss_threshold=0.0)


@dataclass
class Family:
    """A saltdiff pipeline, diffusers' pipeline over the same modules, and the call options both take."""

    name: str
    pipe: object
    base: object
    call: dict = field(default_factory=dict)
    #: whether a layout's capture processors leave the image bit-identical (UNet capture computes the
    #: probabilities explicitly where diffusers' SDPA fuses them: equal up to float error only)
    capture_is_exact: bool = True


def _sd(v_prediction: bool = False):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from saltdiff.pipeline import SaltPipeline
    from saltdiff.testing import tiny_sd_components

    components = tiny_sd_components()
    if v_prediction:  # SD 2.x's 768-v models: the same UNet family, predicting v
        config = components["scheduler"].config
        components["scheduler"] = DDIMScheduler.from_config(config, prediction_type="v_prediction")
    base = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return SaltPipeline.from_pipe(base), base, dict(guidance_scale=7.5)


def _sdxl():
    from saltdiff.pipeline_xl import SaltXLPipeline
    from saltdiff.testing import tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline()
    # diffusers' SDXL default CFG scale is 5, saltdiff's 7.5 on every UNet family: say it
    return SaltXLPipeline.from_pipe(base), base, dict(guidance_scale=5.0)


def _sd3():
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline
    from saltdiff.testing_flow import tiny_sd3_pipeline

    base = tiny_sd3_pipeline()
    return SaltSD3Pipeline.from_pipe(base), base, dict(guidance_scale=2.0, max_sequence_length=16)


def _flux():
    from saltdiff.pipeline_flux import SaltFluxPipeline
    from saltdiff.testing_flow import tiny_flux_pipeline

    base = tiny_flux_pipeline(guidance_embeds=True)  # FLUX.1-dev's embedded guidance, on every call
    return SaltFluxPipeline.from_pipe(base), base, dict(guidance_scale=4.0, max_sequence_length=16)


BUILDERS: dict[str, Callable[[], tuple]] = {
    "sd1-eps": _sd,
    "sd2-v": lambda: _sd(v_prediction=True),
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request) -> Family:
    pipe, base, call = BUILDERS[request.param]()
    for p in (pipe, base):
        p.set_progress_bar_config(disable=True)
    exact = request.param in ("sd3", "flux")
    return Family(request.param, pipe, base, {**SIZE, **call}, capture_is_exact=exact)


def _processors(pipe) -> dict[str, int]:
    return {name: id(p) for name, p in pipe.denoiser.attn_processors.items()}


class Recorder:
    """A step callback that keeps ``(step, timestep, tensors)`` and can raise or interrupt at a step."""

    def __init__(self, *, interrupt_at=None, raise_at=None, halve_latents_at=None):
        self.steps: list[tuple[int, float, dict]] = []
        self.interrupt_at, self.raise_at, self.halve_latents_at = interrupt_at, raise_at, halve_latents_at

    def __call__(self, pipe, i, t, tensors):
        if i == self.raise_at:
            raise RuntimeError(f"stop at step {i}")
        self.steps.append((i, float(t), {k: v.detach().clone() for k, v in tensors.items()}))
        if i == self.interrupt_at:
            pipe._interrupt = True
        return {"latents": tensors["latents"] * 0.5} if i == self.halve_latents_at else {}


class Calls:
    """Counts the forward calls of a module (every branch batch, every guided pass)."""

    def __init__(self, module):
        self.module, self.count = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *a: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _theirs(family: Family, seed: int, **kw):
    return family.base(PROMPT, generator=torch.Generator().manual_seed(seed), **family.call, **kw)


def _ours(family: Family, layout, seed: int, **kw):
    return family.pipe(PROMPT, layout, init="random", guidance="none", seed=seed, **family.call, **kw)


# -- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [None, LAYOUT], ids=["no-layout", "layout-captured"])
def test_random_init_without_guidance_is_diffusers_bit_for_bit(family, layout):
    """With a layout the capture processors run (layout energy is recorded each step): the flow
    families' capture replays the fused attention exactly; the UNet's explicit probabilities are
    equal up to float error."""
    expected = _theirs(family, 1, output_type="np").images
    out = _ours(family, layout, 1, output_type="np")
    assert out.reference_image is None and out.guidance_losses == []
    assert len(out.layout_losses) == (SIZE["num_inference_steps"] if layout else 0)
    if layout is None or family.capture_is_exact:
        assert out.images.tobytes() == expected.tobytes()
    else:
        np.testing.assert_allclose(out.images, expected, rtol=0, atol=1e-5)  # measured: at most 4e-6


# -- callbacks and interrupt ---------------------------------------------------------------------------
def test_step_callbacks_see_diffusers_tensors_once_per_step_and_their_latents_are_used(family):
    """Two images per prompt; every tensor name diffusers' pipeline offers, equal to the ones its
    callbacks get at every step; latents a callback returns replace the loop's, as in diffusers."""
    names = list(type(family.base)._callback_tensor_inputs)
    ours, theirs = Recorder(halve_latents_at=0), Recorder(halve_latents_at=0)
    kw = dict(output_type="latent", num_images_per_prompt=2, callback_on_step_end_tensor_inputs=names)
    expected = _theirs(family, 1, callback_on_step_end=theirs, **kw).images
    out = _ours(family, None, 1, callback_on_step_end=ours, **kw)
    steps = SIZE["num_inference_steps"]
    assert [i for i, _, _ in ours.steps] == list(range(steps))
    assert [t for _, t, _ in ours.steps] == [t for _, t, _ in theirs.steps]
    for (i, _, mine), (_, _, given) in zip(ours.steps, theirs.steps):
        assert sorted(mine) == sorted(names), f"step {i}"
        for name in names:
            assert torch.equal(mine[name], given[name]), f"step {i}: {name}"
    assert torch.equal(out.images, expected)
    plain = _ours(family, None, 1, **{**kw, "callback_on_step_end_tensor_inputs": ["latents"]})
    assert not torch.equal(plain.images, out.images)  # the halved latents were used
    with pytest.raises(ValueError, match="noise"):
        _ours(family, None, 1, callback_on_step_end=ours, callback_on_step_end_tensor_inputs=["noise"])


def test_interrupt_from_a_callback_stops_the_loop_as_in_diffusers(family):
    ours, theirs = Recorder(interrupt_at=0), Recorder(interrupt_at=0)
    with Calls(family.pipe.denoiser) as base_calls:  # from_pipe: diffusers' pipeline shares it
        expected = _theirs(family, 1, output_type="np", callback_on_step_end=theirs).images
    with Calls(family.pipe.denoiser) as calls:
        out = _ours(family, None, 1, output_type="np", callback_on_step_end=ours)
    assert [i for i, _, _ in ours.steps] == [0]
    assert calls.count == base_calls.count == 1  # the first step's batch, nothing after
    assert out.images.tobytes() == expected.tobytes()
    assert family.pipe.interrupt
    with Calls(family.pipe.denoiser) as calls:
        _ours(family, None, 1, output_type="latent")  # the next call starts afresh
    assert not family.pipe.interrupt and calls.count == SIZE["num_inference_steps"]


# -- attention processors --------------------------------------------------------------------------------
def test_attention_processors_come_back_after_a_guided_call_and_after_an_exception(family):
    before = _processors(family.pipe)
    out = family.pipe(
        PROMPT, LAYOUT, init="random", guidance=GUIDED, seed=1, output_type="latent", **family.call
    )
    assert len(out.guidance_losses) == 2  # the guided passes ran
    assert _processors(family.pipe) == before
    with pytest.raises(RuntimeError, match="stop at step 1"):
        family.pipe(
            PROMPT,
            LAYOUT,
            init="random",
            guidance=GUIDED,
            seed=1,
            callback_on_step_end=Recorder(raise_at=1),
            **family.call,
        )
    assert _processors(family.pipe) == before


# -- SALT's start, seeds and the recipe ---------------------------------------------------------------
@pytest.fixture(scope="module")
def salt_request(family) -> GenerationRequest:
    """SALT's full start (objects generated by the pipeline on a gray canvas, inverted), short guidance,
    resolved for the pipeline as ``saltdiff generate`` resolves it before running and writing the
    recipe: the family's guidance defaults (flow: no outside prompt) and the sampler's inversion depth.
    A request saved without that step records the UNet default of ``outside_prompt_steps``."""
    request = GenerationRequest(
        PROMPT,
        Layout.from_pairs(LAYOUT),
        init="salt",
        init_params={"inversion_steps": 2},
        reference_params={"background": "gray", "num_inference_steps": 2, "cache": False},
        guidance=GuidanceConfig(guidance_steps=1, guidance_iters=1),
        num_inference_steps=SIZE["num_inference_steps"],
        guidance_scale=family.call["guidance_scale"],
        seed=1,
        scheduler=default_sampler(family.pipe.scheduler),
        height=SIZE["height"],
        width=SIZE["width"],
    )
    defaults = family_guidance_defaults(
        family.pipe,
        guidance_scale=family.call["guidance_scale"],
        true_cfg_scale=family.call.get("true_cfg_scale", 1.0),
    )
    return dataclasses.replace(request, guidance=request.guidance.with_unset(defaults)).resolved(
        family.pipe.scheduler
    )


def _run(family: Family, request: GenerationRequest):
    extra = {k: v for k, v in family.call.items() if k not in SIZE and k != "guidance_scale"}
    return request.run(family.pipe, output_type="pil", **extra)


def test_a_recipe_read_back_from_the_png_makes_the_same_image(family, salt_request, tmp_path):
    out = _run(family, salt_request)
    assert out.info["init"] == "salt" and out.reference_image is not None
    path = str(tmp_path / "image.png")
    salt_request.save_png(out.images[0], path, model=family.name)
    again = GenerationRequest.from_png(path)
    assert again.recipe(model=family.name) == salt_request.recipe(model=family.name)
    replay = _run(family, again)
    assert np.asarray(replay.images[0]).tobytes() == np.asarray(out.images[0]).tobytes()
    # a seed is a different image under SALT's start too (fresh noise outside the objects)
    other = _run(family, dataclasses.replace(salt_request, seed=2))
    diff = np.abs(np.asarray(other.images[0], dtype=float) - np.asarray(out.images[0], dtype=float))
    assert diff.max() > 10  # in 0..255
    assert (other.init_latent - out.init_latent).abs().mean() > 0.1
