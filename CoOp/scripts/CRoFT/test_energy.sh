#!/usr/bin/env bash
# Setup-I energy distributions (the seed README's `bash test_energy.sh`): for each seed's SHOTS-shot CRoFT model
# (default 32, trained by run_setup1.py), the energy (logsumexp of the logits) of the ID test images (test_id), of
# ImageNet-V2/-Sketch/-A/-R and of the open set, written as arrays and drawn as one histogram figure per seed.
# usage: DATA=/path/to/datasets bash scripts/CRoFT/test_energy.sh [driver flags, e.g. --lambda1 5 --lambda2 5]
#        [-- KEY VALUE ...]
# env:   SHOTS (32), OUTPUT_ROOT (output: the trained models), EVAL_ROOT (eval_energy: the evaluation runs, and
#        <EVAL_ROOT>/energy/<setting>/energy_seed<S>.{npz,png}), PYTHON (python).
# The evaluation runs are those of test_setup1.py with --eval-id-split test (TEST.OOD_ID_SPLIT test), so their
# scores.npz keep the test images' energies (their detection metrics use the test split as ID side: not the
# official Setup-I tables, hence their own EVAL_ROOT). Pass the training sweep's flags (e.g. --epochs, the KEY VALUE
# overrides) so the planned models are the trained ones. Runs whose 'done' marker exists are not repeated.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?set DATA to your datasets folder, e.g. DATA=/data bash scripts/CRoFT/test_energy.sh}"
SHOTS=${SHOTS:-32}
EVAL_ROOT=${EVAL_ROOT:-eval_energy}
"${PYTHON:-python}" scripts/CRoFT/test_setup1.py --root "${DATA}" --shots "${SHOTS}" --eval-id-split test \
  --output-root "${OUTPUT_ROOT:-output}" --eval-root "${EVAL_ROOT}" "$@"
"${PYTHON:-python}" -m launch.energy --root "${EVAL_ROOT}" --trainer CRoFT --shots "${SHOTS}"
