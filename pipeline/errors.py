"""Errors a user can act on: every message says what is wrong and how to fix it."""


class MoeDistillError(Exception):
    """Base class; the CLI prints these without a traceback."""


class ConfigError(MoeDistillError):
    """A config file is malformed, has unknown keys, wrong types or points at missing files."""


class DataError(MoeDistillError):
    """Input records are malformed or a data source cannot be read."""


class ModelError(MoeDistillError):
    """A model is unsupported, or teacher and student do not fit together."""


class CacheError(MoeDistillError):
    """A teacher cache is missing, incomplete, corrupted or does not fit the student."""
