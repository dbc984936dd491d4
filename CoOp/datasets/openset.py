"""Open-set evaluation datasets of Setup-II: ``<ID>_<OOD>`` = a PACS/VLCS held-out-domain split + an open-set
image set (DTD, Food101, Caltech101) read from CoOp's fixed "zhou" split files. Evaluation only: no training.

Registered names: ``PACS_DTD``, ``PACS_Food101``, ``PACS_Caltech101``, ``VLCS_DTD``, ``VLCS_Food101``,
``VLCS_Caltech101`` and the spellings of the official scripts ``PACS_food101``, ``VLCS_food101``.

Splits (spec 4.2; ``K`` = ``DATASET.NUM_SHOTS``: most official evaluation scripts run with ``K = -1``; those of
DPLCLIP and Bayes-CAL pass ``K = 16``, and so do the drivers, ``launch/official.py``):

- ``test`` (closed-set OOD: the held-out domain) = up to ``DATASET.ID_PER_CLASS_CAP`` (500) images per class
  sampled from the json ``test`` list of ``TEST_ENV``.
- ``val`` (the source-domain "ID" features, e.g. the KNN bank) = up to ``DATASET.ID_PER_CLASS_CAP`` images per
  class sampled from the json **train** list (not the json ``val``). ``PACS_DTD`` with K >= 1 (only that class,
  as officially) first cuts the json train list to K per class, so its ``val`` holds K images per class.
- ``train_x`` (unused in evaluation) = the full json train list (K < 1), else the same few-shot construction as
  the training dataset (``DATASET.FEWSHOT_SAMPLER``, the ID dataset's official sampler).
- ``ood_test`` = train + val + test of the open-set split file (in that order), minus the excluded class names,
  then up to ``DATASET.OOD_PER_CLASS_CAP`` (100) images per class. With K >= 1 the open-set train/val are first
  replaced by their K-shot / min(K, 4)-shot draws, as CoOp's own dataset classes make them (DTD's 60/24/36 per
  class: 16 + 4 + 36 = 56 images per class instead of 100). Labels and class names are the open-set dataset's
  own (detectors ignore them); the domain index is -1 and the domain name the open-set folder.

**Few-shot cache** (K >= 1): ``<root>/<ood_folder>/split_fewshot/shot_<K>-seed_<SEED>.pkl``, CoOp's file,
shared both ways with CoOp's and the official code's dataset classes: read when it exists (whoever wrote it; its
lists are used as they are, as officially, e.g. all Caltech101 classes when CoOp's ``Caltech101`` wrote it: a
warning names the excluded classes it holds), else drawn and written (atomically; a folder that cannot be
written is a note, the draw is used). Reading builds nothing but ``Datum`` objects (files are data; another
object is refused with one line naming the file; nothing in it runs); writing uses upstream's layout
(``{"train": [Datum], "val": [Datum]}``, every attribute of the official ``Datum``, domain 0).

Caps below 1 mean "no cap". Sampling uses python's global ``random`` (seeded by the run through
``set_random_seed``), consumed in this fixed order after all files (the cache included) have been read:

1. ``train_x``: the few-shot sampler on the json train list (nothing drawn when K < 1);
2. K >= 1, official draws: ``PACS_DTD``'s cut of the json train list (K per class, plain sampler); the cut of
   the json val list that the official classes draw and discard (``PACS_DTD`` and ``VLCS_*``: plain sampler,
   the other ``PACS_*``: the ``train_x`` sampler); the open-set few-shot draw when no cache exists (K per class
   of the open-set train list, then min(K, 4) of its val list), so it is the official code's draw for the seed;
3. the three caps with :func:`subsample_per_class`, in the order of ``DATASET.OPENSET_DRAW_ORDER``:

   - ``official`` (default, as the official classes): ``ood_test`` (the open-set union), then ``val`` (the json
     train list; ``PACS_DTD``, K >= 1: its cut), then ``test`` (the json test list). The ID samples therefore
     depend on the open-set dataset drawn before them (and, with K >= 1, on whether its few-shot cache existed:
     a run that draws it starts its caps from the state after that draw, one that loads it does not), exactly
     as in an official run of that seed;
   - ``id_first`` (named deviation): ``test``, ``val``, then ``ood_test``, and the state before the open-set
     few-shot draw of step 2 is restored after it (as in a run that finds the cache), so the ID samples never
     depend on the open-set images or on the cache (only on the class's official cuts of step 2: with K >= 1
     ``PACS_DTD`` draws other ones than ``PACS_Food101`` / ``PACS_Caltech101``).

One evaluation pass over several open sets (``train.py --eval-open-set``) takes each open set's own ID samples
in either order; :func:`pass_key` says which datasets may share a pass (those of one ID dataset).

:func:`subsample_per_class` is the official cap ``generate_fewshot_dataset(items, num_shots=cap)``: classes in
order of first appearance, ``random.sample(items, cap)`` for every class with at least ``cap`` items (exactly
``cap`` items are reordered and consume random state too), smaller classes kept as they are.

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
import random
from typing import Any, Iterable, Optional

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase
from dassl.data.datasets.base_dataset import subsample_per_class
from dassl.utils.errors import ConfigError, DataError
from dassl.utils.tools import read_json

from .fewshot_cache import cache_path, read_cache, write_cache
from .lodo import PACS, VLCS, DigitsDG, LODODataset

COOP_SPLIT_KEYS = ("train", "val", "test")
# DATASET.OPENSET_DRAW_ORDER -> the order of the per-class caps (module docstring, step 3)
DRAW_ORDERS = {"official": ("ood_test", "val", "test"), "id_first": ("test", "val", "ood_test")}

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


def read_coop_lists(image_dir: str, split_path: str, exclude: Iterable[str] = (),
                    keys: Iterable[str] = COOP_SPLIT_KEYS, domain: int = -1,
                    domainname: str = "") -> dict[str, list[Datum]]:
    """Read a CoOp split file (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``).

    Returns ``{key: [Datum, ...]}`` for the lists named in ``keys`` (each in file order) with ``impath =
    <image_dir>/<relpath>``, dropping entries whose class name (third field, exact match) is in ``exclude``.
    Missing ``image_dir``/``split_path``, a missing key or a malformed entry is a :class:`DataError` naming the path.
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
    out: dict[str, list[Datum]] = {}
    for key in keys:
        if key not in split:
            raise DataError(f"split file {split_path} has no {key!r} list")
        items = out.setdefault(key, [])
        for entry in split[key]:
            try:
                relpath, label, classname = str(entry[0]), int(entry[1]), str(entry[2])
            except (IndexError, TypeError, ValueError, KeyError):
                raise DataError(f"malformed entry {entry!r} in {split_path} "
                                f"(expected [relative_path, label, classname])") from None
            if classname not in excluded:
                items.append(Datum(impath=os.path.join(image_dir, relpath), label=label, domain=domain,
                                   classname=classname, domainname=domainname))
    return out


def read_coop_split(image_dir: str, split_path: str, exclude: Iterable[str] = (),
                    keys: Iterable[str] = COOP_SPLIT_KEYS, domain: int = -1,
                    domainname: str = "") -> list[Datum]:
    """The lists of :func:`read_coop_lists` concatenated in the order of ``keys``."""
    keys = tuple(keys)
    lists = read_coop_lists(image_dir, split_path, exclude, keys, domain, domainname)
    return [d for key in keys for d in lists[key]]


def cap_per_class(items: list[Datum], cap: int) -> list[Datum]:
    """:func:`subsample_per_class` with ``cap < 1`` meaning no cap (the list is returned unchanged)."""
    return list(items) if int(cap) < 1 else subsample_per_class(items, int(cap))


def pass_key(name: str) -> tuple[Any, ...]:
    """Datasets with equal keys may share one evaluation pass (``train.py --eval-open-set``): the ``<ID>_<OOD>``
    datasets of one ID dataset draw the same ``train_x`` and label space for a config and seed (their ``val`` /
    ``test`` samples may differ, which the pass handles per open set); any other name is its own key."""
    cls = DATASET_REGISTRY.get(name) if name in DATASET_REGISTRY else None
    if not (isinstance(cls, type) and issubclass(cls, LODOOpenSet)):
        return (name,)
    return "open_set", cls.dataset_dir


def draw_order(cfg: Any) -> str:
    """``DATASET.OPENSET_DRAW_ORDER`` (``official`` when the config has no such key); another value is a
    :class:`ConfigError` naming the key."""
    order = str(cfg.DATASET.get("OPENSET_DRAW_ORDER", "official"))
    if order not in DRAW_ORDERS:
        raise ConfigError(f"DATASET.OPENSET_DRAW_ORDER must be one of {', '.join(DRAW_ORDERS)}, got {order!r}")
    return order


class LODOOpenSet(LODODataset):
    """Base class of the ``<ID>_<OOD>`` open-set evaluation datasets (see the module docstring).

    Class attributes:

    - ``id_dataset``: the ID :class:`LODODataset` (``PACS``, ``VLCS``, ``DigitsDG``); its ``dataset_dir``,
      ``domains``, ``official_domain_order`` and ``official_sampler`` are copied onto the subclass unless it sets
      them itself.
    - ``ood_folder`` / ``ood_image_subdir`` / ``ood_split_file``: the open-set folder under ``DATASET.ROOT``, its
      image sub-folder and its CoOp split file (in ``ood_folder``).
    - ``ood_exclude``: open-set class names to drop (exact match on the split's class-name field).
    - ``val_from_cut_train`` (K >= 1): ``val`` is drawn from the json train list cut to K per class (official
      ``PACS_DTD``); ``plain_val_cut``: the discarded official cut of the json val list uses the plain sampler
      (official ``PACS_DTD`` and ``VLCS_*``) instead of the ``train_x`` sampler (the other official ``PACS_*``).
    """

    id_dataset: Optional[type] = None
    ood_folder = ""
    ood_image_subdir = "images"
    ood_split_file = ""
    ood_exclude: tuple[str, ...] = ()
    val_from_cut_train = False
    plain_val_cut = False

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
        k, sampler, order = int(cfg.DATASET.NUM_SHOTS), cfg.DATASET.FEWSHOT_SAMPLER, draw_order(cfg)
        # 1. read everything, the few-shot cache included (no random draws yet)
        train, json_val, test = self.read_lodo_splits(cfg)
        ood = self.read_ood(cfg)
        cached = self.read_fewshot_cache(cfg, k)
        # 2. draws with the global `random`, in the documented order
        train_x = self.sample_train(train, k, sampler)
        val_source = self.generate_fewshot_dataset(train, num_shots=k) if self.val_from_cut_train else train
        self.official_val_cut(json_val, k, sampler)
        ood_train, ood_val = self.fewshot_open_set(ood["train"], ood["val"], k, cached,
                                                   keep_state=order == "id_first")
        # 3. the caps, in DATASET.OPENSET_DRAW_ORDER
        id_cap, ood_cap = cfg.DATASET.ID_PER_CLASS_CAP, cfg.DATASET.OOD_PER_CLASS_CAP
        sources = {"test": (test, id_cap), "val": (val_source, id_cap),
                   "ood_test": (ood_train + ood_val + ood["test"], ood_cap)}
        drawn = {split: cap_per_class(*sources[split]) for split in DRAW_ORDERS[order]}
        DatasetBase.__init__(self, train_x=train_x, val=drawn["val"], test=drawn["test"], ood_test=drawn["ood_test"])
        # ID label space from the full ID lists (a few-shot train_x could miss a class).
        self.set_label_space(list(train) + list(test))
        self._notes = {"num_shots": k, "ood_trainval": "full" if k < 1 else f"{k}-shot/{min(k, 4)}-shot",
                       "id_val": "train cut to K per class" if k >= 1 and self.val_from_cut_train else "train",
                       "draw_order": order}

    def read_ood(self, cfg: Any) -> dict[str, list[Datum]]:
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.ood_root = os.path.join(root, self.ood_folder)
        self.ood_image_dir = os.path.join(self.ood_root, self.ood_image_subdir)
        self.ood_split_path = os.path.join(self.ood_root, self.ood_split_file)
        if not os.path.isdir(self.ood_root):
            raise DataError(f"{type(self).__name__}: open-set folder not found: {self.ood_root} (expected "
                            f"<root>/{self.ood_folder}/{self.ood_image_subdir}/<class>/* and "
                            f"<root>/{self.ood_folder}/{self.ood_split_file})")
        return read_coop_lists(self.ood_image_dir, self.ood_split_path, exclude=self.ood_exclude,
                               domain=-1, domainname=self.ood_folder)

    # ---------------------------------------------------------------- K >= 1: the official few-shot steps
    def read_fewshot_cache(self, cfg: Any, k: int) -> Optional[tuple[list[Datum], list[Datum]]]:
        """The open-set few-shot cache as open-set items (domain -1), or ``None`` (K < 1 or no file yet)."""
        self.fewshot_cache = cache_path(self.ood_root, k, cfg.SEED) if k >= 1 else ""
        self.fewshot_cache_state = "drawn"
        if k < 1 or not os.path.isfile(self.fewshot_cache):
            return None
        print(f"Loading the few-shot cache {self.fewshot_cache}")
        lists = read_cache(self.fewshot_cache, self.ood_image_dir)
        self.fewshot_cache_state = "loaded"
        foreign = sorted({d.classname for items in lists for d in items} & set(self.ood_exclude))
        if foreign:
            self.warn(f"the few-shot cache {self.fewshot_cache} holds class(es) this dataset excludes "
                      f"({', '.join(foreign)}): kept, as in the official code (another dataset class wrote the "
                      f"cache); delete it to draw again")
        return tuple([self.as_open_set(d) for d in items] for items in lists)  # type: ignore[return-value]

    def as_open_set(self, d: Datum) -> Datum:
        return Datum(impath=d.impath, label=d.label, domain=-1, classname=d.classname, domainname=self.ood_folder)

    def official_val_cut(self, json_val: list[Datum], k: int, sampler: str) -> None:
        """The official classes cut the json val list to K per class and never use it: drawn for the random state."""
        if self.plain_val_cut:
            self.generate_fewshot_dataset(json_val, num_shots=k)
        else:
            self.sample_train(json_val, k, sampler)

    def fewshot_open_set(self, ood_train: list[Datum], ood_val: list[Datum], k: int,
                         cached: Optional[tuple[list[Datum], list[Datum]]],
                         keep_state: bool = False) -> tuple[list[Datum], list[Datum]]:
        """K >= 1: the cached lists, else CoOp's draw (K per class of train, min(K, 4) of val) written to the
        cache; ``keep_state`` (``id_first``): the random state before the draw is restored afterwards."""
        if k < 1:
            return list(ood_train), list(ood_val)
        if cached is not None:
            return cached
        state = random.getstate()
        try:
            train = self.generate_fewshot_dataset(ood_train, num_shots=k)
            val = self.generate_fewshot_dataset(ood_val, num_shots=min(k, 4))
        finally:
            if keep_state:
                random.setstate(state)
        upstream = [[Datum(impath=d.impath, label=d.label, classname=d.classname) for d in x] for x in (train, val)]
        if write_cache(self.fewshot_cache, *upstream):
            self.fewshot_cache_state = "written"
        return list(train), list(val)

    # ---------------------------------------------------------------- record
    def warn(self, message: str) -> None:
        print(f"WARNING: {type(self).__name__}: {message}")
        self._data_report = getattr(self, "_data_report", {})
        self._data_report.setdefault("warnings", []).append(message)

    def protocol_notes(self) -> dict[str, Any]:
        """The run record's ``protocol.dataset``: K, what the open-set train/val are, where ``val`` comes from,
        the order of the caps (``DATASET.OPENSET_DRAW_ORDER``)."""
        return {"open_set": dict(getattr(self, "_notes", {}))}

    def data_report(self) -> dict[str, Any]:
        """The ID domain report plus the open-set image count and the few-shot cache (K >= 1: ``path`` and
        ``state``, ``loaded`` / ``written`` / ``drawn`` when it could not be written; K < 1: empty)."""
        cache = {"path": self.fewshot_cache, "state": self.fewshot_cache_state} if self.fewshot_cache else {}
        return {**super().data_report(), "open_set": {"folder": self.ood_folder, "ood_test": len(self.ood_test),
                                                      "fewshot_cache": cache}}


# ------------------------------------------------------------------------------------------------ PACS
@DATASET_REGISTRY.register()
class PACS_DTD(LODOOpenSet):
    """With K >= 1 its ``val`` comes from the json train list cut to K per class (official ``PACS_DTD`` only)."""

    id_dataset = PACS
    ood_folder, ood_image_subdir, ood_split_file = DTD_SOURCE
    val_from_cut_train = True
    plain_val_cut = True


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
    plain_val_cut = True


@DATASET_REGISTRY.register()
class VLCS_Food101(LODOOpenSet):
    id_dataset = VLCS
    ood_folder, ood_image_subdir, ood_split_file = FOOD101_SOURCE
    plain_val_cut = True


@DATASET_REGISTRY.register()
class VLCS_Caltech101(LODOOpenSet):
    id_dataset = VLCS
    ood_folder, ood_image_subdir, ood_split_file = CALTECH101_SOURCE
    plain_val_cut = True
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
