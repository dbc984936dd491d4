"""Frozen-encoder feature cache: every image is encoded once per augmented view and reused by every run.

All trainers of this project keep CLIP's image encoder frozen, so a run only needs image *features*. With
``FEATURE_CACHE.ENABLED True`` the trainer's loaders are replaced by loaders over cached features:

* deterministic splits (val, test, and ood_test with the test transform) use one feature per image;
* training images (and ood_test under the official train transform) get ``FEATURE_CACHE.TRAIN_VIEWS``
  pre-computed augmented views; each time an image is drawn, one view is picked at random (torch RNG, so
  seeding and resume behave as usual). View ``v`` is always drawn with the same seeded augmentation, so all
  methods and seeds share the same views.

The stores live under ``FEATURE_CACHE.DIR/<key>/<kind>/`` (``kind`` = ``test`` or ``train_v<v>``) where the key
hashes the backbone, the weights file (path, size, mtime) and the INPUT config. A run that wants local image
features (``trainer.wants_local``: LoCoOp, or a local score such as ``gl_mcm``) also keeps each image's R x D local
features, flattened, in the store ``<kind>_local`` (``<kind>_local-tokens`` for ``MODEL.BACKBONE.LOCAL_FEATURES
tokens``) next to its global store, filled in the same encoder pass; its loaders then yield ``(1 + R) x D`` rows
(global first), which :meth:`SimpleTrainer.encode_images` / ``encode_images_local`` split. Other runs never
compute or read them. Each store is append-only and
sharded (:mod:`.feature_store`): shards are written atomically under a file lock and read through memory maps,
so parallel runs and ``torchrun`` ranks can share it. An old single-file store (``<kind>.pt``) is imported once. This is a
deliberate deviation from the official code (fresh augmentation every epoch): it is off by default.
"""
from __future__ import annotations

import contextlib
import fcntl

import hashlib
import json
import os
import zlib
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.data_manager import read_image
from ..data.datasets import Datum
from ..utils.errors import DataError
from ..utils.tools import progress_enabled
from .feature_store import FeatureStore

FLUSH_ROWS = 4096  # features encoded between two shard writes (a killed extraction keeps what it flushed)
FILL_LANES = 4     # lanes per store that concurrent fillers take in turn (one lock each)
ENCODE_BATCH = 64  # images per encoder batch when filling a store; the last one of a lane is padded (pad_batch)


def cache_key(cfg: Any, encoder_dtype: torch.dtype) -> str:
    weights = cfg.MODEL.BACKBONE.WEIGHTS
    stat = ""
    if weights and os.path.isfile(weights):
        st = os.stat(weights)
        stat = f"{os.path.abspath(weights)}:{st.st_size}:{int(st.st_mtime)}"
    desc = {"backbone": cfg.MODEL.BACKBONE.NAME, "weights": stat or weights, "size": list(cfg.INPUT.SIZE),
            "interp": cfg.INPUT.INTERPOLATION, "mean": list(cfg.INPUT.PIXEL_MEAN), "std": list(cfg.INPUT.PIXEL_STD),
            "tfms": list(cfg.INPUT.TRANSFORMS), "rrcrop": list(cfg.INPUT.RRCROP_SCALE), "dtype": str(encoder_dtype),
            "encode_batch": ENCODE_BATCH}
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def open_store(cache_dir: str, kind: str) -> FeatureStore:
    """The sharded store ``<cache_dir>/<kind>/``; an old single-file ``<kind>.pt`` store is imported once."""
    store = FeatureStore(os.path.join(cache_dir, kind))
    legacy = os.path.join(cache_dir, f"{kind}.pt")
    if len(store) == 0 and os.path.isfile(legacy):
        try:
            n = store.import_legacy(legacy)
        except ValueError as err:
            raise DataError(str(err)) from None
        print(f"Feature cache: imported {n} features of the old single-file store {legacy}")
    return store


@contextlib.contextmanager
def _fill_lock(folder: str, lane: int, blocking: bool) -> Iterator[bool]:
    """An exclusive ``fcntl`` lock on ``folder/.fill.lock[.<lane>]`` for the block; yields False (and holds
    nothing) when ``blocking`` is off and another process holds it."""
    os.makedirs(folder, exist_ok=True)
    name = ".fill.lock" if lane == 0 else f".fill.lock.{lane}"
    with open(os.path.join(folder, name), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fill_lane(path: str, root: str = "") -> int:
    """The fill lane of an image (``FILL_LANES`` lanes per store, each with its own lock), from its path relative
    to the data root: a tree that lies elsewhere is encoded in the same batches, so its features are bit-identical."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)) if root else path
    return zlib.crc32(rel.encode()) % FILL_LANES


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` padded to ``size`` rows with copies of the last one. Every cached feature is then computed in a
    batch of the same size (``ENCODE_BATCH``, part of the store's key): CPU kernels pick their algorithm (and so
    their rounding) by batch size, so a short last batch would give an image other bits depending on which run, or
    which fill lane, encoded it first. A small fixed batch keeps the padding cheap: a lane of a few-shot store holds
    about a hundred images."""
    short = size - len(images)
    return images if short <= 0 else torch.cat([images, images[-1:].expand(short, *images.shape[1:])])


def view_seed(view: int, path: str, root: str) -> int:
    """Seed of augmented view ``view`` of an image: from the view and the image path relative to the data root
    (``DATASET.ROOT``), so the same data tree gives the same views wherever it lies."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)) if root else path
    return int.from_bytes(hashlib.sha1(f"{view}:{rel}".encode()).digest()[:8], "little") % (2 ** 63)


class _SeededViews(Dataset):
    """Images under a transform; augmented view ``v`` of an image is drawn with a seed of (v, path relative to
    the data root), so it is the same whatever else is encoded with it, in which order, or on which rank."""

    def __init__(self, paths: list[str], transform: Any, view: Optional[int], root: str = "") -> None:
        self.paths = paths
        self.transform = transform
        self.view = view
        self.root = root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, str]:
        path = self.paths[idx]
        img = read_image(path)
        if self.view is None:
            return self.transform(img), path
        seed = view_seed(self.view, path, self.root)
        with torch.random.fork_rng(devices=[]):
            # the transforms draw from the CPU generator only; torch.manual_seed would also (lazily) seed every
            # accelerator, formatting a stack trace per call (~1 ms per image), and leave their streams changed
            torch.default_generator.manual_seed(seed)
            return self.transform(img), path


class FeatureDataset(Dataset):
    """Items like :class:`DatasetWrapper`'s, with ``img`` replaced by a cached feature (a random view)."""

    def __init__(self, data_source: list[Datum], views: list[FeatureStore]) -> None:
        self.data_source = data_source
        self.views = views

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = self.data_source[idx]
        v = int(torch.randint(len(self.views), (1,)).item()) if len(self.views) > 1 else 0
        return {"img": self.views[v].get(item.impath), "label": item.label, "domain": item.domain,
                "impath": item.impath, "index": idx}


class FeatureCache:
    """Pre-computes the features a trainer needs and swaps its loaders for feature loaders."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        cfg = trainer.cfg
        self.views = max(1, int(cfg.FEATURE_CACHE.TRAIN_VIEWS))
        base = cfg.FEATURE_CACHE.DIR or os.path.join(os.path.expanduser("~"), ".cache", "croft", "features")
        dtype = next(trainer.image_encoder.parameters()).dtype
        self.dir = os.path.join(base, cache_key(cfg, dtype))
        self.local_mode = cfg.MODEL.BACKBONE.LOCAL_FEATURES if getattr(trainer, "wants_local", False) else None

    def local_kind(self, kind: str) -> str:
        """The store kind of the local features that go with store ``kind``."""
        return f"{kind}_local" if self.local_mode == "value" else f"{kind}_local-{self.local_mode}"

    @torch.no_grad()
    def _fill(self, items: list[Datum], transform: Any, store: FeatureStore, view: Optional[int], desc: str,
              rank: int = 0, world_size: int = 1, local: Optional[FeatureStore] = None) -> None:
        """Encode the images of ``items`` missing from ``store`` (or from ``local``, its local-feature store)
        (this rank's share of them) and append them."""
        shard = sorted({d.impath for d in items})[rank::world_size]  # shard the full list: ranks never overlap
        if not any(_missing(p, store, local) for p in shard):
            return
        if world_size > 1:  # torchrun ranks fill disjoint shares and need no lock
            self._encode([p for p in shard if _missing(p, store, local)], transform, store, view, desc, local)
            return
        # runs of a sweep start together: the images of a store are split into lanes, one filler per lane at a
        # time; a filler first takes the lanes nobody holds, then waits for the others and reads their shards.
        # So two runs fill one store twice as fast and nothing is encoded twice. The kernel drops the locks of a
        # killed process.
        lanes: dict[int, list[str]] = {}
        for p in shard:
            lanes.setdefault(fill_lane(p, self.trainer.cfg.DATASET.ROOT), []).append(p)
        waiting = []
        for lane, paths in sorted(lanes.items()):
            if not self._fill_lane(lane, paths, transform, store, view, desc, blocking=False, local=local):
                waiting.append((lane, paths))
        for lane, paths in waiting:
            self._fill_lane(lane, paths, transform, store, view, desc, blocking=True, local=local)

    def _fill_lane(self, lane: int, paths: list[str], transform: Any, store: FeatureStore, view: Optional[int],
                   desc: str, blocking: bool, local: Optional[FeatureStore] = None) -> bool:
        """Encode the missing ``paths`` of one lane under its lock; False if the lock is held and not ``blocking``."""
        with _fill_lock(store.folder, lane, blocking) as held:
            if not held:
                return False
            for s in (store, local):
                if s is not None:
                    s.refresh()
            todo = [p for p in paths if _missing(p, store, local)]
            if todo:
                self._encode(todo, transform, store, view, desc, local)
            return True

    @torch.no_grad()
    def _encode(self, todo: list[str], transform: Any, store: FeatureStore, view: Optional[int], desc: str,
                local: Optional[FeatureStore] = None) -> None:
        """Encode ``todo`` and append the features to ``store`` (and the flattened local features to ``local``)
        in shards of ``FLUSH_ROWS``."""
        tr = self.trainer
        loader = DataLoader(_SeededViews(todo, transform, view, tr.cfg.DATASET.ROOT),
                            batch_size=ENCODE_BATCH, shuffle=False, num_workers=0)
        paths_new: list[str] = []
        feats_new: list[torch.Tensor] = []
        locals_new: list[torch.Tensor] = []
        dtype = next(tr.image_encoder.parameters()).dtype

        def flush() -> None:
            if local is not None:
                local.add(paths_new, torch.cat(locals_new))
            store.add(paths_new, torch.cat(feats_new))

        # iterating a DataLoader draws a base seed from the global RNG: keep the run's random stream untouched,
        # so a run that builds the cache and one that re-uses it train identically
        with torch.random.fork_rng(devices=[]):
            for images, paths in tqdm(loader, desc=desc, leave=False, disable=not progress_enabled(tr.cfg.VERBOSE)):
                n = len(images)
                x = pad_batch(images, loader.batch_size).to(tr.device, dtype=dtype)
                if local is None:
                    feats_new.append(tr.image_encoder(x)[:n].float().cpu())
                else:
                    glob, loc = tr.local_image_encoder(x)
                    feats_new.append(glob[:n].float().cpu())
                    locals_new.append(loc[:n].float().flatten(1).cpu())
                tr.encoder_images += len(images)
                paths_new.extend(paths)
                if len(paths_new) >= FLUSH_ROWS:
                    flush()
                    paths_new, feats_new, locals_new = [], [], []
        if paths_new:
            flush()

    def _views(self, items: list[Datum], n_aug: int, name: str, rank: int = 0,
               world_size: int = 1) -> list[Any]:
        """``n_aug`` augmented views (train transform), or the test-transform features when ``n_aug == 0``; with
        local features each view reads its global and local stores as one (:class:`_WithLocal`)."""
        dm = self.trainer.dm
        augmented = n_aug > 0
        out: list[Any] = []
        for v in range(n_aug if augmented else 1):
            kind = f"train_v{v}" if augmented else "test"
            store = open_store(self.dir, kind)
            local = open_store(self.dir, self.local_kind(kind)) if self.local_mode else None
            self._fill(items, dm.tfm_train if augmented else dm.tfm_test, store, v if augmented else None,
                       f"cache {name} {kind}", rank, world_size, local)
            out.append(store if local is None else _WithLocal(store, local))
        return out

    def extract(self, rank: int = 0, world_size: int = 1) -> dict[str, int]:
        """Fill the stores for every split of the dataset (this rank's share), as ``install`` would need them.

        Used by ``tools/extract_features.py`` under ``torchrun``: ranks encode disjoint parts of the images and
        append them as their own shards (no global rewrite); per-image seeded views make the result independent
        of the number of ranks.
        """
        ds = self.trainer.dm.dataset
        aug_ood = self.trainer.cfg.DATALOADER.OOD_TEST.TRANSFORM == "train"
        plan = [("train_x", ds.train_x, self.views), ("val", ds.val, 0), ("test", ds.test, 0),
                ("ood_test", ds.ood_test, 1 if aug_ood else 0)]
        counts = {}
        for name, items, n_aug in plan:
            if items:
                self._views(items, n_aug, name, rank, world_size)
                counts[name] = len(items)
        return counts

    def install(self) -> None:
        """Build feature loaders for every split; afterwards ``encode_images`` passes features through."""
        tr = self.trainer
        cfg = tr.cfg
        ds = tr.dm.dataset
        os.makedirs(self.dir, exist_ok=True)
        print(f"Feature cache: {self.dir} ({self.views} training views"
              f"{f'; local features: {self.local_mode}' if self.local_mode else ''})")
        bs_train, bs_test = cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.DATALOADER.TEST.BATCH_SIZE
        if ds.train_x:
            tr.train_loader_x = _LazyLoader(lambda: DataLoader(
                FeatureDataset(ds.train_x, self._views(ds.train_x, self.views, "train_x")), batch_size=bs_train,
                shuffle=True, drop_last=len(ds.train_x) >= bs_train), len(ds.train_x), bs_train, True)
        for split in ("val", "test"):
            items = getattr(ds, split)
            if items:
                setattr(tr, f"{split}_loader", _LazyLoader(lambda it=items, sp=split: DataLoader(
                    FeatureDataset(it, self._views(it, 0, sp)), batch_size=bs_test, shuffle=False),
                    len(items), bs_test, False))
        if ds.ood_test:
            tr.ood_test_loader = self.ood_loader(ds.ood_test)
        tr.feature_cache_stats = {"hits": 0, "fallbacks": 0}
        tr.feature_provider = _pass_features(tr.device, tr.feature_cache_stats)
        tr.feature_cache = self

    def ood_loader(self, items: list[Datum]) -> "_LazyLoader":
        """A feature loader over open-set images (one fixed view under the train transform: repeatable eval)."""
        n_aug = 1 if self.trainer.cfg.DATALOADER.OOD_TEST.TRANSFORM == "train" else 0
        bs = self.trainer.cfg.DATALOADER.TEST.BATCH_SIZE
        return _LazyLoader(lambda: DataLoader(FeatureDataset(items, self._views(items, n_aug, "ood_test")),
                                              batch_size=bs, shuffle=False), len(items), bs, False)

    def eval_loader(self, items: list[Datum], name: str) -> "_LazyLoader":
        """A feature loader over ``items`` under the test transform, in order (e.g. the training split for the
        statistics of fitted OOD scores); ``name`` labels the progress bar."""
        bs = self.trainer.cfg.DATALOADER.TEST.BATCH_SIZE
        return _LazyLoader(lambda: DataLoader(FeatureDataset(items, self._views(items, 0, name)), batch_size=bs,
                                              shuffle=False), len(items), bs, False)


def _missing(path: str, store: FeatureStore, local: Optional[FeatureStore]) -> bool:
    return path not in store or (local is not None and path not in local)


class _WithLocal:
    """A view's global store and its local store read as one: ``get(path)`` is the ``(1 + R, D)`` rows."""

    def __init__(self, store: FeatureStore, local: FeatureStore) -> None:
        self.store = store
        self.local = local

    def get(self, path: str) -> torch.Tensor:
        glob = self.store.get(path)
        return torch.cat([glob.unsqueeze(0), self.local.get(path).view(-1, glob.shape[0])])


class _LazyLoader:
    """A loader built on first use, so features of splits a run never touches are never computed."""

    def __init__(self, factory: Any, n: int, batch_size: int, drop_last: bool) -> None:
        self._factory = factory
        self._loader: Optional[DataLoader] = None
        self._len = n // batch_size if (drop_last and n >= batch_size) else -(-n // batch_size)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Any:
        if self._loader is None:
            self._loader = self._factory()
        return iter(self._loader)


def _pass_features(device: torch.device, stats: dict[str, int]) -> Any:
    """Batches of the feature loaders (N x D, or N x (1 + R) x D with local features) pass through
    (``stats["hits"]`` counts them); image batches (e.g. Tip-Adapter's own cache loader) fall back to the encoder
    (``stats["fallbacks"]``)."""

    def provider(images: torch.Tensor, batch: Optional[dict]) -> Optional[torch.Tensor]:
        hit = images.dim() in (2, 3)
        stats["hits" if hit else "fallbacks"] += 1
        return images.to(device).float() if hit else None

    return provider
