"""The one user-error family. The CLI turns these into a one-line message and exit code 1."""


class LoramigrateError(Exception):
    """A problem the user can fix: bad input, missing files, incompatible models."""


class ConfigError(LoramigrateError):
    """An option or recipe value is invalid."""


class ArtifactError(LoramigrateError):
    """A stage directory or input file is missing, incomplete, corrupt or from another run."""


class IncompatibleModelsError(LoramigrateError):
    """The two models (or a model and an adapter) cannot be mapped onto each other."""


class UnsupportedArchitectureError(LoramigrateError):
    """The model's config or module names do not reveal where the projections live."""
