"""Metrics with Dassl's API (``from dassl.metrics import compute_accuracy``)."""
from .accuracy import compute_accuracy

__all__ = ["compute_accuracy"]
