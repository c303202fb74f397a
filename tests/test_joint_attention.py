"""Joint-attention capture: stock outputs unchanged, the right block of the joint softmax, restore, grids."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, FluxPosEmbed

from saltdiff.joint_attention import (
    FluxJointCaptureProcessor,
    JointAttentionStore,
    SD3JointCaptureProcessor,
    capture_joint_attention,
    joint_attention_layers,
)
from saltdiff.testing_flow import tiny_flux_transformer, tiny_sd3_transformer

TEXT = 7


def _reference(query, keys, image_rows, text_cols):
    """The image x text block of the *joint* softmax ``[B, H, S, S]`` renormalized over text, mean over heads."""
    probs = (query @ keys.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)
    block = probs[:, :, image_rows][..., text_cols]
    return (block / block.sum(dim=-1, keepdim=True)).mean(dim=1)


def _sd3_inputs(batch=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, h, w, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.tensor([500.0] * batch),
    )


def _image_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _flux_inputs(batch=2, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, h * w, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.tensor([0.5] * batch),
        img_ids=_image_ids(h, w),
        txt_ids=torch.zeros(TEXT, 3),
    )


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_transformer()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_transformer()


def test_sd3_capture_leaves_the_transformers_output_unchanged(sd3):
    inputs = _sd3_inputs()
    with torch.no_grad():
        stock = sd3(**inputs).sample
        with capture_joint_attention(sd3) as store:
            captured = sd3(**inputs).sample
    torch.testing.assert_close(captured, stock, rtol=0, atol=1e-6)
    assert sorted(store.maps) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    for probs in store.maps.values():
        assert probs.shape == (2, 16, TEXT)  # 8x8 latent, patch 2: 4x4 tokens
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 16))  # a distribution over text


def test_flux_capture_leaves_the_transformers_output_unchanged(flux):
    inputs = _flux_inputs()
    with torch.no_grad():
        stock = flux(**inputs).sample
        with capture_joint_attention(flux) as store:
            captured = flux(**inputs).sample
    torch.testing.assert_close(captured, stock, rtol=0, atol=1e-6)
    assert list(store.maps) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert store.text_tokens == TEXT and store.image_hw == (4, 4)
    for probs in store.maps.values():
        assert probs.shape == (2, 16, TEXT)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 16))


def test_sd3_maps_are_the_image_by_text_block_of_the_joint_softmax():
    """On a standalone SD3 ``Attention`` ([image, text]): a capture reading the wrong block, or not
    renormalizing it, differs from this reference built from the full joint softmax."""
    torch.manual_seed(0)
    attn = Attention(
        query_dim=32, added_kv_proj_dim=32, dim_head=8, heads=4, out_dim=32, bias=True, context_pre_only=False,
        processor=JointAttnProcessor2_0(), qk_norm="rms_norm", eps=1e-6,
    )  # fmt: skip
    image, text = torch.randn(2, 9, 32), torch.randn(2, TEXT, 32)
    stock = attn(image, encoder_hidden_states=text)
    store = JointAttentionStore()
    attn.set_processor(SD3JointCaptureProcessor(store, "attn"))
    captured = attn(image, encoder_hidden_states=text)
    for a, b in zip(captured, stock):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    def heads(x):
        return x.view(2, -1, 4, 8).transpose(1, 2)

    with torch.no_grad():
        query = torch.cat(
            [attn.norm_q(heads(attn.to_q(image))), attn.norm_added_q(heads(attn.add_q_proj(text)))], 2
        )
        keys = torch.cat(
            [attn.norm_k(heads(attn.to_k(image))), attn.norm_added_k(heads(attn.add_k_proj(text)))], 2
        )
    expected = _reference(query, keys, slice(0, 9), slice(9, 9 + TEXT))
    torch.testing.assert_close(store.maps["attn"], expected, rtol=1e-5, atol=1e-6)
    assert store.layer_hw["attn"] == (3, 3)


@pytest.mark.parametrize("single", [False, True])
def test_flux_maps_are_the_image_by_text_block_of_the_joint_softmax_after_rope(single):
    """On standalone FLUX attention ([text, image], RoPE on both): double blocks split at the
    context's length, single blocks at ``store.text_tokens``."""
    torch.manual_seed(0)
    attn = FluxAttention(
        query_dim=32, heads=2, dim_head=16, out_dim=32, bias=True, eps=1e-6,
        added_kv_proj_dim=None if single else 32, context_pre_only=None if single else False,
        pre_only=single, processor=FluxAttnProcessor(),
    )  # fmt: skip
    ids = torch.cat([torch.zeros(TEXT, 3), _image_ids(3, 3)])
    rope = FluxPosEmbed(theta=10000, axes_dim=(4, 6, 6))(ids)
    image, text = torch.randn(2, 9, 32), torch.randn(2, TEXT, 32)
    call = (
        dict(hidden_states=torch.cat([text, image], 1))
        if single
        else dict(hidden_states=image, encoder_hidden_states=text)
    )
    stock = attn(**call, image_rotary_emb=rope)
    store = JointAttentionStore(text_tokens=TEXT if single else None)
    attn.set_processor(FluxJointCaptureProcessor(store, "attn"))
    captured = attn(**call, image_rotary_emb=rope)
    for a, b in zip(captured if not single else [captured], stock if not single else [stock]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x):
        return x.unflatten(-1, (-1, 16))

    with torch.no_grad():
        if single:
            joined = torch.cat([text, image], 1)
            query, key = attn.norm_q(heads(attn.to_q(joined))), attn.norm_k(heads(attn.to_k(joined)))
        else:
            query = torch.cat(
                [attn.norm_added_q(heads(attn.add_q_proj(text))), attn.norm_q(heads(attn.to_q(image)))], 1
            )
            key = torch.cat(
                [attn.norm_added_k(heads(attn.add_k_proj(text))), attn.norm_k(heads(attn.to_k(image)))], 1
            )
        query = apply_rotary_emb(query, rope, sequence_dim=1).transpose(1, 2)
        key = apply_rotary_emb(key, rope, sequence_dim=1).transpose(1, 2)
    expected = _reference(query, key, slice(TEXT, TEXT + 9), slice(0, TEXT))
    torch.testing.assert_close(store.maps["attn"], expected, rtol=1e-5, atol=1e-6)


def test_single_block_without_a_text_length_is_one_line():
    attn = FluxAttention(query_dim=32, heads=2, dim_head=16, out_dim=32, bias=True, pre_only=True)
    attn.set_processor(FluxJointCaptureProcessor(JointAttentionStore(), "single_transformer_blocks.3.attn"))
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.3\.attn.*text_tokens"):
        attn(torch.randn(1, 16, 32))


def test_maps_are_differentiable_to_the_latent(sd3):
    inputs = _sd3_inputs(batch=1)
    latent = inputs.pop("hidden_states").requires_grad_(True)
    with capture_joint_attention(sd3, ["transformer_blocks.1.attn"]) as store:
        sd3(hidden_states=latent, **inputs)
        maps = store.phrase_maps_per_layer([[1], [2, 3]])
    assert maps[0].shape == (1, 2, 4, 4)
    (grad,) = torch.autograd.grad(maps[0][0, 0, :2, :2].sum(), latent)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_without_the_mixing_gradient_a_map_reaches_the_latent_through_its_own_queries_and_keys(
    family, sd3, flux
):
    """``mixing_gradient=False`` (``guided_gradient="local"``): the output is the same; the first
    captured layer's map has no attention before it, so its gradient is the full one; the second's
    loses the path through the first layer's attention output, so it differs (and is not zero)."""
    model, inputs, latent_key = (sd3, _sd3_inputs(batch=1), "hidden_states") if family == "sd3" else (
        flux, _flux_inputs(batch=1), "hidden_states")  # fmt: skip
    latent = inputs.pop(latent_key)

    def run(mixing):
        z = latent.clone().requires_grad_(True)
        with capture_joint_attention(model) as store:
            store.mixing_gradient = mixing
            out = model(**{latent_key: z}, **inputs).sample
            maps = store.phrase_maps_per_layer([[1], [2, 3]])
        grads = [torch.autograd.grad(m[0, 0].square().sum(), z, retain_graph=True)[0] for m in maps]
        return out.detach(), grads

    (full_out, full), (local_out, local) = run(True), run(False)
    torch.testing.assert_close(local_out, full_out, rtol=0, atol=0)
    torch.testing.assert_close(local[0], full[0], rtol=1e-5, atol=1e-8)
    assert local[1].abs().sum() > 0
    assert (local[1] - full[1]).abs().max() > 1e-3 * full[1].abs().max()


def test_batch_rows_keep_only_those_rows(sd3):
    inputs = _sd3_inputs(batch=2)
    with torch.no_grad(), capture_joint_attention(sd3) as store:
        sd3(**inputs)
        both = {k: v.clone() for k, v in store.maps.items()}
        store.batch_rows = slice(1, 2)
        sd3(**inputs)
    for name, probs in store.maps.items():
        torch.testing.assert_close(probs, both[name][1:])


def test_non_square_grids_come_from_the_call(sd3, flux):
    with torch.no_grad():
        with capture_joint_attention(sd3) as store:
            sd3(**_sd3_inputs(batch=1, h=8, w=4))
            assert store.image_hw == (4, 2) and store.layer_hw["transformer_blocks.0.attn"] == (4, 2)
            assert store.phrase_maps([[1]]).shape == (1, 1, 4, 2)
        with capture_joint_attention(flux) as store:
            flux(**_flux_inputs(batch=1, h=2, w=6))
            assert store.layer_hw["single_transformer_blocks.0.attn"] == (2, 6)


def test_originals_come_back_even_after_an_exception(sd3):
    before = dict(sd3.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), capture_joint_attention(sd3):
        assert isinstance(
            sd3.attn_processors["transformer_blocks.0.attn.processor"], SD3JointCaptureProcessor
        )
        raise RuntimeError("boom")
    after = sd3.attn_processors
    assert all(after[k] is v for k, v in before.items()) and len(after) == len(before)
    assert not sd3._forward_pre_hooks  # the grid hook is gone too


def test_layers_and_grids():
    sd3 = tiny_sd3_transformer(num_layers=2)
    assert joint_attention_layers(sd3, (64, 32)) == {
        "transformer_blocks.0.attn": (32, 16),
        "transformer_blocks.1.attn": (32, 16),
    }
    flux = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    layers = joint_attention_layers(flux, (64, 32))  # packed 2x2
    assert list(layers) == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    assert set(layers.values()) == {(32, 16)}
    with pytest.raises(ValueError, match=r"\(63, 32\)"):
        joint_attention_layers(sd3, (63, 32))


def test_sd35_image_only_attention_is_not_capturable_and_passes_through():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd35 = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()  # fmt: skip
    assert "transformer_blocks.0.attn2" not in joint_attention_layers(sd35, (8, 8))
    inputs = _sd3_inputs(batch=1)
    with torch.no_grad():
        stock = sd35(**inputs).sample
        with capture_joint_attention(sd35) as store:
            captured = sd35(**inputs).sample
    torch.testing.assert_close(captured, stock, rtol=0, atol=1e-6)
    assert sorted(store.maps) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    with pytest.raises(ValueError, match="attn2"):
        with capture_joint_attention(sd35, ["transformer_blocks.0.attn2"]):
            pass


def test_a_processor_it_cannot_reproduce_is_refused_by_name(sd3):
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0

    original = dict(sd3.attn_processors)
    sd3.set_attn_processor(
        {
            **{k: v for k, v in original.items()},
            "transformer_blocks.0.attn.processor": FusedJointAttnProcessor2_0(),
        }
    )
    try:
        with pytest.raises(ValueError, match="FusedJointAttnProcessor2_0"):
            with capture_joint_attention(sd3):
                pass
    finally:
        sd3.set_attn_processor(dict(original))


def test_flux_capture_keeps_the_processors_attention_backend(flux):
    """set_attention_backend configures each processor instance; the capture must dispatch the same way."""
    processor = flux.attn_processors["transformer_blocks.0.attn.processor"]
    processor._attention_backend = "native"
    try:
        with capture_joint_attention(flux):
            capture = flux.attn_processors["transformer_blocks.0.attn.processor"]
            assert isinstance(capture, FluxJointCaptureProcessor) and capture._attention_backend == "native"
            other = flux.attn_processors["single_transformer_blocks.0.attn.processor"]
            assert other._attention_backend is None
    finally:
        processor._attention_backend = None
