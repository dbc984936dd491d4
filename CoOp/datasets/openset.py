"""Open-set evaluation datasets of Setup-II: ``<ID>_<OOD>`` = a PACS/VLCS held-out-domain split + an open-set
image set (DTD, Food101, Caltech101) read from CoOp's fixed "zhou" split files. Evaluation only: no training.

Registered names: ``PACS_DTD``, ``PACS_Food101``, ``PACS_Caltech101``, ``VLCS_DTD``, ``VLCS_Food101``,
``VLCS_Caltech101`` and the spellings of the official scripts ``PACS_food101``, ``VLCS_food101``.

Splits (spec 4.2; ``K`` = ``DATASET.NUM_SHOTS``, the official evaluation scripts run with ``K = -1``):

- ``test`` (closed-set OOD: the held-out domain) = up to ``DATASET.ID_PER_CLASS_CAP`` (500) images per class
  sampled from the json ``test`` list of ``TEST_ENV``.
- ``val`` (the source-domain "ID" features, e.g. the KNN bank) = up to ``DATASET.ID_PER_CLASS_CAP`` images per
  class sampled from the json **train** list (not the json ``val``), whatever ``K`` is. The official
  ``PACS_DTD`` cuts ``train`` to K per class first when K >= 5, so its ``val`` would hold only 7*K images unlike
  the other five classes; that inconsistency is deliberately *not* reproduced here.
- ``train_x`` (unused in evaluation) = the full json train list (K < 1), else the same few-shot construction as
  the training dataset (``DATASET.FEWSHOT_SAMPLER``, the ID dataset's official sampler).
- ``ood_test`` = train + val + test of the open-set split file (in that order, each in file order), minus the
  excluded class names, then up to ``DATASET.OOD_PER_CLASS_CAP`` (100) images per class. Labels and class names
  are the open-set dataset's own (detectors ignore them); the domain index is -1 and the domain name the
  open-set folder. [Official code with K >= 1 (never used by its scripts) first replaces the open-set
  train/val by CoOp's K-shot / min(K,4)-shot pickles; not reproduced: ``ood_test`` never depends on K.]

Caps below 1 mean "no cap". Sampling uses python's global ``random`` (seeded by the run through
``set_random_seed``), consumed in this fixed order after all files have been read (so a missing file raises
before anything is drawn):

1. ``train_x``: the few-shot sampler on the json train list (nothing drawn when K < 1);
2. ``test``: :func:`subsample_per_class` of the json test list;
3. ``val``: :func:`subsample_per_class` of the json train list;
4. ``ood_test``: :func:`subsample_per_class` of the open-set union.

:func:`subsample_per_class` visits the classes in order of first appearance and draws ``random.sample(items,
cap)`` only for classes with more than ``cap`` items.

``num_classes``, ``lab2cname`` and ``classnames`` are those of the ID task only (from the full json train and
test lists), so text features are built for the ID classes; the open-set items never affect them.

Open-set image paths: ``<root>/<ood_folder>/<ood_image_subdir>/<relpath>`` with ``relpath`` the first field of the
split entry. (The official DTD classes rebuild the path as ``<images>/<classname>/<file name>``; for CoOp's real
DTD split, whose relpaths are ``<classname>/<file>``, that is the same file.) A missing folder or split file is a
:class:`DataError` naming the path (the official fallback that re-splits the folder is not reproduced).

New pairs are a few lines, e.g. for the DigitsDG demo::

    @DATASET_REGISTRY.register()
    class DigitsDG_FashionMNIST(LODOOpenSet):
        id_dataset = DigitsDG
        ood_folder = "fashion-mnist"
        ood_split_file = "split_FashionMNIST.json"
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase
from dassl.data.datasets.base_dataset import subsample_per_class
from dassl.utils.errors import DataError
from dassl.utils.tools import read_json

from .lodo import PACS, VLCS, DigitsDG, LODODataset

COOP_SPLIT_KEYS = ("train", "val", "test")

# Open-set sources (spec 7.1): (folder under DATASET.ROOT, image sub-folder, split file).
DTD_SOURCE = ("dtd", "images", "split_zhou_DescribableTextures.json")
FOOD101_SOURCE = ("food-101", "images", "split_zhou_Food101.json")
CALTECH101_SOURCE = ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json")

# Caltech101 classes removed from the open-set side (class names of CoOp's split, spec 4.2). The official code
# keeps a whitelist written with the raw folder names, so the CoOp-renamed airplane/face/leopard/motorbike
# (folders airplanes/Faces/Leopards/Motorbikes) are excluded by accident of that renaming; the others are
# deliberate removals of classes overlapping the ID classes. Kept exactly as the official lists behave.
PACS_CALTECH_EXCLUDE = ("airplane", "dalmatian", "electric_guitar", "elephant", "face", "leopard", "motorbike",
                        "snoopy")
VLCS_CALTECH_EXCLUDE = ("airplane", "car_side", "chair", "dalmatian", "emu", "face", "flamingo", "flamingo_head",
                        "ibis", "leopard", "motorbike", "pigeon", "snoopy", "wheelchair", "wild_cat",
                        "windsor_chair")


def read_coop_split(image_dir: str, split_path: str, exclude: Iterable[str] = (),
                    keys: Iterable[str] = COOP_SPLIT_KEYS, domain: int = -1,
                    domainname: str = "") -> list[Datum]:
    """Read a CoOp split file (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``).

    Returns the concatenation of the lists named in ``keys`` (in that order, each in file order) as
    :class:`Datum` objects with ``impath = <image_dir>/<relpath>``, dropping entries whose class name (third
    field, exact match) is in ``exclude``. Missing ``image_dir``/``split_path``, a missing key or a malformed
    entry is a :class:`DataError` naming the path.
    """
    if not os.path.isdir(image_dir):
        raise DataError(f"open-set image folder not found: {image_dir} (expected <image folder>/<relpath> for "
                        f"every entry of {os.path.basename(split_path)}; see the dataset layout in the README)")
    if not os.path.isfile(split_path):
        raise DataError(f"open-set split file not found: {split_path} (expected CoOp's split file with "
                        f"train/val/test lists of [relpath, label, classname], relpaths relative to {image_dir})")
    split = read_json(split_path)
    if not isinstance(split, dict):
        raise DataError(f"split file {split_path} is not a JSON object with train/val/test lists")
    excluded = set(exclude)
    out: list[Datum] = []
    for key in keys:
        if key not in split:
            raise DataError(f"split file {split_path} has no {key!r} list")
        for entry in split[key]:
            try:
                relpath, label, classname = str(entry[0]), int(entry[1]), str(entry[2])
            except (IndexError, TypeError, ValueError, KeyError):
                raise DataError(f"malformed entry {entry!r} in {split_path} "
                                f"(expected [relative_path, label, classname])") from None
            if classname in excluded:
                continue
            out.append(Datum(impath=os.path.join(image_dir, relpath), label=label, domain=domain,
                             classname=classname, domainname=domainname))
    return out


def cap_per_class(items: list[Datum], cap: int) -> list[Datum]:
    """:func:`subsample_per_class` with ``cap < 1`` meaning no cap (the list is returned unchanged)."""
    return list(items) if int(cap) < 1 else subsample_per_class(items, int(cap))


class LODOOpenSet(LODODataset):
    """Base class of the ``<ID>_<OOD>`` open-set evaluation datasets (see the module docstring).

    Class attributes:

    - ``id_dataset``: the ID :class:`LODODataset` (``PACS``, ``VLCS``, ``DigitsDG``); its ``dataset_dir``,
      ``domains``, ``official_domain_order`` and ``official_sampler`` are copied onto the subclass unless it sets
      them itself.
    - ``ood_folder`` / ``ood_image_subdir`` / ``ood_split_file``: the open-set folder under ``DATASET.ROOT``, its
      image sub-folder and its CoOp split file (in ``ood_folder``).
    - ``ood_exclude``: open-set class names to drop (exact match on the split's class-name field).
    """

    id_dataset: Optional[type] = None
    ood_folder = ""
    ood_image_subdir = "images"
    ood_split_file = ""
    ood_exclude: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        idc = cls.__dict__.get("id_dataset")
        if idc is not None:
            for attr in ("dataset_dir", "domains", "official_domain_order", "official_sampler"):
                if attr not in cls.__dict__:
                    setattr(cls, attr, getattr(idc, attr))

    def __init__(self, cfg: Any) -> None:
        if not self.dataset_dir or not self.ood_folder or not self.ood_split_file:
            raise TypeError(f"{type(self).__name__} must set id_dataset (or dataset_dir), ood_folder and "
                            f"ood_split_file")
        # 1. read everything (no random draws yet)
        train, _json_val, test = self.read_lodo_splits(cfg)
        ood_all = self.read_ood(cfg)
        # 2. draws with the global `random`, in the documented order
        train_x = self.sample_train(train, cfg.DATASET.NUM_SHOTS, cfg.DATASET.FEWSHOT_SAMPLER)
        id_cap = cfg.DATASET.ID_PER_CLASS_CAP
        test_s = cap_per_class(test, id_cap)
        val_s = cap_per_class(train, id_cap)
        ood_s = cap_per_class(ood_all, cfg.DATASET.OOD_PER_CLASS_CAP)
        DatasetBase.__init__(self, train_x=train_x, val=val_s, test=test_s, ood_test=ood_s)
        # ID label space from the full ID lists (a few-shot train_x could miss a class).
        self.set_label_space(list(train) + list(test))

    def read_ood(self, cfg: Any) -> list[Datum]:
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.ood_root = os.path.join(root, self.ood_folder)
        self.ood_image_dir = os.path.join(self.ood_root, self.ood_image_subdir)
        self.ood_split_path = os.path.join(self.ood_root, self.ood_split_file)
        if not os.path.isdir(self.ood_root):
            raise DataError(f"{type(self).__name__}: open-set folder not found: {self.ood_root} (expected "
                            f"<root>/{self.ood_folder}/{self.ood_image_subdir}/<class>/* and "
                            f"<root>/{self.ood_folder}/{self.ood_split_file})")
        return read_coop_split(self.ood_image_dir, self.ood_split_path, exclude=self.ood_exclude,
                               domain=-1, domainname=self.ood_folder)

# ------------------------------------------------------------------------------------------------ PACS
@DATASET_REGISTRY.register()
class PACS_DTD(LODOOpenSet):
    id_dataset = PACS
    ood_folder, ood_image_subdir, ood_split_file = DTD_SOURCE


@DATASET_REGISTRY.register()
class PACS_Food101(LODOOpenSet):
    id_dataset = PACS
    ood_folder, ood_image_subdir, ood_split_file = FOOD101_SOURCE


@DATASET_REGISTRY.register()
class PACS_Caltech101(LODOOpenSet):
    id_dataset = PACS
    ood_folder, ood_image_subdir, ood_split_file = CALTECH101_SOURCE
    ood_exclude = PACS_CALTECH_EXCLUDE


@DATASET_REGISTRY.register()
class PACS_food101(PACS_Food101):
    """Spelling used by the official scripts/configs."""


# ------------------------------------------------------------------------------------------------ VLCS
@DATASET_REGISTRY.register()
class VLCS_DTD(LODOOpenSet):
    id_dataset = VLCS
    ood_folder, ood_image_subdir, ood_split_file = DTD_SOURCE


@DATASET_REGISTRY.register()
class VLCS_Food101(LODOOpenSet):
    id_dataset = VLCS
    ood_folder, ood_image_subdir, ood_split_file = FOOD101_SOURCE


@DATASET_REGISTRY.register()
class VLCS_Caltech101(LODOOpenSet):
    id_dataset = VLCS
    ood_folder, ood_image_subdir, ood_split_file = CALTECH101_SOURCE
    ood_exclude = VLCS_CALTECH_EXCLUDE


@DATASET_REGISTRY.register()
class VLCS_food101(VLCS_Food101):
    """Spelling used by the official scripts/configs."""


# ----------------------------------------------------------------------------- DigitsDG-mini (the demo)
@DATASET_REGISTRY.register()
class DigitsDG_FashionMNIST(LODOOpenSet):
    """DigitsDG-mini as ID, Fashion-MNIST (built by ``python -m demo.data``) as open-set."""

    id_dataset = DigitsDG
    ood_folder = "fashion-mnist"
    ood_image_subdir = "images"
    ood_split_file = "split_FashionMNIST.json"


@DATASET_REGISTRY.register()
class DigitsDG_Textures(LODOOpenSet):
    """DigitsDG-mini as ID, texture/photo patches cut from packaged scikit-image images as open-set."""

    id_dataset = DigitsDG
    ood_folder = "textures-mini"
    ood_image_subdir = "images"
    ood_split_file = "split_TexturesMini.json"
