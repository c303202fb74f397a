"""Tiny, real Stable Diffusion components built in code (random weights, no downloads).

Used by the test-suite and by anyone who wants to exercise saltdiff without a checkpoint. The
classes are the real diffusers/transformers ones at tiny sizes, so every code path (attention
processors, schedulers, VAE scaling, tokenizer) is the one a real checkpoint goes through.
"""

from __future__ import annotations

import tempfile

import torch

from .components import sd_ddim_scheduler

TINY_WORDS = (
    "a an the and of on in with photo picture at left right top bottom background scene "
    "red green blue yellow purple orange white gray black circle square triangle cat dog car "
    "tree house bird person horse table chair cup"
).split()


def tiny_tokenizer(model_max_length: int = 77):
    """A real ``CLIPTokenizer`` whose vocabulary makes each of ``TINY_WORDS`` one token."""
    from .tokenization import build_clip_tokenizer

    directory = tempfile.mkdtemp(prefix="saltdiff-tok-")
    return build_clip_tokenizer(TINY_WORDS, directory, model_max_length=model_max_length)


def tiny_sd_components(seed: int = 0, sample_size: int = 16, model_max_length: int = 77) -> dict:
    """Components of a tiny SD-1.x-shaped pipeline (UNet with cross-attention at two levels)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(model_max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=model_max_length,
        )
    )
    scheduler = sd_ddim_scheduler()
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def tiny_sd_pipeline(seed: int = 0, **kwargs):
    """A plain diffusers ``StableDiffusionPipeline`` on tiny random components."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **tiny_sd_components(seed=seed, **kwargs),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd15_architecture_components(seed: int = 0, dtype=torch.float32) -> dict:
    """The full Stable Diffusion 1.5 architecture (UNet 860M, VAE, CLIP ViT-L text encoder), random weights.

    Shapes, layer names and attention layout are exactly SD 1.5's, so this measures the real cost of
    each method (seconds per image, peak memory) and checks default layer selection; the tokenizer
    is the generated one (same class and special tokens, smaller vocabulary).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = sd_ddim_scheduler()
    return {
        "unet": unet.to(dtype).eval(),
        "vae": vae.to(dtype).eval(),
        "text_encoder": text_encoder.to(dtype).eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
