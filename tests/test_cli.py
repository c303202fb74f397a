import re
import subprocess
import sys

import pytest
from PIL import Image

from saltdiff.cli import main
from saltdiff.request import read_recipe

BASE = [
    "generate",
    "--prompt",
    "a red circle and a blue square",
    "--box",
    "red circle=0,0.25,0.5,0.75",
    "--box",
    "blue square=0.5,0.25,1,0.75",
    "--steps",
    "3",
    "--height",
    "32",
    "--width",
    "32",
    "--quiet",
    "--object-steps",
    "2",
    "--guidance-steps",
    "1",
    "--guidance-iters",
    "1",
    "--background",
    "gray",
    "--object-cache",
    "false",
]


RANDOM_BASE = (
    BASE[: BASE.index("--object-steps")] + BASE[BASE.index("--guidance-steps") : BASE.index("--background")]
)


def test_generate_writes_png_with_recipe_and_overlay(tiny_pipe_dir, tmp_path):
    out = tmp_path / "img.png"
    code = main(
        [
            *BASE,
            "--model",
            tiny_pipe_dir,
            "--out",
            str(out),
            "--overlay",
            "--seed",
            "7",
            "--inversion-steps",
            "2",
        ]
    )
    assert code == 0
    recipe = read_recipe(str(out))
    assert recipe["prompt"] == "a red circle and a blue square"
    assert recipe["cfg"] == 7.5  # no --cfg: the SD pipeline's own default
    assert recipe["seed"] == 7 and recipe["steps"] == 3 and recipe["init"] == "salt"
    assert recipe["layout"]["boxes"][0]["phrase"] == "red circle"
    assert recipe["init_params"]["inversion_steps"] == 2
    assert recipe["reference"] == "objects" and recipe["reference_params"]["background"] == "gray"
    assert recipe["guidance"]["guidance_steps"] == 1
    assert Image.open(out).size == (32, 32)
    assert (tmp_path / "img-overlay.png").is_file()
    assert (tmp_path / "img-reference.png").is_file()


def test_generate_is_deterministic_per_seed(tiny_pipe_dir, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        assert (
            main([*RANDOM_BASE, "--model", tiny_pipe_dir, "--out", str(p), "--seed", "3", "--init", "random"])
            == 0
        )
    assert Image.open(paths[0]).tobytes() == Image.open(paths[1]).tobytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--box", "red circle 0,0,1,1"], "PHRASE=x0,y0,x1,y1"),
        (["--box", "green dog=0,0,0.5,0.5"], "green dog"),
        (["--box", "red circle=0,0,1.5,1"], "red circle"),
        (["--cfg", "nan"], "guidance_scale"),
        (["--guidance", "magic"], "argument --guidance: invalid choice: 'magic'"),
        (
            ["--init", "random", "--inversion-steps", "3"],
            "--inversion-steps applies to the initializer(s) ['salt']",
        ),
        (["--init", "random"], "need an initializer that uses a reference: --init ['salt']"),
        (
            ["--guidance", "boxdiff", "--reg-weight", "1"],
            "--reg-weight applies to the guidance loss(es) ['salt']",
        ),
        (["--reference-builder", "image"], "--reference-builder image needs --reference IMG"),
        (
            ["--reference", "ref.png"],
            "--background applies to the reference builder(s) ['objects'], not ['image']",
        ),
        (["--step-size", "-1"], "step_size must be a number >= 0, got -1.0"),
        (
            ["--background", "plaid"],
            "background must be generated, prompt-color, gray, white, noise, a colour",
        ),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--height", "10000"], "height 10000 is more than 4x the size this model was trained at"),
        (["--out", "/nonexistent/dir/x.png"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_pipe_dir, tmp_path, capsys, extra, message):
    args = [*BASE, "--model", tiny_pipe_dir, "--out", str(tmp_path / "x.png"), *extra]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    code = main([*BASE, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "no-such-model" in capsys.readouterr().err


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "saltdiff", "generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in [
        "--prompt",
        "--box",
        "--model",
        "--init",
        "--guidance",
        "--steps",
        "--cfg",
        "--seed",
        "--height",
        "--width",
        "--inversion-steps",
        "--reference",
        "--out",
        "--overlay",
        "--device",
        "--dtype",
        "--guidance-steps",
        "--guidance-iters",
        "--step-size",
        "--reg-weight",
        "--background",
    ]:
        assert flag in out, flag


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["demo"], "gradio", "pip install 'saltdiff[demo]'"),
        (["bench", "--out", "unused"], "pycocotools", "pip install 'saltdiff[eval]'"),
        (["study", "reg-weight", "--out", "unused"], "matplotlib", "pip install 'saltdiff[eval]'"),
    ],
)
def test_a_missing_extra_names_the_extra_to_install(monkeypatch, capsys, argv, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert extra in err and err.strip().count("\n") == 0


def _subparsers():
    from saltdiff.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return parser, action.choices


def test_top_level_help_lists_only_commands_that_run():
    parser, commands = _subparsers()
    listed = re.search(r"\{([a-z,-]+)\}", parser.format_help()).group(1).split(",")
    assert listed == list(commands)
    for name, sub in commands.items():
        assert callable(sub.get_default("func")), name


def test_help_shows_each_default_once_in_user_words():
    _, commands = _subparsers()
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for entry in re.split(r" (?=--?[a-z])", text):
            assert entry.count("(default") <= 1, (name, entry)
        for wrong in ("default: None", "default: True", "default: False"):
            assert wrong not in text, (name, wrong)
        for field in ("NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "BATCH_SIZE", "TOPK_FRACTION", " CACHE "):
            assert field not in text, (name, field)  # internal field names as metavars


def test_too_few_sampling_steps_for_the_inversion_is_one_line_that_says_what_to_change(
    tiny_pipe_dir, tmp_path, capsys
):
    args = [*BASE[: BASE.index("--steps")], *BASE[BASE.index("--height") :], "--model", tiny_pipe_dir]
    out = str(tmp_path / "x.png")
    assert main([*args, "--steps", "3", "--inversion-steps", "5", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use inversion_steps <= 3 (--inversion-steps) or more sampling steps" in err[0]
    assert main([*args, "--steps", "3", "--inversion-steps", "3", "--out", out]) == 0


@pytest.mark.parametrize(("steps", "depth"), [(1, 1), (4, 4), (6, 5)])
def test_short_runs_work_by_default_and_the_recipe_records_the_inversion_depth(
    tiny_pipe_dir, tmp_path, steps, depth
):
    from saltdiff.request import GenerationRequest

    args = [*BASE[: BASE.index("--steps")], *BASE[BASE.index("--height") :], "--model", tiny_pipe_dir]
    out = tmp_path / "short.png"
    assert main([*args, "--steps", str(steps), "--out", str(out)]) == 0
    recipe = read_recipe(str(out))
    assert recipe["steps"] == steps and recipe["init_params"]["inversion_steps"] == depth
    again = tmp_path / "again.png"  # the recipe's explicit depth makes the same image
    request = GenerationRequest.from_png(str(out))
    assert request.init_params["inversion_steps"] == depth
    assert main([*args, "--steps", str(steps), "--inversion-steps", str(depth), "--out", str(again)]) == 0
    assert Image.open(out).tobytes() == Image.open(again).tobytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--box", "green dog=0,0,0.5,0.5"], "phrase 'green dog' not found in prompt"),
        (["--height", "30"], "height must be a positive multiple of 4 for this model, got 30"),
        (["--width", "1024"], "width 1024 is more than 4x the size this model was trained at (32"),
        (["--steps", "0"], "num_inference_steps must be an integer >= 1, got 0"),
        (["--cfg", "nan"], "guidance_scale must be a finite number >= 0, got nan"),
        (["--steps", "3", "--inversion-steps", "5"], "inversion_steps=5 cannot end at the sampler's first"),
        (
            ["--scheduler", "euler-a", "--steps", "4", "--inversion-steps", "4"],
            "inversion_steps=4 cannot end",
        ),
    ],
)
def test_what_the_config_files_can_check_fails_before_any_weight_loads(
    tiny_pipe_dir, tmp_path, capsys, monkeypatch, change, message
):
    import saltdiff.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(saltdiff.loading, "load_pipeline", no_loading)
    args = [*BASE, "--model", tiny_pipe_dir, "--out", str(tmp_path / "x.png"), *change]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_checks_before_loading_pass_what_the_pipeline_runs_and_skip_a_model_not_at_hand(
    tiny_pipe_dir, monkeypatch, tmp_path
):
    from saltdiff.cli import build_parser, build_request
    from saltdiff.preflight import check_before_loading, local_model_folder

    args = build_parser().parse_args([*BASE, "--model", tiny_pipe_dir])
    assert check_before_loading(tiny_pipe_dir, build_request(args)) is True
    assert local_model_folder("builtin:shapes").endswith("shapes")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: a hub id is not at hand
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert local_model_folder("someone/not-cached") is None
    assert check_before_loading("someone/not-cached", build_request(args)) is False


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "device 'tpu' is not a device torch knows: use cpu, cuda, cuda:N (a GPU's index) or mps"),
        ("cuda:x", "device 'cuda:x' is not a device torch knows"),
        ("mps", "MPS (Apple GPU) is not available"),
    ],
)
def test_a_device_torch_does_not_know_or_this_machine_lacks_is_one_line_and_exit_2(
    tiny_pipe_dir, tmp_path, capsys, device, message
):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert main([*BASE, "--model", tiny_pipe_dir, "--out", str(tmp_path / "x.png"), "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_output_format_follows_the_extension_and_keeps_the_recipe(tiny_pipe_dir, tmp_path):
    import numpy as np

    from saltdiff.request import GenerationRequest

    args = [*RANDOM_BASE, "--model", tiny_pipe_dir, "--init", "random", "--seed", "5"]
    images = {}
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.jpeg", "JPEG"), ("d.webp", "WEBP")):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt, name
            images[name] = np.asarray(im.convert("RGB"), dtype=np.int16)
        recipe = read_recipe(str(tmp_path / name))
        assert recipe["seed"] == 5 and recipe["init"] == "random", name
        assert GenerationRequest.from_png(str(tmp_path / name)).seed == 5
    assert np.array_equal(images["d.webp"], images["a.png"])  # lossless
    assert np.abs(images["b.jpg"] - images["a.png"]).mean() < 8  # the same image, JPEG-compressed


@pytest.mark.parametrize("name", ["b.gif", "b.bmp", "b"])
def test_an_extension_saltdiff_cannot_write_is_one_line_before_loading(
    tiny_pipe_dir, tmp_path, capsys, monkeypatch, name
):
    import saltdiff.loading

    monkeypatch.setattr(saltdiff.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    assert main([*RANDOM_BASE, "--model", tiny_pipe_dir, "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not one of .png, .jpg, .jpeg, .webp" in err[0], err
    assert not (tmp_path / name).exists()
