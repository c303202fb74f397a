"""``scripts/gpu_check.py``: its CPU smoke run (tiny SD 1.5 and SDXL) and that its checks can fail."""

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


def test_tiny_run_reports_every_family_and_method(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main([*TINY, "--families", "sd15,sdxl", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["ok"] and not report["non_finite"]
    assert set(report["families"]) == {"sd15", "sdxl"}
    for family in report["families"].values():
        assert family["size"] == 32
        assert list(family["methods"]) == ["sd", "layout-guidance", "salt"]
        for result in family["methods"].values():
            assert result["error"] is None and result["non_finite"] is False
            assert math.isfinite(result["sec_per_image"]) and result["sec_per_image"] > 0
            assert math.isfinite(result["peak_mem_gib"]) and result["peak_mem_gib"] > 0
        assert family["methods"]["sd"]["time_vs_sd"] == 1.0
    printed = capsys.readouterr().out
    assert printed.count("| method | s / image | × sd | peak GiB | non-finite |") == 2
    assert "sd15 (tiny) on cpu" in printed and "sdxl (tiny) on cpu" in printed


def _nan_after(module, args, output):
    return output * float("nan")


@pytest.mark.parametrize(
    ("method", "component", "where"),
    [("sd", "vae.decoder", "image"), ("layout-guidance", "unet.conv_in", "guidance_loss")],
)
def test_forced_nan_is_reported_and_fails(gpu_check, monkeypatch, tmp_path, capsys, method, component, where):
    """NaN from the VAE decoder (the image) or the UNet (the guidance loss): reported, exit status 1."""
    build = gpu_check.build_pipe

    def poisoned(*args, **kwargs):
        pipe = build(*args, **kwargs)
        operator.attrgetter(component)(pipe).register_forward_hook(_nan_after)
        return pipe

    monkeypatch.setattr(gpu_check, "build_pipe", poisoned)
    out = tmp_path / "check.json"
    assert gpu_check.main([*TINY, "--families", "sd15", "--methods", method, "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    result = report["families"]["sd15"]["methods"][method]
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
