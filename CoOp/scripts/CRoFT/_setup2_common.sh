#!/usr/bin/env bash
# Shared body of the CRoFT Setup-II shell drivers (sourced, not run).
# The interpreter is ${PYTHON:-python}.
# run_domains DATASET CFG SEED SHOTS L1 L2 RATIO RATIO_TEXT GEN_STEP "DOMAINS" [KEY VALUE ...]
# Trains one run per held-out domain under ${OUTPUT_ROOT:-output}; a run whose directory has a "done" marker is skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${DATA:?set DATA to your datasets folder, e.g. DATA=/data bash scripts/CRoFT/<script> ...}"

run_domains() {
  local DATASET=$1 CFG=$2 SEED=$3 SHOTS=$4 L1=$5 L2=$6 R=$7 RT=$8 GEN=$9 DOMAINS=${10}
  shift 10
  # the official per-config and trainer overrides (epochs, batch sizes, LR, precision) from launch/official.py
  local OFFICIAL
  OFFICIAL=$("${PYTHON:-python}" -m launch.official CRoFT 2 --cfg "${CFG}")
  for DOMAIN in ${DOMAINS}; do
    local DIR=${OUTPUT_ROOT:-output}/CRoFT/${DATASET}_${CFG}_l1-${L1}_l2-${L2}_r${R}_rt${RT}_g${GEN}/test_on_${DOMAIN}.json/seed${SEED}/shots${SHOTS}
    if [ -f "${DIR}/done" ]; then
      echo "The results exist at ${DIR} (skip)"
      continue
    fi
    "${PYTHON:-python}" train.py --root "${DATA}" --seed "${SEED}" --trainer CRoFT \
      --dataset-config-file "configs/datasets/${DATASET}.yaml" --config-file "configs/trainers/CRoFT/${CFG}.yaml" \
      --output-dir "${DIR}" TEST_ENV "test_on_${DOMAIN}.json" DATASET.NUM_SHOTS "${SHOTS}" \
      TRAINER.CRoFT.WCCF True TRAINER.CRoFT.gen_step "${GEN}" TRAINER.CRoFT.ratio "${R}" \
      TRAINER.CRoFT.ratio_text "${RT}" TRAINER.CRoFT.lambda1 "${L1}" TRAINER.CRoFT.lambda2 "${L2}" ${OFFICIAL} "$@"
  done
}
