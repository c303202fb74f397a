"""The full SD 1.5 architecture (random weights) through the CLI: slow, run in CI's slow tier."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_sd15_architecture_generate_salt_end_to_end(tmp_path):
    from diffusers import StableDiffusionPipeline

    from saltdiff.attention import default_capture_layers
    from saltdiff.cli import main
    from saltdiff.request import read_recipe
    from saltdiff.testing import sd15_architecture_components

    components = sd15_architecture_components()
    layers = default_capture_layers(components["unet"])
    # SD 1.5 at 64x64 latents: the 16x16 and 8x8 cross-attention levels (down_blocks.2, mid, up_blocks.1).
    assert layers and all(name.startswith(("down_blocks.2", "mid_block", "up_blocks.1")) for name in layers)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    model_dir = tmp_path / "sd15-random"
    pipe.save_pretrained(model_dir)
    del pipe, components
    out = tmp_path / "sd15.png"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    code = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "a cat and a dog on the left",
            "--box",
            "cat=0.05,0.2,0.45,0.8",
            "--box",
            "dog=0.55,0.2,0.95,0.8",
            "--init",
            "salt",
            "--guidance",
            "salt",
            "--steps",
            "2",
            "--height",
            "256",
            "--width",
            "256",
            "--guidance-steps",
            "1",
            "--guidance-iters",
            "1",
            "--inversion-steps",
            "1",
            "--object-steps",
            "1",
            "--background",
            "gray",
            "--object-cache",
            "false",
            "--overlay",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    recipe = read_recipe(str(out))
    assert recipe["height"] == 256 and recipe["init"] == "salt"
    assert (tmp_path / "sd15-overlay.png").is_file()


def test_sd2_v_prediction_architecture_end_to_end():
    """SD 2.x 768-v (random weights): v-prediction, linear projections, 768 default size, OpenCLIP-H
    width; SALT init and guidance run under DDIM and Euler at a small size."""
    import numpy as np

    from saltdiff import GuidanceConfig, SpatialAwareInit
    from saltdiff.attention import default_capture_layers
    from saltdiff.pipeline import SaltPipeline
    from saltdiff.reference import GeneratedObjects
    from saltdiff.samplers import make_scheduler
    from saltdiff.testing import sd2_architecture_components

    components = sd2_architecture_components()
    assert components["unet"].config.use_linear_projection
    assert components["scheduler"].config.prediction_type == "v_prediction"
    layers = default_capture_layers(components["unet"])
    assert layers and all(name.startswith(("down_blocks.2", "mid_block", "up_blocks.1")) for name in layers)
    pipe = SaltPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe._default_size(None, None) == (768, 768)
    init = SpatialAwareInit(
        reference=GeneratedObjects(background="gray", num_inference_steps=1, cache=False), inversion_steps=1
    )
    guidance = GuidanceConfig(guidance_steps=1, guidance_iters=1, loss_threshold=0.0)
    layout = [("cat", (0.05, 0.2, 0.45, 0.8)), ("dog", (0.55, 0.2, 0.95, 0.8))]
    for sampler in ("ddim", "euler"):
        pipe.scheduler = make_scheduler(sampler, components["scheduler"].config)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        out = pipe(
            "a cat and a dog",
            layout,
            init=init,
            guidance=guidance,
            num_inference_steps=2,
            height=256,
            width=256,
            seed=0,
            output_type="np",
        )
        assert out.images.shape == (1, 256, 256, 3) and np.isfinite(out.images).all()
        assert len(out.guidance_losses) == 1 and len(out.layout_losses) == 2
