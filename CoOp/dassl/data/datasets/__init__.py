from .base_dataset import Datum, DatasetBase
from .build import DATASET_REGISTRY, build_dataset

__all__ = ["Datum", "DatasetBase", "DATASET_REGISTRY", "build_dataset"]
