"""User-facing errors: ``train.py`` prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file); reported as a single line."""


class ConfigError(UserError):
    """Unknown config key, unknown registry name or an invalid value."""


class DataError(UserError):
    """Missing dataset root, split file or unreadable image."""


class WeightsError(UserError):
    """Missing or unusable CLIP weights file."""
