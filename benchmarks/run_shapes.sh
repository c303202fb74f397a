#!/usr/bin/env bash
# Reproduce benchmarks/RESULTS.md: the shapes-suite table (N = 200, the test split `shapes`) and the
# studies (the tuning split `shapes-val`: defaults are chosen there only), with the built-in model, on a
# CPU machine: PROCS processes (default 2) with one thread each; layouts are split by index and the main
# process merges (set PROCS=1 for a single process).
#
#   bash benchmarks/run_shapes.sh [RUNS_DIR] [WHAT...]
#   WHAT: table val hard outside noise feather keep spatial inversion background budget reg sde
#         stepsize method layers (flow models: reverse Euler vs midpoint inversion; the captured blocks)
#   (val: the table's methods on the tuning split; METHODS=sd,random+salt-loss,salt for the three the
#   acceptance targets need)
#   MODEL (default builtin:shapes), CFG (default: the model's, 5 for the built-in models) choose the model
#   and its CFG scale (the tables and studies before session 11 ran at CFG=7.5: RESULTS.md says which);
#   benchmarks/run_shapes_mmdit.sh runs the flow model's table and studies with them.
#
# Every command resumes: rerun the script after a kill and finished images are skipped.
# The studies spatial … sde in RESULTS.md ran with the first version's init (white reference, no fresh
# noise); EXTRA="--noise-outside 0 --background white --keep-region boxes --feather 0" reproduces them.
# INIT_EXTRA is added to every command (run_shapes_mmdit.sh: the initializer defaults of its run). The
# UNet sections before session 11 ran at CFG=7.5 with INIT_EXTRA="--feather 2 --reference-unboxed place".
set -euo pipefail
RUNS=${1:-runs}
shift || true
WHAT=${*:-table hard noise feather keep spatial inversion background budget reg sde}
PROCS=${PROCS:-2}
STEPS=${STEPS:-25}
STUDY_N=${STUDY_N:-50}
MODEL=${MODEL:-builtin:shapes}
CFG=${CFG:-}
CFG_ARGS=(${CFG:+--cfg "$CFG"})
# the flow model's captured-block candidates (the layers study; a '+' joins blocks into one variant)
LAYERS=${LAYERS:-default,transformer_blocks.0,transformer_blocks.1,transformer_blocks.2,transformer_blocks.3}
BUDGET=${BUDGET:-2,5,10}
BUDGET_ITERS=${BUDGET_ITERS:-1,5}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$PROCS" -gt 1 ]; then
    LAUNCH=(python -m accelerate.commands.launch --multi_gpu --num_processes "$PROCS" --num_machines 1
            --mixed_precision no --dynamo_backend no --main_process_port "${PORT:-29533}" -m saltdiff)
else
    LAUNCH=(python -m saltdiff)
fi
# Studies: the tuning split. The table (and hard): the test splits.
COMMON=(--model "$MODEL" "${CFG_ARGS[@]}" --suite shapes-val --seeds 1 --steps "$STEPS" --device cpu -q ${INIT_EXTRA:-} ${EXTRA:-})
TWO=(--model "$MODEL" "${CFG_ARGS[@]}" --suite shapes-val --seeds 2 --steps "$STEPS" --device cpu -q ${INIT_EXTRA:-})   # seed diversity needs two seeds
TABLE=(--model "$MODEL" "${CFG_ARGS[@]}" --suite shapes --seeds 2 --steps "$STEPS" --device cpu -q ${INIT_EXTRA:-})
METHODS=${METHODS:-all}
FID_N=${FID_N:-40}

for what in $WHAT; do
    case $what in
        table)      "${LAUNCH[@]}" bench "${TABLE[@]}" --n 200 --methods "$METHODS" --out "$RUNS/fidelity-n200" ;;
        val)        "${LAUNCH[@]}" bench "${TWO[@]}" --n 200 --methods "$METHODS" --out "$RUNS/val-n200" ;;
        hard)       "${LAUNCH[@]}" bench --model "$MODEL" "${CFG_ARGS[@]}" --suite shapes-hard --seeds 2 --steps "$STEPS" --device cpu -q ${INIT_EXTRA:-} --n 100 \
                        --methods sd,random+salt-loss,layout-guidance,salt --out "$RUNS/hard-n100" ;;
        outside)    "${LAUNCH[@]}" study outside-prompt "${TWO[@]}" --n "${OUTSIDE_N:-200}" --values "${OUTSIDE_VALUES:-0,5,10,15,25}" --out "$RUNS/s-outside-n${OUTSIDE_N:-200}" ;;
        noise)      "${LAUNCH[@]}" study noise-outside "${TWO[@]}" --n "$FID_N" --values 0.8,0.9,1.0 --keep-region objects \
                        --feather 1 --background prompt-color --out "$RUNS/s-noise-out" ;;
        feather)    "${LAUNCH[@]}" study feather "${TWO[@]}" --n "$FID_N" --values 1,2,3 --noise-outside 1.0 \
                        --keep-region objects --background prompt-color --out "$RUNS/s-feather-n1" ;;
        keep)       "${LAUNCH[@]}" study feather "${TWO[@]}" --n "$FID_N" --values 0,1,2 --noise-outside 1.0 \
                        --keep-region boxes --background prompt-color --out "$RUNS/s-feather-boxes" ;;
        spatial)    "${LAUNCH[@]}" study spatial-awareness "${COMMON[@]}" --n "$STUDY_N" --out "$RUNS/study-spatial" ;;
        inversion)  "${LAUNCH[@]}" study inversion-steps "${COMMON[@]}" --n "$STUDY_N" --values "${INVERSION:-1,5,10,25}" --out "$RUNS/study-inversion" ;;
        background) "${LAUNCH[@]}" study background "${COMMON[@]}" --n "$STUDY_N" --out "$RUNS/study-background" ;;
        budget)     "${LAUNCH[@]}" study guidance-budget "${COMMON[@]}" --n "$STUDY_N" --values "$BUDGET" --iters-values "$BUDGET_ITERS" --out "$RUNS/study-budget" ;;
        stepsize)   "${LAUNCH[@]}" study step-size "${COMMON[@]}" --n "$STUDY_N" --values "${STEP_SIZES:-10,30,100}" --out "$RUNS/study-step-size" ;;
        method)     "${LAUNCH[@]}" study inversion-method "${COMMON[@]}" --n "$STUDY_N" --values euler,midpoint --out "$RUNS/study-inv-method" ;;
        layers)     "${LAUNCH[@]}" study layers "${COMMON[@]}" --n "$STUDY_N" --values "$LAYERS" --out "$RUNS/study-layers" ;;
        reg)        "${LAUNCH[@]}" study reg-weight "${COMMON[@]}" --n "$STUDY_N" --values 0,0.5,2 --out "$RUNS/study-reg" ;;
        sde)        "${LAUNCH[@]}" study sde-inversion "${COMMON[@]}" --n "$STUDY_N" --values 0,0.1,0.3 --out "$RUNS/study-sde" ;;
        *) echo "unknown part: $what" >&2; exit 2 ;;
    esac
done
