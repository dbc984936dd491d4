#!/usr/bin/env bash
# CRoFT Setup-II training on PACS, ViT config (official: lambda1 15, ratio 0.2/0.5, gen_step 1).
# usage: DATA=/path/to/datasets bash scripts/CRoFT/croft_pacs_vit.sh DATASET CFG SEED SHOTS LAMBDA2 [KEY VALUE ...]
source "$(dirname "$0")/_setup2_common.sh"
DATASET=$1; CFG=$2; SEED=$3; SHOTS=$4; L2=$5
shift 5
run_domains "$DATASET" "$CFG" "$SEED" "$SHOTS" 15 "$L2" 0.2 0.5 1 "sketch photo cartoon art_painting" "$@"
