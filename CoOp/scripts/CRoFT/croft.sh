#!/usr/bin/env bash
# CRoFT Setup-I training (imagenet46, ViT-B/16; official: ratio 0.2 / ratio_text 0.5).
# usage: DATA=/path/to/datasets bash scripts/CRoFT/croft.sh DATASET CFG SEED SHOTS LAMBDA1 LAMBDA2 GEN_STEP [KEY VALUE ...]
# Same output directory as run_setup1.py (under ${OUTPUT_ROOT:-output}); skipped when its 'done' marker exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?set DATA to your datasets folder, e.g. DATA=/data bash scripts/CRoFT/croft.sh ...}"
DATASET=$1; CFG=$2; SEED=$3; SHOTS=$4; L1=$5; L2=$6; GEN=$7
shift 7
DIR=${OUTPUT_ROOT:-output}/CRoFT/${DATASET}_${CFG}_l1-${L1}_l2-${L2}_r0.2_rt0.5_g${GEN}/seed${SEED}/shots${SHOTS}
if [ -f "${DIR}/done" ]; then
  echo "The results exist at ${DIR} (skip)"
  exit 0
fi
# the official per-config and trainer overrides (epochs, batch sizes, LR, precision) from launch/official.py
OFFICIAL=$("${PYTHON:-python}" -m launch.official CRoFT 1 --cfg "${CFG}")
"${PYTHON:-python}" train.py --root "${DATA}" --seed "${SEED}" --trainer CRoFT \
  --dataset-config-file "configs/datasets/${DATASET}.yaml" --config-file "configs/trainers/CRoFT/${CFG}.yaml" \
  --output-dir "${DIR}" DATASET.NUM_SHOTS "${SHOTS}" TRAINER.CRoFT.WCCF True TRAINER.CRoFT.gen_step "${GEN}" \
  TRAINER.CRoFT.ratio 0.2 TRAINER.CRoFT.ratio_text 0.5 TRAINER.CRoFT.lambda1 "${L1}" TRAINER.CRoFT.lambda2 "${L2}" ${OFFICIAL} "$@"
