"""``scripts/gpu_check.py``: its CPU smoke runs (tiny SD 1.5, SDXL, SD3 and FLUX), its full-size flow
builds (on the meta device), and that its checks can fail."""

from __future__ import annotations

import importlib.util
import json
import math
import operator
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
TINY = ["--tiny", "--device", "cpu", "--dtype", "float32", "--steps", "3", "--repeats", "1"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The script's tiny path over every family and method (22 s together here): the GPU check's own
# plumbing, so the slow tier, which CI runs; the pipelines' behaviour is the contract suite's.
@pytest.mark.slow
def test_tiny_run_reports_every_family_and_method(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main([*TINY, "--families", "sd15,sdxl", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["ok"] and not report["non_finite"]
    assert set(report["families"]) == {"sd15", "sdxl"}
    for family in report["families"].values():
        assert family["size"] == 32
        assert list(family["methods"]) == ["sd", "layout-guidance", "random+salt-loss", "salt"]
        for result in family["methods"].values():
            assert result["error"] is None and result["non_finite"] is False
            assert math.isfinite(result["sec_per_image"]) and result["sec_per_image"] > 0
            assert math.isfinite(result["peak_mem_gib"]) and result["peak_mem_gib"] > 0
        assert family["methods"]["sd"]["time_vs_sd"] == 1.0
    printed = capsys.readouterr().out
    assert printed.count("| method | s / image | × sd | peak GiB | non-finite |") == 2
    assert "sd15 (tiny) on cpu" in printed and "sdxl (tiny) on cpu" in printed


@pytest.mark.slow
def test_tiny_flow_run_reports_every_method(gpu_check, tmp_path, capsys):
    """SD3.5 and FLUX.1 families on their tiny pipelines (FLUX guidance-distilled, as FLUX.1-dev)."""
    out = tmp_path / "check.json"
    assert gpu_check.main([*TINY, "--families", "sd3.5-medium,flux.1-dev", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and list(report["families"]) == ["sd3.5-medium", "flux.1-dev"]
    for family in report["families"].values():
        assert family["arch"] == "tiny" and family["note"] is None
        assert list(family["methods"]) == list(gpu_check.METHODS)
        for name, result in family["methods"].items():
            assert result["error"] is None and result["non_finite"] is False, name
            assert result["sec_per_image"] > 0
        assert family["methods"]["random+salt-loss"]["call"] == {"init": "random", "guidance": "salt"}
    printed = capsys.readouterr().out
    assert "sd3.5-medium (tiny) on cpu" in printed and "flux.1-dev (tiny) on cpu" in printed


@pytest.mark.parametrize(
    ("family", "pipeline", "text", "pooled"),
    [("sd3.5-medium", "SaltSD3Pipeline", 77 + 256, 2048), ("flux.1-dev", "SaltFluxPipeline", 512, 768)],
)
def test_full_flow_architecture_builds_and_runs_on_meta(gpu_check, family, pipeline, text, pooled):
    """The non-tiny path on the meta device (shapes only): the real transformer and VAE, text encoders
    whose outputs fit them, and one transformer call through the family adapter at 1024x1024."""
    pipe = gpu_check.build_pipe(family, False, "meta", torch.float16)
    assert type(pipe).__name__ == pipeline and pipe.vae_scale_factor == 8
    assert pipe.transformer.dtype == torch.float16 and pipe.transformer.device.type == "meta"
    adapter = pipe.family()
    conditions = adapter.conditions(gpu_check.PROMPT)
    assert tuple(conditions.embeds.shape) == (1, text, 4096) and tuple(conditions.pooled.shape) == (1, pooled)
    latents = torch.empty(1, 16, 128, 128, device="meta", dtype=torch.float16)
    assert adapter.denoise(latents, 0.5, conditions).shape == latents.shape
    params = sum(p.numel() for p in pipe.transformer.parameters())
    assert params == {"sd3.5-medium": 2_243_171_520, "flux.1-dev": 11_901_408_320}[family]


def _nan_after(module, args, output):
    return output * float("nan")


@pytest.mark.parametrize(
    ("family", "method", "component", "where"),
    [
        ("sd15", "sd", "vae.decoder", "image"),
        ("sd15", "layout-guidance", "unet.conv_in", "guidance_loss"),
        ("flux.1-dev", "random+salt-loss", "transformer.x_embedder", "guidance_loss"),
    ],
)
def test_forced_nan_is_reported_and_fails(
    gpu_check, monkeypatch, tmp_path, capsys, family, method, component, where
):
    """NaN from the VAE decoder (the image) or the UNet (the guidance loss): reported, exit status 1."""
    build = gpu_check.build_pipe

    def poisoned(*args, **kwargs):
        pipe = build(*args, **kwargs)
        operator.attrgetter(component)(pipe).register_forward_hook(_nan_after)
        return pipe

    monkeypatch.setattr(gpu_check, "build_pipe", poisoned)
    out = tmp_path / "check.json"
    assert gpu_check.main([*TINY, "--families", family, "--methods", method, "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    result = report["families"][family]["methods"][method]
    assert report["non_finite"] and not report["ok"]
    assert result["non_finite"] is True and where in result["non_finite_where"]
    assert "| yes: " in capsys.readouterr().out


def test_cuda_without_cuda_is_one_line_exit_2(gpu_check, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() and len(err.strip().splitlines()) == 1 and "CUDA is not available" in err
    assert not out.exists()


def test_unknown_family_is_refused(gpu_check):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--families", "sd3", "--device", "cpu"])
    assert exc.value.code == 2
