"""Fill the frozen-encoder feature cache ahead of the runs, on one or many GPUs (or CPU processes).

    python tools/extract_features.py   <the train.py arguments of the runs to come>
    torchrun --nproc_per_node 8 tools/extract_features.py --root $DATA --trainer CRoFT \\
        --dataset-config-file configs/datasets/imagenet46.yaml --config-file configs/trainers/CRoFT/ViT_ep30.yaml \\
        --seed 1 DATASET.NUM_SHOTS 16 FEATURE_CACHE.DIR /fast/features
    sbatch --nodes 2 --gpus-per-node 8 scripts/slurm/extract_features.sbatch <the same arguments>   # srun + torchrun

It takes the same arguments as ``train.py``, builds the dataset and the frozen image encoder the same way, and
encodes every image the runs will need (``FEATURE_CACHE.TRAIN_VIEWS`` augmented views of the training images,
the test transform for val/test, the open-set images) into ``FEATURE_CACHE.DIR``. Under ``torchrun`` each rank
encodes a disjoint part of the images on ``cuda:LOCAL_RANK`` (when CUDA is there) and appends it to the stores
as its own shards (named after the rank; no global rewrite); augmented views are seeded per image, so the result does not depend on the number of ranks. Later runs
with ``FEATURE_CACHE.ENABLED True`` and the same backbone/input settings find everything cached.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

COOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if COOP_DIR not in sys.path:
    sys.path.insert(0, COOP_DIR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    import train
    from dassl.engine import build_trainer
    from dassl.engine.feature_cache import FeatureCache
    from dassl.utils import set_random_seed
    from dassl.utils.errors import UserError

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = train.get_parser().parse_args(argv)
        opts = list(args.opts or []) + ["FEATURE_CACHE.ENABLED", "True", "VERBOSE", str(rank == 0)]
        if world > 1 and torch.cuda.is_available() and not args.device:
            opts += ["DEVICE", f"cuda:{local}"]
        args.opts = opts
        cfg = train.setup_cfg(args)
        if cfg.SEED >= 0:
            set_random_seed(cfg.SEED)  # the dataset's few-shot draws must match the runs'
        trainer = build_trainer(cfg)
        cache = FeatureCache(trainer)
        t0 = time.time()
        counts = cache.extract(rank, world)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"rank 0 of {world}: cached {', '.join(f'{k} {v:,}' for k, v in counts.items())} images in "
              f"{time.time() - t0:.1f} s -> {cache.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
