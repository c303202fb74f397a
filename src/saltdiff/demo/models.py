"""The pipelines a demo server offers: its own model, the built-in ones, and (only when the server
allows it) one more typed in the page. Everything loads through :func:`saltdiff.loading.load_pipeline`,
so a missing folder or an unreachable hub id is the same one-line ``ValueError`` as on the CLI.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ..loading import BUILTIN_PREFIX, builtin_models, load_pipeline


def check_model_choice(name: Any, served: Sequence[str], *, allow_model_paths: bool) -> str:
    """Refuse a model name typed in the page unless the server allows it (no arbitrary file reads)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("choose a model")
    name = name.strip()
    if name in served:
        return name
    if not allow_model_paths:
        raise ValueError(
            f"model {name!r} is not served here: this server only offers {list(served)}; loading other "
            "models from the page needs `saltdiff demo --allow-model-paths`"
        )
    return name


class ModelPool:
    """The pipelines a server offers; one extra model (typed in the page) is kept loaded at a time.

    ``default`` is a model name (hub id, folder, ``builtin:NAME``) or a pipeline object (then
    ``name`` is how the page lists it). ``device``/``dtype`` are passed to ``load_pipeline``.
    """

    def __init__(self, default, *, name: str | None = None, device=None, dtype=None, allow_model_paths=False):
        self.device, self.dtype = device, dtype
        self.allow_model_paths = allow_model_paths
        self._lock = threading.Lock()
        if isinstance(default, str):
            self.default_name = default
            self._pipes = {default: self._load(default)}
        else:
            self.default_name = name or _pipe_name(default)
            self._pipes = {self.default_name: _as_salt_pipeline(default)}
        builtins = [BUILTIN_PREFIX + k for k in builtin_models()]
        self.choices = [self.default_name] + [k for k in builtins if k != self.default_name]

    def _load(self, name: str):
        pipe = load_pipeline(name, device=self.device, dtype=self.dtype)  # ModelLoadError is a ValueError
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def get(self, name: str):
        """The pipeline for ``name`` (checked with :func:`check_model_choice`), loaded on first use."""
        name = check_model_choice(name, self.choices, allow_model_paths=self.allow_model_paths)
        with self._lock:
            if name not in self._pipes:
                for extra in [k for k in self._pipes if k != self.default_name]:
                    del self._pipes[extra]
                self._pipes[name] = self._load(name)
            return self._pipes[name]


def _pipe_name(pipe) -> str:
    name = getattr(pipe, "name_or_path", None) or getattr(
        getattr(pipe, "config", None), "_name_or_path", None
    )
    return str(name) if name else "in-memory pipeline"


def _as_salt_pipeline(pipe):
    """A plain ``StableDiffusionPipeline`` becomes a ``SaltPipeline`` on the same components, a plain
    ``StableDiffusion3Pipeline`` a ``SaltSD3Pipeline``, a plain ``FluxPipeline`` a ``SaltFluxPipeline``."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if isinstance(pipe, StableDiffusionPipeline):
        from ..pipeline import SaltPipeline

        if not isinstance(pipe, SaltPipeline):
            pipe = SaltPipeline.from_pipe(pipe)
    elif isinstance(pipe, StableDiffusion3Pipeline):
        from ..pipeline_sd3 import SaltSD3Pipeline

        if not isinstance(pipe, SaltSD3Pipeline):
            pipe = SaltSD3Pipeline.from_pipe(pipe)
    elif isinstance(pipe, FluxPipeline):
        from ..pipeline_flux import SaltFluxPipeline

        if not isinstance(pipe, SaltFluxPipeline):
            pipe = SaltFluxPipeline.from_pipe(pipe)
    return pipe
