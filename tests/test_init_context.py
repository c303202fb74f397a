"""Initializers get an ``InitContext``, never the pipeline; the z_T* memo is the pipeline's own ``InversionMemo``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DiffusionPipeline

from saltdiff.init import InitResult, RandomInit, SpatialAwareInit
from saltdiff.init_context import INVERSION_MEMO_SIZE, InitContext, InversionMemo
from saltdiff.pipeline import SaltPipeline
from saltdiff.reference import GeneratedObjects

PROMPT = "a red circle and a blue square"
LAYOUT = [("red circle", (0.0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1.0, 0.75))]
FAST = dict(num_inference_steps=4, height=32, width=32, guidance="none", output_type="np")


# -- the memo ------------------------------------------------------------------------------------------
def test_the_memo_keeps_its_last_entries_and_hands_out_copies():
    memo = InversionMemo(size=2)
    runs = []

    def compute(value):
        def run():
            runs.append(value)
            return torch.full((1, 4, 2, 2), float(value))

        return run

    first = memo.get_or_compute("a", compute(1))
    first.add_(100)  # what the caller does with its tensor does not reach the kept one
    again = memo.get_or_compute("a", compute(99))
    assert runs == [1] and torch.equal(again, torch.full((1, 4, 2, 2), 1.0))
    again.add_(100)
    assert torch.equal(memo.get_or_compute("a", compute(99)), torch.full((1, 4, 2, 2), 1.0))
    memo.get_or_compute("b", compute(2))
    memo.get_or_compute("a", compute(99))  # "a" used last: "b" is the oldest
    memo.get_or_compute("c", compute(3))
    assert len(memo) == 2 and "a" in memo and "c" in memo and "b" not in memo
    assert runs == [1, 2, 3]
    memo.get_or_compute(None, compute(4))  # no key: run, nothing kept
    memo.get_or_compute(None, compute(5))
    assert runs == [1, 2, 3, 4, 5] and len(memo) == 2
    memo.clear()
    assert len(memo) == 0
    memo.get_or_compute("a", compute(6))
    assert runs[-1] == 6
    assert InversionMemo().size == INVERSION_MEMO_SIZE
    with pytest.raises(ValueError, match="size must be an integer >= 0, got -1"):
        InversionMemo(size=-1)


def test_every_pipeline_owns_its_memo(tiny_pipe):
    memo = tiny_pipe.inversion_memo
    assert isinstance(memo, InversionMemo) and tiny_pipe.inversion_memo is memo
    other = SaltPipeline.from_pipe(tiny_pipe)
    assert other.inversion_memo is not memo and len(other.inversion_memo) == 0
    assert tiny_pipe.init_context().memo is memo


def test_the_same_layout_with_another_seed_inverts_once_until_cleared(tiny_pipe_dir, tmp_path, monkeypatch):
    pipe = SaltPipeline.from_pretrained(tiny_pipe_dir)  # a folder: the model has an identity
    pipe.set_progress_bar_config(disable=True)
    inversions = []
    invert = SpatialAwareInit._invert

    def counting(self, *args, **kwargs):
        inversions.append(1)
        return invert(self, *args, **kwargs)

    monkeypatch.setattr(SpatialAwareInit, "_invert", counting)
    init = SpatialAwareInit(
        reference=GeneratedObjects(num_inference_steps=2, cache_dir=str(tmp_path)), inversion_steps=2
    )
    first = pipe(PROMPT, LAYOUT, init=init, seed=0, **FAST)
    second = pipe(PROMPT, LAYOUT, init=init, seed=1, **FAST)
    assert len(inversions) == 1 and len(pipe.inversion_memo) == 1
    assert not torch.equal(first.init_latent, second.init_latent)  # fresh noise outside the objects
    pipe.inversion_memo.clear()
    assert len(pipe.inversion_memo) == 0
    third = pipe(PROMPT, LAYOUT, init=init, seed=1, **FAST)
    assert len(inversions) == 2 and len(pipe.inversion_memo) == 1
    assert torch.equal(second.init_latent, third.init_latent)  # the kept z_T* is a fresh inversion's


# -- the context ---------------------------------------------------------------------------------------
def _reaches_a_pipeline(value) -> bool:
    """The value is a pipeline, or a plain object (not a callable) holding one in an attribute."""
    if isinstance(value, DiffusionPipeline):
        return True
    if callable(value) or not hasattr(value, "__dict__"):
        return False
    return any(isinstance(v, DiffusionPipeline) for v in vars(value).values())


@dataclasses.dataclass
class Spy:
    """An initializer that records what it is given and starts from random noise."""

    seen: list = dataclasses.field(default_factory=list)

    def __call__(self, ctx, prompt, layout, generator, *, height, width, num_inference_steps, num_images=1):
        self.seen.append(ctx)
        return RandomInit()(
            ctx,
            prompt,
            layout,
            generator,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            num_images=num_images,
        )


def test_an_initializer_gets_a_context_and_no_pipeline(tiny_pipe):
    spy = Spy()
    tiny_pipe(PROMPT, LAYOUT, init=spy, seed=0, **FAST)
    (ctx,) = spy.seen
    assert isinstance(ctx, InitContext)
    for f in dataclasses.fields(ctx):
        assert not _reaches_a_pipeline(getattr(ctx, f.name)), f.name
    assert ctx.latent_shape(2, 32, 32) == (2, 4, 16, 16)
    assert ctx.scheduler is tiny_pipe.scheduler and ctx.dtype == tiny_pipe.denoiser.dtype
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.scheduler = None


def test_the_flow_start_gets_a_context_and_no_pipeline(monkeypatch):
    from saltdiff import flow_pipeline
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline
    from saltdiff.testing_flow import tiny_sd3_pipeline

    pipe = SaltSD3Pipeline.from_pipe(tiny_sd3_pipeline())
    pipe.set_progress_bar_config(disable=True)
    seen = []
    start = flow_pipeline.flow_salt_start

    def spy(init, ctx, *args, **kwargs):
        seen.append(ctx)
        return start(init, ctx, *args, **kwargs)

    monkeypatch.setattr(flow_pipeline, "flow_salt_start", spy)
    init = SpatialAwareInit(reference=GeneratedObjects(num_inference_steps=1, cache=False), inversion_steps=1)
    pipe(
        "a cat and a dog",
        [("a cat", (0.0, 0.0, 0.5, 1.0))],
        init=init,
        seed=0,
        **{**FAST, "output_type": "latent"},
    )
    (ctx,) = seen
    assert isinstance(ctx, InitContext) and ctx.velocity is not None and ctx.inversion_conditioning is None
    for f in dataclasses.fields(ctx):
        assert not _reaches_a_pipeline(getattr(ctx, f.name)), f.name
    assert not any(isinstance(v, DiffusionPipeline) for v in ctx.conditioning_key)


@dataclasses.dataclass
class OldStyleInit:
    """Written for ``init(pipe, ...)``: reads the UNet off the pipeline."""

    def __call__(self, pipe, prompt, layout, generator, *, height, width, num_inference_steps, num_images=1):
        shape = (num_images, pipe.unet.config.in_channels, height // 8, width // 8)
        return InitResult(torch.zeros(shape))


def test_an_initializer_written_for_the_pipeline_fails_in_one_line(tiny_pipe):
    with pytest.raises(AttributeError) as caught:
        tiny_pipe(PROMPT, LAYOUT, init=OldStyleInit(), seed=0, **FAST)
    message = str(caught.value)
    assert message.startswith(
        "InitContext has no 'unet': initializers are called with an InitContext, not the pipeline"
    )
    assert "\n" not in message and "'scheduler'" in message and "latent_shape()" in message
    assert not hasattr(tiny_pipe.init_context(), "unet")  # hasattr still answers
