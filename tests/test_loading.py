"""Loading: one dtype throughout, a usable prompt length, quiet loads, one-line errors, size limits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from saltdiff.components import check_component_dtypes, fit_tokenizer_length
from saltdiff.loading import (
    ModelLoadError,
    check_image_size,
    load_error_message,
    load_pipeline,
    quiet_loading,
)
from saltdiff.pipeline import SaltPipeline
from saltdiff.testing import tiny_sd_pipeline

LONG_PROMPT = " ".join(["a red circle and a blue square on a white background"] * 12)  # > 77 tokens
FAST = {"init": "random", "guidance": "none", "num_inference_steps": 2, "height": 32, "width": 32}


def _dtypes(pipe):
    return {name: getattr(pipe, name).dtype for name in ("unet", "vae", "text_encoder")}


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory):
    """The tiny pipeline saved in float16 (as the built-in model and many hub folders ship)."""
    path = tmp_path_factory.mktemp("tiny-fp16")
    torch.manual_seed(0)
    tiny_sd_pipeline().to(torch.float16).save_pretrained(path)
    return str(path)


def test_from_pretrained_gives_one_dtype_whatever_the_files_hold(fp16_dir):
    # Without a dtype, transformers would load the text encoder in its files' fp16 and diffusers the
    # UNet and VAE in fp32: the README's first call then failed in a matrix product.
    assert set(_dtypes(SaltPipeline.from_pretrained(fp16_dir)).values()) == {torch.float32}
    assert set(_dtypes(SaltPipeline.from_pretrained(fp16_dir, dtype=torch.float16)).values()) == {
        torch.float16
    }


def test_mixed_dtypes_fail_with_one_line_naming_the_components():
    torch.manual_seed(0)
    pipe = SaltPipeline.from_pipe(tiny_sd_pipeline())
    pipe.text_encoder.to(torch.float16)
    with pytest.raises(ValueError, match=r"unet float32, vae float32, text_encoder float16") as info:
        pipe("a red circle", **FAST)
    assert "\n" not in str(info.value) and "pipe.to(torch.float32)" in str(info.value)
    pipe.text_encoder.to(torch.float32)
    check_component_dtypes(pipe)  # one dtype again: no error


def test_a_tokenizer_config_without_model_max_length_takes_the_text_encoders_limit(tmp_path):
    torch.manual_seed(0)
    tiny_sd_pipeline().save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("model_max_length")
    config_path.write_text(json.dumps(config))
    pipe = SaltPipeline.from_pretrained(str(tmp_path))
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    pipe.set_progress_bar_config(disable=True)
    assert pipe(LONG_PROMPT, **FAST).images[0].size == (32, 32)  # was OverflowError: int too big


def test_a_hand_built_pipeline_with_the_sentinel_length_runs():
    torch.manual_seed(0)
    sd = tiny_sd_pipeline()
    sd.tokenizer.model_max_length = int(1e30)  # transformers' VERY_LARGE_INTEGER
    pipe = SaltPipeline.from_pipe(sd)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(LONG_PROMPT, **FAST).images[0].size == (32, 32)
    assert pipe.tokenizer.model_max_length == 77
    assert not fit_tokenizer_length(pipe.tokenizer, pipe.text_encoder)  # a valid length stays


def test_quiet_loading_restores_the_libraries_settings():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = [
        (lib.get_verbosity(), lib.is_progress_bar_enabled())
        for lib in (diffusers_logging, transformers_logging)
    ]
    with quiet_loading():
        assert diffusers_logging.get_verbosity() == diffusers_logging.ERROR
        assert not transformers_logging.is_progress_bar_enabled()
    after = [
        (lib.get_verbosity(), lib.is_progress_bar_enabled())
        for lib in (diffusers_logging, transformers_logging)
    ]
    assert after == before


def _chained(outer: str, inner: BaseException) -> OSError:
    try:
        try:
            raise inner
        except BaseException as cause:
            raise OSError(outer) from cause
    except OSError as exc:
        return exc


def test_an_unreachable_hub_is_one_line_that_says_how_to_use_a_folder():
    diffusers_message = (
        "Cannot load model org/model: the model is not fully cached locally (...) and an error occurred "
        "while trying to fetch metadata from the Hub. Please check out the root cause in the stacktrace above."
    )
    offline = load_error_message(
        "org/model", _chained(diffusers_message, ConnectionError("Name or service not known"))
    )
    assert "cannot be reached" in offline and "--model /path/to/folder" in offline
    assert "stacktrace" not in offline and "\n" not in offline
    missing = load_error_message(
        "org/model", _chained("x", OSError("404 Client Error: Repository Not Found"))
    )
    assert "no such model on the Hugging Face Hub" in missing


def test_an_offline_hub_id_through_the_cli_is_one_line_and_nothing_else(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "saltdiff",
            "generate",
            "--prompt",
            "a cat",
            "--model",
            "nosuchorg/nosuchmodel",
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no "Couldn't connect to the Hub", no warnings, no traceback
    assert "nosuchorg/nosuchmodel" in lines[0] and "--model /path/to/folder" in lines[0]


def test_load_pipeline_is_quiet_and_float16_loads_on_cpu(tiny_pipe_dir, capfd, caplog):
    pipe = load_pipeline(tiny_pipe_dir, device="cpu", dtype="float16")
    assert set(_dtypes(pipe).values()) == {torch.float16}
    err = capfd.readouterr().err
    assert "Loading" not in err and "cannot run with" not in err and "deprecated" not in err, err
    # what applies is said once, by saltdiff: it runs, slowly
    assert [r.getMessage()[:42] for r in caplog.records if r.name == "saltdiff.loading"] == [
        "float16 on the CPU runs, but much slower t"
    ]


def test_a_size_far_beyond_the_trained_one_is_refused_unless_forced(tiny_pipe):
    trained = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor  # 32
    check_image_size(tiny_pipe, 4 * trained, None)
    with pytest.raises(
        ValueError, match=r"height 136 is more than 4x .* \(32, so at most 128\): pass --force"
    ):
        check_image_size(tiny_pipe, 4 * trained + 8, trained)
    check_image_size(tiny_pipe, 10_000, 10_000, force=True)


def test_missing_folder_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline("./no/such/folder")


@pytest.mark.parametrize(
    ("class_name", "components", "family"),
    [
        ("StableDiffusionXLPipeline", ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"], "SDXL"),
        ("FluxFillPipeline", ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"], r"FLUX \(not the text-to-image one\)"),
        ("FluxPipeline", ["transformer", "vae", "text_encoder", "tokenizer"], r"FLUX \(without \[.text_encoder_2., .tokenizer_2.\]\)"),
        ("StableDiffusion3Pipeline", ["transformer", "vae", "text_encoder", "text_encoder_3"], r"Stable Diffusion 3 \(without \[.text_encoder_2., .tokenizer., .tokenizer_2.\]\)"),
        ("PixArtSigmaPipeline", ["transformer", "vae", "text_encoder", "tokenizer"], "PixArt"),
        ("KandinskyV22Pipeline", ["unet", "movq", "scheduler"], "Kandinsky"),
    ],
)  # fmt: skip
def test_other_families_are_refused_in_one_line_before_loading(tmp_path, class_name, components, family):
    import json

    from saltdiff.cli import main
    from saltdiff.pipeline import SaltPipeline

    folder = tmp_path / "model"
    folder.mkdir()
    index = {"_class_name": class_name, "_diffusers_version": "0.30.0"}
    index.update({name: ["diffusers", "Whatever"] for name in components})
    (folder / "model_index.json").write_text(json.dumps(index))  # no weights: refused before loading any
    with pytest.raises(
        ValueError, match=rf"is a {family} pipeline \({class_name}\): not supported; saltdiff runs"
    ):
        SaltPipeline.from_pretrained(str(folder))
    code = main(["generate", "--prompt", "a cat", "--model", str(folder), "--out", str(tmp_path / "x.png")])
    assert code == 2


def test_from_pipe_refuses_another_family(tiny_pipe):
    from saltdiff.pipeline import SaltPipeline

    class FluxPipeline:
        components = {"transformer": None, "vae": None, "text_encoder": None, "text_encoder_2": None}

    with pytest.raises(ValueError, match=r"the FluxPipeline given is a FLUX \(without \['tokenizer', 'tokenizer_2'\]\) pipeline"):
        SaltPipeline.from_pipe(FluxPipeline())
    assert isinstance(SaltPipeline.from_pipe(tiny_pipe), SaltPipeline)  # SD 1.x-style: accepted


def test_hub_reachable_is_one_quick_try(monkeypatch):
    import socket

    from huggingface_hub import constants

    from saltdiff.loading import hub_reachable

    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub_reachable()
    server.close()  # nothing listens there now: refused at once
    assert not hub_reachable()
    monkeypatch.setattr(constants, "ENDPOINT", "https://nosuchhost.invalid")
    assert not hub_reachable()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub_reachable()


def _generate(model: str, out, env) -> subprocess.CompletedProcess:
    args = ["generate", "--prompt", "a red circle", "--box", "red circle=0,0,0.5,1", "--model", model]
    fast = ["--steps", "2", "--height", "32", "--width", "32", "--object-steps", "1", "--background", "gray"]
    return subprocess.run(
        [sys.executable, "-m", "saltdiff", *args, *fast, "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _unreachable_hub_env(cache) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    # a closed loopback port: the Hub refuses at once, as with no network (HF_HUB_OFFLINE not set)
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def test_an_unreachable_hub_without_the_model_cached_is_one_line_and_no_retries(tmp_path):
    proc = _generate("nosuchorg/nosuchmodel", tmp_path / "x.png", _unreachable_hub_env(tmp_path / "hub"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # huggingface_hub retried 5 times, each warning printed twice
    assert "nosuchorg/nosuchmodel" in lines[0] and "--model /path/to/folder" in lines[0]
    assert "not in the local Hugging Face cache" in lines[0]


def test_an_unreachable_hub_loads_a_cached_hub_id_from_the_cache(tiny_pipe_dir, tmp_path):
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--saltdiff-test--tiny"
    revision = "0" * 40
    shutil.copytree(tiny_pipe_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    proc = _generate("saltdiff-test/tiny", tmp_path / "x.png", _unreachable_hub_env(cache))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").is_file()
    assert "Retry" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr


def test_the_default_cfg_is_the_builtin_models_card_scale_else_the_familys_pipeline_default(
    tiny_pipe_dir, tiny_sd3_dir
):
    from saltdiff.cli import build_parser
    from saltdiff.eval.cli import _config
    from saltdiff.eval.methods import parse_methods
    from saltdiff.loading import default_guidance_scale

    assert default_guidance_scale("builtin:shapes") == default_guidance_scale("builtin:shapes-mmdit") == 5.0
    assert default_guidance_scale(tiny_pipe_dir) == 7.5
    assert default_guidance_scale(tiny_sd3_dir) == 7.0
    bench = ["bench", "--out", "unused", "--methods", "salt"]
    # the bench's default model: builtin:shapes
    assert _config(build_parser().parse_args(bench), parse_methods("salt")).cfg == 5.0
    assert _config(build_parser().parse_args([*bench, "--cfg", "7.5"]), parse_methods("salt")).cfg == 7.5


def test_a_wrapped_pipeline_without_a_declared_cfg_gets_sds_default(tiny_pipe):
    from saltdiff.loading import pipeline_guidance_scale

    class Wrapper:  # as the demo's browser tests wrap a pipeline: a call taking **kwargs
        def __init__(self, pipe):
            self.pipe = pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, *args, **kwargs):
            return self.pipe(*args, **kwargs)

    assert pipeline_guidance_scale(Wrapper(tiny_pipe)) == 7.5
