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
    """The model could not be captured as a graph.

    Attributes:
        stage: ``"run"`` when the model does not run on the example batch at
            all, ``"trace"`` when it runs but no frontend tried could capture
            it, ``"call"`` when a specialized graph is called at another size.
        failures: per frontend tried, what it said.
    """

    def __init__(self, message: str, *, stage: str = "trace", failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.failures = dict(failures or {})

    def __reduce__(self) -> tuple[object, ...]:  # keep the attributes through pickling (torch.distributed)
        return (_rebuild_capture_error, (str(self), self.stage, self.failures))


class CalibrationError(FxEqError):
    """Calibration produced no usable statistics, or a batch failed to run."""


class AlreadyEqualizedError(FxEqError):
    """A fusing conv was already rescaled by fxeq; rescaling again would compound."""


class NoSiteWarning(UserWarning):
    """The model has no fusion site; it is returned unchanged."""


def _rebuild_capture_error(message: str, stage: str, failures: dict[str, str]) -> CaptureError:
    return CaptureError(message, stage=stage, failures=failures)
