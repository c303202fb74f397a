import errno
import io
import os

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes them 50x slower
# whenever the cores are busy (measured: 2 s vs 110 s for the same 4-step call under load).
torch.set_num_threads(int(os.environ.get("SALTDIFF_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_pipe():
    """A SaltPipeline over tiny random components (shared; tests must not mutate it)."""
    from saltdiff.pipeline import SaltPipeline
    from saltdiff.testing import tiny_sd_pipeline

    torch.manual_seed(0)
    pipe = SaltPipeline.from_pipe(tiny_sd_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory, tiny_pipe):
    """The tiny pipeline saved as a diffusers folder (for from_pretrained and CLI tests)."""
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """Tiny random SD3 components (CLIP-L, CLIP-G, T5) saved as a ``StableDiffusion3Pipeline`` folder."""
    from saltdiff.testing_flow import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def mmdit_like_dir(tmp_path_factory):
    """A folder built as ``builtin:shapes-mmdit`` is: a ``StableDiffusion3Pipeline`` on the built-in UNet
    model's 4-channel VAE (``shift_factor`` 0: diffusers' SD3 pipeline decodes with it), its CLIP
    tokenizer and text encoder twice (with a projection), no T5, the flow-matching Euler scheduler, its
    vocabulary file; the transformer is tiny and random."""
    import shutil

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from saltdiff.checkpoints import builtin_models
    from saltdiff.vocabulary import VOCABULARY_FILE

    root = builtin_models()["shapes"]
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder")
    hidden, projection = text_encoder.config.hidden_size, text_encoder.config.projection_dim
    transformer = SD3Transformer2DModel(
        sample_size=16,  # 64 px through the VAE's factor 4
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=2 * hidden,
        caption_projection_dim=32,
        pooled_projection_dim=2 * projection,
        pos_embed_max_size=16,
    )
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)  # diffusers' SD3 decode adds it: None would not sample
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    path = tmp_path_factory.mktemp("mmdit-like") / "model"
    pipe.save_pretrained(path)
    shutil.copy(os.path.join(root, VOCABULARY_FILE), path)
    return str(path)


class _FullDiskFile(io.FileIO):
    """A new file on a disk with ``budget`` bytes left: a write past them fails with ENOSPC, after
    writing what fits (as the OS does)."""

    def __init__(self, path: str, budget: int) -> None:
        super().__init__(path, "xb")
        self.budget = budget

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self.budget:
            super().write(view[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(view)
        return super().write(view)


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(budget, skip=0)``: after the next ``skip`` files, every
    :func:`saltdiff.fileio.atomic_write` of the test meets a full disk after ``budget`` bytes (the
    file's own write raises ``OSError(ENOSPC)``, as the OS's would); ``full_disk(None)`` frees it."""
    from saltdiff import fileio

    real = fileio._open_temporary

    def fill(budget: int | None = 0, skip: int = 0) -> None:
        if budget is None:  # the disk has room again
            monkeypatch.setattr(fileio, "_open_temporary", real)
            return
        left = [skip]

        def open_temporary(path):
            left[0] -= 1
            return real(path) if left[0] >= 0 else _FullDiskFile(path, budget)

        monkeypatch.setattr(fileio, "_open_temporary", open_temporary)

    return fill
