"""The exceptions fxeq raises on purpose.

Bad arguments raise the built-in ``ValueError`` or ``TypeError``. Everything
that goes wrong with a graph, a calibration run or a rewrite raises a subclass
of :class:`FxEqError`, whose message names the node or site, says what was
expected and what was found, and suggests the fix.
"""

from __future__ import annotations

__all__ = ["AlreadyEqualizedError", "CalibrationError", "CaptureError", "FxEqError", "NoSiteWarning"]


class FxEqError(RuntimeError):
    """Base class of fxeq's errors about graphs, calibration and rewrites."""


class CaptureError(FxEqError):
    """Neither torch.fx nor torch.export could capture the model."""


class CalibrationError(FxEqError):
    """Calibration produced no usable statistics, or a batch failed to run."""


class AlreadyEqualizedError(FxEqError):
    """A fusing conv was already rescaled by fxeq; rescaling again would compound."""


class NoSiteWarning(UserWarning):
    """The model has no fusion site; it is returned unchanged."""
