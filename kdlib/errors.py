"""Exceptions with messages meant for the thesis author: what is wrong and how to fix it."""


class KdlibError(Exception):
    """Base class: the command line prints these without a traceback."""


class ConfigError(KdlibError, ValueError):
    """A setting is unknown, has a bad value, or contradicts another setting."""


class DataError(KdlibError, ValueError):
    """Input files or tables are missing, malformed, or inconsistent."""


class RunError(KdlibError, RuntimeError):
    """A training run cannot start, resume or finish as asked."""
