"""Cross-attention capture: processor equivalence, shapes, layer selection, gradients, restoration."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from saltdiff.attention import (
    AttentionStore,
    CrossAttentionCaptureProcessor,
    capture_cross_attention,
    cross_attention_layers,
    default_capture_layers,
    select_layers,
)
from saltdiff.testing import tiny_sd_components

TOKENS = 7


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_components()["unet"]


def _inputs(batch=2, h=16, w=16, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, 4, h, w), torch.randn(batch, TOKENS, 32)


def _sd_unet(version: int) -> UNet2DConditionModel:
    """SD 1.x / 2.x block layout (4 levels, cross-attention at the first three and the mid block)
    at tiny channel widths."""
    torch.manual_seed(0)
    common = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
    )
    if version == 1:
        return UNet2DConditionModel(
            **common, block_out_channels=(16, 32, 32, 32), attention_head_dim=8, cross_attention_dim=768
        ).eval()
    return UNet2DConditionModel(
        **common,
        block_out_channels=(20, 40, 40, 40),
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
        cross_attention_dim=1024,
    ).eval()


@pytest.mark.parametrize("reference", [AttnProcessor(), AttnProcessor2_0()], ids=["AttnProcessor", "SDPA"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(query_dim=16, cross_attention_dim=24, heads=2, dim_head=8),
        dict(
            query_dim=16,
            cross_attention_dim=24,
            heads=4,
            dim_head=4,
            upcast_attention=True,
            norm_num_groups=4,
        ),
        dict(query_dim=16, heads=2, dim_head=8, residual_connection=True, rescale_output_factor=2.0),
        dict(query_dim=16, cross_attention_dim=24, heads=2, dim_head=8, cross_attention_norm="layer_norm"),
    ],
    ids=["cross", "group_norm+upcast", "self+residual", "norm_cross"],
)
def test_processor_matches_diffusers_on_standalone_attention(reference, kwargs):
    torch.manual_seed(0)
    attn = Attention(**kwargs).eval()
    cross = kwargs.get("cross_attention_dim") is not None
    hidden = torch.randn(2, 16, 16)
    context = torch.randn(2, 5, 24) if cross else None
    attn.set_processor(reference)
    expected = attn(hidden, encoder_hidden_states=context)
    store = AttentionStore()
    attn.set_processor(CrossAttentionCaptureProcessor(store, "layer"))
    actual = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if cross:
        assert store.maps["layer"].shape == (2, attn.heads, 16, 5)
        assert store.layer_hw["layer"] == (4, 4)
    else:
        assert store.maps == {}


def test_processor_matches_on_4d_input_with_mask():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, norm_num_groups=2).eval()
    hidden = torch.randn(2, 8, 3, 4)
    context = torch.randn(2, 5, 6)
    mask = torch.zeros(2, 1, 5)
    mask[:, :, -1] = -10000.0
    attn.set_processor(AttnProcessor())
    expected = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    store = AttentionStore()
    attn.set_processor(CrossAttentionCaptureProcessor(store, "layer"))
    actual = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert store.layer_hw["layer"] == (3, 4)
    assert store.maps["layer"][..., -1].max() < 1e-3  # the masked token gets no attention


def test_unet_output_unchanged_and_maps_are_probabilities(unet):
    latents, context = _inputs()
    with torch.no_grad():
        expected = unet(latents, 10, encoder_hidden_states=context).sample
        with capture_cross_attention(unet, "all") as store:
            actual = unet(latents, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert set(store.maps) == set(cross_attention_layers(unet))
    for name, probs in store.maps.items():
        h, w = store.layer_hw[name]
        assert probs.shape == (2, 2, h * w, TOKENS)  # tiny UNet: attention_head_dim=2 heads
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert {store.layer_hw[n] for n in store.maps} == {(16, 16), (8, 8)}


def test_only_selected_cross_attention_layers_are_captured(unet):
    latents, context = _inputs(batch=1)
    selected = select_layers(unet, "mid")
    with torch.no_grad(), capture_cross_attention(unet, "mid") as store:
        processors = unet.attn_processors
        unet(latents, 10, encoder_hidden_states=context)
    assert list(store.maps) == selected == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    capturing = [k for k, p in processors.items() if isinstance(p, CrossAttentionCaptureProcessor)]
    assert capturing == [selected[0] + ".processor"]
    assert not any(".attn1" in name for name in store.maps)


def test_batch_rows_and_enabled(unet):
    latents, context = _inputs(batch=4)
    with torch.no_grad(), capture_cross_attention(unet) as store:
        unet(latents, 10, encoder_hidden_states=context)
        full = dict(store.maps)
        store.reset()
        store.batch_rows = slice(2, 4)
        unet(latents, 10, encoder_hidden_states=context)
        for name, probs in store.maps.items():
            assert probs.shape[0] == 2
            torch.testing.assert_close(probs, full[name][2:4])
        store.reset()
        store.enabled = False
        unet(latents, 10, encoder_hidden_states=context)
        assert store.maps == {}


def test_phrase_maps_are_means_over_heads_and_tokens(unet):
    latents, context = _inputs()
    with torch.no_grad(), capture_cross_attention(unet) as store:
        unet(latents, 10, encoder_hidden_states=context)
    per_layer = store.phrase_maps_per_layer([[1, 2], [4]])
    name = next(iter(store.maps))
    h, w = store.layer_hw[name]
    expected = store.maps[name].mean(1)[..., [1, 2]].mean(-1).reshape(2, h, w)
    torch.testing.assert_close(per_layer[0][:, 0], expected)
    assert [tuple(m.shape) for m in per_layer] == [(2, 2, *store.layer_hw[n]) for n in store.maps]

    maps = store.phrase_maps([[1, 2], [4]])
    assert maps.shape == (2, 2, 16, 16)  # the largest captured layer size by default
    assert store.phrase_maps([[1, 2], [4]], size=(4, 6)).shape == (2, 2, 4, 6)
    torch.testing.assert_close(store.token_maps([4]), maps[:, 1:2])
    coarse = [n for n in store.maps if store.layer_hw[n] == (8, 8)]
    assert store.phrase_maps([[3]], layers=coarse).shape == (2, 1, 8, 8)


def test_phrase_maps_bad_arguments(unet):
    with pytest.raises(ValueError, match="no cross-attention maps"):
        AttentionStore().phrase_maps([[1]])
    latents, context = _inputs(batch=1)
    with torch.no_grad(), capture_cross_attention(unet) as store:
        unet(latents, 10, encoder_hidden_states=context)
    with pytest.raises(ValueError, match="outside"):
        store.phrase_maps([[TOKENS]])
    with pytest.raises(ValueError, match="non-empty"):
        store.phrase_maps([[]])
    with pytest.raises(ValueError, match="not captured"):
        store.phrase_maps([[1]], layers=["up_blocks.9.attn2"])


def test_gradient_from_phrase_maps_to_latent_matches_finite_differences(unet):
    """The captured maps keep their graph, and backpropagating through them gives the true
    derivative (float64 copy of the UNet, central difference along a random direction)."""
    model = copy.deepcopy(unet).double()
    latents, context = (x.double() for x in _inputs(batch=1))
    direction = torch.randn_like(latents)

    def loss_at(z):
        with capture_cross_attention(model) as store:
            model(z, 10, encoder_hidden_states=context)
            return store.phrase_maps([[1, 2]])[..., :8, :8].sum()

    z = latents.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_at(z), z)
    h = 1e-4
    with torch.no_grad():
        numeric = (loss_at(latents + h * direction) - loss_at(latents - h * direction)).item() / (2 * h)
    assert abs(numeric) > 1e-4
    assert (grad * direction).sum().item() == pytest.approx(numeric, rel=1e-5)


def test_non_square_latent(unet):
    latents, context = _inputs(batch=1, h=16, w=24)
    with torch.no_grad(), capture_cross_attention(unet, "all") as store:
        store.latent_hw = (16, 24)
        unet(latents, 10, encoder_hidden_states=context)
    factors = cross_attention_layers(unet)
    for name, probs in store.maps.items():
        expected = (16 // factors[name], 24 // factors[name])
        assert store.layer_hw[name] == expected
        assert probs.shape[2] == expected[0] * expected[1]
    assert store.phrase_maps([[1]]).shape == (1, 1, 16, 24)

    # the layout of the map is the spatial layout of the queries: compare with an explicit reshape
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    row_major = store.maps[name].mean(1)[0, :, 1].reshape(8, 12)
    torch.testing.assert_close(store.phrase_maps_per_layer([[1]], layers=[name])[0][0, 0], row_major)

    store.reset()
    store.latent_hw = None
    with (
        torch.no_grad(),
        capture_cross_attention(unet, "all", store=store),
        pytest.raises(ValueError, match="latent_hw"),
    ):
        unet(latents, 10, encoder_hidden_states=context)


def test_processors_restored_after_exit_exception_and_nesting(unet):
    before = unet.attn_processors
    latents, context = _inputs(batch=1)
    with capture_cross_attention(unet, "mid") as outer:
        inside_outer = unet.attn_processors
        with capture_cross_attention(unet, "up") as inner:
            with torch.no_grad():
                unet(latents, 10, encoder_hidden_states=context)
        assert unet.attn_processors == inside_outer
        assert inner.maps and all(n.startswith("up_blocks") for n in inner.maps)
        assert list(outer.maps) == select_layers(unet, "mid")  # the outer processors stay in place
    assert unet.attn_processors == before
    assert all(a is b for a, b in zip(unet.attn_processors.values(), before.values()))

    with pytest.raises(RuntimeError, match="boom"), capture_cross_attention(unet):
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(unet.attn_processors.values(), before.values()))


def test_layer_selection_on_tiny_unet(unet):
    layers = cross_attention_layers(unet)
    assert sorted(set(layers.values())) == [1, 2]
    assert default_capture_layers(unet) == list(layers)  # two levels only: all of them
    assert select_layers(unet, None) == select_layers(unet, "default") == list(layers)
    assert select_layers(unet, "all") == list(layers)
    assert select_layers(unet, "mid,up") == [n for n in layers if not n.startswith("down")]
    assert select_layers(unet, ["x2"]) == [n for n, f in layers.items() if f == 2]
    assert select_layers(unet, "up_blocks.1") == [n for n in layers if n.startswith("up_blocks.1.")]
    name = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    assert select_layers(unet, name + ".processor") == [name]
    for bad in ("x8", "sideways", "up_blocks.7", "attn1", "mid,", ""):
        with pytest.raises(ValueError):
            select_layers(unet, bad)
    with pytest.raises(ValueError, match="up_blocks.0.attentions.0"):
        select_layers(unet, "nonexistent")


@pytest.mark.parametrize("version", [1, 2])
def test_default_layers_on_sd_layouts(version):
    unet = _sd_unet(version)
    layers = cross_attention_layers(unet)
    assert set(layers.values()) == {1, 2, 4, 8}
    assert len(layers) == 2 + 2 + 2 + 1 + 3 + 3 + 3  # down 0-2, mid, up 1-3
    assert all(".attn2" in n for n in layers)
    default = default_capture_layers(unet)
    assert {n.split(".attentions")[0] for n in default} == {"down_blocks.2", "mid_block", "up_blocks.1"}
    assert len(default) == 2 + 1 + 3
    assert {layers[n] for n in default} == {4, 8}
    assert select_layers(unet, "x1") == [n for n in layers if n.startswith(("down_blocks.0", "up_blocks.3"))]

    # capture at a 16x16 latent: the default layers sit at 4x4 and 2x2
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    context = torch.randn(1, 5, unet.config.cross_attention_dim)
    with torch.no_grad(), capture_cross_attention(unet) as store:
        unet(latents, 10, encoder_hidden_states=context)
    assert list(store.maps) == default
    assert {store.layer_hw[n] for n in default} == {(4, 4), (2, 2)}
    heads = {n: store.maps[n].shape[1] for n in default}
    expected_heads = 8 if version == 1 else 20  # SD 2.x: attention_head_dim [5, 10, 20, 20] per level
    assert set(heads.values()) == {expected_heads}
