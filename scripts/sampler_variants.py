"""``saltdiff bench`` with extra, experimental samplers registered (the probes behind ``ancestral_skip``;
results in ``benchmarks/RESULTS.md``, "``salt`` under each sampler").

    PYTHONPATH=src python scripts/sampler_variants.py bench --suite shapes --n 50 --seeds 1 \
        --steps 25 --methods salt --scheduler euler-a-skip4 --device cpu --out DIR

Registered here, not in the package:

* ``ddim-eta1``: DDIM with eta = 1 (ancestral DDIM, i.e. DDPM on the sampler's grid), whatever
  ``eta`` the call passes; the VP-space twin of Euler a.
* ``euler-a-skipK`` (K = 1..10) and ``ddim-skipK``: the sampler's schedule for ``steps + K`` steps
  with its first K (noisiest) steps dropped: the same number of UNet calls, starting at a lower noise
  level. SALT inverts to the new first timestep (``samplers.sampler_start_timestep`` reads it), so
  the start keeps more of the reference's layout in its clean part.
"""

from __future__ import annotations

import sys

from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from saltdiff.registry import SCHEDULERS, Entry


class DDIMEta1(DDIMScheduler):
    def step(self, model_output, timestep, sample, eta=0.0, *args, **kwargs):
        return super().step(model_output, timestep, sample, 1.0, *args, **kwargs)


def _skipping(base, k: int):
    """``base`` whose ``set_timesteps(n)`` keeps the last n timesteps of its (n + k)-step schedule."""

    def set_timesteps(self, num_inference_steps, device=None, **kwargs):
        base.set_timesteps(self, num_inference_steps + k, device=device, **kwargs)
        self.timesteps = self.timesteps[k:]
        if (
            hasattr(self, "sigmas")
            and isinstance(base, type)
            and issubclass(base, EulerAncestralDiscreteScheduler)
        ):
            self.sigmas = self.sigmas[k:]
        self.num_inference_steps = num_inference_steps
        if hasattr(self, "_step_index"):
            self._step_index = None
            self._begin_index = None

    cls = type(f"{base.__name__}Skip{k}", (base,), {"set_timesteps": set_timesteps})
    if base is DDIMScheduler:
        # DDIM's step reads the previous timestep as t - 1000 // num_inference_steps: keep the (n + k) grid
        def step(self, model_output, timestep, sample, *args, **kwargs):
            n = self.num_inference_steps
            self.num_inference_steps = n + k
            try:
                return base.step(self, model_output, timestep, sample, *args, **kwargs)
            finally:
                self.num_inference_steps = n

        cls.step = step
    cls.__module__ = __name__
    return cls


SCHEDULERS.register(Entry("ddim-eta1", f"{__name__}:DDIMEta1", "DDIM, eta = 1"), replace=True)
for _k in range(1, 11):
    for _base, _name in ((EulerAncestralDiscreteScheduler, "euler-a"), (DDIMScheduler, "ddim")):
        _cls = _skipping(_base, _k)
        globals()[_cls.__name__] = _cls
        SCHEDULERS.register(
            Entry(f"{_name}-skip{_k}", f"{__name__}:{_cls.__name__}", f"{_name}, first {_k} steps dropped"),
            replace=True,
        )


if __name__ == "__main__":
    sys.modules.setdefault("sampler_variants", sys.modules[__name__])
    from saltdiff.cli import main

    raise SystemExit(main(sys.argv[1:]))
