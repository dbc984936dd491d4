"""A lean, from-scratch engine with the Dassl.pytorch API that CoOp-family trainers expect.

Sub-packages: ``config`` (yacs defaults), ``utils`` (registry, logger, I/O helpers), ``data`` (datasets,
samplers, transforms, :class:`DataManager`), ``optim`` (optimiser / LR-scheduler builders), ``engine``
(trainer base classes and ``TRAINER_REGISTRY``), ``evaluation`` (closed-set evaluator and the OOD module).
"""

__version__ = "0.1.0"
