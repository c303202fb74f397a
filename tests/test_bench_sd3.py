"""``saltdiff bench`` and ``saltdiff study`` on a tiny random SD3 folder: the UNet model's methods, the
model's own sampler, the family's defaults in the records, and one line for what SD3 does not run."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from saltdiff.cli import main
from saltdiff.eval.bench import BenchConfig, run_bench
from saltdiff.eval.methods import parse_methods
from saltdiff.guidance import OUTSIDE_PROMPT_STEPS

LAYOUTS = [
    {
        "prompt": "a red circle and a blue square on a gray background",
        "background": "gray",
        "boxes": [
            {"phrase": "red circle", "box": [0.05, 0.3, 0.45, 0.7]},
            {"phrase": "blue square", "box": [0.55, 0.3, 0.95, 0.7]},
        ],
    },
    {
        "id": "tri",
        "prompt": "a green triangle and a yellow circle",
        "boxes": [{"phrase": "green triangle", "box": [0.1, 0.1, 0.6, 0.6]}],
        "unboxed": ["yellow circle"],
    },
]
# 64 px (the tiny transformer's 32 latent cells x VAE factor 2), 2 steps, one guided step, one inversion step.
FAST = [
    "--steps", "2", "--guidance-steps", "1", "--guidance-iters", "1", "--inversion-steps", "1",
    "--object-steps", "1", "--background", "gray", "--detector", "shapes", "--device", "cpu",
    "--dtype", "float32", "-q", "--bootstrap", "20",
]  # fmt: skip


@pytest.fixture(scope="module")
def layouts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "layouts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in LAYOUTS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3_dir):
    from saltdiff.loading import load_pipeline

    pipe = load_pipeline(tiny_sd3_dir, device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_args(layouts_file, model, out, methods="sd,salt"):
    return ["bench", "--suite", layouts_file, "--model", model, "--methods", methods, "--seeds", "1",
            "--out", str(out), *FAST]  # fmt: skip


def test_bench_on_an_sd3_folder_writes_metrics_report_and_what_ran(tiny_sd3_dir, layouts_file, tmp_path):
    out = tmp_path / "run"
    assert main(bench_args(layouts_file, tiny_sd3_dir, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"sd", "salt"}
    assert all(m["n_images"] == 2 for m in metrics["methods"].values())
    assert metrics["scheduler"] == "flow-euler"  # the model's own sampler, not the UNet default ddim
    assert "| salt |" in (out / "report.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["scheduler"] == "flow-euler" and config["dtype"] == "float32"
    salt = config["methods"]["salt"]
    # SD3 with CFG runs the UNet loop's outside prompt with a loss, and none without: records say so
    assert salt["guidance"]["outside_prompt_steps"] == OUTSIDE_PROMPT_STEPS
    assert config["methods"]["sd"]["guidance"]["outside_prompt_steps"] == 0
    assert salt["init_params"]["inversion_steps"] == 1
    record = json.loads((out / "records" / "salt" / "tri_s0.json").read_text())
    assert record["method_config"] == salt and record["reference"] is not None
    images = {
        m: np.asarray(Image.open(out / "images" / m / "tri_s0.png"), dtype=np.float32) for m in ("sd", "salt")
    }
    assert images["sd"].shape == (64, 64, 3)
    assert np.abs(images["sd"] - images["salt"]).max() > 10  # SALT's start is not the random one
    assert os.path.isfile(out / "images" / "salt" / "tri_s0_ref.png")


def test_a_vp_sampler_on_sd3_is_one_line_before_any_image(tiny_sd3_dir, layouts_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*bench_args(layouts_file, tiny_sd3_dir, out), "--scheduler", "ddim"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scheduler 'ddim' is a VP" in err and "method" not in err
    assert not out.exists()


def test_sde_inversion_noise_is_refused_naming_the_method_before_any_image(sd3_pipe, layouts_file, tmp_path):
    from saltdiff.eval.methods import SharedSettings

    config = BenchConfig(
        suite=layouts_file, out=str(tmp_path / "run"), methods=parse_methods("sd,salt"), steps=2, device="cpu",
        shared=SharedSettings(init_params={"inversion_noise_scale": 0.3}), progress=False, bootstrap=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="method 'salt': inversion_noise_scale=0.3 does not run") as info:
        run_bench(config, pipe=sd3_pipe)
    assert "SaltSD3Pipeline" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()  # refused before the run folder is written


def test_the_sde_inversion_study_is_refused_naming_its_first_noisy_variant(sd3_pipe, layouts_file, tmp_path):
    from saltdiff.eval.studies import run_study

    config = BenchConfig(
        suite=layouts_file, out=str(tmp_path / "run"), methods=parse_methods("sd"), steps=2,
        device="cpu", progress=False, bootstrap=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"method 'noise=0.1': inversion_noise_scale=0.1 does not"):
        run_study("sde-inversion", config, values=(0.0, 0.1), pipe=sd3_pipe)


def test_the_outside_prompt_runs_on_sd3_when_asked_and_is_recorded(sd3_pipe, layouts_file, tmp_path):
    from saltdiff.eval.methods import SharedSettings

    out = tmp_path / "run"
    config = BenchConfig(
        suite=layouts_file, out=str(out), methods=parse_methods("random+salt-loss"), n=1, steps=2,
        device="cpu", progress=False, bootstrap=0, detector="shapes",
        shared=SharedSettings(guidance={"outside_prompt_steps": 1, "guidance_steps": 1, "guidance_iters": 1}),
    )  # fmt: skip
    run_bench(config, pipe=sd3_pipe)
    record = json.loads((out / "records" / "random+salt-loss" / "line-0_s0.json").read_text())
    assert record["method_config"]["guidance"]["outside_prompt_steps"] == 1


def test_a_folder_built_as_shapes_mmdit_loads_without_t5_and_benches_on_the_shapes_suite(
    mmdit_like_dir, tmp_path
):
    """The built-in MMDiT's structure (the UNet model's VAE and CLIP, no T5, a vocabulary file): diffusers
    loads such a folder only with ``text_encoder_3=None``, which saltdiff's loader passes; the shapes
    suite runs on it with the exact detector."""
    from diffusers import StableDiffusion3Pipeline

    from saltdiff.loading import load_pipeline

    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(mmdit_like_dir)
    pipe = load_pipeline(mmdit_like_dir, device="cpu")
    assert (
        pipe.text_encoder_3 is None and pipe.default_size() == 64 and "circle" in pipe.model_vocabulary.words
    )
    out = tmp_path / "run"
    args = ["bench", "--suite", "shapes", "--n", "2", "--model", mmdit_like_dir, "--methods", "sd,salt",
            "--seeds", "1", "--out", str(out), "--steps", "2", "--object-steps", "1", "--device", "cpu",
            "-q", "--bootstrap", "0"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["detector"] == "shapes" and metrics["scheduler"] == "flow-euler"
    assert all(m["n_images"] == 2 for m in metrics["methods"].values())


def test_the_layers_study_reads_the_guidance_from_each_chosen_block(sd3_pipe, layouts_file, tmp_path):
    """The captured-blocks study on SD3: one variant per selection ('+' joins blocks), each guided on
    its own blocks (their losses differ), recorded in the method's description."""
    from saltdiff.eval.methods import SharedSettings
    from saltdiff.eval.studies import STUDIES, run_study

    out = tmp_path / "study"
    values = ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.0+transformer_blocks.1")
    shared = SharedSettings(
        guidance={"guidance_steps": 1, "guidance_iters": 1},
        init_params={"inversion_steps": 1},
        reference_params={"num_inference_steps": 1, "background": "gray"},
    )
    specs = [v.spec for v in STUDIES["layers"].variants(values, "salt")]
    config = BenchConfig(
        suite=layouts_file, out=str(out), methods=specs, n=1, steps=2, device="cpu", progress=False,
        bootstrap=0, detector="shapes", shared=shared,
    )  # fmt: skip
    metrics = run_study("layers", config, values=values, pipe=sd3_pipe)
    names = [f"layers={v}" for v in values]
    assert set(metrics["methods"]) == {"sd", "random+salt", *names}
    records = {n: json.loads((out / "records" / n / "line-0_s0.json").read_text()) for n in names}
    layers = [r["method_config"]["guidance"]["layers"] for r in records.values()]
    assert layers == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "transformer_blocks.0,transformer_blocks.1",
    ]
    losses = [r["guidance_losses"][0][0] for r in records.values()]
    assert losses[0] != losses[1]  # each variant's loss is read on its own block
    assert "| layers=transformer_blocks.1 |" in (out / "study.md").read_text()
