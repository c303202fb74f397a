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
    """A folder exported as ``builtin:shapes-mmdit`` is, by its trainer's own functions: a
    ``StableDiffusion3Pipeline`` on the built-in UNet model's 4-channel VAE (``shift_factor`` 0), its
    CLIP tokenizer and text encoder in both CLIP slots, no T5, the flow-matching Euler scheduler, the
    vocabulary file; the transformer is 2 layers wide 2 x 16 and random."""
    from saltdiff.training.mmdit import export_sd3_pipeline, load_base, make_scheduler, make_transformer
    from saltdiff.training.mmdit_config import MMDiTTrainConfig

    work = tmp_path_factory.mktemp("mmdit-like")
    cfg = MMDiTTrainConfig(out=str(work / "model"), work=str(work / "work"), layers=2, heads=2, head_dim=16)
    vae, text_encoder, tokenizer = load_base(cfg)
    torch.manual_seed(0)
    transformer = make_transformer(cfg, text_encoder.config.hidden_size)
    export_sd3_pipeline(work / "model", vae, text_encoder, tokenizer, transformer, make_scheduler(cfg))
    return str(work / "model")


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
