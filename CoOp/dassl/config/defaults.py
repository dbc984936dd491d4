"""Default configuration tree (yacs), mirroring Dassl's ``defaults.py`` for the keys this project uses.

Every key here is read by the engine, a trainer or a driver (``tests/test_config_keys.py``); keys that only
upstream Dassl/CoOp files read are added by :mod:`dassl.config.coop` (``COMPAT_KEYS``).

Only two values differ from upstream Dassl, both because the official CRoFT code ships them:
``OPTIM.WEIGHT_DECAY = 0.1`` (Dassl: 5e-4; see ``OPTIM.WEIGHT_DECAY`` notes in the README) and the
open-set loader transform (``DATALOADER.OOD_TEST.TRANSFORM = "train"``, the official behaviour).
"""
from __future__ import annotations

from typing import Any

from yacs.config import CfgNode as CN

_C = CN()
_C.VERSION = 1
_C.OUTPUT_DIR = "./output"
_C.RESUME = ""
# -1: no seeding. 0 is a valid seed (upstream Dassl silently ignored it).
_C.SEED = -1
# "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N". CPU runs always use fp32.
_C.DEVICE = "auto"
_C.VERBOSE = True
# Deterministic algorithms (slower on GPU); cudnn.benchmark is off when True.
_C.DETERMINISTIC = False

###########################
# Input
###########################
_C.INPUT = CN()
_C.INPUT.SIZE = (224, 224)
_C.INPUT.INTERPOLATION = "bilinear"
_C.INPUT.TRANSFORMS = ()
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
_C.INPUT.CROP_PADDING = 4
_C.INPUT.RRCROP_SCALE = (0.08, 1.0)

###########################
# Dataset
###########################
_C.DATASET = CN()
_C.DATASET.ROOT = ""
_C.DATASET.NAME = ""
# -1 = use all training images; K >= 1 = K-shot per class.
_C.DATASET.NUM_SHOTS = -1
_C.DATASET.SUBSAMPLE_CLASSES = "all"
# Few-shot sampler for leave-one-domain-out datasets: "official" reproduces the class-agnostic PACS
# "balanced" sampler of the official code; "per_class_domain" draws K/#domains images per class and domain.
_C.DATASET.FEWSHOT_SAMPLER = "official"
# Domain of an image in the leave-one-domain-out datasets: "substring" (official: case-sensitive substring tests,
# upper-case VLCS folders become one domain) or "folder" (named fix: first folder, case-insensitive).
_C.DATASET.DOMAIN_MATCH = "substring"
# Open-set evaluation datasets (<ID>_<OOD>, e.g. PACS_DTD): per-class caps of the official code.
_C.DATASET.ID_PER_CLASS_CAP = 500
# Order of their caps: "official" (open-set sample, then val, then test: the ID samples depend on the open set
# drawn before them) or "id_first" (named deviation: test, val, then the open set; see datasets/openset.py).
_C.DATASET.OPENSET_DRAW_ORDER = "official"
# Setup-I: size of the open-set sample of the 600 held-out ImageNet classes (< 1 = all their val images)
_C.DATASET.SETUP1_OOD_SIZE = 1000
# Setup-I open-set sample of evaluation runs: "shared_cache" (official: seeds 2 and 3 group the held-out images by
# seed 1's labels, as the seedless preprocessed.pkl written by seed 1 makes them) or "per_seed".
_C.DATASET.SETUP1_OOD_SAMPLE = "shared_cache"
# Single prompt template used by single-template trainers ("" = the dataset's default, "a photo of a {}.").
_C.DATASET.PROMPT_TEMPLATE = ""
_C.DATASET.OOD_PER_CLASS_CAP = 100
# Decode the held-out (test) and open-set (ood_test) images at start-up, before training, so a corrupt file stops
# the run at once; images that decoded are remembered per folder tree by path, size and mtime
# ($CROFT_CACHE_DIR or ~/.cache/croft/image_checks), so later runs only stat them. False skips the check.
_C.DATASET.VERIFY_IMAGES = True

###########################
# Dataloader
###########################
_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 0
_C.DATALOADER.TRAIN_X = CN()
_C.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"
_C.DATALOADER.TRAIN_X.BATCH_SIZE = 32
_C.DATALOADER.TEST = CN()
_C.DATALOADER.TEST.BATCH_SIZE = 32
_C.DATALOADER.OOD_TEST = CN()
# Transform applied to open-set (ood_test) images: "train" reproduces the official code (random resized
# crop + flip, bug 1.11/9); "test" is the deterministic fix.
_C.DATALOADER.OOD_TEST.TRANSFORM = "train"

###########################
# Frozen-encoder feature cache (off = official behaviour: fresh augmentation every epoch)
###########################
_C.FEATURE_CACHE = CN()
_C.FEATURE_CACHE.ENABLED = False
_C.FEATURE_CACHE.DIR = ""          # "" = ~/.cache/croft/features
_C.FEATURE_CACHE.TRAIN_VIEWS = 10  # pre-computed augmented views per training image

###########################
# Model
###########################
_C.MODEL = CN()
_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = ""
# Local CLIP weights: OpenAI TorchScript .pt, a plain state dict, or an open_clip checkpoint. Empty: look
# in ~/.cache/clip/<name>.pt (where OpenAI's loader keeps them). Nothing is ever downloaded.
_C.MODEL.BACKBONE.WEIGHTS = ""
# Local (per-region) image features, computed only when a trainer (LoCoOp) or a score (gl_mcm, l_mcm) needs them:
# "value" (LoCoOp / GL-MCM: ViT's last block on its value path; ResNets: the attention pool's value projection)
# or "tokens" (named deviation, ViT only: the final patch tokens through ln_post and proj).
_C.MODEL.BACKBONE.LOCAL_FEATURES = "value"

###########################
# Optimization
###########################
_C.OPTIM = CN()
_C.OPTIM.NAME = "sgd"
_C.OPTIM.LR = 0.0003
# Official CRoFT code: 0.1 (upstream Dassl: 5e-4). Kept as the default for fidelity.
_C.OPTIM.WEIGHT_DECAY = 0.1
_C.OPTIM.MOMENTUM = 0.9
_C.OPTIM.SGD_DAMPNING = 0.0
_C.OPTIM.SGD_NESTEROV = False
_C.OPTIM.ADAM_BETA1 = 0.9
_C.OPTIM.ADAM_BETA2 = 0.999
_C.OPTIM.LR_SCHEDULER = "single_step"
_C.OPTIM.STEPSIZE = (-1,)
_C.OPTIM.GAMMA = 0.1
_C.OPTIM.MAX_EPOCH = 10
_C.OPTIM.WARMUP_EPOCH = -1
_C.OPTIM.WARMUP_TYPE = "linear"
_C.OPTIM.WARMUP_CONS_LR = 1e-5
_C.OPTIM.WARMUP_MIN_LR = 1e-5
_C.OPTIM.WARMUP_RECOUNT = True

###########################
# Train
###########################
_C.TRAIN = CN()
# Every epoch replaces the rolling checkpoint model.pth.tar-<E> (resume; best-val is kept too when
# TEST.FINAL_MODEL = best_val); N > 0 also keeps the file of every N-th epoch.
_C.TRAIN.CHECKPOINT_FREQ = 0
_C.TRAIN.PRINT_FREQ = 10
_C.TRAIN.TENSORBOARD = False

###########################
# Test
###########################
_C.TEST = CN()
_C.TEST.EVALUATOR = "Classification"
_C.TEST.NO_TEST = False
_C.TEST.SPLIT = "test"
# "best_val" (official) or "last_step"
_C.TEST.FINAL_MODEL = "best_val"
# Open-set detection scores computed in evaluation runs.
_C.TEST.OOD_SCORES = ("energy", "mcm", "msp", "knn")
_C.TEST.KNN_K = 50
_C.TEST.MCM_TEMPERATURE = 1.0
# OpenOOD v1.5 scores (dassl/evaluation/openood_scores.py), OpenOOD's defaults: GEN's gamma and top-M (gen.yml);
# the principal dimensions of ViM (vim.yml) and Residual (residual.yml), each < the image feature dimension.
_C.TEST.GEN_GAMMA = 0.1
_C.TEST.GEN_M = 100
_C.TEST.VIM_DIM = 256
_C.TEST.RESIDUAL_DIM = 512
# Which split is the in-distribution side of open-set detection: "test" (Setup-II official: the held-out
# domain) or "val" (Setup-I official). Only correctly classified ID images count (official evaluator).
_C.TEST.OOD_ID_SPLIT = "test"
_C.TEST.OOD_ID_CORRECT_ONLY = True
# The KNN score's ID side: all held-out images (False, the official KNN script) or, True, only the correctly
# classified ones like the other scores (a named deviation).
_C.TEST.KNN_ID_CORRECT_ONLY = False
# Save per-sample scores/features (.npz) and the energy-distribution PNG in evaluation runs.
_C.TEST.SAVE_SCORES = True
# With SAVE_SCORES: also draw energy_hist.png (False saves the matplotlib time of every evaluation run in sweeps).
_C.TEST.SAVE_PLOTS = True

###########################
# Trainer specifics
###########################
_C.TRAINER = CN()
_C.TRAINER.NAME = ""

# Setup-II: which test_on_<domain>.json to use for leave-one-domain-out datasets.
_C.TEST_ENV = ""
# Setup-I evaluation (ImageNetOOD46): which test set is the closed-set split: test_id (ImageNet val of the
# 400 ID classes), imagenet_v2, imagenet_s, imagenet_a or imagenet_r.
_C.TEST_OOD = "test_id"
# Which plan a sweep driver ran ("official" | "grid"; "" = a run started by hand); recorded in record.json.
_C.PROTOCOL = CN()
_C.PROTOCOL.PRESET = ""


def get_cfg_default() -> CN:
    """Return a fresh copy of the default config."""
    return _C.clone()


def clean_cfg(cfg: CN, node: str) -> None:
    """Drop the TRAINER.<X> sub-nodes other than ``node`` (the running trainer's), so ``config.yaml`` holds only it."""
    keys = list(cfg.TRAINER.keys())
    for key in keys:
        if key == "NAME" or key.upper() == node.upper():
            continue
        if isinstance(cfg.TRAINER[key], CN):
            cfg.TRAINER.pop(key, None)


def cfg_to_dict(cfg: CN) -> dict[str, Any]:
    """Convert a (possibly nested) CfgNode into plain python containers for JSON records."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, CN):
            out[k] = cfg_to_dict(v)
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out
