"""``scripts/guided_memory.py`` on tiny meta-device models: the counts it prints are the hand-computed ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from saltdiff.testing_flow import tiny_flux_transformer, tiny_sd3_transformer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "guided_memory.py"
SIDE, TEXT = 64, 10  # a 8x8 latent: 16 image tokens after SD3's 2x2 patches or FLUX's 2x2 packing


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("guided_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _meta(build, **kwargs):
    with torch.device("meta"):
        return build(**kwargs).to(torch.float16)


@pytest.mark.parametrize(
    ("build", "kwargs", "layers", "heads", "head_dim"),
    [
        (tiny_sd3_transformer, dict(num_layers=3), 3, 4, 8),
        (tiny_flux_transformer, dict(num_layers=1, num_single_layers=2), 3, 2, 16),
    ],
)
def test_flow_capture_costs_what_text_attention_keeps(memory, build, kwargs, layers, heads, head_dim):
    """Per captured block the maps are ``Q x T`` fp32, and the capture keeps its fp32 softmax
    ``H x Q x T`` and the fp32 copies of its queries ``H x Q x d`` and text keys ``H x T x d``."""
    model = _meta(build, **kwargs)
    queries = (SIDE // memory.VAE_FACTOR // 2) ** 2
    kept = memory.kept_bytes(model, "all", SIDE, text_tokens=TEXT)
    assert kept.layers == layers
    assert kept.maps == layers * queries * TEXT * 4
    per_block = heads * 4 * (queries * TEXT + queries * head_dim + TEXT * head_dim)
    assert kept.capture == layers * per_block
    assert 0 < kept.upto <= kept.whole
    first = memory.kept_bytes(model, "first:1", SIDE, text_tokens=TEXT)
    assert first.layers == 1 and first.maps * layers == kept.maps
    assert first.capture == per_block and first.upto < kept.upto  # the pass stops after the first block
    assert memory.kept_bytes(model, "default", SIDE, text_tokens=TEXT) == kept  # flow default: every block


def test_unet_table_and_early_stop(memory):
    from diffusers import UNet2DConditionModel

    from saltdiff.testing import tiny_sdxl_components

    unet = tiny_sdxl_components()["unet"]
    with torch.device("meta"):
        meta = UNet2DConditionModel(**unet.config).to(torch.float16)
    assert memory.model_kind(meta) == "unet"
    mid = memory.kept_bytes(meta, "mid", SIDE)
    every = memory.kept_bytes(meta, "all", SIDE)
    assert 0 < mid.maps < every.maps and mid.upto < every.upto <= every.whole
    assert mid.whole < every.whole  # explicit probabilities on 70 layers instead of 10
    text = memory.table("tiny", meta, ["mid", "all"], SIDE)
    assert text.splitlines()[0] == f"tiny, {SIDE}x{SIDE}, fp16, one guided pass (batch 1, 77 text tokens)"
    assert text.count("\n| ") == 3 and "| mid | " in text and "| all | " in text


def test_frozen_weights_keep_less_and_the_same_capture(memory):
    """Without weight gradients autograd keeps fewer inputs. The capture keeps the same, but for the
    first block's fp32 queries: its text keys depend on no weight nor on the latent, so nothing asks
    for their gradient (later blocks' text stream has attended to the image)."""
    model = _meta(tiny_sd3_transformer, num_layers=2)
    trainable = memory.kept_bytes(model, "all", SIDE, text_tokens=TEXT)
    model.requires_grad_(False)
    frozen = memory.kept_bytes(model, "all", SIDE, text_tokens=TEXT)
    assert frozen.upto < trainable.upto and frozen.maps == trainable.maps
    heads, head_dim, queries = 4, 8, (SIDE // memory.VAE_FACTOR // 2) ** 2
    assert trainable.capture - frozen.capture == heads * queries * head_dim * 4


def test_meta_flux_ids_leave_the_grid_to_the_token_count(memory):
    """``capture_joint_attention``'s hook reads FLUX's grid from ``img_ids``; meta ids hold none."""
    from saltdiff.joint_attention import capture_joint_attention

    model = _meta(tiny_flux_transformer)
    inputs = memory.guided_inputs(model, SIDE, text_tokens=TEXT)
    with memory.flash_like_sdpa(), capture_joint_attention(model) as store:
        model(**inputs)
    assert store.image_hw is None and set(store.layer_hw.values()) == {(4, 4)}
