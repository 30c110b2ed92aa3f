"""User-facing errors: each message says what to do. The CLI prints them without a traceback."""


class MvtError(Exception):
    """Base class for errors caused by input (bad option, missing file, unsupported checkpoint)."""


class CheckpointError(MvtError):
    pass


class UnsupportedModelError(CheckpointError):
    pass


class OptionError(MvtError):
    pass


class OutputExistsError(MvtError):
    pass


class MissingDependencyError(MvtError):
    pass


class MemoryBudgetError(MvtError):
    """A run whose estimated peak memory exceeds what this machine has available (export.graph.footprint)."""


class EngineUnavailableError(MvtError):
    """An engine (model.plan) that cannot run here: none built, another runtime, no GPU, another GPU."""


class ShapeOutsideProfilesError(MvtError):
    """An input shape that none of an engine's optimization profiles holds."""


def require(module: str, extra: str):
    """Import an optional dependency, or fail with the one line that says which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed; install the extra: pip install 'mvt-deploy[{extra}]' ({exc})"
        ) from None
