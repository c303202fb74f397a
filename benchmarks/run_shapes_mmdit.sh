#!/usr/bin/env bash
# The flow model's numbers (builtin:shapes-mmdit, benchmarks/RESULTS.md "The built-in flow model"):
# the studies on the tuning split (shapes-val, STUDY_N layouts x 1 seed; the outside prompt 2 seeds),
# then the table on the test split (shapes, N = 200 x 2) with the three methods the acceptance needs.
#
#   bash benchmarks/run_shapes_mmdit.sh [RUNS_DIR] [WHAT...]    (WHAT: studies tuning6 tuning15 tuning16 tuning17 table; default studies table)
#
# tuning6: the studies behind today's flow defaults on the 6-block weights (session 14): each variant is
# one `saltdiff bench` of `salt` on the tuning split's first 64 layouts, seed 0 (the last three on 32
# layouts x 2 seeds, with `sd`, for seed diversity), into RUNS/val64-NAME or RUNS/val32x2-NAME; flags are
# relative to the defaults before that session (10 x 3 updates, no outside prompt; with $S14, the start
# before session 15), so they reproduce its table with today's code; compare two with `saltdiff compare RUNS/val64-default:salt RUNS/val64-NAME:salt`.
#
# tuning15: the session-15 studies behind the flow feather (1) and object steps (10): where the start loses
# the layout (RUNS/val32x1-NAME, 32 layouts x 1 seed, the session-14 start: object steps 25, feather 3.5;
# g0 = no guidance, rt = no guidance, CFG 1, no fresh noise: the round trip), the feather study
# (RUNS/val32x2-NAME, 32 layouts x 2 seeds, against def = feather 3.5) and its check on 96 layouts
# (RUNS/val96x1-NAME). Compare with `saltdiff compare RUNS/val32x2-def:salt RUNS/val32x2-f1:salt`.
#
# tuning16: the session-16 cost study (RUNS/v32-NAME, 32 layouts x 2 seeds, `sd` and `salt` in one run for the
# time ratio, one run at a time on the idle machine): the defaults of that session (def: the conditional row re-run, --guided-prediction updated), the guided pass's prediction
# reused (gp: --guided-prediction guided-pass), the loss on blocks 0-3 only (b03), both (gpb03). Compare with
# `saltdiff compare RUNS/v32-def:salt RUNS/v32-gp:salt`, time with `scripts/cost_ratio.py RUNS/v32-gp salt sd`.
#
# tuning17: the session-17 check behind SD3's guided-pass default (RUNS/v64-NAME, 64 layouts x 2 seeds, `sd`
# and `salt` in one run): the conditional row re-run on guided steps (def: --guided-prediction updated, the
# default before), guided-pass (gp, today's default) and guided-pass with the local gradient (gploc:
# --guided-gradient local), and guided-pass with unboxed objects at one place for every seed (gpplace:
# --reference-unboxed place). tuning16's v32 folders copied to v64-def and v64-gp resume them (same records).
# Compare with `saltdiff compare RUNS/v64-def:salt RUNS/v64-gp:salt`.
#
# CFG 5 is the scale builtin_quality --tune chose on held-out captions (the model card). INIT_EXTRA adds
# initializer flags to every command: empty (today's defaults) for the 6-block weights' table;
# INIT_EXTRA="--feather 2 --reference-unboxed place" reproduces the 4-block weights' table and studies
# (session 9). Every part resumes after a kill (rerun the same command).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-runs/mmdit}
shift || true
WHAT=${*:-studies table}
export MODEL=${MODEL:-builtin:shapes-mmdit} CFG=${CFG:-5}
export INIT_EXTRA=${INIT_EXTRA-}
export STUDY_N=${STUDY_N:-32} OUTSIDE_N=${OUTSIDE_N:-24} OUTSIDE_VALUES=${OUTSIDE_VALUES:-0,5,10}
export INVERSION=${INVERSION:-1,2,5,10} BUDGET=${BUDGET:-3,10} BUDGET_ITERS=${BUDGET_ITERS:-1,3}
B=transformer_blocks
PRE="--guidance-iters 3 --outside-prompt-steps 0"   # the defaults the session-14 studies started from
TUNING6=(
    "default|$PRE" "out10|--guidance-iters 3 --outside-prompt-steps 10" "i1|--guidance-iters 1 --outside-prompt-steps 0"
    "b02|$PRE --layers $B.0,$B.1,$B.2" "inv5|$PRE --inversion-steps 5"
    "o10i1|--guidance-iters 1 --outside-prompt-steps 10" "o10s5i1|--guidance-iters 1 --outside-prompt-steps 10 --guidance-steps 5"
    "o10i1inv5|--guidance-iters 1 --outside-prompt-steps 10 --inversion-steps 5"
    "o10i1b35|--guidance-iters 1 --outside-prompt-steps 10 --layers $B.3,$B.4,$B.5"
    "o10i1obj10|--guidance-iters 1 --outside-prompt-steps 10 --object-steps 10"
    "o10i1mid|--guidance-iters 1 --outside-prompt-steps 10 --inversion-method midpoint"
)
TUNING6_SEEDS=("default|sd,salt|$PRE" "o10i1|salt|--guidance-iters 1 --outside-prompt-steps 10"
               "o5i1|salt|--guidance-iters 1 --outside-prompt-steps 5")
G0="--guidance-steps 0 --outside-prompt-steps 0"
S14="--object-steps 25 --feather 3.5"   # the start before session 15
TUNING15_DIAG=("def|$S14" "g0|$S14 $G0" "cfg1g0|$S14 $G0 --cfg 1" "rt|$S14 $G0 --cfg 1 --noise-outside 0"
               "g0ip|$S14 $G0 --inversion-prompt prompt" "g0no0|$S14 $G0 --noise-outside 0" "g0f1|$G0")
TUNING15=("def|--feather 3.5" "f0|--feather 0" "f05|--feather 0.5" "f1|--feather 1" "f15|--feather 1.5"
          "f2|--feather 2" "kbf2|--feather 2 --keep-region boxes" "f1g5|--feather 1 --guidance-steps 5"
          "f1o5|--feather 1 --outside-prompt-steps 5")
TUNING16=("def|--guided-prediction updated" "gp|--guided-prediction guided-pass" "b03|--guided-prediction updated --layers $B.0,$B.1,$B.2,$B.3"
          "gpb03|--guided-prediction guided-pass --layers $B.0,$B.1,$B.2,$B.3")
TUNING17=("def|--guided-prediction updated" "gp|--guided-prediction guided-pass"
          "gploc|--guided-prediction guided-pass --guided-gradient local"
          "gpplace|--guided-prediction guided-pass --reference-unboxed place")
bench() { OMP_NUM_THREADS=1 python -m saltdiff bench --model "$MODEL" --cfg "$CFG" --suite shapes-val --steps 25 \
              --device cpu -q --bootstrap 200 $INIT_EXTRA "$@"; }
for what in $WHAT; do
    case $what in
        studies) bash "$HERE/run_shapes.sh" "$RUNS" inversion method layers budget stepsize outside ;;
        tuning6)
            for v in "${TUNING6[@]}"; do
                bench --n 64 --seeds 1 --methods salt $S14 ${v#*|} --out "$RUNS/val64-${v%%|*}"
            done
            for v in "${TUNING6_SEEDS[@]}"; do
                IFS='|' read -r name methods flags <<< "$v"
                bench --n 32 --seeds 2 --methods "$methods" $S14 $flags --out "$RUNS/val32x2-$name"
            done ;;
        tuning15)
            for v in "${TUNING15_DIAG[@]}"; do
                bench --n 32 --seeds 1 --methods salt ${v#*|} --out "$RUNS/val32x1-${v%%|*}"
            done
            for v in "${TUNING15[@]}"; do
                bench --n 32 --seeds 2 --methods salt ${v#*|} --out "$RUNS/val32x2-${v%%|*}"
            done
            for v in "def|--feather 3.5" "f1|--feather 1"; do
                bench --n 96 --seeds 1 --methods salt ${v#*|} --out "$RUNS/val96x1-${v%%|*}"
            done ;;
        tuning16)
            for v in "${TUNING16[@]}"; do
                bench --n 32 --seeds 2 --methods sd,salt ${v#*|} --out "$RUNS/v32-${v%%|*}"
            done ;;
        tuning17)
            for v in "${TUNING17[@]}"; do
                bench --n 64 --seeds 2 --methods sd,salt ${v#*|} --out "$RUNS/v64-${v%%|*}"
            done ;;
        table)   METHODS=${METHODS:-sd,random+salt-loss,salt} bash "$HERE/run_shapes.sh" "$RUNS" table ;;
        *) echo "unknown part: $what (studies, tuning6, tuning15, tuning16, tuning17, table)" >&2; exit 2 ;;
    esac
done
