"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class OptimizerError(Exception):
    """Base class for errors caused by the user's input or configuration."""


class LoadError(OptimizerError):
    """The model could not be loaded (missing, corrupt, unsafe or unsupported)."""


class ConfigError(OptimizerError):
    """A target, recipe, pass config or CLI option is invalid."""


class ExportError(OptimizerError):
    """Lowering to a backend failed or produced a graph we refuse to ship."""
