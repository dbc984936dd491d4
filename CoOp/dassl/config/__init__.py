from .coop import COMPAT_KEYS, add_coop_config
from .defaults import _C as cfg_default
from .defaults import get_cfg_default, clean_cfg, cfg_to_dict

__all__ = ["cfg_default", "get_cfg_default", "clean_cfg", "cfg_to_dict", "COMPAT_KEYS", "add_coop_config"]
