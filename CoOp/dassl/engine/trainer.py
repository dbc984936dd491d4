"""Trainer base classes with Dassl's hook structure.

``TrainerBase`` keeps named (model, optimiser, scheduler) triples (``register_model``) so that saving, loading,
resuming, LR updates and backward/step are generic. ``SimpleTrainer`` adds the config-driven pieces (device,
data, evaluator, best-val selection, the final test). ``TrainerX`` runs epochs over labelled data.

Every trainer in this project keeps CLIP's image encoder frozen, so image features come from one engine call,
:meth:`SimpleTrainer.encode_images`; a feature cache plugs in there (``self.feature_provider``) without
touching trainers.
"""
from __future__ import annotations

import datetime
import os
import re
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..data import DataManager
from ..evaluation import build_evaluator
from ..utils.errors import ConfigError, UserError
from ..utils.safe_load import UnsafeFileError
from .inference import InferenceOutput, as_inference_output, local_reduction
from ..utils.meters import AverageMeter, MetricMeter
from ..utils.tools import progress_enabled, mkdir_if_missing, resolve_device
from ..utils.torchtools import (load_checkpoint, prune_checkpoints, rng_from_tensors, rng_to_tensors, save_checkpoint,
                                set_latest_checkpoint, sync_checkpoint)
from . import guards
from .ragged import cat_padded

PRECISIONS = ("fp32", "fp16", "amp", "bf16")


def checkpoint_candidates(directory: str, names: list[str]) -> list[str]:
    """Checkpoint file names to try, newest first: the one ``checkpoint`` names, then every
    ``model.pth.tar-<E>`` present for all models, then ``model-best.pth.tar`` (it holds the full training state
    of its epoch, as the rolling checkpoint of that epoch did)."""
    with open(os.path.join(directory, names[0], "checkpoint"), encoding="utf-8") as f:
        first = f.readline().strip()
    common: Optional[set[int]] = None
    for name in names:
        found = {int(m.group(1)) for f in os.listdir(os.path.join(directory, name))
                 if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", f))}
        common = found if common is None else common & found
    older = [f"model.pth.tar-{e}" for e in sorted(common or (), reverse=True)]
    best = ["model-best.pth.tar"] if all(os.path.isfile(os.path.join(directory, n, "model-best.pth.tar"))
                                         for n in names) else []
    return [first] + [f for f in older + best if f != first]


class TrainerBase:
    """Registry of named models with generic save / load / resume / update."""

    def __init__(self) -> None:
        self._models: "OrderedDict[str, nn.Module]" = OrderedDict()
        self._optims: "OrderedDict[str, Any]" = OrderedDict()
        self._scheds: "OrderedDict[str, Any]" = OrderedDict()
        self._writer = None
        self.epoch = 0
        self.start_epoch = 0
        self.max_epoch = 0
        self.best_result = -np.inf
        self.best_epoch: Optional[int] = None
        self.val_history: list[dict[str, float]] = []  # one {"epoch", "accuracy"} per validated epoch
        self.run_fingerprint: Optional[str] = None  # set by train.py; checkpoints of another run are refused
        self.segments: list[dict[str, Any]] = []  # one per process that trained this run (resumed runs: several)
        self.defer_checkpoint_prune = False  # stacked members prune once every member has saved the epoch
        self._segment_t0: Optional[float] = None  # start of this process's segment (set by open_segment)

    # ----------------------------------------------------------------- registration
    def register_model(self, name: str = "model", model: Optional[nn.Module] = None, optim: Any = None,
                       sched: Any = None) -> None:
        if "_models" not in self.__dict__:
            raise AttributeError("call super().__init__() before register_model()")
        if name in self._models:
            raise KeyError(f"model {name!r} is already registered")
        self._models[name] = model
        self._optims[name] = optim
        self._scheds[name] = sched

    def get_model_names(self, names: Any = None) -> list[str]:
        if names is None:
            return list(self._models.keys())
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self._models:
                raise KeyError(f"unknown model name {n!r} (registered: {list(self._models)})")
        return names

    # ----------------------------------------------------------------- checkpoints
    def save_model(self, epoch: int, directory: str, is_best: bool = False, val_result: Any = None,
                   model_name: str = "") -> None:
        """Save every registered model (state, optimiser, scheduler, RNG states as tensors, the run's fingerprint
        and training segments) atomically. A regular save is the rolling checkpoint: older ``model.pth.tar-<E>``
        files are removed afterwards unless ``TRAIN.CHECKPOINT_FREQ`` keeps them."""
        self._close_segment(epoch + 1)
        rng = rng_to_tensors()
        for name in self.get_model_names():
            optim = self._optims[name]
            sched = self._scheds[name]
            save_checkpoint({
                "state_dict": self._models[name].state_dict(),
                "epoch": epoch + 1,
                "optimizer": optim.state_dict() if optim is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "val_result": None if val_result is None else float(val_result),
                "best_result": float(self.best_result),
                "best_epoch": self.best_epoch,
                "val_history": list(self.val_history),
                "rng_state": rng,
                "fingerprint": self.run_fingerprint,
                "segments": [dict(s) for s in self.segments],
            }, os.path.join(directory, name), is_best=is_best, model_name=model_name)
        if not is_best and not model_name and not self.defer_checkpoint_prune:
            self.prune_checkpoints(directory)

    def sync_checkpoints(self, directory: str) -> None:
        """``fsync`` each model's rolling checkpoint (written every epoch without it: atomic, kill-safe), so that a
        finished run's checkpoints survive a power loss."""
        for name in self.get_model_names():
            sync_checkpoint(os.path.join(directory, name))

    def prune_checkpoints(self, directory: str) -> None:
        """Keep the newest ``model.pth.tar-<E>`` of each model (and those ``TRAIN.CHECKPOINT_FREQ`` asks for)."""
        freq = int(getattr(getattr(getattr(self, "cfg", None), "TRAIN", None), "CHECKPOINT_FREQ", 0) or 0)
        for name in self.get_model_names():
            prune_checkpoints(os.path.join(directory, name), freq)

    def _close_segment(self, epochs_done: Optional[int]) -> None:
        """Bring the current training segment up to now (and to ``epochs_done`` completed epochs)."""
        if not self.segments or self._segment_t0 is None:
            return
        seg = self.segments[-1]
        seg["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        seg["seconds"] = round(time.time() - self._segment_t0, 3)
        if epochs_done is not None:
            seg["to_epoch"] = int(epochs_done)
            seg["epochs"] = seg["to_epoch"] - seg["from_epoch"]

    def open_segment(self, start_epoch: int) -> None:
        """Start this process's training segment (after a resume: appended to the checkpoint's segments)."""
        if self._segment_t0 is not None and self.segments:  # started again in this process: one segment
            self.segments.pop()
        self._segment_t0 = time.time()
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.segments.append({"started": now, "ended": now, "from_epoch": int(start_epoch),
                              "to_epoch": int(start_epoch), "epochs": 0, "seconds": 0.0})

    def resume_model_if_exist(self, directory: str) -> int:
        """Resume all models from ``<directory>/<name>/checkpoint``; return the epoch to start from.

        An unreadable (e.g. truncated) checkpoint is skipped with a warning naming it, and the newest epoch whose
        checkpoints all load is used instead; with none left, training starts from epoch 0. A checkpoint that
        would run code when unpickled is refused (one line): nobody's run writes one, so it was planted.
        """
        names = self.get_model_names()
        if not names or not all(os.path.isfile(os.path.join(directory, n, "checkpoint")) for n in names):
            return 0
        print("Found checkpoint at {} (will resume training)".format(directory))
        for i, fname in enumerate(checkpoint_candidates(directory, names)):
            try:
                ckpts = {n: load_checkpoint(os.path.join(directory, n, fname)) for n in names}
            except UnsafeFileError:
                raise
            except UserError as err:
                print(f"WARNING: skipping an unreadable checkpoint: {err}")
                continue
            self.check_fingerprint(directory, fname, ckpts)
            start = self.restore_checkpoints(directory, fname, ckpts)
            if os.path.abspath(directory) == os.path.abspath(getattr(self, "output_dir", "") or "."):
                if i > 0:
                    self.save_model(start - 1, directory)  # the state resumed from becomes the rolling checkpoint
                else:  # killed between two models' saves: every pointer names the files resumed from
                    for n in names:
                        set_latest_checkpoint(os.path.join(directory, n), fname)
                    if not self.defer_checkpoint_prune:  # and older files a kill left behind go
                        self.prune_checkpoints(directory)
            return start
        print(f"WARNING: no readable checkpoint in {directory}; training starts from epoch 0")
        return 0

    def check_fingerprint(self, directory: str, fname: str, ckpts: dict[str, dict[str, Any]]) -> None:
        """Refuse (one line) checkpoints written by a run with another fingerprint than this run's."""
        theirs = {c.get("fingerprint") for c in ckpts.values()} - {None}
        if self.run_fingerprint and theirs and theirs != {self.run_fingerprint}:
            raise ConfigError(f"{os.path.join(directory, '<model>', fname)} belongs to another run (fingerprint "
                              f"{', '.join(sorted(theirs))}; this run: {self.run_fingerprint}): resume only from a "
                              f"run's own checkpoints (train.py --rerun-changed replaces that run)")

    def restore_checkpoints(self, directory: str, fname: str, ckpts: dict[str, dict[str, Any]]) -> int:
        """Load states, optimisers, schedulers, best-val bookkeeping and RNG states; return the next epoch."""
        start_epoch, rng = 0, None
        current = self.segments[-1] if self.segments and self._segment_t0 is not None else None  # a rewind
        for name, ckpt in ckpts.items():
            self._models[name].load_state_dict(ckpt["state_dict"])
            if self._optims[name] is not None and ckpt.get("optimizer") is not None:
                self._optims[name].load_state_dict(ckpt["optimizer"])
            if self._scheds[name] is not None and ckpt.get("scheduler") is not None:
                self._scheds[name].load_state_dict(ckpt["scheduler"])
            start_epoch = int(ckpt["epoch"])
            if ckpt.get("best_result") is not None:
                self.best_result = ckpt["best_result"]
            self.best_epoch = ckpt.get("best_epoch", self.best_epoch)
            self.val_history = list(ckpt.get("val_history", self.val_history))
            self.segments = [dict(seg) for seg in ckpt.get("segments") or []]
            rng = ckpt.get("rng_state")
            print(f'Loaded "{os.path.join(directory, name, fname)}" (epoch = {start_epoch})')
        if rng:
            rng_from_tensors(rng)
        if current is not None:  # this process's segment goes on from the epoch restored
            current.update(from_epoch=start_epoch, to_epoch=start_epoch, epochs=0)
            self.segments.append(current)
        return start_epoch

    def load_model(self, directory: str, epoch: Optional[int] = None) -> None:
        """Load weights for evaluation: ``model-best.pth.tar`` or ``model.pth.tar-<epoch>`` of each model."""
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given")
            return
        fname = f"model.pth.tar-{epoch}" if epoch is not None else "model-best.pth.tar"
        for name in self.get_model_names():
            path = os.path.join(directory, name, fname)
            if not os.path.isfile(path):
                raise UserError(f"model file not found: {path} (check --model-dir / --load-epoch)")
            ckpt = load_checkpoint(path)
            sd = {k: v for k, v in ckpt["state_dict"].items() if k not in self.load_model_drop_keys()}
            print(f'Loading weights to {name} from "{path}" (epoch = {ckpt["epoch"]})')
            self._models[name].load_state_dict(sd, strict=False)

    def load_model_drop_keys(self) -> set[str]:
        """State-dict keys :meth:`load_model` ignores (none here; prompt trainers drop their token buffers)."""
        return set()

    # ----------------------------------------------------------------- modes and updates
    def set_model_mode(self, mode: str = "train", names: Any = None) -> None:
        for name in self.get_model_names(names):
            self._models[name].train(mode == "train")

    def update_lr(self, names: Any = None) -> None:
        for name in self.get_model_names(names):
            if self._scheds[name] is not None:
                self._scheds[name].step()

    def get_current_lr(self, names: Any = None) -> float:
        name = self.get_model_names(names)[0]
        return self._optims[name].param_groups[0]["lr"]

    def detect_anomaly(self, loss: torch.Tensor) -> None:
        guards.check_loss(self, loss)

    def model_zero_grad(self, names: Any = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].zero_grad()

    def model_backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        self.detect_anomaly(loss)
        loss.backward(retain_graph=retain_graph)

    def model_update(self, names: Any = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].step()

    def model_backward_and_update(self, loss: torch.Tensor, names: Any = None, retain_graph: bool = False) -> None:
        """Zero-grad, backward and step the named models (all registered models by default)."""
        self.model_zero_grad(names)
        self.model_backward(loss, retain_graph=retain_graph)
        self.model_update(names)

    # ----------------------------------------------------------------- tensorboard
    def init_writer(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("TRAIN.TENSORBOARD True needs the 'tensorboard' package (pip install tensorboard)")
        self._writer = SummaryWriter(log_dir=log_dir)

    def close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    # ----------------------------------------------------------------- loop
    def train(self, start_epoch: int = 0, max_epoch: int = 0) -> None:
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        self.before_train()
        for self.epoch in range(self.start_epoch, self.max_epoch):
            self.before_epoch()
            self.run_epoch()
            self.after_epoch()
        self.after_train()

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def run_epoch(self) -> None:
        raise NotImplementedError

    def test(self, split: Optional[str] = None) -> Any:
        raise NotImplementedError

    def parse_batch_train(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def parse_batch_test(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def model_inference(self, input: torch.Tensor) -> Any:
        raise NotImplementedError


class SimpleTrainer(TrainerBase):
    """Config-driven trainer: device, data, evaluator, best-val selection and the final test.

    Local image features: a trainer whose ``model_inference`` can return ``local_logits`` declares
    ``LOCAL_FEATURES = True`` and, when ``self.wants_local`` is set, builds ``self.local_image_encoder``
    (``images -> (global, local)``); ``TRAIN_LOCAL = True`` means its training needs them (LoCoOp). Its
    ``model_inference`` returns them only while ``self.infer_local`` is set (:meth:`collect_outputs` on a
    detection split with a local score), so accuracy passes never compute them.
    """

    LOCAL_FEATURES = False
    TRAIN_LOCAL = False

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.check_cfg(cfg)
        self.local_scores = self.check_local_scores(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.DEVICE)
        self.start_epoch = self.epoch = 0
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.output_dir = cfg.OUTPUT_DIR
        self.feature_provider: Optional[Callable[[torch.Tensor, Optional[dict]], torch.Tensor]] = None
        self.feature_cache: Any = None  # the installed FeatureCache (FEATURE_CACHE.ENABLED)
        self.image_encoder: Optional[nn.Module] = None
        self.local_image_encoder: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None
        self.wants_local = False  # set before build_model: this run computes local image features
        self.infer_local = False  # this inference pass returns local logits (set by collect_outputs)
        self.encoder_images = 0  # images passed through the image encoder by this run (cache fills included)
        self.metrics: dict[str, dict[str, Any]] = {}
        if cfg.TRAIN.TENSORBOARD:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("TRAIN.TENSORBOARD True needs the 'tensorboard' package "
                                  "(pip install tensorboard)") from None
        self.build_data_loader()
        self.wants_local = self.TRAIN_LOCAL or bool(self.local_scores and self.ood_test_loader is not None)
        self.build_model()
        if self.wants_local and self.local_image_encoder is None:
            raise RuntimeError(f"{type(self).__name__} set no local_image_encoder in build_model()")
        if cfg.FEATURE_CACHE.ENABLED:
            if self.image_encoder is None:
                raise ConfigError(f"FEATURE_CACHE needs a frozen image encoder; {type(self).__name__} sets none")
            from .feature_cache import FeatureCache

            FeatureCache(self).install()
        self.evaluator = build_evaluator(cfg, lab2cname=self.lab2cname)
        self.best_result = -np.inf

    def check_cfg(self, cfg: Any) -> None:
        """Trainer-specific config checks (override); raise :class:`ConfigError` on bad values."""

    def check_local_scores(self, cfg: Any) -> list[str]:
        """The scores of ``TEST.OOD_SCORES`` that read local logits; refused (:class:`ConfigError`) for a trainer
        whose model yields no local features."""
        from ..evaluation.scores import score_names, score_needs
        from .build import TRAINER_REGISTRY

        local = [n for n in cfg.TEST.OOD_SCORES if n in score_names() and "local_logits" in score_needs(n)]
        if local and not self.LOCAL_FEATURES:
            able = [n for n in TRAINER_REGISTRY.registered_names()
                    if getattr(TRAINER_REGISTRY.get(n), "LOCAL_FEATURES", False)]
            raise ConfigError(f"TEST.OOD_SCORES: {', '.join(local)} {'needs' if len(local) == 1 else 'need'} local "
                              f"image features, which {type(self).__name__} does not produce (trainers that do: "
                              f"{', '.join(able)})")
        return local

    # ----------------------------------------------------------------- precision
    def resolve_precision(self, prec: str) -> str:
        """The precision actually used: CPU always runs fp32."""
        if prec not in PRECISIONS:
            raise ConfigError(f"invalid PREC {prec!r} (choose from {', '.join(PRECISIONS)})")
        used = prec
        if self.device.type == "cpu" and prec != "fp32":
            print(f"Note: PREC {prec} requested on CPU -> using fp32")
            used = "fp32"
        self.precision_info = {"requested": prec, "used": used, "device": self.device.type}
        return used

    # ----------------------------------------------------------------- data and features
    def build_data_loader(self) -> None:
        dm = DataManager(self.cfg)
        self.train_loader_x = dm.train_loader_x
        self.train_loader_u = dm.train_loader_u
        self.val_loader = dm.val_loader
        self.test_loader = dm.test_loader
        self.ood_test_loader = dm.ood_test_loader
        self.num_classes = dm.num_classes
        self.lab2cname = dm.lab2cname
        self.dm = dm

    def build_model(self) -> None:
        raise NotImplementedError

    def set_ood_test(self, items: list[Any]) -> None:
        """Evaluate against other open-set images (a pass over several open-set datasets): ``ood_test_loader``
        is rebuilt over ``items`` as the run's own was (through the feature cache when it is installed)."""
        cache = getattr(self, "feature_cache", None)
        self.ood_test_loader = cache.ood_loader(items) if cache is not None else self.dm.build_ood_loader(items)

    def encode_images(self, images: torch.Tensor, batch: Optional[dict[str, Any]] = None) -> torch.Tensor:
        """Frozen CLIP image features of a batch: the one call through which all trainers get them.

        A feature cache sets ``self.feature_provider`` (called with the images and the batch dict, which
        carries ``impath``/``index``; returning None falls back to the encoder) and nothing else changes.
        """
        if self.feature_provider is not None:
            feats = self.feature_provider(images, batch)
            if feats is not None:
                return feats[:, 0] if feats.dim() == 3 else feats  # cached (global, local) rows: the global
        if self.image_encoder is None:
            raise RuntimeError("trainer set no image_encoder in build_model()")
        dtype = next(self.image_encoder.parameters()).dtype
        self.encoder_images += len(images)
        with torch.no_grad():
            return self.image_encoder(images.to(self.device, dtype=dtype))

    def encode_images_local(self, images: torch.Tensor,
                            batch: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen global ``(N, D)`` and local ``(N, R, D)`` image features (``self.local_image_encoder``); a feature
        cache installed for a run that wants local features passes both through (``(N, 1 + R, D)`` rows)."""
        if self.feature_provider is not None:
            feats = self.feature_provider(images, batch)
            if feats is not None:
                if feats.dim() != 3:
                    raise RuntimeError("the feature cache passed no local features (installed before wants_local?)")
                return feats[:, 0], feats[:, 1:]
        if self.local_image_encoder is None:
            raise RuntimeError(f"{type(self).__name__} set no local_image_encoder in build_model()")
        dtype = next(self.image_encoder.parameters()).dtype
        self.encoder_images += len(images)
        with torch.no_grad():
            return self.local_image_encoder(images.to(self.device, dtype=dtype))

    # ----------------------------------------------------------------- loop hooks
    def before_train(self) -> None:
        directory = self.cfg.RESUME or self.output_dir
        self.start_epoch = self.resume_model_if_exist(directory) if os.path.isdir(directory) else 0
        self.open_segment(self.start_epoch)
        if self.cfg.TRAIN.TENSORBOARD:
            writer_dir = os.path.join(self.output_dir, "tensorboard")
            mkdir_if_missing(writer_dir)
            self.init_writer(writer_dir)
        self.time_start = time.time()

    def after_epoch(self) -> None:
        do_test = not self.cfg.TEST.NO_TEST
        if do_test and self.cfg.TEST.FINAL_MODEL == "best_val" and self.val_loader is not None:
            print("Do evaluation on val set")
            curr_result = self.test(split="val")["accuracy"]
            self.val_history.append({"epoch": self.epoch + 1, "accuracy": float(curr_result)})
            if curr_result > self.best_result:
                self.best_result = curr_result
                self.best_epoch = self.epoch + 1
                self.save_model(self.epoch, self.output_dir, is_best=True, val_result=curr_result)
        self.save_model(self.epoch, self.output_dir)  # the rolling checkpoint: a kill loses at most this epoch

    def after_train(self) -> None:
        print("Finished training")
        self.sync_checkpoints(self.output_dir)
        if not self.cfg.TEST.NO_TEST:
            if self.cfg.TEST.FINAL_MODEL == "best_val" and self.val_loader is not None:
                print("Deploy the model with the best val performance")
                self.load_model(self.output_dir)
            else:
                print("Deploy the model of the last epoch")
            print("Do evaluation on test set")
            self.metrics["test"] = dict(self.test(split="test"))
            if self.best_result > -np.inf:
                self.metrics["val"] = {"best_accuracy": float(self.best_result)}
        self._close_segment(None)
        elapsed = str(datetime.timedelta(seconds=round(time.time() - self.time_start)))
        print(f"Elapsed: {elapsed}")
        self.close_writer()

    # ----------------------------------------------------------------- evaluation
    def split_loader(self, split: str) -> Any:
        if split == "train":
            return self.train_eval_loader()
        loaders = {"val": self.val_loader, "test": self.test_loader, "ood_test": self.ood_test_loader}
        if split not in loaders:
            raise ConfigError(f"unknown split {split!r} (val, test, ood_test, train)")
        if loaders[split] is None:
            raise UserError(f"dataset {self.cfg.DATASET.NAME} has no {split!r} split")
        return loaders[split]

    def train_eval_loader(self) -> Any:
        """The training split ``train_x`` under the test transform, in order (``split_loader("train")``: the
        statistics of fitted OOD scores), through the feature cache when installed; built on first use."""
        if getattr(self, "_train_eval_loader", None) is None:
            items = self.dm.dataset.train_x
            if not items:
                raise UserError(f"dataset {self.cfg.DATASET.NAME} has no 'train' split (train_x is empty)")
            cache = self.feature_cache
            self._train_eval_loader = (cache.eval_loader(items, "train_x") if cache is not None
                                       else self.dm.build_eval_loader(items))
        return self._train_eval_loader

    @torch.no_grad()
    def test(self, split: Optional[str] = None) -> "OrderedDict[str, float]":
        """Closed-set accuracy on ``split`` (default ``TEST.SPLIT``); prints the familiar result block."""
        self.set_model_mode("eval")
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        loader = self.split_loader(split)
        print(f"Evaluate on the *{split}* set")
        for batch_idx, batch in enumerate(tqdm(loader, desc=f"eval {split}", leave=False,
                                               disable=not progress_enabled(self.cfg.VERBOSE))):
            input, label = self.parse_batch_test(batch)
            logits = self.inference_output(input).logits
            guards.check_logits(logits, split, batch_idx)
            self.evaluator.process(logits, label)
        results = self.evaluator.evaluate()
        for k, v in results.items():
            self.write_scalar(f"{split}/{k}", v, self.epoch)
        return results

    def inference_output(self, input: Any) -> InferenceOutput:
        """``model_inference(input)`` read as an :class:`InferenceOutput` (a list is a clear error)."""
        return as_inference_output(self.model_inference(input), f"{type(self).__name__}.model_inference")

    @torch.no_grad()
    def collect_outputs(self, split: str) -> dict[str, np.ndarray]:
        """Run inference on a split: logits, labels, the trainer's score, features, extras and image paths. With
        a local score requested (``gl_mcm``, ...), a detection split (any but ``train``, whose outputs feed only
        the fits of fitted scores) runs with ``self.infer_local`` and each batch's local logits are reduced per
        image at once (``local_<score>``, :func:`.inference.local_reduction`), never kept whole."""
        reduce = local_reduction(self) if split != "train" else None
        self.set_model_mode("eval")
        rows: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "score": []}
        paths: list[str] = []
        self.infer_local = reduce is not None
        try:
            for batch in tqdm(self.split_loader(split), desc=f"infer {split}", leave=False,
                              disable=not progress_enabled(self.cfg.VERBOSE)):
                input, label = self.parse_batch_test(batch)
                out = self.inference_output(input)
                local = {} if reduce is None or out.local_logits is None else reduce(out.local_logits)
                fields = {"logits": out.logits, "labels": label, "score": out.score, "features": out.features,
                          **local, **{f"extra_{k}": v for k, v in out.extras.items()}}
                for key, val in fields.items():
                    if val is not None:
                        rows.setdefault(key, []).append(val.detach().cpu() if key == "labels"
                                                        else val.detach().float().cpu())
                paths.extend(batch["impath"])
        finally:
            self.infer_local = False
        n = len(rows["labels"])
        ragged = [k for k, v in rows.items() if len(v) != n]
        if ragged:
            raise TypeError(f"{type(self).__name__}.model_inference set {ragged} for some batches only")
        # ragged logits (DPLCLIP's official concatenation grows with the domains in a batch): -inf padding
        out_dict = {k: (cat_padded(v) if k == "logits" else torch.cat(v)).numpy() for k, v in rows.items()}
        out_dict["impaths"] = np.asarray(paths)
        return out_dict

    def logit_scale_value(self) -> float:
        """The logit scale s of the trained model (used to turn logits back into cosines for MCM)."""
        return float(getattr(self, "logit_scale", 100.0))

    # ----------------------------------------------------------------- batches
    def parse_batch_train(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def parse_batch_test(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def model_inference(self, input: torch.Tensor) -> InferenceOutput:
        """Dassl's default ``self.model(input)`` as logits; trainers that set a frozen ``image_encoder`` get
        ``self.model(image features)`` (features through :meth:`encode_images`, so a feature cache applies)."""
        if self.image_encoder is None:
            return InferenceOutput(logits=self.model(input))
        return InferenceOutput(logits=self.model(self.encode_images(input)))


class TrainerX(SimpleTrainer):
    """Epochs over the labelled loader ``train_loader_x``; prints Dassl's progress line."""

    def run_epoch(self) -> None:
        self.set_model_mode("train")
        losses = MetricMeter()
        batch_time, data_time = AverageMeter(), AverageMeter()
        loader = self.train_loader_x
        if loader is None or len(loader) == 0:
            raise UserError(f"dataset {self.cfg.DATASET.NAME} has no training images (train_x is empty)")
        self.num_batches = len(loader)
        end = time.time()
        for self.batch_idx, batch in enumerate(loader):
            data_time.update(time.time() - end)
            loss_summary = self.forward_backward(batch)
            guards.check_train_step(self, loss_summary)
            batch_time.update(time.time() - end)
            losses.update(loss_summary)
            self.log_train_step(losses, batch_time, data_time)
            end = time.time()

    def log_train_step(self, losses: MetricMeter, batch_time: AverageMeter, data_time: AverageMeter) -> None:
        """Dassl's progress line (every ``TRAIN.PRINT_FREQ`` batches and at the epoch's end) and scalars."""
        freq = self.cfg.TRAIN.PRINT_FREQ
        if (self.batch_idx + 1) % freq == 0 or self.num_batches < freq or self.batch_idx + 1 == self.num_batches:
            rest = self.num_batches - self.batch_idx - 1 + (self.max_epoch - self.epoch - 1) * self.num_batches
            eta = str(datetime.timedelta(seconds=int(batch_time.avg * rest)))
            print(f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.batch_idx + 1}/{self.num_batches}] "
                  f"time {batch_time.val:.3f} ({batch_time.avg:.3f}) data {data_time.val:.3f} "
                  f"({data_time.avg:.3f}) {losses} lr {self.get_current_lr():.4e} eta {eta}")
        n_iter = self.epoch * self.num_batches + self.batch_idx
        for name, meter in losses.meters.items():
            self.write_scalar("train/" + name, meter.avg, n_iter)
        self.write_scalar("train/lr", self.get_current_lr(), n_iter)
