"""The full SDXL architecture (random weights, built in code): slow, run in CI's slow tier."""

import time

import pytest
import torch

pytestmark = pytest.mark.slow


def test_sdxl_architecture_salt_end_to_end():
    """SDXL base 1.0's architecture at 128x128 (latent 16x16: every level runs, the captured layers at
    4x4): SALT init (object generation, VAE encode, inversion) and SALT guidance with a gradient step,
    DDIM; pooled embeddings and time ids on every UNet call, every layer's output finite."""
    import numpy as np

    from saltdiff import GuidanceConfig, SpatialAwareInit
    from saltdiff.attention import cross_attention_layers, default_capture_layers
    from saltdiff.pipeline_xl import SaltXLPipeline
    from saltdiff.reference import GeneratedObjects
    from saltdiff.testing import sdxl_architecture_components

    start = time.perf_counter()
    components = sdxl_architecture_components()
    pipe = SaltXLPipeline(**components, add_watermarker=False)
    built = time.perf_counter() - start
    layers = cross_attention_layers(pipe.unet)
    default = default_capture_layers(pipe.unet)
    assert len(layers) == 70 and len(default) == 20
    assert all(name.startswith(("mid_block.", "up_blocks.0.attentions.0.")) for name in default)

    seen, calls = set(), []

    def check_output(module, args, output):  # every transformer and resnet block ran, finite
        out = output[0] if isinstance(output, tuple) else output
        seen.add(module)
        assert torch.isfinite(out).all()

    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in ("Transformer2DModel", "ResnetBlock2D")]
    for block in blocks:
        block.register_forward_hook(check_output)
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((torch.is_grad_enabled(), kwargs.get("added_cond_kwargs"))),
        with_kwargs=True,
    )
    init = SpatialAwareInit(
        reference=GeneratedObjects(num_inference_steps=1, background="gray"), inversion_steps=1
    )
    guidance = GuidanceConfig(loss="salt", guidance_steps=1, guidance_iters=1, loss_threshold=0.0)
    out = pipe(
        "a cat and a dog",
        [("cat", (0.05, 0.2, 0.45, 0.8)), ("dog", (0.55, 0.2, 0.95, 0.8))],
        init=init,
        guidance=guidance,
        num_inference_steps=2,
        height=128,
        width=128,
        seed=0,
        output_type="np",
        progress=False,
    )
    elapsed = time.perf_counter() - start
    assert out.images.shape == (1, 128, 128, 3) and np.isfinite(out.images).all()
    assert len(out.guidance_losses) == 1 and any(grad for grad, _ in calls)  # a gradient step was taken
    assert len(seen) == len(blocks)
    assert calls and all(c is not None and c["text_embeds"].shape[-1] == 1280 for _, c in calls)
    assert all(c["time_ids"].tolist()[0] == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0] for _, c in calls)
    print(f"SDXL architecture: built in {built:.0f} s, built + SALT call in {elapsed:.0f} s")
