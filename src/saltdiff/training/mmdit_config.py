"""The configuration of a flow-model training run (``builtin:shapes-mmdit``): every knob, validated."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MMDiTTrainConfig"]


@dataclass
class MMDiTTrainConfig:
    """Every knob of the MMDiT stage (the shipped weights: a chain of runs, scripts/train_builtin_shapes_mmdit.sh).

    The VAE, CLIP text encoder and tokenizer come from ``base`` (a folder exported by the UNet trainer,
    by default the shipped ``builtin:shapes``) and stay frozen: the latent space and the words are the
    UNet model's, so the two built-in models differ only in the denoiser and can be compared on the
    same suite.
    """

    out: str = "src/saltdiff/models/shapes-mmdit"
    work: str = "train_work/shapes-mmdit"
    base: str = "builtin:shapes"
    seed: int = 0
    image_size: int = 64
    model_max_length: int = 32
    latent_cache: int = 80_000
    # SD3Transformer2DModel
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    # flow matching: x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, sigma ~ logit-normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    scheduler_shift: float = 1.0
    # optimisation
    steps: int = 12_000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 300
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # zero rows standing in for T5 (SD3's max_sequence_length): each step draws one of these counts;
    # validation uses the last. See saltdiff.training.mmdit.
    t5_padding: tuple[int, ...] = (16, 32, 64, 128)
    # token grounding on the image->text joint attention (TokenCompose-style, as the UNet needed)
    grounding_weight: float = 0.05
    # distillation: a VP epsilon-UNet folder (e.g. builtin:shapes) whose velocity becomes the target,
    # mixed with the data target by teacher_weight ("" = data target only). See saltdiff.training.teacher.
    teacher: str = ""
    teacher_weight: float = 1.0
    # above this sigma the data target is kept: an epsilon-teacher's x0 (so its velocity) degrades at high
    # noise; measured on 128 VAL points at 16 sigmas, the teacher's velocity was nearer the data than the
    # student's (step 7,435) up to sigma 0.83, farther from 0.89 up
    teacher_max_sigma: float = 0.85
    # start from a trained SD3 transformer (a pipeline folder or builtin:NAME, "" = random init): its
    # blocks keep their places except the last, which stays last; blocks added in between start as
    # identities (adaLN-zero: their modulation is zero, so every gate is shut). See grow_transformer.
    init_from: str = ""
    # stop (with a checkpoint) after this step without changing the schedule (0: run to ``steps``), so a
    # chain of runs that switches a knob mid-way is reproducible
    until: int = 0
    # bookkeeping
    checkpoint_minutes: float = 5.0
    log_every: int = 25
    val_size: int = 256
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch",
            "latent_cache",
            "log_every",
            "val_size",
            "layers",
            "heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size not in (1, 2, 4):
            raise ValueError(f"patch_size must be 1, 2 or 4, got {self.patch_size}")
        if (self.image_size // 4) % self.patch_size:
            raise ValueError(
                f"the latent side ({self.image_size // 4}) must be divisible by patch_size={self.patch_size}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not (self.grounding_weight >= 0.0 and math.isfinite(self.grounding_weight)):
            raise ValueError(f"grounding_weight must be a finite number >= 0, got {self.grounding_weight}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not (self.logit_std > 0 and math.isfinite(self.logit_std)):
            raise ValueError(f"logit_std must be a positive number, got {self.logit_std}")
        if not self.t5_padding or min(self.t5_padding) < 1:
            raise ValueError(f"t5_padding must list positive row counts, got {self.t5_padding}")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight must be in [0, 1], got {self.teacher_weight}")
        if not 0.0 < self.teacher_max_sigma <= 1.0:
            raise ValueError(f"teacher_max_sigma must be in (0, 1], got {self.teacher_max_sigma}")
        if self.until < 0:
            raise ValueError(f"until must be >= 0 (0: run to steps), got {self.until}")
        if not self.scheduler_shift > 0:
            raise ValueError(f"scheduler_shift must be > 0, got {self.scheduler_shift}")

    def last_step(self) -> int:
        """Where this run stops: ``until`` when set (and below ``steps``), else ``steps``."""
        return min(self.until, self.steps) if self.until else self.steps

    def _pipeline_folder(self, name: str, subfolder: str, kind: str) -> Path | None:
        """The field ``name`` as a folder (``builtin:NAME`` resolved) holding ``subfolder``; ``None`` if unset."""
        value = getattr(self, name)
        if not value:
            return None
        from ..checkpoints import resolve_model

        folder = Path(resolve_model(value))
        if not (folder / subfolder).is_dir():
            raise ValueError(f"{name} {value!r} has no {subfolder} sub-folder: it must be {kind}")
        return folder

    def teacher_folder(self) -> Path | None:
        """``teacher`` as a folder, or ``None`` without one."""
        return self._pipeline_folder("teacher", "unet", "a VP UNet pipeline")

    def init_folder(self) -> Path | None:
        """``init_from`` as a folder holding a ``transformer`` sub-folder, or ``None`` without one."""
        return self._pipeline_folder("init_from", "transformer", "an SD3 pipeline")

    def base_folder(self) -> Path:
        """``base`` as a folder (``builtin:NAME`` resolved), checked to hold what the stage reuses."""
        from ..checkpoints import resolve_model

        folder = Path(resolve_model(self.base))
        missing = [c for c in ("vae", "text_encoder", "tokenizer") if not (folder / c).is_dir()]
        if missing:
            raise ValueError(
                f"base {self.base!r} is not a pipeline folder exported by the UNet trainer: "
                f"no {', '.join(missing)} sub-folder"
            )
        return folder
