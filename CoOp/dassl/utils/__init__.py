from .errors import ConfigError, DataError, UserError, WeightsError
from .logger import Logger, setup_logger
from .registry import Registry
from .tools import (atomic_write_bytes, atomic_write_json, atomic_write_text, check_isfile, collect_env_info,
                    listdir_nohidden, mkdir_if_missing, read_json, resolve_device, set_random_seed, sha256_file,
                    write_json)
from .torchtools import (count_num_param, load_checkpoint, load_pretrained_weights, resume_from_checkpoint,
                         save_checkpoint)

__all__ = [
    "ConfigError", "DataError", "UserError", "WeightsError", "Logger", "setup_logger", "Registry",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_isfile", "collect_env_info",
    "listdir_nohidden", "mkdir_if_missing", "read_json", "resolve_device", "set_random_seed", "sha256_file",
    "write_json",
    "count_num_param", "load_checkpoint", "load_pretrained_weights", "resume_from_checkpoint", "save_checkpoint",
]
