from .lr_scheduler import AVAI_SCHEDS, WarmupLR, build_lr_scheduler
from .optimizer import AVAI_OPTIMS, build_optimizer

__all__ = ["AVAI_SCHEDS", "WarmupLR", "build_lr_scheduler", "AVAI_OPTIMS", "build_optimizer"]
