"""The studio error hierarchy: every error names the input, shows its value and says the fix."""

from __future__ import annotations


class StudioError(Exception):
    """Base of every error studio raises on purpose."""


class BackboneNotFoundError(StudioError, FileNotFoundError):
    """A backbone source that is neither a local path, a cached/reachable hub id nor an embedded name."""


class NotACheckpointError(StudioError, ValueError):
    """A file that studio cannot read as a backbone checkpoint."""


class UnsafeFileError(StudioError, ValueError):
    """A pickle-based weight file (.ckpt/.bin/.pt/.pth) that studio refuses to unpickle."""


class UnknownFamilyError(StudioError, ValueError):
    """A family name studio does not know, or one it cannot detect from a source."""


class UnknownSchedulerError(StudioError, ValueError):
    """A scheduler name that is not registered, or not usable with the backbone's family."""


class InvalidSizeError(StudioError, ValueError):
    """A width/height the backbone cannot generate."""


class InvalidArgumentError(StudioError, ValueError):
    """Any other argument outside its allowed range."""


class RecipeError(StudioError, ValueError):
    """A PNG without a studio recipe, or a recipe that cannot be replayed."""


class MissingExtraError(StudioError, ImportError):
    """An optional feature whose package is not installed; the message names the extra to install."""
