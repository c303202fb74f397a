"""Tiny, real Stable Diffusion components built in code (random weights, no downloads).

Used by the test-suite and by anyone who wants to exercise saltdiff without a checkpoint. The
classes are the real diffusers/transformers ones at tiny sizes, so every code path (attention
processors, schedulers, VAE scaling, tokenizer) is the one a real checkpoint goes through.
"""

from __future__ import annotations

import tempfile
from typing import NamedTuple

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


def _tiny_vae(sample_size: int, **config):
    """A two-level VAE (2x downsampling) for the tiny pipelines; ``config`` adds e.g. SDXL's scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
        **config,
    )


def tiny_sd_components(seed: int = 0, sample_size: int = 16, model_max_length: int = 77) -> dict:
    """Components of a tiny SD-1.x-shaped pipeline (UNet with cross-attention at two levels)."""
    from diffusers import UNet2DConditionModel
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
    vae = _tiny_vae(sample_size)
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


#: The SD 1.x/2.x UNet layout: four levels, cross-attention on the first three and in the mid block.
_SD_UNET_LEVELS = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def _sd_vae(sample_size: int, scaling_factor: float = 0.18215, latent_channels: int = 4, **config):
    """The SD 1.x/2.x VAE (8x downsampling, 4 latent channels, scaling 0.18215); SDXL's differs in
    config, SD3's and FLUX's in config and 16 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=2,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **config,
    )


def _clip_text_encoder(tokenizer, **config):
    """A CLIP text encoder of the given width and depth on ``tokenizer``'s vocabulary and specials."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **config,
        )
    )


def _components(unet, vae, text_encoder, tokenizer, scheduler, dtype) -> dict:
    return {
        "unet": unet.to(dtype).eval(),
        "vae": vae.to(dtype).eval(),
        "text_encoder": text_encoder.to(dtype).eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def sd15_architecture_components(seed: int = 0, dtype=torch.float32) -> dict:
    """The full Stable Diffusion 1.5 architecture (UNet 860M, VAE, CLIP ViT-L text encoder), random weights.

    Shapes, layer names and attention layout are exactly SD 1.5's, so this measures the real cost of
    each method (seconds per image, peak memory) and checks default layer selection; the tokenizer
    is the generated one (same class and special tokens, smaller vocabulary).
    """
    from diffusers import UNet2DConditionModel

    tokenizer = tiny_tokenizer(77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, **_SD_UNET_LEVELS
    )
    vae = _sd_vae(512)
    text_encoder = _clip_text_encoder(
        tokenizer,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
    )
    return _components(unet, vae, text_encoder, tokenizer, sd_ddim_scheduler(), dtype)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data ~ N(0, sigma^2 I), with the UNet's call signature.

    ``eps(x_t, t) = sqrt(1 - a_t) x_t / (a_t sigma^2 + 1 - a_t)`` (``prediction_type="epsilon"``) or
    the matching ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0_hat`` (``"v_prediction"``). Its sampler
    trajectories discretize an exact ODE that maps the data onto N(0, I), so inversion followed by
    sampling must return to the start with an error that vanishes as steps grow -- a random UNet's
    predictions are no score at all, and would hide a sampler fed a latent in the wrong space.

    Fractional timesteps (Euler-type samplers) read the noise level the way those samplers do:
    ``sigma_t = sqrt((1 - a_t) / a_t)`` interpolated linearly between integer timesteps.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, sigma: float = 0.5, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.sigma = sigma
        self.prediction_type = prediction_type

    def alpha(self, timestep) -> torch.Tensor:
        t = float(timestep)
        lo = int(t)
        if t == lo:
            return self.alphas_cumprod[lo]
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        frac = t - lo
        s = (1 - frac) * sigmas[lo] + frac * sigmas[min(lo + 1, len(sigmas) - 1)]
        return 1 / (1 + s**2)

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        from types import SimpleNamespace

        a = self.alpha(timestep)
        denom = a * self.sigma**2 + 1 - a
        eps = (1 - a).sqrt() * sample.double() / denom
        if self.prediction_type == "v_prediction":
            x0 = a.sqrt() * self.sigma**2 * sample.double() / denom
            out = a.sqrt() * eps - (1 - a).sqrt() * x0
        else:
            out = eps
        return SimpleNamespace(sample=out.to(sample.dtype))


def sd2_architecture_components(seed: int = 0, dtype=torch.float32) -> dict:
    """The Stable Diffusion 2.x 768-v architecture (random weights): v-prediction, 768 default size.

    SD 2.x differs from 1.5 where saltdiff could go wrong: the UNet predicts ``v`` (inversion must
    convert it at the model's own timestep), its transformer blocks use linear projections and
    per-level head sizes, the text encoder is OpenCLIP ViT-H (1024 wide, 23 layers), and the default
    size is 768 (``sample_size`` 96).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    tokenizer = tiny_tokenizer(77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        **_SD_UNET_LEVELS,
    )
    vae = _sd_vae(768)
    text_encoder = _clip_text_encoder(
        tokenizer,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=512,
    )
    scheduler = DDIMScheduler.from_config(sd_ddim_scheduler().config, prediction_type="v_prediction")
    return _components(unet, vae, text_encoder, tokenizer, scheduler, dtype)


def _sdxl_text_encoders(tokenizer, tokenizer_2, *, one: dict, two: dict):
    """SDXL's pair: a CLIP text encoder and a CLIP text encoder with projection (pooled embeddings)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_encoder = _clip_text_encoder(tokenizer, **one)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            max_position_embeddings=77,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
            **two,
        )
    )
    return text_encoder, text_encoder_2


def _sdxl_dict(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, dtype) -> dict:
    return {
        **_components(unet, vae, text_encoder, tokenizer, scheduler, dtype),
        "text_encoder_2": text_encoder_2.to(dtype).eval(),
        "tokenizer_2": tokenizer_2,
    }


def tiny_sdxl_components(seed: int = 0, sample_size: int = 16, tokenizer_2=None) -> dict:
    """Components of a tiny SDXL-structured pipeline (random weights), for ``StableDiffusionXLPipeline``.

    What makes SDXL SDXL, at tiny sizes: a UNet with added ``text_time`` conditioning (pooled text
    embeddings + 6 time ids), no attention at the finest level and several transformer blocks per
    attention module at the coarsest, linear projections; two text encoders whose penultimate states
    are concatenated (16 + 16 = 32 wide cross-attention), the second with a projection (pooled
    embeddings); two tokenizers. ``tokenizer_2`` replaces the second tokenizer (tests of disagreement).
    """
    from diffusers import UNet2DConditionModel

    tokenizer = tiny_tokenizer(77)
    tokenizer_2 = tokenizer_2 if tokenizer_2 is not None else tiny_tokenizer(77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16,  # 6 time ids x 8 + the pooled width
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(seed)
    common = dict(intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, layer_norm_eps=1e-5)
    text_encoder, text_encoder_2 = _sdxl_text_encoders(
        tokenizer,
        tokenizer_2,
        one=dict(hidden_size=16, **common),
        two=dict(hidden_size=16, projection_dim=16, **common),
    )
    return _sdxl_dict(
        unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, sd_ddim_scheduler(), torch.float32
    )


def tiny_sdxl_pipeline(seed: int = 0, **kwargs):
    """A plain diffusers ``StableDiffusionXLPipeline`` on tiny random components."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed=seed, **kwargs), add_watermarker=False)


#: SDXL base 1.0's UNet (2.6 B parameters): three levels, cross-attention on the two coarser ones
#: with 2 and 10 transformer blocks per attention module, added text-time conditioning.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled
)


def sdxl_architecture_components(seed: int = 0, dtype=torch.float32) -> dict:
    """The full SDXL base 1.0 architecture (random weights): UNet 2.6 B, VAE (scaling 0.13025, fp16
    overflow: ``force_upcast``), CLIP ViT-L (768 wide, 12 layers) and OpenCLIP ViT-bigG (1280 wide,
    32 layers, projection 1280) text encoders; the tokenizers are the generated one (same class and
    special tokens, smaller vocabulary). About 3.5 B parameters: 14 GB in fp32.
    """
    from diffusers import UNet2DConditionModel

    tokenizer, tokenizer_2 = tiny_tokenizer(77), tiny_tokenizer(77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    vae = _sd_vae(1024, scaling_factor=0.13025, force_upcast=True)
    text_encoder, text_encoder_2 = _sdxl_text_encoders(
        tokenizer,
        tokenizer_2,
        one=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        ),
        two=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
        ),
    )
    return _sdxl_dict(
        unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, sd_ddim_scheduler(), dtype
    )


def add_tiny_ip_adapter(pipe, image_dim: int = 8, tokens: int = 4):
    """A tiny IP-Adapter built in code on ``pipe``'s UNet (SD or SDXL; changes it, returns ``pipe``).

    What ``load_ip_adapter`` installs, at tiny sizes: an image projection (``image_dim`` → ``tokens``
    text-width tokens) as the UNet's ``encoder_hid_proj`` and decoupled attention (large random
    ``to_k_ip``/``to_v_ip``, so the image visibly matters) on every cross-attention layer. Feed it
    ``ip_adapter_image_embeds=[tensor [2, 1, image_dim]]`` (negative and image rows).
    """
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = pipe.unet
    text_dim = unet.config.cross_attention_dim
    torch.manual_seed(1)
    projection = ImageProjection(
        image_embed_dim=image_dim, cross_attention_dim=text_dim, num_image_text_embeds=tokens
    )
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    processors = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            processors[name] = AttnProcessor2_0()
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        proc = IPAdapterAttnProcessor2_0(hidden, text_dim, num_tokens=(tokens,), scale=1.0)
        for layer in (*proc.to_k_ip, *proc.to_v_ip):
            torch.nn.init.normal_(layer.weight, std=0.5)
        processors[name] = proc
    unet.set_attn_processor(processors)
    return pipe


def check_ip_adapter_conditions_sampling(pipe, prompt, layout, **call) -> list[torch.Tensor]:
    """Assert that an IP-Adapter on ``pipe`` (see :func:`add_tiny_ip_adapter`) conditions sampling
    and that attention capture computes its attention as the default processor does; returns the
    image embeddings used (``[negative; image]`` rows)."""
    import numpy as np

    image_embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(0))]
    other_embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(1))]
    unguided = dict(init="random", guidance="none", **call)
    # with boxes the capture processor replaces the IP-Adapter's; without boxes nothing is captured
    captured = pipe(prompt, layout, ip_adapter_image_embeds=image_embeds, **unguided).images
    plain = pipe(prompt, ip_adapter_image_embeds=image_embeds, **unguided).images
    np.testing.assert_allclose(captured, plain, atol=1e-5)
    other = pipe(prompt, layout, ip_adapter_image_embeds=other_embeds, **unguided).images
    assert np.abs(other - captured).max() > 1e-3, "the image embedding changes nothing"
    return image_embeds


class UNetCall(NamedTuple):
    grad: bool  # the call ran with gradients (a guided pass)
    batch: int
    kwargs: dict  # encoder_hidden_states, added_cond_kwargs, timestep_cond, cross_attention_kwargs, ...


class UNetCalls:
    """Records every forward of a UNet (grad mode, batch size, keyword arguments) while in its ``with``
    block: how tests check what reaches the UNet (conditioning rows, CFG batches, LoRA scales)."""

    def __init__(self, unet):
        self.unet = unet
        self.calls: list[UNetCall] = []
        self.handle = None

    def __enter__(self) -> UNetCalls:
        self.handle = self.unet.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> bool:
        self.handle.remove()
        return False

    def _record(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls.append(UNetCall(torch.is_grad_enabled(), sample.shape[0], dict(kwargs)))
