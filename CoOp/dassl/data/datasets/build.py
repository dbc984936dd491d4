from __future__ import annotations

from typing import Any

from ...utils.registry import Registry

DATASET_REGISTRY = Registry("DATASET")


def build_dataset(cfg: Any) -> Any:
    """Instantiate the dataset class registered as ``cfg.DATASET.NAME``."""
    if not cfg.DATASET.NAME:
        from ...utils.errors import ConfigError

        raise ConfigError("DATASET.NAME is empty: pass --dataset-config-file or DATASET.NAME <name>")
    cls = DATASET_REGISTRY.get(cfg.DATASET.NAME)
    if cfg.VERBOSE:
        print(f"Loading dataset: {cfg.DATASET.NAME}")
    from .checks import check_dataset

    dataset = cls(cfg)
    check_dataset(dataset)
    return dataset
