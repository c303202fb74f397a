"""Token grounding (TokenCompose-style): pull each object word's cross-attention into its object's box.

The loss is the layout-guidance energy of :func:`saltdiff.losses.layout_guidance_loss` applied at
training time, with soft box masks (:func:`saltdiff.layout.box_coverage`) on the coarse attention
grids; the scenes' boxes are re-created from their seeds, so the latent cache stores none.
"""

from __future__ import annotations

import torch

from ..layout import Layout, box_coverage
from ..losses import layout_guidance_loss

__all__ = ["grounding_loss", "grounding_targets"]


def grounding_targets(seeds: torch.Tensor, tokenizer) -> list[list[tuple[int, tuple]]]:
    """Per sample: ``(token position, box)`` for each token of every object's phrase (color, shape).

    The scene is re-created from its seed (the cache keeps seeds), so boxes need no storage; token
    positions come from :meth:`Layout.resolve_tokens` on the scene's caption, the same resolution
    the pipeline uses. An object whose phrase occurs twice in the scene is skipped.
    """
    from ..worlds.shapes import sample_scene

    out = []
    for seed in seeds.tolist():
        scene = sample_scene(int(seed))
        phrases = [o.phrase for o in scene.objects]
        unique = [o for o in scene.objects if phrases.count(o.phrase) == 1]
        if not unique:
            out.append([])
            continue
        layout = Layout.from_pairs([(o.phrase, o.box) for o in unique])
        positions = layout.resolve_tokens(tokenizer, scene.caption)
        out.append([(pos, tuple(o.box)) for o, toks in zip(unique, positions) for pos in toks])
    return out


def grounding_loss(store, targets: list[list[tuple[int, tuple]]], keep: torch.Tensor) -> torch.Tensor:
    """Mean over captured layers and grounded words of ``(1 - attention mass inside the box)^2``.

    A word's map is its column of the head-averaged attention probabilities, normalized over
    the layer's pixels (TokenCompose's token loss, with boxes for masks). Caption-dropped samples
    (``keep`` false) have no words to ground. Each grounded word is one "box" of
    :func:`~saltdiff.losses.layout_guidance_loss` (a batch of one with ``R`` boxes), whose mean
    over boxes is the mean over words.
    """
    rows = [(b, pos, box) for b, pairs in enumerate(targets) if keep[b] for pos, box in pairs]
    if not rows:
        return torch.zeros(())
    b_idx = torch.tensor([r[0] for r in rows])
    t_idx = torch.tensor([r[1] for r in rows])
    losses = []
    mask_cache: dict = {}
    for name, probs in store.maps.items():
        h, w = store.layer_hw[name]
        if (h, w) not in mask_cache:
            mask_cache[(h, w)] = torch.stack([box_coverage(r[2], h, w) for r in rows])  # [R, h, w]
        masks = mask_cache[(h, w)]
        if probs.ndim == 4:  # cross-attention keeps heads; joint-attention stores average them already
            probs = probs.mean(dim=1)
        maps = probs[b_idx, :, t_idx]  # [R, Q]
        losses.append(layout_guidance_loss(maps.reshape(1, len(rows), h, w), masks.unsqueeze(0)))
    return torch.stack(losses).mean()
