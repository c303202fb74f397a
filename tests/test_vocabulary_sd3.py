"""Unknown-word warnings on SD3 pipelines: a model folder's vocabulary file, and words the T5
(SentencePiece) tokenizer maps to its unknown token; one line per call."""

import logging
import shutil

import pytest

from saltdiff.vocabulary import unknown_words

CALL = {"init": "random", "guidance": "none", "num_inference_steps": 1, "seed": 0, "output_type": "latent"}


def warnings_of(pipe, prompt, layout, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saltdiff"):
        pipe(prompt, layout, **CALL)
    return [r.getMessage() for r in caplog.records if "not trained on" in r.getMessage()]


@pytest.fixture(scope="module")
def sd3_with_vocabulary(tiny_sd3_dir, tmp_path_factory):
    """The tiny SD3 folder with the shapes world's vocabulary file, as the built-in models ship it."""
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline
    from saltdiff.training.export import write_vocabulary

    folder = tmp_path_factory.mktemp("sd3-vocab") / "model"
    shutil.copytree(tiny_sd3_dir, folder)
    write_vocabulary(folder)
    pipe = SaltSD3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_t5s_unknown_token_flags_a_word_clip_spells():
    """CLIP's unknown token is its end token (flags nothing); the tiny T5 has no 'ü', 'ñ' or capitals."""
    from saltdiff.testing_flow import tiny_t5_tokenizer

    t5 = tiny_t5_tokenizer()
    assert t5.unk_token_id in t5("über", add_special_tokens=False).input_ids
    assert unknown_words("a cat über the ñandu and a dog", tokenizers=[t5]) == ["über", "ñandu"]
    assert unknown_words("a cat and a dog", tokenizers=[t5]) == []


def test_an_sd3_folders_vocabulary_warns_once_per_call_and_survives_from_pipe(sd3_with_vocabulary, caplog):
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline

    pipe = sd3_with_vocabulary
    assert "navy" not in pipe.model_vocabulary.words
    assert SaltSD3Pipeline.from_pipe(pipe).model_vocabulary == pipe.model_vocabulary
    lines = warnings_of(
        pipe, "a navy circle and a blue square", [("navy circle", (0.1, 0.1, 0.5, 0.5))], caplog
    )
    assert len(lines) == 1 and "'navy'" in lines[0] and pipe.model_name in lines[0]
    assert "colours red" in lines[0]  # what the model knows, from the file's groups
    assert (
        warnings_of(pipe, "a red circle and a blue square", [("red circle", (0.1, 0.1, 0.5, 0.5))], caplog)
        == []
    )


def test_an_sd3_pipeline_without_a_vocabulary_warns_on_t5s_unknown_words(tiny_sd3_dir, caplog):
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline

    pipe = SaltSD3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model_vocabulary is None
    lines = warnings_of(pipe, "a cat über a dog", [("a cat", (0.1, 0.1, 0.5, 0.5))], caplog)
    assert len(lines) == 1 and "'über'" in lines[0] and "'cat'" not in lines[0]
    assert warnings_of(pipe, "a cat and a dog", [("a cat", (0.1, 0.1, 0.5, 0.5))], caplog) == []
