from .inference import InferenceOutput
from .build import TRAINER_REGISTRY, build_trainer
from .records import RunRecord
from .trainer import SimpleTrainer, TrainerBase, TrainerX

__all__ = ["InferenceOutput", "TRAINER_REGISTRY", "build_trainer", "RunRecord", "SimpleTrainer", "TrainerBase",
           "TrainerX"]
