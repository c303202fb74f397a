"""Words a model cannot draw: one warning line naming them and what the model knows."""

import json
import logging
import os
import shutil

import pytest

from saltdiff.vocabulary import (
    VOCABULARY_FILE,
    ModelVocabulary,
    load_vocabulary,
    unknown_backgrounds,
    unknown_words,
    warn_unknown_words,
)

BUILTIN = os.path.join(os.path.dirname(__import__("saltdiff").__file__), "models", "shapes")


@pytest.fixture(scope="module")
def shapes_vocabulary():
    return load_vocabulary(BUILTIN)


def test_the_shipped_vocabulary_is_the_shapes_worlds(shapes_vocabulary):
    """The built-in model's file lists exactly what its training captions use (no drift from the world)."""
    from saltdiff.training.export import shapes_vocabulary as expected

    with open(os.path.join(BUILTIN, VOCABULARY_FILE), encoding="utf-8") as fh:
        assert json.load(fh) == expected()
    assert {"red", "circle", "gray", "background", "photo"} <= shapes_vocabulary.words
    assert shapes_vocabulary.groups["backgrounds"] == ("white", "light gray", "gray", "dark gray", "beige")


def test_unknown_words_and_backgrounds(shapes_vocabulary):
    v = shapes_vocabulary
    assert unknown_words("a red circle and a blue square on a gray background", vocabulary=v) == []
    assert unknown_words("a Navy circle, a navy square and a cat", vocabulary=v) == ["Navy", "cat"]
    # "yellow" is an object colour of the world, never a background: the word passes, the background not
    assert unknown_words("a red circle on a yellow background", vocabulary=v) == []
    assert unknown_backgrounds("a red circle on a yellow background", v) == ["yellow"]
    assert unknown_backgrounds("red circle, light gray background", v) == []
    assert unknown_backgrounds("a red circle on a dark gray background", v) == []
    assert unknown_backgrounds("a red circle on a background", v) == []
    assert unknown_backgrounds("a yellow background", None) == []  # no list of backgrounds: no verdict


def test_one_warning_line_names_the_words_and_what_the_model_knows(shapes_vocabulary, caplog):
    with caplog.at_level(logging.WARNING, logger="saltdiff"):
        line = warn_unknown_words(
            "builtin:shapes", "a navy circle on a yellow background", vocabulary=shapes_vocabulary
        )
        assert warn_unknown_words("builtin:shapes", "a red circle", vocabulary=shapes_vocabulary) is None
        again = warn_unknown_words(
            "builtin:shapes", "a red circle", vocabulary=shapes_vocabulary, background="teal"
        )
    assert [r.getMessage() for r in caplog.records] == [line, again]
    assert "'navy'" in line and "'yellow'" in line and "builtin:shapes" in line
    assert "colours red, orange, yellow, green, blue, purple" in line and "beige" in line
    assert "\n" not in line
    assert "reference background 'teal'" in again
    # a named background of the world is no news
    assert warn_unknown_words("m", "a red circle", vocabulary=shapes_vocabulary, background="beige") is None


def test_a_tokenizer_that_maps_a_word_to_its_unknown_token():
    """Without a vocabulary file, a word a tokenizer cannot spell is flagged (a word-level or
    SentencePiece vocabulary without it); CLIP's unknown token is its end token, which flags nothing."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "a", "red", "circle"]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    assert unknown_words("a red circle", tokenizers=[tok]) == []
    assert unknown_words("a red zebra", tokenizers=[tok]) == ["zebra"]
    from saltdiff.testing import tiny_tokenizer

    assert unknown_words("a red zebra", tokenizers=[tiny_tokenizer()]) == []


def test_a_damaged_vocabulary_file_is_named(tmp_path):
    (tmp_path / VOCABULARY_FILE).write_text('{"words": 3}')
    with pytest.raises(ValueError, match=VOCABULARY_FILE):
        load_vocabulary(tmp_path)
    assert load_vocabulary(tmp_path / "nowhere") is None
    assert ModelVocabulary(frozenset({"a"})).describe() == "1 words"


def test_the_pipeline_warns_once_per_call(tiny_pipe_dir, tmp_path, caplog):
    """A folder with a vocabulary file: from_pretrained reads it, the call warns once, from_pipe keeps it."""
    from saltdiff import SaltPipeline
    from saltdiff.training.export import write_vocabulary

    folder = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, folder)
    write_vocabulary(folder)
    pipe = SaltPipeline.from_pretrained(str(folder))
    assert pipe.model_name == str(folder) and "navy" not in pipe.model_vocabulary.words
    assert SaltPipeline.from_pipe(pipe).model_vocabulary == pipe.model_vocabulary
    with caplog.at_level(logging.WARNING, logger="saltdiff"):
        pipe(
            "a navy circle and a blue square",
            [("navy circle", (0.1, 0.1, 0.5, 0.5))],
            init="random",
            guidance="none",
            num_inference_steps=1,
            seed=0,
            output_type="latent",
        )
    lines = [r.getMessage() for r in caplog.records if "not trained on" in r.getMessage()]
    assert len(lines) == 1 and "'navy'" in lines[0]
