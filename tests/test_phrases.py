"""saltdiff.phrases: phrase -> token positions with CLIP BPE and T5 SentencePiece, the rest of the
prompt, the T5 length check, one line for a phrase one encoder cannot see, the outside-prompt text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import saltdiff
from saltdiff import layout as layout_module
from saltdiff.families.flux import FluxFamily
from saltdiff.families.sd3 import SD3Family
from saltdiff.layout import Box, Layout
from saltdiff.phrases import (
    LayoutError,
    Phrase,
    agreed_positions,
    boxed_phrases_prompt,
    check_sequence_length,
    find_in_prompt,
    normalize_phrase,
    other_tokens,
    resolve_boxes,
    resolve_phrase_tokens,
    strip_phrases,
    suggest,
)
from saltdiff.testing import tiny_tokenizer
from saltdiff.testing_flow import tiny_t5_tokenizer


@pytest.fixture(scope="module")
def clip():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def t5():
    return tiny_t5_tokenizer()


@pytest.fixture(scope="module")
def sd3_parts(clip, t5):
    """What SD3Family reads to look up phrases: the pipeline's three tokenizers, nothing else."""
    return SimpleNamespace(
        tokenizer=clip, tokenizer_2=clip, tokenizer_3=t5, text_encoder_3=object(), tokenizer_max_length=77
    )


def pieces(tokenizer, prompt, positions):
    ids = tokenizer(prompt).input_ids
    return [tokenizer.convert_ids_to_tokens(ids[i]) for i in positions]


def test_public_names_stay_where_they_were():
    assert layout_module.resolve_phrase_tokens is resolve_phrase_tokens
    assert layout_module.LayoutError is LayoutError and saltdiff.LayoutError is LayoutError
    assert issubclass(LayoutError, ValueError)


def test_normalize_and_suggest():
    assert normalize_phrase("  Red   Car ") == "red car"
    assert suggest("dgo", "a photo of a dog") == " (did you mean 'dog'?)"
    # word pairs when no single word is close
    assert suggest("tra lig", "a traffic light") == " (did you mean 'traffic light'?)"
    assert suggest("zebra", "a red car") == ""
    assert find_in_prompt("red  car", "A Red car.").group(0) == "Red car"
    assert find_in_prompt("cat", "two cats") is None


def test_clip_and_t5_positions(clip, t5):
    # CLIP: BOS at 0, word-start matching on "</w>"; T5: no BOS, "▁" marks the word start
    assert resolve_phrase_tokens(clip, "a red cat", "red cat") == [2, 3]
    assert resolve_phrase_tokens(t5, "a red cat", "red cat") == [1, 2]
    assert pieces(t5, "a red cat", [1, 2]) == ["▁red", "▁cat"]
    # a word outside either vocabulary is several pieces in both, still found as a whole word
    zebra = resolve_phrase_tokens(clip, "a zebra", "zebra")
    assert pieces(clip, "a zebra", zebra) == ["z", "e", "b", "r", "a</w>"]
    assert resolve_phrase_tokens(t5, "a zebra", "zebra") == [1, 2, 3, 4, 5, 6]
    with pytest.raises(LayoutError, match="'ed' not found"):
        resolve_phrase_tokens(t5, "a red cat", "ed")
    assert resolve_phrase_tokens(t5, "a dog and a dog", "dog", occurrence=1) == [4]


def test_resolve_boxes_is_the_layouts_lookup(clip, t5):
    prompt = "a dog and a cat and a dog"
    boxes = (Box("dog", (0, 0, 0.5, 0.5)), Box("dog", (0.5, 0.5, 1, 1)), Box("cat", (0, 0.5, 0.5, 1)))
    layout = Layout(boxes)
    assert resolve_boxes(clip, prompt, layout.boxes) == layout.resolve_tokens(clip, prompt) == [[2], [8], [5]]
    assert resolve_boxes(t5, prompt, layout.boxes) == [[1], [7], [4]]
    assert resolve_boxes(t5, prompt, [Phrase("dog", 1)]) == [[7]]
    assert resolve_boxes(clip, prompt, []) == []


def test_other_tokens_clip_and_t5(clip, t5):
    prompt = "a red cat on the table"
    boxed = [resolve_phrase_tokens(clip, prompt, "red cat")]
    ids = clip(prompt).input_ids
    assert other_tokens(clip, prompt, boxed) == [i for i in range(1, len(ids) - 1) if i not in {2, 3}]
    assert other_tokens(clip, prompt, boxed) == [1, 4, 5, 6]  # BOS and EOS are not words
    boxed_t5 = [resolve_phrase_tokens(t5, prompt, "red cat")]
    assert other_tokens(t5, prompt, boxed_t5, max_sequence_length=512) == [0, 3, 4, 5]  # no BOS in T5
    assert other_tokens(t5, prompt, boxed_t5, max_sequence_length=4) == [0, 3]  # T5 is cut there


def test_sequence_length_is_one_line():
    assert check_sequence_length("cat", [2, 3], 4) == [2, 3]
    with pytest.raises(LayoutError) as info:
        check_sequence_length("cat", [3, 4], 4)
    assert str(info.value) == "phrase 'cat' is at T5 token 4, past max_sequence_length=4"


def test_two_tokenizers_must_agree():
    assert agreed_positions("SDXL's two tokenizers", ["cat"], "a cat", [[2]], [[2]]) == [[2]]
    with pytest.raises(LayoutError) as info:
        agreed_positions("SDXL's two tokenizers", ["cat"], "a cat", [[2]], [[3]])
    assert str(info.value) == (
        "SDXL's two tokenizers put the boxed phrases ['cat'] of 'a cat' at different token positions "
        "([[2]] and [[3]]); reword the prompt"
    )


def test_sd3_columns_clip_then_t5(sd3_parts):
    adapter = SD3Family(sd3_parts, max_sequence_length=16)
    assert adapter.phrase_tokens("a red cat", "cat") == [3, 77 + 2]
    layout = Layout((Box("dog", (0, 0, 0.5, 1)), Box("dog", (0.5, 0, 1, 1))))
    assert adapter.box_tokens("a dog and a dog", layout.boxes) == [[2, 77 + 1], [5, 77 + 4]]
    assert adapter.box_tokens("a dog", ()) == []


def test_a_phrase_past_t5s_length_but_within_clips_is_one_line(sd3_parts, t5):
    prompt = "a red cat on the table with a dog"
    sd3 = SD3Family(sd3_parts, max_sequence_length=4)
    assert SD3Family(sd3_parts, max_sequence_length=4, text_tokens="clip").phrase_tokens(prompt, "dog") == [9]
    for adapter in (sd3, FluxFamily(SimpleNamespace(tokenizer_2=t5), max_sequence_length=4)):
        with pytest.raises(LayoutError) as info:
            adapter.phrase_tokens(prompt, "dog")
        assert str(info.value) == "phrase 'dog' is at T5 token 8, past max_sequence_length=4"


def test_a_phrase_only_clip_can_see_is_one_line_naming_the_tokenizer(sd3_parts, clip, t5):
    """T5's SentencePiece keeps letter case and the tiny vocabulary has no capitals: "Red" is
    ['▁', '<unk>', 'e', 'd'] there while CLIP lower-cases it. The error names the tokenizer and both
    readings instead of suggesting the very phrase the user wrote."""
    prompt = "a Red cat"
    assert resolve_phrase_tokens(clip, prompt, "red") == [2]
    with pytest.raises(LayoutError) as info:
        SD3Family(sd3_parts).phrase_tokens(prompt, "red")
    message = str(info.value)
    assert "\n" not in message and "did you mean" not in message
    assert message.startswith("phrase 'red' not found in prompt 'a Red cat' by T5Tokenizer")
    assert "['▁', '<unk>', 'e', 'd']" in message and "['▁red']" in message
    # a phrase in no reading of the prompt keeps the did-you-mean
    with pytest.raises(LayoutError, match=r"'rde' not found in prompt 'a red cat' \(did you mean 'red'\?\)"):
        resolve_phrase_tokens(t5, "a red cat", "rde")


def test_strip_phrases():
    assert (
        strip_phrases("a red circle and a blue square on a gray background", ["red circle", "blue square"])
        == "on a gray background"
    )
    assert strip_phrases("a cat", ["cat"]) == ""
    # Connectors between removed phrases go too; nothing dangles.
    assert (
        strip_phrases(
            "a picture of a red circle and a blue square on a beige background", ["red circle", "blue square"]
        )
        == "a picture on a beige background"
    )
    assert (
        strip_phrases(
            "a red circle, a blue square and a green triangle on a gray background",
            ["red circle", "blue square", "green triangle"],
        )
        == "on a gray background"
    )
    assert strip_phrases("a photo of two cats and a dog in the park", ["cat", "dog"]) == "a photo in the park"
    assert strip_phrases("a cat with a hat and a dog", ["cat", "dog"]) == "a hat"


def test_boxed_phrases_prompt():
    assert boxed_phrases_prompt(["red circle", "blue square"]) == "a red circle and a blue square"
    assert boxed_phrases_prompt(["apple", "the cat", "apple", "dog"]) == "an apple, the cat and a dog"
