from .data_manager import DataManager, DatasetWrapper, build_data_loader
from .datasets import DATASET_REGISTRY, Datum, DatasetBase, build_dataset

__all__ = ["DataManager", "DatasetWrapper", "build_data_loader", "DATASET_REGISTRY", "Datum", "DatasetBase",
           "build_dataset"]
