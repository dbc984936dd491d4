#!/usr/bin/env bash
# CRoFT Setup-II training on VLCS with the ViT config (official: gen_step 5).
# usage: DATA=/path/to/datasets bash croft_vlcs_vit.sh DATASET CFG SEED SHOTS LAMBDA2 LAMBDA1 RATIO RATIO_TEXT [KEY VALUE ...]
# Runs the 4 held-out domains; a run whose output directory has a 'done' marker is skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?set DATA to your datasets folder, e.g. DATA=/data bash scripts/CRoFT/croft_vlcs_vit.sh ...}"
DATASET=$1; CFG=$2; SEED=$3; SHOTS=$4; L2=$5
L1=$6; R=$7; RT=$8; GEN=5
shift 8
for DOMAIN in labelme sun pascal caltech; do
  DIR=output/CRoFT/${DATASET}_${CFG}_l1-${L1}_l2-${L2}_r${R}_rt${RT}_g${GEN}/test_on_${DOMAIN}.json/seed${SEED}/shots${SHOTS}
  if [ -f "${DIR}/done" ]; then
    echo "The results exist at ${DIR} (skip)"
    continue
  fi
  python train.py --root "${DATA}" --seed "${SEED}" --trainer CRoFT \
    --dataset-config-file "configs/datasets/${DATASET}.yaml" --config-file "configs/trainers/CRoFT/${CFG}.yaml" \
    --output-dir "${DIR}" TEST_ENV "test_on_${DOMAIN}.json" DATASET.NUM_SHOTS "${SHOTS}" \
    TRAINER.CRoFT.WCCF True TRAINER.CRoFT.gen_step "${GEN}" TRAINER.CRoFT.ratio "${R}" \
    TRAINER.CRoFT.ratio_text "${RT}" TRAINER.CRoFT.lambda1 "${L1}" TRAINER.CRoFT.lambda2 "${L2}" "$@"
done
