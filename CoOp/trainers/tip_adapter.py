"""``TIP_ADAPTER`` trainer: Tip-Adapter-F (Zhang et al., ECCV 2022) as used as a baseline by the official CRoFT code.

Model (``x`` = L2-normalised frozen CLIP image feature, ``W`` = 7-template ensemble class text features,
``K`` = learnable cache keys, ``V`` = one-hot cache values, ``s`` = 100 as officially, or CLIP's logit scale with
``CLIP_LOGIT_SCALE True``)::

    logits = s * x W^T + ALPHA * exp(-(BETA - BETA * x K^T)) V

Cache (``CACHE_MODE``):

* ``official`` (default, as the official ``TIP_ADAPTER.py``): ``AUGMENT_EPOCH`` passes of the *training* loader
  (shuffled, training augmentation, last incomplete batch dropped: e.g. 96 of ~105 PACS images with batch 32);
  key i is the mean of the i-th feature of every pass (so with ``AUGMENT_EPOCH > 1`` it mixes different images),
  L2-normalised; the values are the one-hot labels of the first pass. The keys and labels are stored in ONE file
  per shots/seed, ``<CACHE_DIR>/keys_<K>shotsseed<S>.pt``, reused whenever it exists, whatever the dataset: runs
  that share ``CACHE_DIR`` share (and, across datasets, corrupt) the cache, as officially with ``cache/``. A
  stored cache whose labels or feature size do not fit the current run is a one-line error naming the file.
  The passes draw from the run's RNG stream like any training epoch.
* ``fixed`` (named fix): keys are the CLIP features of the whole few-shot training set (``train_x``) averaged
  over ``AUGMENT_EPOCH`` passes with the training augmentation through an **unshuffled** loader, then
  L2-normalised (the original Tip-Adapter's ``build_cache_model``); values are the one-hot labels; the file is
  per dataset/env/backbone/shots/seed with a content hash (below). ``K`` is a ``Linear(D -> N_cache, no bias)``
initialised with the keys; it is the only trained module (checkpoint model name ``adapter``). Its checkpoint also
holds the cache values (buffer ``cache_values``), so a saved model is self-contained: evaluation (``--eval-only
--model-dir``) never reads the training images, even when the evaluation dataset's ``train_x`` differs (e.g.
``PACS_DTD`` with ``NUM_SHOTS -1``). Inference returns ``InferenceOutput(logits, normalised image features)``.

Cache file of ``CACHE_MODE fixed`` (``TRAINER.TIP_ADAPTER.CACHE_DIR``, default ``<OUTPUT_DIR>/tip_cache`` in both
modes)::

    keys_<dataset>[-<test env>]_<backbone>_<K>shots_seed<S>_<hash8>.pt

``hash8`` = the first 8 hex digits of the SHA-256 of everything the keys depend on: the ordered train list
(image paths relative to ``DATASET.ROOT`` and labels), ``AUGMENT_EPOCH``, backbone name and weights, the
encoder precision, the feature source (the encoder, or a ``feature_provider``'s ``cache_tag``/name), the input
pipeline and the augmentation seed. The file is written atomically and reused
when its stored description matches (otherwise it is rebuilt and replaced). The cache is prepared when first
needed (start of training, or the first forward when no checkpoint was loaded), not at build time.

Randomness (``fixed``): the augmented passes draw from torch's global RNG, re-seeded with the run seed (``SEED``; 0 when
``SEED < 0``) and restored afterwards (python, numpy, torch and CUDA states). Building the cache therefore
leaves the training RNG stream untouched, so a run that builds the cache and a rerun that reuses it train
identically, and the keys are deterministic for a given seed.

Differences from the official ``TIP_ADAPTER.py`` (see spec section 3):

* ``CACHE_MODE fixed`` (not the default): unshuffled cache loader and per-run cache files, see above;
* ``AUGMENT_EPOCH`` is declared, default 10 (official: undeclared key, crash unless the cache exists) [bug fixed];
* ``CLIP_LOGIT_SCALE True`` (named fix, off by default): the zero-shot logits use CLIP's logit scale ``s``
  instead of the official constant 100 (the same for OpenAI weights up to their fp16 rounding);
* one-hot values use the dataset's class count (official ``F.one_hot`` infers it from the labels present);
* ``PREC`` (official default fp16) casts the image encoder only; the image features are upcast to fp32 and the text
  classifier, cache keys/values, logits and scores are fp32 (official: fp16 CLIP, cache and logits throughout);
  CPU always runs fp32. A model cast to float64 (the golden parity tests) computes in float64.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from dassl.data.data_manager import build_data_loader
from dassl.config.validate import PREC, count, nonneg
from dassl.engine import TRAINER_REGISTRY
from dassl.optim import build_lr_scheduler, build_optimizer
from dassl.utils.errors import ConfigError, UserError
from dassl.utils.tools import atomic_write_bytes
from dassl.utils.safe_load import UnsafeFileError, load_torch_file
from dassl.utils.torchtools import load_checkpoint

from .clip_common import FeatureHeadTrainer, setup_frozen_clip, single_template, text_features
from .prompting import upcast

CACHE_FORMAT = 1
CACHE_MODES = ("official", "fixed")
OFFICIAL_ZS_SCALE = 100.0  # the official zero-shot logits: 100. * image_features @ clip_weights


class TipCache(nn.Module):
    """Learnable cache keys (``weight``, N x D, as ``nn.Linear(D, N, bias=False)``) + one-hot values (N x C)."""

    def __init__(self, dim: int, n_cache: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_cache, dim))
        self.register_buffer("cache_values", torch.zeros(n_cache, num_classes))

    @property
    def n_cache(self) -> int:
        return int(self.weight.shape[0])

    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Initialise the keys with ``keys`` (N x D) and the values with one-hot ``labels`` (N)."""
        with torch.no_grad():
            self.weight.copy_(keys.to(self.weight))
            self.cache_values.copy_(F.one_hot(labels.long(), self.cache_values.shape[1]).to(self.cache_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities ``x K^T`` (N x N_cache) of normalised features ``x`` (the official ``adapter(x)``)."""
        return x @ self.weight.t()

    def cache_logits(self, affinity: torch.Tensor, beta: float) -> torch.Tensor:
        """Cache logits ``exp(-(beta - beta * A)) V`` (N x C), as the official expression."""
        return torch.exp(-(beta - beta * affinity)) @ self.cache_values


def tip_logits(cache: TipCache, x: torch.Tensor, clip_weights: torch.Tensor, alpha: float, beta: float,
               zs_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tip-Adapter(-F) ``(logits, zero-shot logits, cache logits)`` for L2-normalised image features ``x``:
    ``logits = zs_scale * x W^T + alpha * exp(-(beta - beta * x K^T)) V``."""
    clip = zs_scale * x @ clip_weights.t()
    cache_part = cache.cache_logits(cache(x), beta)
    return clip + alpha * cache_part, clip, cache_part


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch(/CUDA) RNGs seeded by ``seed``; restore the previous states after."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "none"


@TRAINER_REGISTRY.register()
class TIP_ADAPTER(FeatureHeadTrainer):
    """Tip-Adapter-F: a learnable few-shot feature cache added to the zero-shot CLIP classifier."""

    cfg_node = "TIP_ADAPTER"  # the TRAINER.<node> this trainer reads
    dataset_signature = staticmethod(single_template)  # derived from DATASET.NAME (one evaluation pass must agree)

    CFG_RANGES = {"TRAINER.TIP_ADAPTER.ALPHA": nonneg(), "TRAINER.TIP_ADAPTER.BETA": nonneg(),
                  "TRAINER.TIP_ADAPTER.AUGMENT_EPOCH": count(1), "TRAINER.TIP_ADAPTER.PREC": PREC}

    @staticmethod
    def extend_cfg(cfg: Any) -> None:
        c = cfg.TRAINER.TIP_ADAPTER = CN()
        c.ALPHA = 1.0          # cache residual weight (Setup-I scripts: 1.17; Setup-II: 1)
        c.BETA = 1.0           # affinity sharpness (Setup-I scripts: 1.0; Setup-II: 10)
        c.AUGMENT_EPOCH = 10   # augmented passes averaged into the cache keys
        c.PREC = "fp16"        # precision of the frozen image encoder (official fp16; CPU: fp32); the cache is fp32
        c.CACHE_DIR = ""       # where cache files live ("" = <OUTPUT_DIR>/tip_cache)
        c.CACHE_MODE = "official"  # official (shuffled, drop-last, one shared file per shots/seed) | fixed
        c.CLIP_LOGIT_SCALE = False  # named fix: zero-shot logits x CLIP's logit scale (official: the constant 100)

    def check_cfg(self, cfg: Any) -> None:
        c = cfg.TRAINER.TIP_ADAPTER
        if c.CACHE_MODE not in CACHE_MODES:
            raise ConfigError(f"TRAINER.TIP_ADAPTER.CACHE_MODE must be one of {CACHE_MODES}, got {c.CACHE_MODE!r}")

    # ----------------------------------------------------------------- model
    def build_model(self) -> None:
        cfg = self.cfg
        c = cfg.TRAINER.TIP_ADAPTER
        self.clip_bundle, self.prec = setup_frozen_clip(self, c.PREC)
        print("Text features: 7-template ensemble")
        self.dim = int(self.clip_weights.shape[1])
        self.alpha, self.beta = float(c.ALPHA), float(c.BETA)
        train_x = list(self.dm.dataset.train_x or [])
        print(f"Tip-Adapter-F: alpha {self.alpha}, beta {self.beta}, cache size {len(train_x)}, "
              f"augment epochs {int(c.AUGMENT_EPOCH)}")
        self._cache_ready = False
        self._register_cache(len(train_x))
        if train_x:
            labels = torch.tensor([d.label for d in train_x], dtype=torch.long)
            self.adapter.set_cache(torch.zeros(len(train_x), self.dim), labels)

    @property
    def clip_weights(self) -> torch.Tensor:
        """The zero-shot classifier ``[C, D]``: 7-template ensemble text features of the frozen CLIP."""
        return self.frozen_text(lambda: text_features(self.clip_bundle, self.dm.dataset.classnames, "ensemble7",
                                                      single_template(self.cfg), self.device))

    @property
    def zs_scale(self) -> float:
        """Scale of the zero-shot logits: 100 (official) or CLIP's logit scale (``CLIP_LOGIT_SCALE``)."""
        return float(self.logit_scale) if self.cfg.TRAINER.TIP_ADAPTER.CLIP_LOGIT_SCALE else OFFICIAL_ZS_SCALE

    def _register_cache(self, n_cache: int) -> None:
        """(Re)create the cache module with ``n_cache`` entries (in the text classifier's dtype), its optimiser
        and scheduler (name ``adapter``)."""
        self.adapter = TipCache(self.dim, n_cache, self.num_classes).to(self.device, self.clip_weights.dtype)
        self.optim = build_optimizer(self.adapter, self.cfg.OPTIM) if n_cache > 0 else None
        self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM) if self.optim is not None else None
        if "adapter" in self._models:
            self._models["adapter"], self._optims["adapter"], self._scheds["adapter"] = \
                self.adapter, self.optim, self.sched
        else:
            self.register_model("adapter", self.adapter, self.optim, self.sched)

    # ----------------------------------------------------------------- cache
    def cache_seed(self) -> int:
        return int(self.cfg.SEED) if int(self.cfg.SEED) >= 0 else 0

    def cache_dir(self) -> str:
        return self.cfg.TRAINER.TIP_ADAPTER.CACHE_DIR or os.path.join(self.output_dir, "tip_cache")

    def cache_description(self) -> dict[str, Any]:
        """Everything the cache keys depend on (hashed into the file name, stored in the file, checked on reuse)."""
        cfg = self.cfg
        root = os.path.abspath(cfg.DATASET.ROOT) if cfg.DATASET.ROOT else ""

        def rel(path: str) -> str:
            ap = os.path.abspath(path)
            return os.path.relpath(ap, root) if root and ap.startswith(root + os.sep) else path

        inp = cfg.INPUT
        fp = self.feature_provider
        source = "encoder" if fp is None else getattr(fp, "cache_tag", getattr(fp, "__qualname__",
                                                                               type(fp).__qualname__))
        return {
            "format": CACHE_FORMAT,
            "dataset": cfg.DATASET.NAME,
            "test_env": cfg.TEST_ENV,
            "num_shots": int(cfg.DATASET.NUM_SHOTS),
            "seed": int(cfg.SEED),
            "augment_seed": self.cache_seed(),
            "augment_epoch": int(cfg.TRAINER.TIP_ADAPTER.AUGMENT_EPOCH),
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "weights": cfg.MODEL.BACKBONE.WEIGHTS,
            "precision": self.prec,
            "feature_source": source,
            "input": {"size": list(inp.SIZE), "interpolation": inp.INTERPOLATION, "transforms": list(inp.TRANSFORMS),
                      "mean": list(inp.PIXEL_MEAN),
                      "std": list(inp.PIXEL_STD), "crop_padding": inp.CROP_PADDING,
                      "rrcrop_scale": list(inp.RRCROP_SCALE)},
            "train": [[rel(d.impath), int(d.label)] for d in self.dm.dataset.train_x],
        }

    def cache_path(self, desc: Optional[dict[str, Any]] = None) -> str:
        desc = desc if desc is not None else self.cache_description()
        digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode("utf-8")).hexdigest()[:8]
        env = re.sub(r"^test_on_", "", re.sub(r"\.json$", "", str(desc["test_env"])))
        dataset = _token(desc["dataset"]) + (f"-{_token(env)}" if env else "")
        shots = f"{desc['num_shots']}shots" if desc["num_shots"] >= 1 else "allshots"
        name = f"keys_{dataset}_{_token(desc['backbone'])}_{shots}_seed{desc['seed']}_{digest}.pt"
        return os.path.join(self.cache_dir(), name)

    @torch.no_grad()
    def compute_cache_keys(self) -> torch.Tensor:
        """Mean of ``AUGMENT_EPOCH`` augmented-pass features of ``train_x`` (unshuffled), L2-normalised (N x D)."""
        cfg = self.cfg
        loader = build_data_loader(self.dm.dataset.train_x, cfg.DATALOADER.TEST.BATCH_SIZE, self.dm.tfm_train,
                                   is_train=False, num_workers=cfg.DATALOADER.NUM_WORKERS)
        total: Optional[torch.Tensor] = None
        n_aug = int(cfg.TRAINER.TIP_ADAPTER.AUGMENT_EPOCH)
        with isolated_rng(self.cache_seed()):
            for aug in range(n_aug):
                print(f"Tip-Adapter cache: augment epoch {aug + 1}/{n_aug}")
                feats = torch.cat([upcast(self.encode_images(b["img"].to(self.device), b)) for b in loader])
                total = feats if total is None else total + feats
        keys = total / n_aug
        return (keys / keys.norm(dim=-1, keepdim=True)).cpu()

    def _read_cache(self, path: str, desc: dict[str, Any]) -> Optional[torch.Tensor]:
        try:
            obj = load_torch_file(path, "Tip-Adapter cache")  # weights only: a code-carrying file is refused
        except UnsafeFileError:
            raise
        except UserError as err:
            print(f"WARNING: unreadable Tip-Adapter cache {path} ({err}); rebuilding")
            return None
        if not isinstance(obj, dict) or obj.get("meta") != desc:
            print(f"WARNING: Tip-Adapter cache {path} does not match this run; rebuilding")
            return None
        keys = obj.get("keys")
        if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (len(desc["train"]), self.dim):
            print(f"WARNING: Tip-Adapter cache {path} has wrong key shape; rebuilding")
            return None
        return keys

    @torch.no_grad()
    def compute_official_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Official keys/labels: ``AUGMENT_EPOCH`` passes of the shuffled, drop-last training loader."""
        n_aug = int(self.cfg.TRAINER.TIP_ADAPTER.AUGMENT_EPOCH)
        total: Optional[torch.Tensor] = None
        labels: Optional[torch.Tensor] = None
        for aug in range(n_aug):
            print(f"Tip-Adapter cache (official): augment epoch {aug + 1}/{n_aug}")
            feats, labs = [], []
            for b in self.train_loader_x:
                feats.append(upcast(self.encode_images(b["img"].to(self.device), b)))
                labs.append(b["label"])
            epoch = torch.cat(feats)
            total = epoch if total is None else total + epoch
            labels = torch.cat(labs) if labels is None else labels
        keys = total / n_aug
        return (keys / keys.norm(dim=-1, keepdim=True)).cpu(), labels.long().cpu()

    def official_cache_path(self) -> str:
        return os.path.join(self.cache_dir(), f"keys_{int(self.cfg.DATASET.NUM_SHOTS)}shotsseed{int(self.cfg.SEED)}.pt")

    def load_or_build_official_cache(self) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
        path = self.official_cache_path()
        if os.path.isfile(path):
            obj = load_torch_file(path, "Tip-Adapter cache")  # weights only: a code-carrying file is refused
            keys, labels = obj["keys"], obj["labels"]
            if keys.shape[1] != self.dim or int(labels.max()) >= self.num_classes:
                raise UserError(f"shared Tip-Adapter cache {path} ({keys.shape[0]} keys of size {keys.shape[1]}, "
                                f"labels up to {int(labels.max())}) does not fit this run ({self.num_classes} "
                                f"classes, features of size {self.dim}); use another CACHE_DIR or CACHE_MODE fixed")
            print(f"Loaded the shared Tip-Adapter cache from {path} (official: whatever run wrote it)")
            return keys, labels, path, True
        keys, labels = self.compute_official_cache()
        buf = io.BytesIO()
        torch.save({"keys": keys, "labels": labels, "meta": {"mode": "official", "dataset": self.cfg.DATASET.NAME}},
                   buf)
        atomic_write_bytes(path, buf.getvalue())
        print(f"Built the shared Tip-Adapter cache ({len(labels)} x {self.dim}) -> {path}")
        return keys, labels, path, False

    def load_or_build_cache(self) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
        """Return ``(keys, labels, path, reused)``; builds and writes the cache file when absent or stale."""
        if self.cfg.TRAINER.TIP_ADAPTER.CACHE_MODE == "official":
            return self.load_or_build_official_cache()
        desc = self.cache_description()
        path = self.cache_path(desc)
        labels = torch.tensor([lab for _, lab in desc["train"]], dtype=torch.long)
        keys = self._read_cache(path, desc) if os.path.isfile(path) else None
        if keys is not None:
            print(f"Loaded Tip-Adapter cache from {path}")
            return keys, labels, path, True
        t0 = time.time()
        keys = self.compute_cache_keys()
        buf = io.BytesIO()
        torch.save({"keys": keys, "labels": labels, "meta": desc}, buf)
        atomic_write_bytes(path, buf.getvalue())
        print(f"Built Tip-Adapter cache ({len(labels)} x {self.dim}) in {time.time() - t0:.1f}s -> {path}")
        return keys, labels, path, False

    def prepare_cache(self) -> None:
        """Initialise the cache keys/values from the few-shot training set (once; no-op after a model load)."""
        if self._cache_ready:
            return
        if not self.dm.dataset.train_x:
            raise UserError(f"Tip-Adapter needs training images ({self.cfg.DATASET.NAME} has no train_x) to build "
                            f"its cache, or a trained model (--model-dir)")
        keys, labels, _, _ = self.load_or_build_cache()
        if self.adapter.n_cache != len(labels):
            self._register_cache(len(labels))
        self.adapter.set_cache(keys, labels)
        self._cache_ready = True

    # ----------------------------------------------------------------- checkpoints
    def load_model(self, directory: str, epoch: Optional[int] = None) -> None:
        """Load the trained cache; its size comes from the checkpoint (it may differ from this ``train_x``)."""
        if directory:
            fname = f"model.pth.tar-{epoch}" if epoch is not None else "model-best.pth.tar"
            path = os.path.join(directory, "adapter", fname)
            if os.path.isfile(path):
                sd = load_checkpoint(path)["state_dict"]
                weight = sd.get("weight")
                if weight is not None and weight.shape[0] != self.adapter.n_cache:
                    if "cache_values" not in sd:
                        raise UserError(f"{path}: cache of {weight.shape[0]} entries without stored values does "
                                        f"not match this dataset's {self.adapter.n_cache} training images")
                    self._register_cache(int(weight.shape[0]))
        super().load_model(directory, epoch)
        if directory:
            self._cache_ready = True

    # ----------------------------------------------------------------- train / infer
    def before_train(self) -> None:
        self.prepare_cache()
        super().before_train()

    def logit_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, zero-shot logits, cache logits)`` of L2-normalised features ``x`` at ``self.alpha``/``beta``."""
        return tip_logits(self.adapter, x, self.clip_weights, self.alpha, self.beta, self.zs_scale)

    def forward_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = upcast(feats)
        x = x / x.norm(dim=-1, keepdim=True)
        return self.logit_parts(x)[0], x

    def before_step(self) -> None:
        self.prepare_cache()
