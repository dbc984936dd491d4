from .evaluator import EVALUATOR_REGISTRY, Classification, EvaluatorBase, build_evaluator
from . import openood_scores  # noqa: F401  (registers OpenOOD's post-hoc scores with the score registry)

__all__ = ["EVALUATOR_REGISTRY", "Classification", "EvaluatorBase", "build_evaluator"]
