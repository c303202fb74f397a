"""Every name a user can choose — guidance loss, initializer, reference builder, sampler — declared once:
the catalogue of built-in entries (the machinery, :class:`Param`, :class:`Entry` and :class:`Registry`,
is :mod:`saltdiff.registry_core`, re-exported here).

An :class:`Entry` says what a name is (a callable or a class, given lazily as ``"module:attr"`` so
this module imports no torch), what it does, its hyper-parameters (:class:`Param`: default, help,
bounds) and what it needs from the pipeline (e.g. a guidance loss that needs the attention of the
prompt's unboxed tokens). The CLI's flags and choices, the bench's method presets, the demo's
radio buttons and every help text are derived from these entries, so adding a loss is one function
plus one :func:`Registry.register` call::

    from saltdiff.registry import GUIDANCE_LOSSES, Entry, Param
    GUIDANCE_LOSSES.register(Entry("mass", my_loss, "push attention mass into the box",
                                   params=(Param("power", 2.0, "exponent of the outside mass", minimum=0),)))
    pipe(prompt, layout, guidance=GuidanceConfig(loss="mass", loss_params={"power": 3.0}))

Config dataclasses (``GuidanceConfig``, ``SpatialAwareInit``, ``GeneratedObjects``) validate their
fields with these same ``Param`` objects; a test checks that every registered param is a field of
its class with the same default.
"""

from __future__ import annotations

from typing import Any

from .registry_core import Entry, Param, Registry, check_fields

__all__ = [
    "Entry",
    "GUIDANCE_LOSSES",
    "FLOW_GUIDANCE_BUDGETS",
    "GUIDANCE_BUDGETS",
    "GUIDANCE_PARAMS",
    "INITIALIZERS",
    "Param",
    "REFERENCE_BUILDERS",
    "Registry",
    "SCHEDULERS",
    "check_fields",
]


# -- built-in entries ------------------------------------------------------------------------------
#: The guidance budget a start gets where ``GuidanceConfig`` leaves it unset, by start: SALT's z_T*
#: (``"reference"``: an initializer that built a reference) or anything else (``"noise"``). From
#: z_T* the layout is already there and the loss is nearly always under its threshold, so a small
#: budget that always steps is what helps (guidance-budget and outside-prompt studies in
#: ``benchmarks/RESULTS.md``); from random noise guidance has to build the layout.
GUIDANCE_BUDGETS: dict[str, dict[str, Any]] = {
    "reference": {"guidance_steps": 3, "guidance_iters": 1, "loss_threshold": 0.0},
    "noise": {"guidance_steps": 10, "guidance_iters": 5, "loss_threshold": 0.2},
}
#: Where a flow-matching model's budget differs (``GuidanceConfig.for_start(..., flow=True)``): from
#: z_T* 10 steps of one update. Chosen on the tuning split with ``builtin:shapes-mmdit`` (6 blocks,
#: ``shapes-val``, 64 layouts, ``benchmarks/RESULTS.md``): 10 steps against the UNet's 3, mIoU and
#: prompt accuracy beyond noise (4 blocks); 5 steps loses mAP@0.5 (-0.052) beyond noise; 3 updates
#: per step add nothing beyond noise (mIoU +0.011) for three times the guided passes.
FLOW_GUIDANCE_BUDGETS: dict[str, dict[str, Any]] = {
    "reference": {"guidance_steps": 10, "guidance_iters": 1, "loss_threshold": 0.0},
}


def _by_start(name: str) -> str:
    ref, noise = GUIDANCE_BUDGETS["reference"][name], GUIDANCE_BUDGETS["noise"][name]
    return f"(default: {ref:g} from a SALT start, {noise:g} from random noise)"


#: Knobs of the guidance loop shared by every loss (fields of ``GuidanceConfig``).
GUIDANCE_PARAMS: tuple[Param, ...] = (
    Param(
        "guidance_steps",
        None,
        f"guide the first N denoising steps {_by_start('guidance_steps')}",
        kind=int,
        minimum=0,
        optional=True,
    ),
    Param(
        "guidance_iters",
        None,
        f"at most N gradient updates of the latent per guided step {_by_start('guidance_iters')}",
        kind=int,
        minimum=0,
        optional=True,
    ),
    Param(
        "step_size",
        30.0,
        "guidance step size eta (scaled by 1 - alpha_bar_t under the 'sigma' schedule)",
        minimum=0,
    ),
    Param(
        "step_size_schedule",
        "sigma",
        "'sigma' (eta * (1 - alpha_bar_t)) or 'constant' (eta)",
        choices=("sigma", "constant"),
    ),
    Param(
        "loss_threshold",
        None,
        f"no (more) updates in a guided step once the loss is below this {_by_start('loss_threshold')}",
        kind=float,
        minimum=0,
        optional=True,
    ),
    Param(
        "outside_prompt_steps",
        None,
        "for the first N steps, give the area outside the boxes its own text condition (see "
        "outside_prompt): fewer copies of boxed objects there; costs a third batch row on those steps "
        "(default: 10 with a guidance loss, 0 with --guidance none)",
        kind=int,
        minimum=0,
        optional=True,
    ),
    Param(
        "outside_prompt",
        "boxed-negative",
        "outside the boxes, 'boxed-negative' makes the boxed phrases the negative prompt (the whole "
        "prompt stays positive); 'without-boxed' drops them from the prompt",
        choices=("boxed-negative", "without-boxed"),
    ),
    Param(
        "guided_prediction",
        None,
        "the prediction a guided step samples with: 'updated' runs the denoiser again on the updated "
        "latent (layout-guidance's way); 'guided-pass' takes the conditional one from the guided pass "
        "itself and adds the update to the step (one conditional pass fewer per guided step; "
        "flow-matching models only) (default: 'guided-pass' on SD3, 'updated' on FLUX and UNet models)",
        choices=("updated", "guided-pass"),
        optional=True,
    ),
    Param(
        "guided_gradient",
        "full",
        "the gradient of a guided pass: 'full' backpropagates through every captured block; 'local' "
        "treats each block's attention output as a constant, so the loss reaches the latent through "
        "each block's own queries and keys and the residual stream (a cheaper backward, an approximate "
        "gradient; flow-matching models only)",
        choices=("full", "local"),
    ),
    Param(
        "placed_unboxed",
        "guide",
        "where SALT's reference placed an object the prompt names without a box: 'guide' treats that "
        "place as a box for the guidance loss and the outside prompt (the object stays there, once); "
        "'free' leaves it to the prompt",
        choices=("guide", "free"),
    ),
    Param(
        "layers",
        "default",
        "cross-attention layers for the loss: default, all, down, mid, up, x4/x8 tags or names",
    ),
    Param(
        "max_grad_norm",
        None,
        "clip the latent gradient to this norm",
        kind=float,
        minimum=0,
        open_minimum=True,
        optional=True,
    ),
)

GUIDANCE_LOSSES = Registry("guidance loss")
GUIDANCE_LOSSES.register(
    Entry(
        "salt",
        "saltdiff.losses:salt_loss",
        "SALT: layout energy + peak-normalized outside-box term (+ optional unboxed-token term)",
        params=(
            Param("reg_weight", 0.5, "weight of SALT's outside-box regularization term", minimum=0),
            Param(
                "unboxed_weight",
                0.0,
                "weight of SALT's term that keeps unboxed tokens' attention alive",
                minimum=0,
            ),
        ),
        needs={"unboxed_tokens": "unboxed_weight"},
        bench_names=("random+salt-loss", "salt"),
    )
)
GUIDANCE_LOSSES.register(
    Entry(
        "layout-guidance",
        "saltdiff.losses:layout_guidance_loss",
        "Chen et al.'s backward guidance: (1 - attention mass inside the box)^2",
    )
)
GUIDANCE_LOSSES.register(
    Entry(
        "boxdiff",
        "saltdiff.losses:boxdiff_loss",
        "BoxDiff's inner-box, outer-box and corner constraints",
        params=(
            Param(
                "topk_fraction",
                0.2,
                "BoxDiff: fraction of pixels in its top-k constraints",
                minimum=0,
                maximum=1,
                open_minimum=True,
                flag="boxdiff-topk-fraction",
            ),
        ),
    )
)
GUIDANCE_LOSSES.register(Entry("none", None, "no attention guidance"))

INITIALIZERS = Registry("initializer")
INITIALIZERS.register(
    Entry(
        "salt",
        "saltdiff.init:SpatialAwareInit",
        "spatial-aware init: DDIM inversion of a reference image of the layout",
        params=(
            Param(
                "inversion_steps",
                None,
                "inversion steps up to the sampler's first timestep (default: 5 DDIM steps, or as "
                "many as fit when few sampling steps start too low for 5, e.g. 4 at 4 steps; flow "
                "models: 10; the recipe records the value used)",
                kind=int,
                optional=True,
                minimum=1,
            ),
            Param(
                "inversion_method",
                "euler",
                "flow models (SD3, FLUX): 'euler' (reverse Euler, one call per step) or 'midpoint' "
                "(second order, one more call); the UNet families invert with DDIM: 'euler' only",
                choices=("euler", "midpoint"),
            ),
            Param(
                "inversion_prompt",
                "empty",
                "'empty' or 'prompt': text condition used during inversion (CFG 1)",
                choices=("empty", "prompt"),
            ),
            Param(
                "noise_outside",
                1.0,
                "blend this much fresh noise into z_T outside the kept region (0 = off)",
                minimum=0,
                maximum=1,
            ),
            Param(
                "noise_inside",
                0.0,
                "blend this much fresh noise into z_T inside the kept region (0 = off)",
                minimum=0,
                maximum=1,
            ),
            Param(
                "keep_region",
                "objects",
                "where z_T* is kept: the boxes, or only the pasted objects' pixels",
                choices=("boxes", "objects"),
            ),
            Param(
                "feather",
                None,
                "feather the kept region by this many latent cells when blending noise (default: 3.5; "
                "flow models: 1; the recipe records the value used)",
                kind=float,
                optional=True,
                minimum=0,
            ),
            Param(
                "inversion_noise_scale",
                0.0,
                "SDE-style inversion: add this much fresh noise per step (0 = DDIM ODE)",
                minimum=0,
            ),
            Param(
                "ancestral_skip",
                0.14,
                "under an ancestral sampler (Euler a) start this fraction of a longer schedule lower "
                "(steps + k steps, the k noisiest skipped: 4 at 25 steps), so its fresh noise erases "
                "less of the layout; 0 = the sampler's first step; other samplers always start there",
                minimum=0,
                maximum=1,
                open_maximum=True,
            ),
        ),
        needs={"reference": None},
    )
)
INITIALIZERS.register(Entry("random", "saltdiff.init:RandomInit", "z_T ~ N(0, I): the usual baseline"))

REFERENCE_BACKGROUNDS = ("generated", "prompt-color", "gray", "white", "noise")  # and any colour
REFERENCE_BUILDERS = Registry("reference builder")
REFERENCE_BUILDERS.register(
    Entry(
        "objects",
        "saltdiff.reference:GeneratedObjects",
        "each boxed object generated by the same model, cut out and pasted into its box",
        params=(
            Param(
                "background",
                "prompt-color",
                "reference background: generated (a scene of the prompt without the boxed phrases), "
                "prompt-color (that scene's median colour, flat), gray, white, noise, or a flat colour: "
                "beige, dark gray (the built-in model's names), any CSS name or #rrggbb",
                accepts="saltdiff.colors:is_background",
                accepts_help="generated, prompt-color, gray, white, noise, a colour of the built-in "
                "model's prompts (beige, light gray, dark gray), any CSS colour name or #rrggbb",
            ),
            Param(
                "object_prompt",
                "a {phrase} on a white background",
                "prompt of each object; contains {phrase}",
            ),
            Param("object_seed", 0, "seed for the object and background generations", minimum=0),
            Param(
                "num_inference_steps",
                None,
                "steps for each object generation (default: 25; flow models: 10; the recipe records "
                "the value used)",
                kind=int,
                optional=True,
                minimum=1,
                flag="object-steps",
            ),
            Param(
                "guidance_scale", 7.5, "CFG scale for each object generation", minimum=0, flag="object-cfg"
            ),
            Param(
                "cutout",
                "attention-color",
                "how objects are cut out: attention-color (the phrase's attention locates it, colour "
                "and edges outline it; survives shadows, gradients, clutter, white on white), "
                "foreground (border colour only) or attention (its own map only)",
                choices=("attention-color", "foreground", "attention"),
            ),
            Param(
                "threshold",
                0.15,
                "foreground cut-out: RGB distance from the border color that counts as object",
                minimum=0,
                maximum=1,
                open_minimum=True,
                open_maximum=True,
                flag="cutout-threshold",
            ),
            Param(
                "attention_threshold",
                0.5,
                "attention cut-out: fraction of the map's maximum that counts as object",
                minimum=0,
                maximum=1,
                open_minimum=True,
                open_maximum=True,
            ),
            Param(
                "fit",
                "stretch",
                "stretch the object to its box, or contain it keeping its aspect ratio",
                choices=("stretch", "contain"),
            ),
            Param(
                "unboxed",
                "place-seeded",
                "objects the prompt names without a box (the layout's unboxed phrases): 'place-seeded' pastes "
                "each into the reference at a free place drawn from the seed (saltdiff.placement.free_boxes), so "
                "it is drawn once, there, and elsewhere for another seed; 'place' in the middle of the free space "
                "for every seed (less seed diversity); 'ignore' leaves them to the prompt",
                choices=("place", "place-seeded", "ignore"),
                flag="reference-unboxed",
            ),
            Param(
                "batch_size",
                8,
                "objects generated per batched call (lower it when memory is short)",
                minimum=1,
                flag="object-batch-size",
            ),
            Param("cache", True, "cache generated objects on disk", flag="object-cache"),
            Param(
                "cache_dir",
                None,
                "object cache folder (default ~/.cache/saltdiff/objects or $SALTDIFF_CACHE)",
                kind=str,
                optional=True,
                flag="object-cache-dir",
            ),
        ),
        needs={"object_generator": None},
    )
)
REFERENCE_BUILDERS.register(
    Entry(
        "image",
        "saltdiff.reference:UserImages",
        "your own reference image (or one image per object), pasted as given",
        params=(
            Param(
                "image",
                None,
                "use this whole image as the reference for --init salt (instead of generated objects)",
                kind=object,
                optional=True,
                flag="reference",
            ),
        ),
    )
)

#: Samplers: a diffusers scheduler class built from the pipeline's scheduler config (same noise
#: schedule, so the model and z_T* stay valid) plus fixed options. SALT's latent is put into each
#: sampler's noise space by :func:`saltdiff.samplers.to_sampler_space`.
SCHEDULERS = Registry("scheduler")
for _name, _cls, _options, _text in (
    ("ddim", "DDIMScheduler", {}, "DDIM (deterministic; the mirror of SALT's DDIM inversion)"),
    (
        "pndm",
        "PNDMScheduler",
        {"skip_prk_steps": True},
        "PNDM (SD 1.x checkpoints' shipped sampler; multistep: unstable under strong CFG with few steps, the built-in model needs ~50)",
    ),
    (
        "dpm++2m",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM-Solver++ (2M)",
    ),
    (
        "dpm++2m-karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM-Solver++ (2M) with Karras sigmas",
    ),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}, "Euler (SDXL's default sampler)"),
    (
        "euler-a",
        "EulerAncestralDiscreteScheduler",
        {},
        "Euler ancestral (fresh noise each step; SALT starts it lower, --ancestral-skip)",
    ),
    ("heun", "HeunDiscreteScheduler", {}, "Heun (2nd order: two UNet calls per step)"),
    ("lms", "LMSDiscreteScheduler", {}, "linear multistep (k-diffusion's LMS, order 4: same caveat as PNDM)"),
    ("unipc", "UniPCMultistepScheduler", {}, "UniPC (multistep predictor-corrector)"),
    (
        "flow-euler",
        "FlowMatchEulerDiscreteScheduler",
        {},
        "flow-matching Euler (SD3's sampler; flow models only, as the others are VP models' only)",
    ),
):
    SCHEDULERS.register(Entry(_name, f"diffusers:{_cls}", _text, options=_options))
