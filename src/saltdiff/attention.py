"""Capture of cross-attention probabilities through diffusers attention processors.

Layout guidance needs the cross-attention probabilities ``softmax(QK^T / sqrt(d))`` of chosen UNet
layers, with their autograd graph, so that a loss on them can be differentiated back to the latent.
The default SDPA processor never materializes them, so :func:`capture_cross_attention` swaps the
selected cross-attention layers for a :class:`CrossAttentionCaptureProcessor` (the computation of
diffusers' ``AttnProcessor``, plus recording) and restores the original processors afterwards. The
UNet itself is never forked or monkey-patched.

Layer names are the names of the ``Attention`` modules inside the UNet, i.e. the keys of
``unet.attn_processors`` without the trailing ``".processor"``, for example
``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"``.

Default layers (:func:`default_capture_layers`): every cross-attention layer at the two coarsest
resolutions that carry cross-attention. For SD 1.x / 2.x (cross-attention at latent/1, /2, /4 and
in the /8 mid block) these are ``down_blocks.2``, ``mid_block`` and ``up_blocks.1`` -- 16x16 and
8x8 for a 64x64 latent, the levels where cross-attention maps are known to follow object layout
(Chen et al.'s layout-guidance uses the mid block and the first up level, BoxDiff the 16x16
level). The 8x8 level alone is too coarse for small boxes (a box under 1/8 of the image side can
vanish), and adding the 32x32 level roughly doubles the cost of a guidance step. For the tiny test
UNet and the built-in model, which carry cross-attention at two levels only, the default is all
of their cross-attention layers.

SDXL-style UNets (added ``text_time`` conditioning) stack up to 10 transformer blocks per attention
module: their two levels with cross-attention (latent/2 and /4) hold 70 layers, and capturing all of
them materializes 70 probability tensors per pass. Their default is the coarsest level's mid block
and the first transformer stack of the first up block (SDXL: ``mid_block`` and
``up_blocks.0.attentions.0``, 20 layers at 32x32 for a 1024² image) -- the layers layout guidance
reads in SD (mid block and first up level), at the resolution where SDXL's maps follow the layout.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionStore",
    "CrossAttentionCaptureProcessor",
    "capture_cross_attention",
    "cross_attention_layers",
    "default_capture_layers",
    "select_layers",
]

_PROCESSOR_SUFFIX = ".processor"
_BLOCK_KEYWORDS = ("down", "mid", "up")
_FACTOR_TAG = re.compile(r"x(\d+)")


@dataclass(eq=False)
class AttentionStore:
    """Holds the cross-attention probabilities captured during one UNet forward.

    Attributes:
        maps: layer name -> probabilities ``[B, heads, h*w, T]``; kept with their autograd graph
            when the forward ran under gradients. Each forward overwrites the entries of the
            layers it runs through; call :meth:`reset` between forwards to drop stale ones.
        layer_hw: layer name -> ``(h, w)`` spatial size of that layer's queries.
        latent_hw: ``(h, w)`` of the latent fed to the UNet; set it before the forward when the
            latent is not square (square latents are inferred).
        enabled: record only while this is true.
        batch_rows: keep only these batch rows (e.g. ``slice(n, 2 * n)``, the conditional half of
            a classifier-free-guidance batch); ``None`` keeps all.
    """

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    latent_hw: tuple[int, int] | None = None
    enabled: bool = True
    batch_rows: slice | None = None

    def reset(self) -> None:
        """Forget every captured map (and its autograd graph)."""
        self.maps.clear()
        self.layer_hw.clear()

    def _layers(self, layers: Sequence[str] | None) -> list[str]:
        if not self.maps:
            raise ValueError(
                "no cross-attention maps were captured: run the UNet forward inside "
                "capture_cross_attention(...) with the store enabled"
            )
        if layers is None:
            return list(self.maps)
        if isinstance(layers, str):
            layers = [layers]
        missing = [name for name in layers if name not in self.maps]
        if missing:
            raise ValueError(f"layers {missing} were not captured; captured layers: {sorted(self.maps)}")
        return list(layers)

    def phrase_maps_per_layer(
        self, token_indices: Sequence[Sequence[int]], layers: Sequence[str] | None = None
    ) -> list[torch.Tensor]:
        """Per captured layer, ``[B, K, h_l, w_l]``: mean over heads and over each phrase's tokens.

        Args:
            token_indices: for each of the K phrases, the token positions (columns of the
                attention matrix) that make it up.
            layers: the captured layers to use, in this order; ``None`` uses all of them in the
                order they were captured.
        """
        names = self._layers(layers)
        num_tokens = self.maps[names[0]].shape[-1]
        weights = _phrase_weights(token_indices, num_tokens)
        out = []
        for name in names:
            probs = self.maps[name]
            batch, _, _, tokens = probs.shape
            if tokens != num_tokens:
                raise ValueError(f"layer {name!r} has {tokens} text tokens, expected {num_tokens}")
            h, w = self.layer_hw[name]
            per_query = probs.mean(dim=1) @ weights.to(device=probs.device, dtype=probs.dtype)  # [B, Q, K]
            out.append(per_query.transpose(1, 2).reshape(batch, weights.shape[1], h, w))
        return out

    def phrase_maps(
        self,
        token_indices: Sequence[Sequence[int]],
        *,
        size: tuple[int, int] | None = None,
        layers: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``[B, K, H, W]``: :meth:`phrase_maps_per_layer` resized bilinearly to ``size`` and averaged.

        ``size`` defaults to the largest captured layer size among ``layers``.
        """
        per_layer = self.phrase_maps_per_layer(token_indices, layers)
        if size is None:
            size = max((tuple(m.shape[-2:]) for m in per_layer), key=lambda hw: hw[0] * hw[1])
        size = (int(size[0]), int(size[1]))
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"size must be two positive integers, got {size}")
        resized = [
            m
            if tuple(m.shape[-2:]) == size
            else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in per_layer
        ]
        return torch.stack(resized).mean(dim=0)

    def token_maps(
        self,
        token_indices: Sequence[int],
        *,
        size: tuple[int, int] | None = None,
        layers: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``[B, N, H, W]``: :meth:`phrase_maps` of single tokens (e.g. the unboxed ones)."""
        return self.phrase_maps([[int(i)] for i in token_indices], size=size, layers=layers)


def _phrase_weights(token_indices: Sequence[Sequence[int]], num_tokens: int) -> torch.Tensor:
    """``[T, K]`` matrix whose column k averages phrase k's token columns."""
    if isinstance(token_indices, torch.Tensor) or len(token_indices) == 0:
        raise ValueError(f"token_indices must be a non-empty list of lists of ints, got {token_indices!r}")
    weights = torch.zeros(num_tokens, len(token_indices))
    for k, phrase in enumerate(token_indices):
        if isinstance(phrase, int) or len(phrase) == 0:
            raise ValueError(f"phrase {k} must be a non-empty list of token indices, got {phrase!r}")
        for index in phrase:
            if not 0 <= int(index) < num_tokens:
                raise ValueError(f"token index {index} of phrase {k} is outside [0, {num_tokens})")
            weights[int(index), k] = 1.0
        weights[:, k] /= weights[:, k].sum()
    return weights


class CrossAttentionCaptureProcessor:
    """Attention processor that computes attention like diffusers' ``AttnProcessor`` and records it.

    The probabilities come from ``attn.get_attention_scores`` (so they exist as a tensor); on a
    cross-attention call (``encoder_hidden_states`` given) with ``store.enabled`` they are stored,
    reshaped to ``[B, heads, Q, T]`` and restricted to ``store.batch_rows``, under ``store.maps[name]``
    without detaching, so that gradients flow back to the latent.

    Args:
        store: where to record.
        name: the layer name used as key.
        downsample_factor: the layer's resolution relative to the latent (1, 2, 4, 8, ...), used
            to recover ``(h, w)`` of non-square latents from ``store.latent_hw``.
    """

    def __init__(self, store: AttentionStore, name: str, downsample_factor: int = 1, ip_adapter=None):
        if downsample_factor < 1:
            raise ValueError(f"downsample_factor must be >= 1, got {downsample_factor}")
        self.store = store
        self.name = name
        self.downsample_factor = int(downsample_factor)
        # an IP-Adapter processor this one replaces: its image key/value projections are applied too
        self.ip_adapter = ip_adapter if hasattr(ip_adapter, "to_k_ip") else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, downsample_factor={self.downsample_factor})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):  # IP-Adapter: (text, [image tokens per adapter])
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        residual = hidden_states

        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        spatial_hw = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial_hw = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        # q/k normalization over the head dimension, as AttnProcessor2_0 applies it
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, Q, T]
        if is_cross and self.store.enabled:
            self._record(attention_probs, attn.heads, spatial_hw)

        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        if ip_hidden_states is not None and self.ip_adapter is not None:
            hidden_states = hidden_states + self._image_attention(attn, query, ip_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _image_attention(self, attn, query: torch.Tensor, ip_hidden_states) -> torch.Tensor:
        """IP-Adapter's decoupled attention to the image tokens (as ``IPAdapterAttnProcessor``, no masks)."""
        ip = self.ip_adapter
        out = 0
        for tokens, scale, to_k, to_v in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip):
            if scale == 0:
                continue
            if tokens.ndim == 4:  # [B, images, tokens, D]: the images' tokens side by side
                tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
            key = attn.head_to_batch_dim(to_k(tokens))
            value = attn.head_to_batch_dim(to_v(tokens))
            probs = attn.get_attention_scores(query, key, None)
            out = out + scale * attn.batch_to_head_dim(torch.bmm(probs, value))
        return out

    def _record(self, probs: torch.Tensor, heads: int, spatial_hw: tuple[int, int] | None) -> None:
        rows, queries, tokens = probs.shape
        probs = probs.reshape(rows // heads, heads, queries, tokens)
        if self.store.batch_rows is not None:
            probs = probs[self.store.batch_rows]
        self.store.maps[self.name] = probs
        self.store.layer_hw[self.name] = spatial_hw or self._layer_hw(queries)

    def _layer_hw(self, queries: int) -> tuple[int, int]:
        latent_hw = self.store.latent_hw
        if latent_hw is None:
            side = math.isqrt(queries)
            if side * side != queries:
                raise ValueError(
                    f"layer {self.name!r} has {queries} queries, which is not a square: set "
                    "store.latent_hw to the latent's (h, w) before the forward"
                )
            return side, side
        h, w = int(latent_hw[0]), int(latent_hw[1])
        factor = self.downsample_factor
        while factor > 1:  # stride-2 convolutions with padding 1 round up
            h, w, factor = -(-h // 2), -(-w // 2), factor // 2
        if h * w != queries:
            raise ValueError(
                f"layer {self.name!r} has {queries} queries, but store.latent_hw={tuple(latent_hw)} at "
                f"downsample factor {self.downsample_factor} gives {h}x{w}: is latent_hw up to date?"
            )
        return h, w


def cross_attention_layers(unet) -> dict[str, int]:
    """Cross-attention layer name -> downsample factor relative to the latent (1, 2, 4, 8, ...).

    Names are ``Attention`` module names (keys of ``unet.attn_processors`` without
    ``".processor"``), ordered down blocks, mid block, up blocks. The factor follows from the block structure of
    a ``UNet2DConditionModel``: down block ``i`` runs after the downsamplers of blocks ``< i``; the
    mid block after all of them; up block ``j`` after the upsamplers of up blocks ``< j``.
    """
    down_blocks = list(getattr(unet, "down_blocks", []))
    up_blocks = list(getattr(unet, "up_blocks", []))
    down_factors, factor = [], 1
    for block in down_blocks:
        down_factors.append(factor)
        if getattr(block, "downsamplers", None) is not None:
            factor *= 2
    mid_factor = factor
    up_factors = []
    for block in up_blocks:
        up_factors.append(factor)
        if getattr(block, "upsamplers", None) is not None:
            factor //= 2

    layers: dict[str, int] = {}
    for name, module in unet.named_modules():
        if not (hasattr(module, "set_processor") and getattr(module, "is_cross_attention", False)):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            layers[name] = down_factors[int(parts[1])]
        elif parts[0] == "up_blocks":
            layers[name] = up_factors[int(parts[1])]
        elif parts[0] == "mid_block":
            layers[name] = mid_factor
        else:
            raise ValueError(
                f"cross-attention layer {name!r} is outside down_blocks/mid_block/up_blocks: "
                f"{type(unet).__name__} is not a supported UNet layout"
            )
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return dict(sorted(layers.items(), key=lambda item: order[item[0].split(".")[0]]))


def default_capture_layers(unet) -> list[str]:
    """The cross-attention layers at the two coarsest levels that carry cross-attention.

    SD 1.x / 2.x: ``down_blocks.2``, ``mid_block``, ``up_blocks.1`` (16x16 and 8x8 of a 64x64
    latent). UNets with cross-attention at two levels only (the tiny test UNet, the built-in
    model): all of their cross-attention layers. SDXL-style UNets (``addition_embed_type`` "text_time"):
    the coarsest level's mid-block layers and the first attention module of the first up block there.
    See the module docstring for why.
    """
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers")
    if getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time":
        factor = max(layers.values())
        ups = [n.split(".attentions.")[0] for n, f in layers.items() if f == factor and n.startswith("up_")]
        keep = ("mid_block.", *([f"{ups[0]}.attentions.0."] if ups else []))
        return [name for name, f in layers.items() if f == factor and name.startswith(keep)]
    coarsest = sorted(set(layers.values()), reverse=True)[:2]
    return [name for name, factor in layers.items() if factor in coarsest]


def select_layers(unet, spec: str | Sequence[str] | None = None) -> list[str]:
    """Resolve a layer selection to cross-attention layer names, in UNet order.

    ``spec`` is ``None`` or ``"default"`` (:func:`default_capture_layers`), ``"all"``, or a
    comma-separated string / sequence of selectors whose union is taken:

    - ``"down"``, ``"mid"``, ``"up"``: every cross-attention layer of that part of the UNet;
    - ``"x1"``, ``"x2"``, ``"x4"``, ``"x8"``: layers at that downsample factor relative to the latent
      (resolutions in pixels depend on the image size, factors do not);
    - a layer name or a dotted prefix/segment of names (``"up_blocks.1"``,
      ``"mid_block.attentions.0"``); a trailing ``".processor"`` is ignored.

    Raises ``ValueError`` naming the valid choices when a selector matches nothing.
    """
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers")
    if spec is None:
        return default_capture_layers(unet)
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    if not tokens or any(not t for t in tokens):
        raise ValueError(f"empty layer selector in {spec!r}")

    chosen: set[str] = set()
    for token in tokens:
        key = token.lower()
        if key == "default":
            matched = default_capture_layers(unet)
        elif key == "all":
            matched = list(layers)
        elif key in _BLOCK_KEYWORDS:
            prefix = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}[key]
            matched = [name for name in layers if name.startswith(prefix)]
        elif _FACTOR_TAG.fullmatch(key):
            factor = int(key[1:])
            matched = [name for name, f in layers.items() if f == factor]
            if not matched:
                factors = ", ".join(f"x{f}" for f in sorted(set(layers.values())))
                raise ValueError(
                    f"no cross-attention layer at downsample factor {token!r}; available: {factors}"
                )
        else:
            name = token.removesuffix(_PROCESSOR_SUFFIX)
            matched = [n for n in layers if f".{name}." in f".{n}."]
        if not matched:
            raise ValueError(
                f"layer selector {token!r} matches no cross-attention layer; use 'default', 'all', "
                f"'down', 'mid', 'up', a factor tag (x1, x2, ...) or a name among: {list(layers)}"
            )
        chosen.update(matched)
    return [name for name in layers if name in chosen]


@contextlib.contextmanager
def capture_cross_attention(
    unet,
    layers: str | Sequence[str] | None = None,
    store: AttentionStore | None = None,
) -> Iterator[AttentionStore]:
    """Record the cross-attention of ``layers`` (see :func:`select_layers`) into a store.

    Replaces only the selected layers' processors with :class:`CrossAttentionCaptureProcessor`
    instances sharing one store and restores every original processor on exit, also when the body
    raises; nested uses restore in order. Yields the store (a new one unless ``store`` is given).
    """
    names = select_layers(unet, layers)
    factors = cross_attention_layers(unet)
    store = AttentionStore() if store is None else store
    original = dict(unet.attn_processors)
    replaced = dict(original)
    for name in names:
        replaced[name + _PROCESSOR_SUFFIX] = CrossAttentionCaptureProcessor(
            store, name, factors[name], ip_adapter=original[name + _PROCESSOR_SUFFIX]
        )
    # set_attn_processor pops entries from the dict it is given: always hand it a copy
    unet.set_attn_processor(dict(replaced))
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))
