"""The tiny SD3 and FLUX parts: real tokenizers, diffusers' own pipelines run on them, save and load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saltdiff.testing import TINY_WORDS
from saltdiff.testing_flow import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_t5_tokenizer

CALL = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="np")


def test_t5_tokenizer_gives_real_pieces_not_unk():
    """transformers 5 maps every word to <unk> when a T5Tokenizer is given a vocab_file: ours must not."""
    tokenizer = tiny_t5_tokenizer()
    ids = tokenizer("a red cat on the table").input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁cat", "▁on", "▁the", "▁table", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    words = tokenizer(" ".join(TINY_WORDS)).input_ids[:-1]
    assert len(words) == len(TINY_WORDS)  # each vocabulary word is one piece
    other = tokenizer("zebra").input_ids  # any lowercase word still tokenizes, letter by letter
    assert tokenizer.unk_token_id not in other and len(other) > 2


@pytest.fixture(scope="module")
def sd3_pipe():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompt="a red cat", seed=0):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **CALL).images


def _check_round_trip(pipe, tmp_path, expected_classes):
    images = _run(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert {k: v[1] for k, v in index.items() if isinstance(v, list)} == expected_classes
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(loaded), images, atol=1e-5)
    return loaded


def test_sd3_pipeline_runs_and_saves_and_loads(sd3_pipe, tmp_path):
    loaded = _check_round_trip(
        sd3_pipe,
        tmp_path,
        {
            "transformer": "SD3Transformer2DModel",
            "vae": "AutoencoderKL",
            "text_encoder": "CLIPTextModelWithProjection",
            "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel",
            "tokenizer": "CLIPTokenizer",
            "tokenizer_2": "CLIPTokenizer",
            "tokenizer_3": "T5Tokenizer",
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "image_encoder": None,
            "feature_extractor": None,
        },
    )
    assert loaded.tokenizer_3.unk_token_id not in loaded.tokenizer_3("a red cat").input_ids
    assert sd3_pipe.vae.config.latent_channels == 16 and loaded.scheduler.config.shift == 3.0


def test_flux_pipeline_runs_and_saves_and_loads(flux_pipe, tmp_path):
    loaded = _check_round_trip(
        flux_pipe,
        tmp_path,
        {
            "transformer": "FluxTransformer2DModel",
            "vae": "AutoencoderKL",
            "text_encoder": "CLIPTextModel",
            "text_encoder_2": "T5EncoderModel",
            "tokenizer": "CLIPTokenizer",
            "tokenizer_2": "T5Tokenizer",
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "image_encoder": None,
            "feature_extractor": None,
        },
    )
    assert loaded.tokenizer_2.unk_token_id not in loaded.tokenizer_2("a red cat").input_ids
    assert loaded.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_t5_branch_carries_the_prompt(family, sd3_pipe, flux_pipe):
    """The T5 part of the prompt embeddings changes with the prompt (a tokenizer mapping words to
    <unk> would make "red" and "blue" the same), and the image follows."""
    pipe = sd3_pipe if family == "sd3" else flux_pipe
    encode = pipe._get_t5_prompt_embeds
    red, blue = encode("a red cat", max_sequence_length=16), encode("a blue cat", max_sequence_length=16)
    assert red.shape == (1, 16, 32)
    assert (red - blue).abs().max() > 1e-3
    assert np.abs(_run(pipe, "a red cat") - _run(pipe, "a blue cat")).max() > 1e-4
