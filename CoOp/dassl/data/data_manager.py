"""Build the loaders ``train_loader_x``, ``val_loader``, ``test_loader`` and ``ood_test_loader``."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ..utils.errors import DataError
from .datasets import build_dataset
from .datasets.base_dataset import Datum
from .transforms import build_transform
from .verify import verify_dataset


def read_image(path: str) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is a :class:`DataError` naming the path."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"unreadable image {path}: {err}") from None


class DatasetWrapper(Dataset):
    """Map-style dataset returning dicts: img, label, domain, impath, index."""

    def __init__(self, data_source: list[Datum], transform: Callable) -> None:
        self.data_source = data_source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = self.data_source[idx]
        img = self.transform(read_image(item.impath))
        return {"img": img, "label": item.label, "domain": item.domain, "impath": item.impath, "index": idx}


def build_data_loader(data_source: list[Datum], batch_size: int, transform: Callable, is_train: bool,
                      num_workers: int = 0, sampler_type: str = "RandomSampler",
                      pin_memory: bool = False) -> DataLoader:
    """Random order + ``drop_last`` (when the set holds at least one batch) for training; sequential else."""
    dataset = DatasetWrapper(data_source, transform)
    num_workers = max(0, min(num_workers, os.cpu_count() or 1))
    shuffle = is_train and sampler_type == "RandomSampler"
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=is_train and len(data_source) >= batch_size, pin_memory=pin_memory)


class DataManager:
    """Builds the dataset named in ``cfg.DATASET.NAME`` and its loaders (Dassl API)."""

    def __init__(self, cfg: Any, custom_tfm_train: Optional[Callable] = None,
                 custom_tfm_test: Optional[Callable] = None, dataset: Any = None) -> None:
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        if cfg.DATASET.VERIFY_IMAGES:  # held-out and open-set images decode: found now, not at the final test
            verify_dataset(self.dataset, os.path.expanduser(cfg.DATASET.ROOT))
        self.tfm_train = custom_tfm_train or build_transform(cfg, is_train=True)
        self.tfm_test = custom_tfm_test or build_transform(cfg, is_train=False)
        nw = cfg.DATALOADER.NUM_WORKERS
        pin = str(cfg.DEVICE).startswith("cuda")
        ds = self.dataset
        self.train_loader_x = build_data_loader(ds.train_x, cfg.DATALOADER.TRAIN_X.BATCH_SIZE, self.tfm_train,
                                                True, nw, cfg.DATALOADER.TRAIN_X.SAMPLER, pin) if ds.train_x else None
        self.train_loader_u = None
        self.val_loader = build_data_loader(ds.val, cfg.DATALOADER.TEST.BATCH_SIZE, self.tfm_test, False, nw,
                                            pin_memory=pin) if ds.val else None
        self.test_loader = build_data_loader(ds.test, cfg.DATALOADER.TEST.BATCH_SIZE, self.tfm_test, False, nw,
                                             pin_memory=pin) if ds.test else None
        self._ood = (cfg.DATALOADER.TEST.BATCH_SIZE,
                     self.tfm_train if cfg.DATALOADER.OOD_TEST.TRANSFORM == "train" else self.tfm_test, nw, pin)
        self.ood_test_loader = self.build_ood_loader(ds.ood_test) if ds.ood_test else None
        self._num_classes = ds.num_classes
        self._lab2cname = ds.lab2cname
        if cfg.VERBOSE:
            self.show_dataset_summary(cfg)

    def build_ood_loader(self, items: list[Datum]) -> DataLoader:
        """A loader over open-set images built like ``ood_test_loader`` (``DATALOADER.OOD_TEST.TRANSFORM``)."""
        batch_size, tfm, nw, pin = self._ood
        return build_data_loader(items, batch_size, tfm, False, nw, pin_memory=pin)

    def build_eval_loader(self, items: list[Datum]) -> DataLoader:
        """A loader over ``items`` built like ``test_loader`` (test transform, in order)."""
        batch_size, _, nw, pin = self._ood
        return build_data_loader(items, batch_size, self.tfm_test, False, nw, pin_memory=pin)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def lab2cname(self) -> dict[int, str]:
        return self._lab2cname

    def show_dataset_summary(self, cfg: Any) -> None:
        ds = self.dataset
        rows = [("Dataset", cfg.DATASET.NAME), ("# classes", f"{self.num_classes:,}"),
                ("# train_x", f"{len(ds.train_x):,}"), ("# val", f"{len(ds.val):,}"),
                ("# test", f"{len(ds.test):,}")]
        if ds.ood_test:
            rows.append(("# ood_test", f"{len(ds.ood_test):,}"))
        print("***** Dataset statistics *****")
        for k, v in rows:
            print(f"  {k}: {v}")


