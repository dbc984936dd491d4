"""``Datum`` / ``DatasetBase`` and the few-shot samplers (Dassl API, plus the official PACS sampler)."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Iterable, Optional


class Datum:
    """One sample: image path, integer label, domain index, class name, domain name (and the official
    ``alldomain``, unused here).

    Pickles in the official CRoFT layout: the instance dict ``_impath``, ``_label``, ``_domain``, ``_classname``,
    ``_domainname``, ``_alldomain``, always all six (the official DataManager reads ``domainname`` of every
    item). Upstream Dassl's ``Datum`` (the first four) reads such pickles, and pickles of either load here (a
    missing ``_domainname`` is ``""``), so few-shot split caches are shared both ways.
    """

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = "",
                 domainname: str = "", alldomain: Optional[list[str]] = None) -> None:
        self._impath = impath
        self._label = int(label)
        self._domain = int(domain)
        self._classname = classname
        self._domainname = domainname
        self._alldomain = alldomain

    impath = property(lambda self: self._impath)
    label = property(lambda self: self._label)
    domain = property(lambda self: self._domain)
    classname = property(lambda self: self._classname)
    domainname = property(lambda self: self._domainname)
    alldomain = property(lambda self: self._alldomain)

    def __repr__(self) -> str:
        return f"Datum({self._impath!r}, label={self._label}, domain={self._domain}, classname={self._classname!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Datum) and (self._impath, self._label, self._domain) == (
            other._impath, other._label, other._domain)

    def __hash__(self) -> int:
        return hash((self._impath, self._label, self._domain))

    def __getstate__(self) -> dict[str, Any]:
        return {"_impath": self._impath, "_label": self._label, "_domain": self._domain,
                "_classname": self._classname, "_domainname": self._domainname, "_alldomain": self._alldomain}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = state[1]  # (dict, slots) pickles of slotted classes
        if isinstance(state, dict):
            self.__init__(state.get("_impath", ""), state.get("_label", 0), state.get("_domain", 0),
                          state.get("_classname", ""), state.get("_domainname", ""), state.get("_alldomain"))
        else:  # this project's earlier tuple layout
            self.__init__(*state)


class DatasetBase:
    """Container of the splits ``train_x``, ``train_u``, ``val``, ``test`` and ``ood_test`` (open-set OOD).

    Subclasses fill the lists with :class:`Datum` objects and call ``super().__init__``.
    """

    dataset_dir = ""
    domains: list[str] = []

    def __init__(self, train_x: Optional[list[Datum]] = None, train_u: Optional[list[Datum]] = None,
                 val: Optional[list[Datum]] = None, test: Optional[list[Datum]] = None,
                 ood_test: Optional[list[Datum]] = None) -> None:
        self._train_x = train_x or []
        self._train_u = train_u
        self._val = val or []
        self._test = test or []
        self._ood_test = ood_test or []
        labelled = self._train_x or self._test
        self._num_classes = self.get_num_classes(labelled)
        self._lab2cname, self._classnames = self.get_lab2cname(labelled)

    train_x = property(lambda self: self._train_x)
    train_u = property(lambda self: self._train_u)
    val = property(lambda self: self._val)
    test = property(lambda self: self._test)
    ood_test = property(lambda self: self._ood_test)
    lab2cname = property(lambda self: self._lab2cname)
    classnames = property(lambda self: self._classnames)
    num_classes = property(lambda self: self._num_classes)

    @property
    def classnames_o(self) -> list[str]:
        """Alias used by the official CRoFT trainers (class names sorted by label)."""
        return self._classnames

    @staticmethod
    def get_num_classes(data_source: Iterable[Datum]) -> int:
        labels = {item.label for item in data_source if item.label >= 0}
        return max(labels) + 1 if labels else 0

    @staticmethod
    def get_lab2cname(data_source: Iterable[Datum]) -> tuple[dict[int, str], list[str]]:
        mapping = {item.label: item.classname for item in data_source if item.label >= 0}
        labels = sorted(mapping)
        return {lab: mapping[lab] for lab in labels}, [mapping[lab] for lab in labels]

    @staticmethod
    def split_dataset_by_label(data_source: Iterable[Datum]) -> dict[int, list[Datum]]:
        output: dict[int, list[Datum]] = defaultdict(list)
        for item in data_source:
            output[item.label].append(item)
        return output

    @staticmethod
    def split_dataset_by_domain(data_source: Iterable[Datum]) -> dict[int, list[Datum]]:
        output: dict[int, list[Datum]] = defaultdict(list)
        for item in data_source:
            output[item.domain].append(item)
        return output

    def generate_fewshot_dataset(self, *data_sources: list[Datum], num_shots: int = -1,
                                 repeat: bool = False) -> Any:
        """K images per label drawn with python's global ``random`` (all of them if a label has fewer).

        Returns one list per source (a single list when one source is given), as Dassl does.
        """
        if num_shots < 1:
            return data_sources[0] if len(data_sources) == 1 else data_sources
        print(f"Creating a {num_shots}-shot dataset")
        output = []
        for data_source in data_sources:
            dataset: list[Datum] = []
            for _, items in self.split_dataset_by_label(data_source).items():
                if len(items) >= num_shots:
                    dataset.extend(random.sample(items, num_shots))
                elif repeat:
                    dataset.extend(random.choices(items, k=num_shots))
                else:
                    dataset.extend(items)
            output.append(dataset)
        return output[0] if len(output) == 1 else output

    def generate_fewshot_dataset_balance(self, *data_sources: list[Datum], num_shots: int = -1,
                                         repeat: bool = False) -> Any:
        """The official PACS "balanced" sampler, reproduced with its bug (spec 7.3).

        For every label with at least ``num_shots`` items it splits the *whole* source by domain and draws
        ``num_shots // #domains`` items from each domain regardless of class, so the result is class-agnostic
        (~proportional to class frequencies) and may contain duplicates. A domain with fewer items than that
        share is taken whole without a draw, a label with fewer than ``num_shots`` items likewise (``repeat``:
        ``random.choices`` instead, as officially). Use :meth:`generate_fewshot_per_class_domain` for the fix.
        """
        if num_shots < 1:
            return data_sources[0] if len(data_sources) == 1 else data_sources
        output = []
        for data_source in data_sources:
            dataset: list[Datum] = []
            by_domain = self.split_dataset_by_domain(data_source)
            per_domain = num_shots // max(len(by_domain), 1)
            for _, items in self.split_dataset_by_label(data_source).items():
                if len(items) < num_shots:
                    dataset.extend(random.choices(items, k=num_shots) if repeat else items)
                    continue
                for _, dom_items in by_domain.items():
                    if len(dom_items) >= per_domain:
                        dataset.extend(random.sample(dom_items, per_domain))
                    else:
                        dataset.extend(random.choices(dom_items, k=per_domain) if repeat else dom_items)
            output.append(dataset)
        return output[0] if len(output) == 1 else output

    def generate_fewshot_per_class_domain(self, *data_sources: list[Datum], num_shots: int = -1) -> Any:
        """Correct balanced sampler: per class, ``num_shots`` split as evenly as possible over its domains."""
        if num_shots < 1:
            return data_sources[0] if len(data_sources) == 1 else data_sources
        output = []
        for data_source in data_sources:
            dataset: list[Datum] = []
            for _, items in sorted(self.split_dataset_by_label(data_source).items()):
                by_domain = sorted(self.split_dataset_by_domain(items).items())
                base = num_shots // len(by_domain)
                extra = num_shots - base * len(by_domain)
                for j, (_, dom_items) in enumerate(by_domain):
                    k = base + (1 if j < extra else 0)
                    dataset.extend(random.sample(dom_items, min(k, len(dom_items))))
            output.append(dataset)
        return output[0] if len(output) == 1 else output


def subsample_per_class(items: list[Datum], cap: int) -> list[Datum]:
    """At most ``cap`` (>= 1) items per label, as the official caps ``generate_fewshot_dataset(items,
    num_shots=cap)``: labels in order of first appearance, ``random.sample(group, cap)`` (python's global
    ``random``) for every label with at least ``cap`` items, so exactly ``cap`` items are reordered and consume
    random state too; smaller groups are kept as they are."""
    out: list[Datum] = []
    for _, group in DatasetBase.split_dataset_by_label(items).items():
        out.extend(random.sample(group, cap) if len(group) >= cap else group)
    return out
