#!/usr/bin/env bash
# The flow model's numbers (builtin:shapes-mmdit, benchmarks/RESULTS.md "The built-in flow model"):
# the studies on the tuning split (shapes-val, STUDY_N layouts x 1 seed; the outside prompt 2 seeds),
# then the table on the test split (shapes, N = 200 x 2) with the three methods the acceptance needs.
#
#   bash benchmarks/run_shapes_mmdit.sh [RUNS_DIR] [WHAT...]    (WHAT: studies table; default both)
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
for what in $WHAT; do
    case $what in
        studies) bash "$HERE/run_shapes.sh" "$RUNS" inversion method layers budget stepsize outside ;;
        table)   METHODS=${METHODS:-sd,random+salt-loss,salt} bash "$HERE/run_shapes.sh" "$RUNS" table ;;
        *) echo "unknown part: $what (studies, table)" >&2; exit 2 ;;
    esac
done
