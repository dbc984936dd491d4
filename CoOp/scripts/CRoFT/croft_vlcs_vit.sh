#!/usr/bin/env bash
# CRoFT Setup-II training on VLCS, ViT config (official: gen_step 5; lambda1 and ratios swept).
# usage: DATA=/path/to/datasets bash scripts/CRoFT/croft_vlcs_vit.sh DATASET CFG SEED SHOTS LAMBDA2 LAMBDA1 RATIO RATIO_TEXT [KEY VALUE ...]
source "$(dirname "$0")/_setup2_common.sh"
DATASET=$1; CFG=$2; SEED=$3; SHOTS=$4; L2=$5; L1=$6; R=$7; RT=$8
shift 8
run_domains "$DATASET" "$CFG" "$SEED" "$SHOTS" "$L1" "$L2" "$R" "$RT" 5 "labelme sun pascal caltech" "$@"
