from .base_dataset import Datum, DatasetBase
from .build import DATASET_REGISTRY, build_dataset
from .splits import read_split, save_split, subsample_classes

__all__ = ["Datum", "DatasetBase", "DATASET_REGISTRY", "build_dataset", "read_split", "save_split",
           "subsample_classes"]
