import pytest
import torch


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
