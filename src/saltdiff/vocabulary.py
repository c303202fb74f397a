"""Words a model cannot draw: one warning line instead of an image that silently ignores them.

A model trained on a closed world (the built-in ``builtin:shapes`` knows six colours, three shapes
and five backgrounds) turns "on a yellow background" or "a navy circle" into whatever it knows
best, and a user cannot tell a bug from a gap in the training. Such a model's folder may hold
:data:`VOCABULARY_FILE`::

    {"words": ["a", "background", "blue", ...],
     "groups": {"colours": [...], "shapes": [...], "backgrounds": [...]}}

``words``: every word its training captions used; ``groups``: what to list in the warning, and
``groups["backgrounds"]`` the background names it was trained on (for a reference background).
Any other model is checked through its tokenizer alone: a word that it maps to its unknown token
(a SentencePiece T5 vocabulary without that character, a word-level tokenizer) is one the text
encoder never saw.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .phrases import LayoutError, find_in_prompt, normalize_phrase

logger = logging.getLogger(__name__)

#: A model folder's list of the words it was trained on (optional).
VOCABULARY_FILE = "saltdiff_vocabulary.json"
#: A word: letters of any script (``"über"``, not ``"ber"``: a T5 vocabulary may lack the ``ü``),
#: joined by inner apostrophes or hyphens.
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")
#: The tokenizer attributes of a pipeline that are checked for words mapped to the unknown token
#: (SD 1.x: the first; SDXL: two CLIPs; SD3: two CLIPs and T5).
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass(frozen=True)
class ModelVocabulary:
    """The words a model was trained on, and named groups of them for messages."""

    words: frozenset[str]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelVocabulary:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            words = frozenset(str(w).lower() for w in data["words"])
            groups = {str(k): tuple(str(v) for v in vs) for k, vs in data.get("groups", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"cannot read the model's vocabulary {str(path)!r}: {exc}") from exc
        return cls(words, groups)

    def describe(self) -> str:
        """``"colours red, blue; shapes circle, …"``: what the model knows, for a message."""
        if not self.groups:
            return f"{len(self.words)} words"
        return "; ".join(f"{name} {', '.join(values)}" for name, values in self.groups.items())


def load_vocabulary(folder: str | os.PathLike) -> ModelVocabulary | None:
    """The :data:`VOCABULARY_FILE` of a model folder, or ``None`` (a hub id, a folder without one)."""
    path = os.path.join(str(folder), VOCABULARY_FILE)
    return ModelVocabulary.from_file(path) if os.path.isfile(path) else None


def _maps_to_unknown(tokenizer, word: str) -> bool:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or tokenizer is None:
        return False
    # A tokenizer whose unknown token is also its end/padding token (CLIP's) marks nothing by it.
    if unk in {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)}:
        return False
    return unk in tokenizer(word, add_special_tokens=False).input_ids


def unknown_words(
    prompt: str, *, vocabulary: ModelVocabulary | None = None, tokenizers: Sequence = ()
) -> list[str]:
    """Words of ``prompt`` the model was not trained on (``vocabulary``) or that a tokenizer maps to its
    unknown token, each once, in prompt order."""
    out: list[str] = []
    for word in _WORD.findall(prompt):
        lower = word.lower()
        if lower in (w.lower() for w in out):
            continue
        if vocabulary is not None and lower not in vocabulary.words:
            out.append(word)
        elif any(_maps_to_unknown(t, word) for t in tokenizers if t is not None):
            out.append(word)
    return out


_BACKGROUND_PHRASE = re.compile(r"\b([A-Za-z]+)(?:\s+([A-Za-z]+))?\s+background\b", re.IGNORECASE)


def unknown_backgrounds(prompt: str, vocabulary: ModelVocabulary | None) -> list[str]:
    """Colours named as ``"... X background"`` in ``prompt`` that are not among the model's trained
    backgrounds (``"a yellow background"`` with ``builtin:shapes``, whose yellow is only an object colour)."""
    known = {b.lower() for b in (vocabulary.groups.get("backgrounds", ()) if vocabulary else ())}
    if not known:
        return []
    out = []
    for first, second in _BACKGROUND_PHRASE.findall(prompt):
        words = [w.lower() for w in (first, second) if w]
        if " ".join(words) in known or words[-1] in known:
            continue
        name = words[-1]
        if name not in {"a", "an", "the", "plain"} and name not in out:
            out.append(name)
    return out


def warn_unknown_words(
    model: str,
    prompt: str,
    *,
    vocabulary: ModelVocabulary | None = None,
    tokenizers: Sequence = (),
    background: str | None = None,
) -> str | None:
    """Log one warning line naming the words (and a reference ``background``) the model cannot draw,
    and what it knows; returns the line, or ``None`` when every word is known."""
    words = unknown_words(prompt, vocabulary=vocabulary, tokenizers=tokenizers)
    parts = []
    if words:
        parts.append("word" + ("s " if len(words) > 1 else " ") + ", ".join(repr(w) for w in words))
    backgrounds = [b for b in unknown_backgrounds(prompt, vocabulary) if b not in (w.lower() for w in words)]
    if backgrounds:
        parts.append(
            "background" + ("s " if len(backgrounds) > 1 else " ") + ", ".join(map(repr, backgrounds))
        )
    known_backgrounds = vocabulary.groups.get("backgrounds") if vocabulary is not None else None
    if isinstance(background, str) and known_backgrounds and background.lower() not in known_backgrounds:
        parts.append(
            f"reference background {background!r} (it paints the reference; the model will not keep it)"
        )
    if not parts:
        return None
    knows = f"; it knows {vocabulary.describe()}" if vocabulary is not None else ""
    line = f"{model} was not trained on {' and '.join(parts)}: the image will not show them{knows}"
    logger.warning(line)
    return line


def object_phrases(prompt: str, vocabulary: ModelVocabulary | None) -> list[str]:
    """Every ``"<colour> <shape>"`` of ``prompt`` (repeats kept, in order) for a model whose vocabulary
    names its ``colours`` and ``shapes`` groups; ``[]`` for any other model (no way to tell an object)."""
    if vocabulary is None:
        return []
    colours = [c.lower() for c in vocabulary.groups.get("colours", ())]
    shapes = [s.lower() for s in vocabulary.groups.get("shapes", ())]
    if not colours or not shapes:
        return []
    pattern = re.compile(
        r"\b(" + "|".join(map(re.escape, colours)) + r")\s+(" + "|".join(map(re.escape, shapes)) + r")\b",
        re.IGNORECASE,
    )
    return [f"{m.group(1).lower()} {m.group(2).lower()}" for m in pattern.finditer(prompt)]


def unboxed_objects(prompt: str, boxed: Sequence[str], vocabulary: ModelVocabulary | None) -> list[str]:
    """The object phrases of ``prompt`` (:func:`object_phrases`) left once each ``boxed`` phrase has
    taken one occurrence: what the prompt names without a box."""
    left = object_phrases(prompt, vocabulary)
    for phrase in boxed:
        key = normalize_phrase(phrase)
        if key in left:
            left.remove(key)
    return left


def with_unboxed_objects(layout, prompt: str, vocabulary: ModelVocabulary | None):
    """``layout`` with its :attr:`~saltdiff.layout.Layout.unboxed` phrases: the user's, each checked to
    occur in ``prompt`` (one line naming a missing one), or else those :func:`unboxed_objects` finds."""
    from dataclasses import replace

    if layout.unboxed:
        for phrase in layout.unboxed:
            if find_in_prompt(phrase, prompt) is None:
                raise LayoutError(f"unboxed phrase {phrase!r} is not in the prompt {prompt!r}")
        return layout
    if not len(layout):
        return layout
    found = unboxed_objects(prompt, layout.phrases, vocabulary)
    return replace(layout, unboxed=tuple(found)) if found else layout


def warn_pipeline_prompt(pipe, prompt: str, init=None) -> str | None:
    """:func:`warn_unknown_words` for a pipeline: its name (``model_name``), its folder's vocabulary
    (``model_vocabulary``), every tokenizer it has (:data:`TOKENIZER_NAMES`), and the flat colour of
    ``init``'s reference builder (a generated or special background is no colour to check)."""
    from .colors import GENERATED_BACKGROUNDS, SPECIAL_BACKGROUNDS

    reference = getattr(init, "reference", None)
    background = getattr(reference, "background", None)
    if background in SPECIAL_BACKGROUNDS or background in GENERATED_BACKGROUNDS:
        background = None
    config = getattr(pipe, "config", None) or {}
    return warn_unknown_words(
        getattr(pipe, "model_name", None) or config.get("_name_or_path") or type(pipe).__name__,
        prompt,
        vocabulary=getattr(pipe, "model_vocabulary", None),
        tokenizers=[getattr(pipe, name, None) for name in TOKENIZER_NAMES],
        background=background,
    )
