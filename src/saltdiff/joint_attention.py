"""Capture of image-to-text attention in joint-attention transformers (SD3's MMDiT, FLUX).

These transformers have no cross-attention layer: text and image tokens are concatenated and attend
to each other in one softmax (SD3: ``[image, text]``; FLUX's double-stream blocks: ``[text, image]``;
FLUX's single-stream blocks receive the already joined ``[text, image]`` sequence). The stock
processors (``JointAttnProcessor2_0``, ``FluxAttnProcessor``) call fused SDPA, so no probability
ever exists as a tensor. The capture processors here compute exactly what the stock ones compute
(same projections, norms, RoPE, SDPA: same output) and additionally recompute, from the same
queries and keys, the image-query x text-key block of the joint softmax, renormalized over the
text tokens and averaged over heads: ``[batch, image_tokens, text_tokens]``, with its autograd
graph, under the layer's name in a :class:`JointAttentionStore`.

**Why renormalized over the text tokens.** In a joint softmax an image query spends most of its
mass on the image keys (self-attention), and that share varies from token to token and step to
step. Unnormalized, the text block would mix "how much this pixel listens to text at all" with
"which word it listens to"; the layout losses (:mod:`saltdiff.losses`) are written for UNet
cross-attention, whose rows are distributions over the text tokens. Renormalizing the row's text
slice gives exactly that: ``p_ij / sum_{j' in text} p_ij' = softmax_j(q_i k_j / sqrt(d))`` over the
text keys only, so the text-only softmax is computed directly (cheaper: the image-image block is
never materialized) and the guidance code reads these maps as it reads the UNet's.

:func:`capture_joint_attention` swaps the chosen layers' processors and restores the originals on
exit (also after an exception), as :func:`saltdiff.attention.capture_cross_attention` does; a
forward pre-hook on the transformer records the token grid and text length of each call (FLUX's
single blocks need the text length to split their sequence). The transformer is never forked or
monkey-patched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionStore, _phrase_weights

__all__ = [
    "FluxJointCaptureProcessor",
    "JointAttentionStore",
    "SD3JointCaptureProcessor",
    "capture_joint_attention",
    "joint_attention_layers",
    "text_attention",
]

_PROCESSOR_SUFFIX = ".processor"


@dataclass(eq=False)
class JointAttentionStore(AttentionStore):
    """:class:`~saltdiff.attention.AttentionStore` for joint attention: maps are ``[B, image_tokens, T]``.

    Heads are averaged inside the processor (FLUX has 24 heads over 4096 image tokens: keeping them
    would hold 24 times the memory per captured block). ``image_hw`` (the transformer's token grid)
    and ``text_tokens`` are set for each forward by :func:`capture_joint_attention`'s hook; set them
    yourself when calling a processor outside it.
    """

    image_hw: tuple[int, int] | None = None
    text_tokens: int | None = None
    #: Whether autograd runs through the attention outputs (the token mixing). ``False``
    #: (``GuidanceConfig.guided_gradient="local"``): under autograd the captured layers compute their
    #: attention output without a graph, so a loss on the maps reaches the inputs only through each
    #: layer's own queries and keys and the residual stream. The output's value is the same.
    mixing_gradient: bool = True

    def phrase_maps_per_layer(
        self, token_indices: Sequence[Sequence[int]], layers: Sequence[str] | None = None
    ) -> list[torch.Tensor]:
        """Per captured layer, ``[B, K, h, w]``: each phrase's tokens averaged (heads already are)."""
        names = self._layers(layers)
        num_tokens = self.maps[names[0]].shape[-1]
        weights = _phrase_weights(token_indices, num_tokens)
        out = []
        for name in names:
            probs = self.maps[name]
            if probs.shape[-1] != num_tokens:
                raise ValueError(f"layer {name!r} has {probs.shape[-1]} text tokens, expected {num_tokens}")
            h, w = self.layer_hw[name]
            per_query = probs @ weights.to(device=probs.device, dtype=probs.dtype)  # [B, Q, K]
            out.append(per_query.transpose(1, 2).reshape(probs.shape[0], weights.shape[1], h, w))
        return out


def text_attention(
    image_query: torch.Tensor, text_key: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, Q, T]``: ``softmax(q k^T / sqrt(d))`` over the text keys only, averaged over heads.

    ``image_query`` ``[B, H, Q, d]``, ``text_key`` ``[B, H, T, d]`` (heads first). Equal to the
    image x text block of the joint softmax renormalized over the text tokens (module docstring).
    Computed in float32 (a bf16 softmax over a few hundred tokens loses the small maps the loss
    reads). ``attention_mask`` (additive or boolean, already sliced to ``[..., Q, T]``) is applied
    as SDPA applies it.
    """
    scale = 1.0 / math.sqrt(image_query.shape[-1])
    logits = torch.matmul(image_query.float(), text_key.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        else:
            logits = logits + attention_mask.float()
    return logits.softmax(dim=-1).mean(dim=1)


class _CaptureBase:
    """What both capture processors share: the store, the layer name, and how a record is kept."""

    def __init__(self, store: JointAttentionStore, name: str):
        if not isinstance(store, JointAttentionStore):
            raise ValueError(f"store must be a JointAttentionStore, got {type(store).__name__}")
        self.store = store
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def _mixing(self):
        """Where the attention output is computed: without autograd when the store says so."""
        if self.store.mixing_gradient or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return torch.no_grad()

    def _record(self, image_query: torch.Tensor, text_key: torch.Tensor, mask=None) -> None:
        """Store ``text_attention`` of the kept batch rows, with the layer's token grid."""
        rows = self.store.batch_rows
        if rows is not None:
            image_query, text_key = image_query[rows], text_key[rows]
            if mask is not None and mask.shape[0] > 1:
                mask = mask[rows]
        probs = text_attention(image_query, text_key, mask)
        self.store.maps[self.name] = probs
        self.store.layer_hw[self.name] = self._grid(probs.shape[1])

    def _grid(self, queries: int) -> tuple[int, int]:
        """The layer's ``(h, w)``: the store's token grid, or a square one inferred from ``queries``."""
        hw = self.store.image_hw
        if hw is not None:
            if hw[0] * hw[1] != queries:
                raise ValueError(
                    f"layer {self.name!r} has {queries} image tokens, but store.image_hw={tuple(hw)}"
                )
            return int(hw[0]), int(hw[1])
        side = math.isqrt(queries)
        if side * side != queries:
            raise ValueError(
                f"layer {self.name!r} has {queries} image tokens, not a square: set store.image_hw"
            )
        return side, side


class SD3JointCaptureProcessor(_CaptureBase):
    """``JointAttnProcessor2_0`` (SD3, SD3.5) plus recording; the sequence is ``[image, text]``.

    The computation is diffusers 0.42.1's, line for line (``tests/test_joint_attention.py`` checks
    the outputs are equal); a call without ``encoder_hidden_states`` (SD3.5's second, image-only
    attention) is passed through and records nothing. ``attention_mask`` is ignored, as the stock
    processor ignores it.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = attn.add_q_proj(encoder_hidden_states)
            context_key = attn.add_k_proj(encoder_hidden_states)
            context_value = attn.add_v_proj(encoder_hidden_states)
            context_query = context_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_key = context_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_value = context_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            if self.store.enabled:
                self._record(query, context_key)  # image queries come first, text keys are the context's
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        with self._mixing():
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxJointCaptureProcessor(_CaptureBase):
    """``FluxAttnProcessor`` plus recording; the sequence is ``[text, image]``.

    Double-stream blocks get text as ``encoder_hidden_states`` (its length splits the sequence);
    single-stream blocks get the joined sequence alone, split at ``store.text_tokens``. Queries and
    keys are taken after RoPE, as the softmax sees them. The computation is diffusers 0.42.1's,
    through its own helpers (projections, RoPE, attention dispatch), so the output is the stock one.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.store.enabled:
            text = self._text_length(encoder_hidden_states, query.shape[1])
            # [B, S, H, d] -> heads first; rows: image queries, columns: text keys
            image_query = query[:, text:].transpose(1, 2)
            text_key = key[:, :text].transpose(1, 2)
            self._record(image_query, text_key, _mask_block(attention_mask, text, query.shape[1]))

        with self._mixing():
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _text_length(self, encoder_hidden_states, sequence: int) -> int:
        """Text tokens at the front of the sequence: the context's length, or the store's (single blocks)."""
        if encoder_hidden_states is not None:
            return encoder_hidden_states.shape[1]
        text = self.store.text_tokens
        if text is None or not 0 < text < sequence:
            raise ValueError(
                f"layer {self.name!r} gets the joined sequence ({sequence} tokens) and store.text_tokens is "
                f"{text!r}: run the transformer inside capture_joint_attention, or set it"
            )
        return text


def _mask_block(mask: torch.Tensor | None, text: int, sequence: int) -> torch.Tensor | None:
    """The image-row x text-column block of a ``[B or 1, H or 1, S or 1, S]`` SDPA mask (``None`` stays)."""
    if mask is None:
        return None
    if mask.ndim != 4 or mask.shape[-1] != sequence:
        raise ValueError(
            f"capture needs an attention mask broadcastable to [B, heads, {sequence}, {sequence}], "
            f"got shape {tuple(mask.shape)}"
        )
    rows = mask if mask.shape[-2] == 1 else mask[..., text:, :]
    return rows[..., :text]


def joint_attention_layers(transformer, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Every layer whose image queries see text keys -> its token grid ``(h, w)`` for a latent of ``latent_hw``.

    ``latent_hw`` is the VAE latent's size (before FLUX's 2x2 packing). SD3: the joint ``attn`` of
    every block (not SD3.5's image-only ``attn2``), at ``latent / patch_size``; FLUX: the double
    blocks' ``attn`` and the single blocks' ``attn``, at ``latent / 2`` (packing; ``patch_size`` 1).
    Names are ``transformer.attn_processors`` keys without ``".processor"``, in forward order.
    """
    h, w = (int(v) for v in latent_hw)
    patch = int(transformer.config.get("patch_size", 1))
    factor = patch * (2 if _is_flux(transformer) else 1)
    if h < 1 or w < 1 or h % factor or w % factor:
        raise ValueError(
            f"latent_hw must be positive multiples of {factor} for this transformer, got {latent_hw}"
        )
    grid = (h // factor, w // factor)
    layers = {}
    for key in transformer.attn_processors:
        name = key.removesuffix(_PROCESSOR_SUFFIX)
        module = transformer.get_submodule(name)
        if getattr(module, "add_k_proj", None) is not None or name.startswith("single_transformer_blocks."):
            layers[name] = grid
    return layers


def _is_flux(transformer) -> bool:
    """FLUX-structured (packed latents, single-stream blocks) rather than SD3-structured."""
    return "num_single_layers" in transformer.config


def _capture_processor(original, store: JointAttentionStore, name: str):
    """The capture processor that replaces ``original`` exactly, or ``ValueError`` for another kind."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if type(original) is JointAttnProcessor2_0:
        return SD3JointCaptureProcessor(store, name)
    if type(original) is FluxAttnProcessor:
        capture = FluxJointCaptureProcessor(store, name)
        # set_attention_backend / context parallelism configure the processor instance: keep them
        capture._attention_backend = getattr(original, "_attention_backend", None)
        capture._parallel_config = getattr(original, "_parallel_config", None)
        return capture
    raise ValueError(
        f"layer {name!r} uses {type(original).__name__}; joint-attention capture replaces only "
        "JointAttnProcessor2_0 (SD3) and FluxAttnProcessor (FLUX) -- unfuse QKV, drop IP-Adapters first"
    )


@contextlib.contextmanager
def capture_joint_attention(
    transformer,
    layers: Sequence[str] | None = None,
    store: JointAttentionStore | None = None,
) -> Iterator[JointAttentionStore]:
    """Record the text attention of ``layers`` (default: all of :func:`joint_attention_layers`).

    Replaces only those layers' processors; every original processor comes back on exit, also when
    the body raises (``set_attn_processor`` empties the dict it is given, so it always gets a
    copy). A forward pre-hook sets ``store.image_hw`` and ``store.text_tokens`` from each call's
    inputs, and is removed on exit too. Yields the store (a new one unless ``store`` is given).
    """
    original = dict(transformer.attn_processors)
    available = [k.removesuffix(_PROCESSOR_SUFFIX) for k in original]
    capturable = [n for n in available if n in joint_attention_layers(transformer, _any_grid(transformer))]
    names = capturable if layers is None else [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in names if n not in capturable]
    if unknown or not names:
        raise ValueError(f"layers {unknown or names!r} are not capturable; choose among {capturable}")
    store = JointAttentionStore() if store is None else store
    replaced = dict(original)
    for name in names:
        key = name + _PROCESSOR_SUFFIX
        replaced[key] = _capture_processor(original[key], store, name)
    handle = transformer.register_forward_pre_hook(_grid_hook(store, transformer), with_kwargs=True)
    try:
        transformer.set_attn_processor(dict(replaced))
        yield store
    finally:
        handle.remove()
        transformer.set_attn_processor(dict(original))


def _any_grid(transformer) -> tuple[int, int]:
    """A latent size every transformer accepts, for listing layers without a real latent."""
    factor = int(transformer.config.get("patch_size", 1)) * (2 if _is_flux(transformer) else 1)
    return factor, factor


def _grid_hook(store: JointAttentionStore, transformer):
    """A forward pre-hook that reads the token grid and text length of the call into ``store``."""
    patch = int(transformer.config.get("patch_size", 1))

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        store.text_tokens = None if context is None else int(context.shape[1])
        if hidden is not None and hidden.ndim == 4:  # SD3: [B, C, H, W], patchified inside
            store.image_hw = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        else:  # FLUX: packed [B, N, C]; img_ids [N, 3] hold (0, row, col)
            ids = kwargs.get("img_ids")
            store.image_hw = None
            # meta ids (shapes-only memory estimates) hold no positions: the grid is then inferred square
            if ids is not None and not ids.is_meta:
                ids = ids[0] if ids.ndim == 3 else ids
                store.image_hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)

    return hook
