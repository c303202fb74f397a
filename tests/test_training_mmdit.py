"""The flow-model trainer (``python -m saltdiff.training mmdit``) on a few steps: resumable, and what it
exports is a plain ``StableDiffusion3Pipeline`` folder whose conditioning the trainer reproduces."""

from __future__ import annotations

import json

import pytest
import torch

from saltdiff.training.mmdit import flow_batch, load_base, sd3_text_conditions, train_mmdit
from saltdiff.training.mmdit_config import MMDiTTrainConfig


def _tiny(tmp_path, **overrides) -> MMDiTTrainConfig:
    kwargs = dict(
        out=str(tmp_path / "out"),
        work=str(tmp_path / "work"),
        latent_cache=8,
        layers=1,
        heads=2,
        head_dim=8,
        steps=2,
        batch=4,
        warmup=1,
        log_every=1,
        val_size=4,
        t5_padding=(3, 5),
        progress=False,
    )
    kwargs.update(overrides)
    return MMDiTTrainConfig(**kwargs)


def test_mmdit_training_resumes_and_exports_an_sd3_folder(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    assert train_mmdit(_tiny(tmp_path))["steps"] == 2
    with pytest.raises(ValueError, match="--resume"):
        train_mmdit(_tiny(tmp_path))
    assert train_mmdit(_tiny(tmp_path, resume=True, steps=3))["steps"] == 3
    logged = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["stage"] == "mmdit"] == [1, 2, 3]
    assert all(r["grounding"] > 0 for r in logged if r["stage"] == "mmdit")

    out = str(tmp_path / "out")  # plain diffusers loads it as it loads SD3 without T5
    pipe = StableDiffusion3Pipeline.from_pretrained(
        out, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, max_sequence_length=5, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0

    # the trainer's conditioning is exactly what the exported pipeline feeds its transformer
    cfg = _tiny(tmp_path)
    _, text_encoder, tokenizer = load_base(cfg)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    embeds, pooled = sd3_text_conditions(text_encoder, ids, 256, 5)
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        "a red circle", None, None, do_classifier_free_guidance=False, max_sequence_length=5
    )
    torch.testing.assert_close(embeds, ref_embeds, atol=2e-3, rtol=2e-3)  # fp16 export vs fp32
    torch.testing.assert_close(pooled, ref_pooled, atol=2e-3, rtol=2e-3)

    from saltdiff import load_pipeline

    salt = load_pipeline(out)  # saltdiff needs no keywords: the folder's nulls are passed as None
    assert type(salt).__name__ == "SaltSD3Pipeline" and salt.text_encoder_3 is None


def test_flow_batch_is_a_pure_function_of_the_step(tmp_path):
    cfg = _tiny(tmp_path)
    cache = {
        "n": 8,
        "seeds": torch.arange(8),
        "latents": torch.randn(8, 4, 16, 16).half(),
        "ids": torch.randint(0, 50, (8, 32), dtype=torch.int32),
    }
    empty = torch.zeros(32, dtype=torch.long)
    a, b = flow_batch(cfg, cache, 1.0, empty, 7), flow_batch(cfg, cache, 1.0, empty, 7)
    for x, y in zip(a, b):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    xt, sigma, _, target, _, _, rows = a
    assert rows in (3, 5) and bool(((sigma > 0) & (sigma < 1)).all())
    from saltdiff.training.data import permuted_positions

    x0 = cache["latents"][
        torch.from_numpy(permuted_positions(cfg.seed, 5, 8, 7 * cfg.batch, cfg.batch))
    ].float()
    # on the straight path x_sigma = x0 + sigma * (eps - x0): the target is the path's velocity
    torch.testing.assert_close(xt, x0 + sigma.view(-1, 1, 1, 1) * target)
    assert not torch.equal(flow_batch(cfg, cache, 1.0, empty, 8)[0], xt)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="patch_size"):
        MMDiTTrainConfig(patch_size=3)
    with pytest.raises(ValueError, match="t5_padding"):
        MMDiTTrainConfig(t5_padding=())
    with pytest.raises(ValueError, match="not a pipeline folder"):
        MMDiTTrainConfig(base="/nonexistent").base_folder()


def test_vp_teacher_velocity_is_exact_for_an_exact_denoiser():
    """An oracle ε-model (it knows x0 and reads ``alphas_cumprod`` at the timestep it is given) must
    yield the flow velocity ``eps - x0`` exactly: this fails if the input scale or the timestep map is wrong."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from saltdiff.training.teacher import VPTeacher

    table = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    sigma = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * eps

    def alpha_at(t):
        lo = t.floor().long().clamp(0, len(table) - 2)
        frac = (t - lo).view(-1, 1, 1, 1)
        log_a = (1 - frac) * table[lo].log().view(-1, 1, 1, 1) + frac * table[lo + 1].log().view(-1, 1, 1, 1)
        return log_a.exp()

    def oracle(z, t, states):
        a = alpha_at(t)
        return SimpleNamespace(sample=(z - a.sqrt() * x0) / (1 - a).sqrt())

    velocity, inside = VPTeacher(oracle, table.float()).velocity(x, sigma, None)
    assert inside.all()
    torch.testing.assert_close(velocity, eps - x0, atol=2e-3, rtol=1e-3)


def test_teacher_distillation_runs_and_logs_the_taught_share(tmp_path):
    """``--teacher builtin:shapes`` trains (its velocity is the target below teacher_max_sigma) and ``until``
    stops early with a checkpoint that a later run resumes to ``steps``."""
    cfg = _tiny(tmp_path, teacher="builtin:shapes", until=1, steps=3)
    assert train_mmdit(cfg)["steps"] == 1
    rows = [json.loads(line) for line in open(tmp_path / "work" / "log.jsonl") if '"stage": "mmdit"' in line]
    assert rows and 0.0 < rows[-1]["taught"] <= 1.0
    assert train_mmdit(_tiny(tmp_path, steps=3, resume=True))["steps"] == 3
    from saltdiff.training.cli import main

    main(["mmdit", "--work", str(tmp_path / "work"), "--plot-loss", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_grown_transformer_computes_what_its_source_did_and_can_learn():
    """Growing 2 blocks into 4: same output at start (the added blocks' gates are shut), but their
    weights get gradients once trained, and a shallower target or another width is refused."""
    from diffusers import SD3Transformer2DModel

    from saltdiff.testing_flow import tiny_sd3_transformer
    from saltdiff.training.mmdit import grow_transformer

    source, target = tiny_sd3_transformer(0, num_layers=2), tiny_sd3_transformer(1, num_layers=4)
    grow_transformer(target, source)
    gen = torch.Generator().manual_seed(0)
    x, text, pooled = (torch.randn(shape, generator=gen) for shape in ((2, 16, 8, 8), (2, 5, 32), (2, 32)))
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        expected = source(x, text, pooled, t, return_dict=False)[0]
        fresh = tiny_sd3_transformer(1, num_layers=4)(x, text, pooled, t, return_dict=False)[0]
    out = target(x, text, pooled, t, return_dict=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, fresh)  # the loaded weights, not the target's own, decide
    out.square().mean().backward()
    assert target.transformer_blocks[1].norm1.linear.weight.grad.abs().sum() > 0  # the gates can open
    with pytest.raises(ValueError, match="at least as deep"):
        grow_transformer(tiny_sd3_transformer(0, num_layers=1), source)
    wider = SD3Transformer2DModel.from_config(
        {**source.config, "num_attention_heads": 3, "caption_projection_dim": 24}
    )
    with pytest.raises(ValueError, match="num_attention_heads"):
        grow_transformer(wider, source)


def test_training_can_start_from_a_trained_transformer(tmp_path):
    """``--init-from`` a trained folder: the grown run trains and exports a folder of the new depth."""
    first = _tiny(tmp_path, steps=1)
    train_mmdit(first)
    grown = _tiny(
        tmp_path,
        steps=1,
        layers=3,
        init_from=str(tmp_path / "out"),
        work=str(tmp_path / "work2"),
        out=str(tmp_path / "out2"),
    )
    train_mmdit(grown)
    from diffusers import SD3Transformer2DModel

    assert (
        len(SD3Transformer2DModel.from_pretrained(tmp_path / "out2" / "transformer").transformer_blocks) == 3
    )
    with pytest.raises(ValueError, match="no transformer sub-folder"):
        _tiny(tmp_path, init_from=str(tmp_path)).init_folder()
