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
