"""What one guided pass keeps for its backward, per image at 1024x1024 in fp16: computed, not run.

    python scripts/guided_memory.py [--models sdxl sd3.5-medium sd3.5-large flux.1-dev] [--size 1024]
                                    [--layers default all ...]

Each denoiser (SDXL's UNet, :data:`saltdiff.testing.SDXL_UNET_CONFIG`; the SD3.5-medium, SD3.5-large
and FLUX.1-dev transformers, :data:`saltdiff.testing_flow.FLOW_ARCHITECTURES`) is built on the meta
device (shapes only, no weights, seconds on a CPU) and run once as a guided pass runs it: the
conditional row alone (batch 1), gradients on for the latent, the chosen layers captured by
saltdiff's own processors. Every tensor autograd saves is counted once per storage, weights
excluded. Attention outside what the capture computes counts as CUDA's flash / memory-efficient
kernels keep it (q, k, v, the output and a float32 log-sum-exp per query; no attention matrix).

Printed per layer choice: the captured maps (SDXL: heads x queries x 77 fp16 per layer; SD3/FLUX:
queries x text tokens fp32 per block, heads averaged), what is kept up to the last captured layer (a
guided pass stops there: ``saltdiff.denoising.stop_after``), how much of that the capture adds over a
plain forward stopped at the same layer, and what a whole forward would keep. Text: SDXL 77 tokens,
SD3 77 CLIP + 256 T5 (the pipeline's ``max_sequence_length``), FLUX 512 T5. Transient buffers of the
backward itself are not counted, nor the weights. The weights require gradients, as diffusers loads
them and saltdiff leaves them, so autograd also keeps the inputs that weight gradients would need
(nobody asks for them: the guidance differentiates with respect to the latent only);
``--frozen-weights`` counts the pass with ``requires_grad_(False)`` on the denoiser.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch
import torch.nn.functional as F

from saltdiff.attention import capture_cross_attention, select_layers
from saltdiff.flow_pipeline import FlowSaltMixin
from saltdiff.joint_attention import capture_joint_attention, joint_attention_layers

#: the VAEs of SDXL, SD3 and FLUX all downsample 8x
VAE_FACTOR = 8
#: text tokens a guided pass attends to, per model kind (the pipelines' default lengths)
TEXT_TOKENS = {"unet": 77, "sd3": 77 + 256, "flux": 512}
#: model -> the layer choices its table shows unless ``--layers`` is given
MODELS = {
    "sdxl": ("default", "all", "mid"),
    "sd3.5-medium": ("default", "all", "first:12"),
    "sd3.5-large": ("default", "all", "first:19"),
    "flux.1-dev": ("default", "all", "transformer_blocks"),
}


class FlashLikeAttention(torch.autograd.Function):
    """Keeps for backward what flash / memory-efficient SDPA keeps; shapes only (meta tensors)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run: the pass is counted, not differentiated
        raise NotImplementedError


@contextlib.contextmanager
def flash_like_sdpa():
    """``F.scaled_dot_product_attention`` replaced by :class:`FlashLikeAttention` (restored on exit)."""
    sdpa = F.scaled_dot_product_attention

    def flash_like(query, key, value, *args, **kwargs):
        return FlashLikeAttention.apply(query, key, value)

    F.scaled_dot_product_attention = flash_like
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


@dataclass
class Kept:
    """Bytes of one guided pass (see the module docstring)."""

    layers: int
    maps: int
    upto: int
    capture: int
    whole: int


def model_kind(model) -> str:
    """``"unet"``, ``"sd3"`` or ``"flux"``."""
    if "cross_attention_dim" in model.config:
        return "unet"
    return "flux" if "num_single_layers" in model.config else "sd3"


def guided_inputs(model, side: int, text_tokens: int | None = None) -> dict:
    """The denoiser's keyword inputs for one conditional row at ``side`` pixels; the latent needs grad."""
    kind = model_kind(model)
    cfg = model.config
    half = dict(device="meta", dtype=torch.float16)
    text = TEXT_TOKENS[kind] if text_tokens is None else text_tokens
    h = w = side // VAE_FACTOR
    t = torch.full((1,), 500.0, **half)
    if kind == "unet":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return dict(
            sample=torch.empty(1, cfg.in_channels, h, w, requires_grad=True, **half),
            timestep=t,
            encoder_hidden_states=torch.empty(1, text, cfg.cross_attention_dim, **half),
            added_cond_kwargs={
                "text_embeds": torch.empty(1, pooled, **half),
                "time_ids": torch.empty(1, 6, **half),
            },
        )
    context = dict(
        timestep=t,
        encoder_hidden_states=torch.empty(1, text, cfg.joint_attention_dim, **half),
        pooled_projections=torch.empty(1, cfg.pooled_projection_dim, **half),
        return_dict=False,
    )
    if kind == "sd3":
        return dict(
            hidden_states=torch.empty(1, cfg.in_channels, h, w, requires_grad=True, **half), **context
        )
    tokens = (h // 2) * (w // 2)  # FLUX packs 2x2 latent patches into one token
    return dict(
        hidden_states=torch.empty(1, tokens, cfg.in_channels, requires_grad=True, **half),
        img_ids=torch.empty(tokens, 3, **half),
        txt_ids=torch.empty(text, 3, **half),
        guidance=torch.full((1,), 3.5, **half) if cfg.guidance_embeds else None,
        **context,
    )


def chosen_layers(model, spec: str, side: int) -> list[str]:
    """The layers a guided pass with ``--layers spec`` captures, in forward order; ``"first:N"``
    (this script's shorthand) is the first N capturable layers, named one by one."""
    if spec.startswith("first:"):
        return chosen_layers(model, "all", side)[: int(spec.removeprefix("first:"))]
    if model_kind(model) == "unet":
        return select_layers(model, spec)
    latent = (side // VAE_FACTOR,) * 2
    return FlowSaltMixin._select_layers(joint_attention_layers(model, latent), spec)


def _capture(model) -> Callable:
    return capture_cross_attention if model_kind(model) == "unet" else capture_joint_attention


def _saved_bytes(model, names: list[str], inputs: dict, capture: bool) -> tuple[int, int, int]:
    """``(map bytes, bytes kept up to names[-1], bytes kept by the whole forward)`` of one pass."""
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    total = 0
    upto = {}

    def pack(t):
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in seen and key not in weights:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    def mark(*_):  # returns None: the layer's output is left alone
        upto.setdefault("bytes", total)

    handle = model.get_submodule(names[-1]).register_forward_hook(mark)
    recording = _capture(model)(model, names) if capture else contextlib.nullcontext(None)
    try:
        with (
            flash_like_sdpa(),
            recording as store,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            model(**inputs)
            maps = 0 if store is None else sum(m.untyped_storage().nbytes() for m in store.maps.values())
    finally:
        handle.remove()
    return maps, upto["bytes"], total


def kept_bytes(model, spec: str, side: int, text_tokens: int | None = None) -> Kept:
    """What a guided pass capturing ``spec`` keeps (a meta-device ``model`` in fp16), per image."""
    names = chosen_layers(model, spec, side)
    inputs = guided_inputs(model, side, text_tokens)
    maps, upto, whole = _saved_bytes(model, names, inputs, capture=True)
    _, plain_upto, _ = _saved_bytes(model, names, inputs, capture=False)
    return Kept(len(names), maps, upto, upto - plain_upto, whole)


def build(name: str):
    """Model ``name`` of :data:`MODELS` on the meta device, fp16, with its table's title."""
    from diffusers import UNet2DConditionModel

    from saltdiff.testing import SDXL_UNET_CONFIG
    from saltdiff.testing_flow import flow_transformer

    with torch.device("meta"):
        if name == "sdxl":
            return "SDXL UNet", UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.float16)
        return f"{name} transformer", flow_transformer(name).to(torch.float16)


def table(title: str, model, specs, side: int) -> str:
    """One model's markdown table."""
    gib, mib = 2**30, 2**20
    kind = model_kind(model)
    lines = [
        f"{title}, {side}x{side}, fp16, one guided pass (batch 1, {TEXT_TOKENS[kind]} text tokens)",
        "",
        "| layers | captured | maps | kept up to the last captured layer | of which the capture | whole forward |",
        "|---|---|---|---|---|---|",
    ]
    for spec in specs:
        k = kept_bytes(model, spec, side)
        lines.append(
            f"| {spec} | {k.layers} | {k.maps / mib:.0f} MiB | {k.upto / gib:.2f} GiB | "
            f"{k.capture / gib:.2f} GiB | {k.whole / gib:.2f} GiB |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="layer choices as the pipelines' --layers takes them (names, prefixes; SDXL also mid, up, "
        "x2, ...) or first:N; default: per model, "
        + "; ".join(f"{m}: {' '.join(v)}" for m, v in MODELS.items()),
    )
    parser.add_argument(
        "--frozen-weights",
        action="store_true",
        help="the denoiser's weights with requires_grad False (saltdiff leaves them as diffusers loads "
        "them, requiring gradients, so autograd also keeps what weight gradients would need)",
    )
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # no "cast with to()" notice: the weights are shapes
    for name in args.models:
        title, model = build(name)
        if args.frozen_weights:
            model.requires_grad_(False)
            title += " (weights frozen)"
        specs = args.layers or MODELS[name]
        print(table(title, model, specs, args.size), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
