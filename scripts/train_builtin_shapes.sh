#!/usr/bin/env bash
# Reproduce the shipped builtin:shapes weights (src/saltdiff/models/shapes) from seed 0, as the chain
# of runs that made them: each later run resumes the work folder with a longer --unet-steps (the
# cosine schedule stretches to the new end), the last ones with the token-grounding loss.
#
#   bash scripts/train_builtin_shapes.sh [WORK] [OUT]
#
# 4.8 h wall time as shipped, on 2 CPU cores often shared with other jobs (model card). Every run checkpoints
# every 5 min: rerun the script after a kill and it resumes where it stopped. The shipped first run was
# killed and resumed with other step counts (model card, "Reproducing"); otherwise the chain is exact.
set -euo pipefail
WORK=${1:-train_work/shapes-repro}
OUT=${2:-train_work/shapes-repro-out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
train() { python -m saltdiff.training --work "$WORK" --out "$OUT" --vae-steps 5500 --resume --no-progress "$@"; }

train --unet-steps 6500                              # VAE 5,500 steps, then UNet + text encoder (first weights)
train --unet-steps 10500                             # longer (the second weights)
train --unet-steps 12000 --grounding-weight 0.05     # token grounding (TokenCompose-style)
train --unet-steps 13800 --grounding-weight 0.05
train --unet-steps 18000 --grounding-weight 0.05
train --unet-steps 22000 --grounding-weight 0.05     # the shipped weights
