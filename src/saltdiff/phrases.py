"""A prompt's phrases: where they sit in each tokenizer's sequence, and prompts made from them.

Every model family asks the same questions of a prompt and its boxed phrases, with its own
tokenizers (CLIP BPE, T5 SentencePiece): which token positions hold a phrase
(:func:`resolve_phrase_tokens`, :func:`resolve_boxes`), whether they lie inside what the text
encoder reads (:func:`check_sequence_length`), whether two tokenizers whose states sit side by side
agree (:func:`agreed_positions`), and which positions are the rest of the prompt
(:func:`other_tokens`). The outside prompt needs the prompt without its boxed phrases
(:func:`strip_phrases`) or the boxed phrases alone (:func:`boxed_phrases_prompt`). One module, so
that every family answers them alike and a phrase one encoder cannot see is one line naming it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from .fileio import excerpt

__all__ = [
    "LayoutError",
    "Phrase",
    "agreed_positions",
    "boxed_phrases_prompt",
    "check_sequence_length",
    "find_in_prompt",
    "normalize_phrase",
    "other_tokens",
    "resolve_boxes",
    "resolve_phrase_tokens",
    "strip_phrases",
    "suggest",
]


class LayoutError(ValueError):
    """An invalid layout, box, box specification, or a phrase that cannot be found in the prompt.

    Defined here, the lowest module that raises it, and re-exported by :mod:`saltdiff.layout`.
    """


class Phrase(NamedTuple):
    """A phrase looked up without a box (a family adapter's ``phrase_tokens``): what
    :func:`resolve_boxes` reads of a :class:`~saltdiff.layout.Box`."""

    phrase: str
    occurrence: int | None = None
    box: tuple[float, float, float, float] | None = None


def normalize_phrase(phrase: str) -> str:
    """Lower case, single spaces: the key two spellings of one phrase share ("Red  Car" and "red car")."""
    return " ".join(phrase.lower().split())


def suggest(phrase: str, prompt: str) -> str:
    """`` (did you mean 'x'?)`` with the prompt's words (or word pairs) closest to ``phrase``, or ``""``."""
    words = re.findall(r"\w+", prompt.lower())
    target = normalize_phrase(phrase)
    close = difflib.get_close_matches(target, list(dict.fromkeys(words)), n=3, cutoff=0.6)
    if not close and " " in target:
        grams = {" ".join(g) for g in zip(words, words[1:])}
        close = difflib.get_close_matches(target, sorted(grams), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def find_in_prompt(phrase: str, prompt: str) -> re.Match | None:
    """Where ``phrase`` occurs in ``prompt`` as whole words, ignoring case (single spaces between its
    words), or ``None``: the text itself, before any tokenizer reads it."""
    return re.search(r"(?<!\w)" + re.escape(" ".join(phrase.split())) + r"(?!\w)", prompt, re.IGNORECASE)


def _pieces(tokenizer, text: str) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def _not_found(tokenizer, prompt: str, phrase: str) -> str:
    """Why ``phrase`` is not in ``prompt``: a did-you-mean, or, when the text is there as whole words,
    how this tokenizer reads it (a letter case or character its vocabulary lacks: T5's SentencePiece
    keeps case, CLIP lowers it), so that a phrase one encoder sees and another does not is one line."""
    seen = find_in_prompt(phrase, prompt)
    if seen is None:
        return (
            f"phrase {excerpt(phrase)} not found in prompt {excerpt(prompt, 120)}{suggest(phrase, prompt)}. "
            "A box's phrase must appear in the prompt as whole words"
        )
    return (
        f"phrase {excerpt(phrase)} not found in prompt {excerpt(prompt, 120)} by {type(tokenizer).__name__}: "
        f"it reads {excerpt(seen.group(0))} there as {_pieces(tokenizer, seen.group(0))} but the phrase as "
        f"{_pieces(tokenizer, phrase.strip())} (letter case or a character its vocabulary lacks): "
        "write the phrase exactly as in the prompt, or in characters every text encoder of the model knows"
    )


def resolve_phrase_tokens(
    tokenizer,
    prompt: str,
    phrase: str,
    occurrence: int | None = None,
    exclude: set[int] | frozenset[int] = frozenset(),
) -> list[int]:
    """Positions of ``phrase``'s tokens in ``tokenizer(prompt).input_ids`` (CLIP: BOS is position 0).

    The prompt is encoded without truncation and the phrase without special tokens; the phrase's
    token sequence is then searched as a contiguous run of the prompt's tokens that starts at a word
    boundary. So with CLIP's tokenizer "Dog," in the prompt matches the phrase "dog", and multi-token
    phrases ("traffic light", words split into several BPE pieces) work; T5's SentencePiece pieces
    carry their word start ("▁dog") themselves. ``occurrence`` (0-based) picks the n-th match;
    otherwise the first match not overlapping ``exclude`` is returned. Positions returned for an
    explicit ``occurrence`` may overlap ``exclude``; the caller decides.
    """
    if not isinstance(phrase, str) or not phrase.strip():
        raise LayoutError(f"phrase must be a non-empty string, got {excerpt(phrase)}")
    if not isinstance(prompt, str):
        raise LayoutError(f"prompt must be a string, got {excerpt(prompt, 120)}")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 1e9 and len(prompt_ids) > limit:
        raise LayoutError(
            f"prompt is {len(prompt_ids)} tokens long (with start/end tokens), more than the text encoder's "
            f"limit of {limit}: tokens past the limit are cut off, so phrase {excerpt(phrase)} might be lost. "
            f"Shorten the prompt {excerpt(prompt, 120)}"
        )
    phrase_ids = list(tokenizer(phrase.strip(), add_special_tokens=False).input_ids)
    if not phrase_ids:
        raise LayoutError(f"phrase {excerpt(phrase)} encodes to no tokens")

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    word_suffix = "</w>" if str(tokenizer.convert_ids_to_tokens(phrase_ids[-1])).endswith("</w>") else None

    def at_word_start(i: int) -> bool:
        # BPE pieces of one word carry "</w>" only on the last piece: a match must not begin mid-word.
        if word_suffix is None or i == 0 or prompt_ids[i - 1] in special:
            return True
        return str(tokens[i - 1]).endswith(word_suffix)

    n = len(phrase_ids)
    matches = [
        list(range(i, i + n))
        for i in range(len(prompt_ids) - n + 1)
        if prompt_ids[i : i + n] == phrase_ids and at_word_start(i)
    ]
    if not matches:
        raise LayoutError(_not_found(tokenizer, prompt, phrase))
    if occurrence is not None:
        if isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 0:
            raise LayoutError(
                f"occurrence of phrase {excerpt(phrase)} must be a non-negative integer, got {excerpt(occurrence)}"
            )
        if occurrence >= len(matches):
            raise LayoutError(
                f"occurrence {occurrence} (0-based; '#{occurrence + 1}' on the command line) of phrase {excerpt(phrase)} "
                f"does not exist: the phrase occurs {len(matches)} time(s) in prompt {excerpt(prompt, 120)}"
            )
        return matches[occurrence]
    for m in matches:
        if not exclude.intersection(m):
            return m
    raise LayoutError(
        f"duplicate boxes for one token: all {len(matches)} occurrence(s) of phrase {excerpt(phrase)} in prompt "
        f"{excerpt(prompt, 120)} are already taken by earlier boxes; repeat the word in the prompt or drop a box"
    )


def resolve_boxes(tokenizer, prompt: str, boxes: Sequence[Any]) -> list[list[int]]:
    """For each box (a :class:`~saltdiff.layout.Box`: ``phrase``, ``occurrence``, ``box``), the positions
    of its phrase in ``tokenizer(prompt).input_ids``: :meth:`saltdiff.layout.Layout.resolve_tokens`.

    Boxes are resolved in order; a box without ``occurrence`` takes the first match that no earlier
    box took, so two boxes of one phrase bind to its first and second occurrence. Two boxes resolving
    to a shared token are an error.
    """
    taken: set[int] = set()
    owner: dict[int, Any] = {}
    result = []
    for b in boxes:
        positions = resolve_phrase_tokens(tokenizer, prompt, b.phrase, b.occurrence, exclude=taken)
        clash = sorted(set(positions) & taken)
        if clash:  # only reachable with an explicit occurrence
            other = owner[clash[0]]
            raise LayoutError(
                f"duplicate boxes for one token: box {b.box} of phrase {excerpt(b.phrase)} (occurrence "
                f"{b.occurrence}) and box {other.box} of phrase {excerpt(other.phrase)} both resolve to token "
                f"position(s) {clash} in prompt {excerpt(prompt, 120)}"
            )
        taken.update(positions)
        owner.update(dict.fromkeys(positions, b))
        result.append(positions)
    return result


def check_sequence_length(
    phrase: str, positions: Sequence[int], max_sequence_length: int, encoder: str = "T5"
) -> list[int]:
    """``positions`` when they lie inside the first ``max_sequence_length`` tokens the encoder reads;
    otherwise one line naming the phrase (T5 is cut there, the phrase would guide nothing)."""
    if positions and positions[-1] >= max_sequence_length:
        raise LayoutError(
            f"phrase {phrase!r} is at {encoder} token {positions[-1]}, past max_sequence_length={max_sequence_length}"
        )
    return list(positions)


def agreed_positions(who: str, phrases: Sequence[str], prompt: str, first: list, second: list) -> list:
    """``first`` when it equals ``second``: two tokenizers whose states the model reads side by side
    (one column per token: SDXL, SD3's two CLIPs) must put every phrase at the same positions."""
    if first != second:
        raise LayoutError(
            f"{who} put the boxed phrases {list(phrases)} of {prompt!r} at different token positions "
            f"({first} and {second}); reword the prompt"
        )
    return first


def other_tokens(
    tokenizer, prompt: str, token_indices: Sequence[Sequence[int]], max_sequence_length: int | None = None
) -> list[int]:
    """The prompt's positions outside every boxed phrase, between BOS (CLIP's; T5 has none) and EOS
    and inside ``max_sequence_length``: the words an ``unboxed_tokens`` guidance loss protects."""
    ids = tokenizer(prompt).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    start = 1 if bos is not None and len(ids) and ids[0] == bos else 0
    end = len(ids) - 1
    if max_sequence_length is not None:
        end = min(end, max_sequence_length)
    boxed = {i for group in token_indices for i in group}
    return [i for i in range(start, end) if i not in boxed]


def strip_phrases(prompt: str, phrases: list[str]) -> str:
    """The prompt without the boxed phrases (and their articles), for a background-only scene.

    The connectors between removed phrases go with them ("a picture of a cat and a dog in the park"
    becomes "a picture in the park", not "a picture of and in the park"): a dangling "of" or "and"
    makes small models draw stray objects.
    """
    slot = "\x00"
    text = prompt
    for phrase in sorted(set(phrases), key=len, reverse=True):
        pattern = r"\b(?:(?:a|an|the|one|two|some)\s+)?" + re.escape(phrase) + r"s?\b"
        text = re.sub(pattern, f" {slot} ", text, flags=re.IGNORECASE)
    joined = re.compile(slot + r"(?:\s|,|\band\b|\bwith\b|\bor\b)*" + slot, re.IGNORECASE)
    while joined.search(text):
        text = joined.sub(slot, text)
    text = re.sub(r"\bof\s+" + slot, slot, text, flags=re.IGNORECASE)
    text = text.replace(slot, " ")
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    text = re.sub(r"\s+", " ", text).strip(" ,.;")
    text = re.sub(r"^(and|with|,)\s+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+(and|with)$", "", text, flags=re.IGNORECASE)
    return text.strip(" ,.;")


def boxed_phrases_prompt(phrases: list[str]) -> str:
    """The boxed phrases as one prompt ("a red circle and an apple"), each once, in layout order:
    the negative prompt outside the boxes (``outside_prompt="boxed-negative"``)."""
    unique = list(dict.fromkeys(phrases))
    with_article = [
        p
        if re.match(r"(a|an|the)\s", p, re.IGNORECASE)
        else f"{'an' if p[:1].lower() in 'aeiou' else 'a'} {p}"
        for p in unique
    ]
    return (
        " and ".join(with_article)
        if len(with_article) < 3
        else ", ".join(with_article[:-1]) + " and " + with_article[-1]
    )
