from .build import TRAINER_REGISTRY, build_trainer
from .records import RunRecord
from .trainer import SimpleTrainer, TrainerBase, TrainerX

__all__ = ["TRAINER_REGISTRY", "build_trainer", "RunRecord", "SimpleTrainer", "TrainerBase", "TrainerX"]
