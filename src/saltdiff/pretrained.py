"""``PretrainedMixin``: loading a SALT pipeline checked against its model family, for every family.

``from_pretrained`` reads the family from ``model_index.json`` before any weight loads (a folder or
a cached hub id; a hub id fetched just now is checked right after), loads in one dtype (float32
unless told), and records where the model came from and the words it was trained on;
``from_pipe`` refuses a pipeline of another family in one line. Both the UNet pipelines
(:class:`saltdiff.salt_mixin.SaltMixin`) and the flow pipelines
(:class:`saltdiff.flow_pipeline.FlowSaltMixin`) mix it in before their diffusers class, so it also
holds what every SALT pipeline owns whatever its family: the z_T* memo (``inversion_memo``).
"""

from __future__ import annotations

import os

import torch

from .checkpoints import check_family, check_model_index, null_components, resolve_model
from .components import dtype_keyword
from .init_context import InversionMemo
from .vocabulary import ModelVocabulary, load_vocabulary

__all__ = ["PretrainedMixin"]


class PretrainedMixin:
    """``from_pretrained`` / ``from_pipe`` checked against :attr:`_family` (a ``checkpoints.FAMILIES`` key)."""

    _family: str
    #: Where the pipeline came from (``from_pretrained``'s name), and the words its model was trained
    #: on when its folder lists them (:mod:`saltdiff.vocabulary`; the built-in models do).
    model_name: str | None = None
    model_vocabulary: ModelVocabulary | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        name = str(pretrained_model_name_or_path)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            # One dtype throughout, whatever the files hold (transformers loads a text encoder in its
            # files' dtype, diffusers its models in fp32; the built-in model is fp16 on disk): fp32.
            kwargs[dtype_keyword()] = torch.float32
        path = resolve_model(name)
        where = {"cache_dir": kwargs.get("cache_dir"), "revision": kwargs.get("revision")}
        checked = check_model_index(path, name, **where, family=cls._family)  # a folder or a cached hub id
        for component in null_components(path):  # a folder saved without one (SD3 without T5)
            kwargs.setdefault(component, None)
        pipe = super().from_pretrained(path, **kwargs)
        if not checked:  # a hub id fetched just now: its index is cached now
            check_model_index(path, name, **where, family=cls._family)
        pipe._after_loading()
        pipe.model_name = name
        pipe.model_vocabulary = load_vocabulary(path) if os.path.isdir(str(path)) else None
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        source = f"the {type(pipeline).__name__} given"
        check_family(type(pipeline).__name__, pipeline.components, source, family=cls._family)
        pipe = super().from_pipe(pipeline, **kwargs)
        pipe.model_name = getattr(pipeline, "model_name", None)
        pipe.model_vocabulary = getattr(pipeline, "model_vocabulary", None)
        return pipe

    @property
    def inversion_memo(self) -> InversionMemo:
        """The z_T* this pipeline keeps (:class:`~saltdiff.init_context.InversionMemo`), its own: a
        pipeline made by ``from_pipe`` starts empty. ``pipe.inversion_memo.clear()`` forgets them.

        Made on first use: diffusers builds a pipeline from its ``__init__`` signature (the
        components), which a mixin cannot extend."""
        memo = self.__dict__.get("_inversion_memo")
        if memo is None:
            memo = self.__dict__["_inversion_memo"] = InversionMemo()
        return memo

    def _after_loading(self) -> None:
        """A family's fix-ups of freshly loaded components (SD: tokenizer lengths); none by default."""
