"""Flow-matching test material built in code: the exact Gaussian velocity field, tiny SD3 and FLUX parts.

Like :mod:`saltdiff.testing` for the UNet families: real diffusers / transformers classes at tiny
sizes (random weights, no downloads), so that every code path a real SD3 or FLUX checkpoint goes
through (joint attention, packing, T5 tokenization, dynamic shift) is the one the tests run.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "FLOW_ARCHITECTURES",
    "FLUX1_DEV_TRANSFORMER_CONFIG",
    "SD35_LARGE_TRANSFORMER_CONFIG",
    "SD35_MEDIUM_TRANSFORMER_CONFIG",
    "GaussianVelocity",
    "flow_architecture_components",
    "flow_transformer",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
    "tiny_sd3_transformer",
    "tiny_t5_tokenizer",
]


class GaussianVelocity:
    """The exact flow-matching velocity for data ``x0 ~ N(mean, std^2 I)`` (elementwise).

    With ``x = (1 - s) x0 + s eps``, ``x`` is Gaussian with mean ``m_s = (1 - s) mean`` and variance
    ``v_s = (1 - s)^2 std^2 + s^2``; the regression target ``E[eps - x0 | x]`` is
    ``u(x, s) = (s - (1 - s) std^2) / v_s * (x - m_s) - mean``. Its ODE keeps the standardized
    ``(x - m_s) / sqrt(v_s)`` constant, so the exact flow map is :meth:`flow_map` -- what an
    integrator must reproduce as its steps shrink. A random transformer's output is no velocity
    field at all, and would hide an inversion stepping the wrong way.
    """

    def __init__(self, mean: float = 0.5, std: float = 0.5):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.mean = float(mean)
        self.std = float(std)
        self.calls: list[float] = []  # the sigmas it was called at, in order

    def _moments(self, s: float) -> tuple[float, float]:
        return (1.0 - s) * self.mean, (1.0 - s) ** 2 * self.std**2 + s**2

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``u(x, sigma)`` in float64 (then ``x``'s dtype); records ``sigma`` in :attr:`calls`."""
        s = float(sigma)
        self.calls.append(s)
        m, v = self._moments(s)
        u = (s - (1.0 - s) * self.std**2) / v * (x.double() - m) - self.mean
        return u.to(x.dtype)

    def flow_map(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact ODE solution: ``m_t + sqrt(v_t / v_s) (x - m_s)``."""
        m_s, v_s = self._moments(float(sigma_from))
        m_t, v_t = self._moments(float(sigma_to))
        return (m_t + (v_t / v_s) ** 0.5 * (x.double() - m_s)).to(x.dtype)


def tiny_t5_tokenizer(words=None):
    """A real ``T5Tokenizer`` from a SentencePiece unigram model trained here, offline, in ~0.1 s.

    Trained on random sentences of ``words`` (default :data:`saltdiff.testing.TINY_WORDS`) plus every
    lowercase letter, so each vocabulary word is one piece and any lowercase word still tokenizes.
    T5's specials: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no BOS. transformers 5's ``T5Tokenizer``
    is built from the (piece, score) pairs: given a ``vocab_file`` instead it silently maps every
    word to ``<unk>`` (``tests/test_testing_flow.py`` checks it does not).
    """
    return _trained_t5_tokenizer(tuple(words) if words is not None else None)


@functools.lru_cache(maxsize=4)
def _trained_t5_tokenizer(words):
    import io
    import random

    import sentencepiece as spm
    from transformers import T5Tokenizer

    from .testing import TINY_WORDS

    vocabulary = list(words or TINY_WORDS)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(vocabulary) for _ in range(6)) for _ in range(2000)]
    sentences.append(" ".join("abcdefghijklmnopqrstuvwxyz"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=len(vocabulary) + 64,
        hard_vocab_limit=False,
        character_coverage=1.0,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5_encoder(tokenizer, d_model: int):
    """A two-layer ``T5EncoderModel`` of width ``d_model`` on ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _clip_with_projection(tokenizer, hidden: int, projection: int):
    """A ``CLIPTextModelWithProjection`` (SD3's pooled embeddings come from its projection)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=hidden,
            projection_dim=projection,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            layer_norm_eps=1e-5,
        )
    )


def _flow_vae(scaling_factor: float, shift_factor: float):
    """A two-level ``AutoencoderKL`` with 16 latent channels and no quant convs, as SD3's and FLUX's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _sd3_scheduler():
    """SD3's and SD3.5's flow-matching Euler scheduler: static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _flux_scheduler():
    """FLUX.1's flow-matching Euler scheduler: shift ``mu`` from the image's token count (256 to 4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 2):
    """An ``SD3Transformer2DModel``: patch 2, 16 latent channels, 4 heads of 8, text width 32."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=32,
    ).eval()


def tiny_flux_transformer(
    seed: int = 0, num_layers: int = 1, num_single_layers: int = 1, guidance_embeds: bool = False
):
    """A ``FluxTransformer2DModel``: packed 2x2 x 16 channels (64 in), 2 heads of 16, RoPE axes (4, 6, 6);
    ``guidance_embeds``: guidance-distilled, as FLUX.1-dev."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
        guidance_embeds=guidance_embeds,
    ).eval()


def tiny_sd3_components(seed: int = 0) -> dict:
    """Components of a tiny ``StableDiffusion3Pipeline`` (random weights, real classes).

    Two CLIP text encoders with projection (hidden 16 + 16, pooled 16 + 16 = the transformer's 32)
    and CLIP BPE tokenizers, a T5 encoder (width 32 = the joint attention width; SD3 pads the CLIP
    states to it) with a SentencePiece tokenizer, a 16-channel VAE with SD3's scaling and shift, and
    the flow-matching Euler scheduler with SD3's shift 3.
    """
    from .testing import tiny_tokenizer

    tokenizer, tokenizer_2, tokenizer_3 = tiny_tokenizer(77), tiny_tokenizer(77), tiny_t5_tokenizer()
    transformer = tiny_sd3_transformer(seed)
    torch.manual_seed(seed)
    text_encoder = _clip_with_projection(tokenizer, 16, 16)
    text_encoder_2 = _clip_with_projection(tokenizer_2, 16, 16)
    text_encoder_3 = _t5_encoder(tokenizer_3, 32)
    torch.manual_seed(seed)
    vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
    return {
        "transformer": transformer,
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "text_encoder_3": text_encoder_3.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "scheduler": _sd3_scheduler(),
    }


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = False) -> dict:
    """Components of a tiny ``FluxPipeline`` (random weights, real classes).

    A CLIP text encoder (pooled width 32) with a CLIP BPE tokenizer, a T5 encoder (width 32 = the
    joint attention width) with a SentencePiece tokenizer, a 16-channel VAE with FLUX's scaling and
    shift, and the flow-matching Euler scheduler with FLUX's resolution-dependent shift.
    """
    from .testing import _clip_text_encoder, tiny_tokenizer

    tokenizer, tokenizer_2 = tiny_tokenizer(77), tiny_t5_tokenizer()
    transformer = tiny_flux_transformer(seed, guidance_embeds=guidance_embeds)
    torch.manual_seed(seed)
    text_encoder = _clip_text_encoder(
        tokenizer, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2
    )
    text_encoder_2 = _t5_encoder(tokenizer_2, 32)
    torch.manual_seed(seed)
    vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = _flux_scheduler()
    return {
        "transformer": transformer,
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def tiny_sd3_pipeline(seed: int = 0):
    """A plain diffusers ``StableDiffusion3Pipeline`` on tiny random components."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**tiny_sd3_components(seed))


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False):
    """A plain diffusers ``FluxPipeline`` on tiny random components."""
    from diffusers import FluxPipeline

    return FluxPipeline(**tiny_flux_components(seed, guidance_embeds=guidance_embeds))


# The released transformers' configs (diffusers ``transformer/config.json``), written here so that no
# download is needed. Sources (read through the search index, not fetched): SD3.5-medium and -large:
# ``transformer/config.json`` of the public mirrors of ``stabilityai/stable-diffusion-3.5-medium``
# and ``-large`` on the Hugging Face hub (the official repositories are gated); FLUX.1-dev:
# ``FluxTransformer2DModel``'s documented defaults (diffusers API docs) with ``guidance_embeds=True``,
# as in FLUX.1-dev-derived ``transformer/config.json`` files (FLUX.1-schnell's differs only there).

#: SD3.5-medium's MMDiT-X (2.24 B parameters): 24 blocks, 24 heads of 64, QK RMS-norm, a second
#: image-only attention in blocks 0 to 12.
SD35_MEDIUM_TRANSFORMER_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)

#: SD3.5-large's MMDiT (8.06 B parameters): 38 blocks, 38 heads of 64, QK RMS-norm.
SD35_LARGE_TRANSFORMER_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)

#: FLUX.1-dev's transformer (11.9 B parameters): 19 double-stream and 38 single-stream blocks,
#: 24 heads of 128, guidance-distilled (embedded guidance).
FLUX1_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

#: name -> (diffusers pipeline class, transformer class, transformer config)
FLOW_ARCHITECTURES = {
    "sd3.5-medium": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER_CONFIG),
    "sd3.5-large": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", SD35_LARGE_TRANSFORMER_CONFIG),
    "flux.1-dev": ("FluxPipeline", "FluxTransformer2DModel", FLUX1_DEV_TRANSFORMER_CONFIG),
}


def flow_transformer(name: str):
    """The transformer of :data:`FLOW_ARCHITECTURES` ``name``, built where ``torch.device`` points
    (``with torch.device("meta"):`` gives shapes only), random weights, float32."""
    import diffusers

    if name not in FLOW_ARCHITECTURES:
        raise ValueError(f"unknown flow architecture {name!r}; choose from {', '.join(FLOW_ARCHITECTURES)}")
    _, cls, config = FLOW_ARCHITECTURES[name]
    return getattr(diffusers, cls)(**config).eval()


def flow_architecture_components(
    name: str, seed: int = 0, dtype=torch.float32, device: str | torch.device = "cpu"
) -> dict:
    """A full-size SD3.5 or FLUX.1 transformer and VAE with random weights, and tiny text encoders.

    ``name`` is a key of :data:`FLOW_ARCHITECTURES`. The transformer and the VAE (SD3's and FLUX's:
    8x downsampling, 16 channels, their scaling and shift) are the real architectures; the text
    encoders are tiny random ones whose outputs have the real widths (joint attention 4096, pooled
    2048 for SD3, 768 for FLUX) and the real sequence lengths (the pipelines pad to
    ``max_sequence_length``), because only the transformer's and the VAE's cost is meant to be real.
    Built on ``device`` (FLUX.1-dev is 48 GB in float32: build it on the GPU), then cast to ``dtype``.
    """
    from .testing import _clip_text_encoder, _sd_vae, tiny_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = flow_transformer(name)
        pipeline = FLOW_ARCHITECTURES[name][0]
        scaling, shift = (0.3611, 0.1159) if pipeline == "FluxPipeline" else (1.5305, 0.0609)
        vae = _sd_vae(
            1024,
            scaling_factor=scaling,
            shift_factor=shift,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    tokenizer, t5_tokenizer = tiny_tokenizer(77), tiny_t5_tokenizer()
    t5 = _t5_encoder(t5_tokenizer, transformer.config.joint_attention_dim)
    parts = {"transformer": transformer, "vae": vae}
    if pipeline == "FluxPipeline":
        clip = _clip_text_encoder(
            tokenizer,
            hidden_size=transformer.config.pooled_projection_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
        )
        parts.update(text_encoder=clip, text_encoder_2=t5, tokenizer=tokenizer, tokenizer_2=t5_tokenizer)
        parts["scheduler"] = _flux_scheduler()
    else:
        half = transformer.config.pooled_projection_dim // 2
        tokenizer_2 = tiny_tokenizer(77)
        parts.update(
            text_encoder=_clip_with_projection(tokenizer, 16, half),
            text_encoder_2=_clip_with_projection(tokenizer_2, 16, half),
            text_encoder_3=t5,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=t5_tokenizer,
        )
        parts["scheduler"] = _sd3_scheduler()
    for key, part in parts.items():
        if isinstance(part, torch.nn.Module):
            parts[key] = part.to(device=device, dtype=dtype).eval()
    return parts
