"""What one guided pass costs on a flow model against a plain transformer row, in one process.

    OMP_NUM_THREADS=1 python benchmarks/flow_guided_pass_cost.py [--model builtin:shapes-mmdit] [--reps 30]

Times (mean of ``--reps`` calls after two warm-up calls, one latent of the model's default size, every
joint-attention block captured as the guidance captures it, a stand-in loss on the maps): a plain
forward row without autograd; a CFG batch of two rows; the guided pass (forward with autograd, then the
gradient with respect to the latent) with the full gradient, with ``guided_gradient="local"``
(``JointAttentionStore.mixing_gradient=False``), and with SDPA's math backend instead of the default
one. The ratios are what to compare (benchmarks/RESULTS.md, session 17); the milliseconds depend on
the machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from saltdiff import load_pipeline
from saltdiff.families import Conditions
from saltdiff.joint_attention import JointAttentionStore

PROMPT = "a red circle and a blue square and a green triangle on a white background"


def mean_ms(fn, reps: int) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:shapes-mmdit")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    adapter = pipe.family()
    text, negative = adapter.conditions(PROMPT), adapter.conditions("")
    side = pipe.default_size() // pipe.vae_scale_factor
    z = torch.randn(1, adapter.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    layers = list(adapter.attention_layers((side, side)))
    store = JointAttentionStore()

    def guided_pass():
        store.reset()
        latent = z.clone().requires_grad_(True)
        with torch.enable_grad():
            adapter.denoise(latent, 0.5, text)
            loss = sum(m.float()[..., 0].square().sum() for m in store.maps.values())
            torch.autograd.grad(loss, latent)

    times = {}
    with torch.no_grad():
        times["plain row"] = mean_ms(lambda: adapter.denoise(z, 0.5, text), args.reps)
        both = Conditions.cat(negative, text)
        times["CFG batch of 2"] = mean_ms(lambda: adapter.denoise(torch.cat([z, z]), 0.5, both), args.reps)
    with adapter.capture(layers, store):
        times["guided pass, full gradient"] = mean_ms(guided_pass, args.reps)
        store.mixing_gradient = False
        times["guided pass, local gradient"] = mean_ms(guided_pass, args.reps)
        store.mixing_gradient = True
        with sdpa_kernel(SDPBackend.MATH):
            times["guided pass, SDPA math backend"] = mean_ms(guided_pass, args.reps)
    base = times["plain row"]
    for name, ms in times.items():
        print(f"{name:32s} {ms:7.1f} ms  {ms / base:5.2f}x a plain row")
    return times


if __name__ == "__main__":
    main()
