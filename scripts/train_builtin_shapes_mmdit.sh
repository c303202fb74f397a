#!/usr/bin/env bash
# Reproduce the shipped builtin:shapes-mmdit weights (src/saltdiff/models/shapes-mmdit) from seed 0.
#
#   bash scripts/train_builtin_shapes_mmdit.sh [WORK] [OUT]
#
# The shipped run was a chain of four legs (the model card says why):
#   1. steps 0-7,823: 4 blocks, flow matching on the data (cosine schedule over 12,000 steps);
#   2. steps 7,823-8,135: the same schedule, the target now the velocity of builtin:shapes' UNet
#      (--teacher, distillation) below sigma 0.85;
#   3. steps 8,135-10,000: the same, the schedule shortened to end at 10,000 (--steps 10000);
#   4. the 4 blocks grown to 6 (--init-from: the two new blocks start as identities), 4,000 more steps
#      with the teacher from the start (a new run: its own optimizer and a 4,000-step schedule).
# One thread (it ran beside other work on the 2-core machine); every leg checkpoints every 5 min:
# rerun the script after a kill and it resumes where it stopped (the batches are a pure function of
# the step, so a resumed run sees what an uninterrupted one would); a finished leg only re-exports.
set -euo pipefail
WORK=${1:-train_work/shapes-mmdit}
OUT=${2:-train_work/shapes-mmdit-out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
train() { python -m saltdiff.training mmdit --resume --no-progress "$@"; }
train --work "$WORK" --out "$OUT-4blocks" --steps 12000 --until 7823
train --work "$WORK" --out "$OUT-4blocks" --steps 12000 --until 8135 --teacher builtin:shapes
train --work "$WORK" --out "$OUT-4blocks" --steps 10000 --teacher builtin:shapes
train --work "$WORK-6blocks" --out "$OUT" --init-from "$OUT-4blocks" --layers 6 --teacher builtin:shapes \
    --lr 2e-4 --warmup 200 --steps 4000
