"""What one guided pass of SDXL's UNet keeps for its backward, at 1024x1024 in fp16: computed, not run.

    python scripts/sdxl_guided_memory.py [--size 1024] [--layers default all mid]

The full SDXL base UNet is built on the meta device (shapes only, no weights, seconds on a CPU) and
run once as a guided pass runs it (conditional row, batch 1, gradients on, the chosen layers
captured). Every tensor autograd saves is counted once per storage, parameters excluded. Attention
outside the captured layers counts as CUDA's flash / memory-efficient kernels keep it (q, k, v, the
output and a float32 log-sum-exp per query, no attention matrix). Printed per layer choice: the
captured probabilities (heads x queries x 77 tokens x 2 bytes per layer), what is kept up to the last
captured layer (a guided pass stops there: ``saltdiff.denoising.stop_after``) and what a whole
forward would keep. Transient buffers of the backward itself are not counted.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from saltdiff.attention import capture_cross_attention, select_layers
from saltdiff.testing import SDXL_UNET_CONFIG


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


def saved_bytes(unet, layers: str, side: int) -> tuple[int, int, int, int]:
    """``(captured layers, probability bytes, bytes kept up to the last captured layer, whole forward)``."""
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    seen: set[int] = set()
    total = 0
    upto = {}

    def pack(t):
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in seen and key not in params:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    names = select_layers(unet, layers)
    handle = unet.get_submodule(names[-1]).register_forward_hook(lambda *_: upto.setdefault("bytes", total))
    half = dict(device="meta", dtype=torch.float16)
    latent = torch.empty(1, 4, side // 8, side // 8, requires_grad=True, **half)
    text = torch.empty(1, 77, 2048, **half)
    added = {"text_embeds": torch.empty(1, 1280, **half), "time_ids": torch.empty(1, 6, **half)}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, **kw: FlashLikeAttention.apply(q, k, v)
    try:
        with (
            capture_cross_attention(unet, names) as store,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            unet(latent, 999, encoder_hidden_states=text, added_cond_kwargs=added)
            probs = sum(m.untyped_storage().nbytes() for m in store.maps.values())
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        handle.remove()
    return len(names), probs, upto["bytes"], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--layers", nargs="+", default=["default", "all", "mid"])
    args = parser.parse_args()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.float16)
    gib, mib = 2**30, 2**20
    print(f"SDXL UNet, {args.size}x{args.size}, fp16, one guided pass (batch 1)")
    print("| layers | captured | probabilities | kept up to the last captured layer | whole forward |")
    print("|---|---|---|---|---|")
    for spec in args.layers:
        n, probs, upto, whole = saved_bytes(unet, spec, args.size)
        print(f"| {spec} | {n} | {probs / mib:.0f} MiB | {upto / gib:.2f} GiB | {whole / gib:.2f} GiB |")


if __name__ == "__main__":
    main()
