#!/usr/bin/env bash
# Reproduce the shipped builtin:shapes-mmdit weights (src/saltdiff/models/shapes-mmdit) from seed 0.
#
#   bash scripts/train_builtin_shapes_mmdit.sh [WORK] [OUT]
#
# One thread (it ran beside other work on the 2-core machine); every run checkpoints every 5 min:
# rerun the script after a kill and it resumes where it stopped (the data are a pure function of the
# step, so a resumed run sees what an uninterrupted one would). See the model card for the steps done.
set -euo pipefail
WORK=${1:-train_work/shapes-mmdit}
OUT=${2:-train_work/shapes-mmdit-out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m saltdiff.training mmdit --work "$WORK" --out "$OUT" --resume --no-progress "$@"
