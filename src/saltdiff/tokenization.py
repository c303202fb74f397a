"""Build a real CLIP BPE tokenizer for a small closed vocabulary.

The built-in model and the tests need a ``CLIPTokenizer`` without downloading one. We generate the
two files CLIP's tokenizer is made of (``vocab.json`` and ``merges.txt``): the 512 byte symbols of
CLIP's byte-level BPE (so *any* text still tokenizes, character by character), plus merges that
turn each word of the given vocabulary into a single ``word</w>`` token. Words outside the
vocabulary therefore become several tokens — exactly the multi-token case that token resolution
must handle with real checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import lru_cache

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _word_symbols(word: str) -> list[str]:
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"]


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair with the lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        best_rank = min(r for r, _ in pairs)
        first, second = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best_rank)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges that make every word in ``words`` one token (lower-cased)."""
    table = bytes_to_unicode()
    base = list(table.values())
    vocab_list = base + [c + "</w>" for c in base]
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    seen = set(vocab_list)
    for word in sorted({w.lower() for w in words if w.strip()}):
        if not word.isalpha():
            raise ValueError(f"vocabulary words must be alphabetic, got {word!r}")
        symbols = _apply_bpe(_word_symbols(word), ranks)
        # Merges appended later have higher rank, so they never disturb words already single tokens.
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                seen.add(pair[0] + pair[1])
                vocab_list.append(pair[0] + pair[1])
            symbols = _apply_bpe(symbols, ranks)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_clip_tokenizer_files(words: Iterable[str], directory: str | os.PathLike) -> None:
    """Write ``vocab.json`` and ``merges.txt`` for ``words`` into ``directory``."""
    vocab, merges = build_vocab_and_merges(words)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


def build_clip_tokenizer(words: Iterable[str], directory: str | os.PathLike, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` whose vocabulary makes each of ``words`` a single token."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(words, directory)
    # from_pretrained reads vocab.json/merges.txt the same way across transformers versions.
    return CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=model_max_length, pad_token=EOS_TOKEN
    )
