"""fxeq: scale equalization for multi-level feature fusion, as a graph pass.

Segmentation decoders upsample branch features, concatenate them and fuse
them with a conv. Bilinear upsampling shrinks variance, so the branches reach
the conv on different scales. fxeq standardizes each concatenation input with
its calibration mean and std (Kim & Kim, TMLR 2024) and folds that into the
fusing conv's weights: the deployed graph is the original one.

The package layout is the pipeline: :mod:`fxeq.capturing` → :mod:`fxeq.sites`
(find) → :mod:`fxeq.observe` (with :mod:`fxeq.batches`) → :mod:`fxeq.calibration`
→ :mod:`fxeq.rewrite` (with :mod:`fxeq.fold`, the arithmetic, and
:mod:`fxeq.modes`, the training semantics: init / reparam / explicit), and
:mod:`fxeq.report` describing the outcome (:mod:`fxeq.plot` draws it).
:mod:`fxeq.pipeline` runs it all, :mod:`fxeq.replay` applies a saved report
again, :mod:`fxeq.integrations` equalizes inside training frameworks and
:mod:`fxeq.cli` is the command line. Helpers every stage uses sit in leaf
modules: ``_model`` (model state and inputs) and :mod:`fxeq.files` (atomic writes).

Example:
    >>> import torch, torch.nn.functional as F, fxeq
    >>> class Fuse(torch.nn.Module):  # two branches, one upsampled, fused by a conv
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 1)
    ...         self.fuse = torch.nn.Conv2d(8, 2, 3, padding=1)
    ...     def forward(self, x):
    ...         return self.fuse(torch.cat([self.a(x), F.interpolate(self.b(F.avg_pool2d(x, 4)), scale_factor=4.0)], 1))
    >>> deployed = fxeq.transform(Fuse(), [torch.randn(2, 3, 16, 16)])
    >>> len(deployed.fxeq_report.search.sites)
    1
"""

from ._version import __version__
from .capturing import FxEqGraphModule, capture
from .errors import AlreadyEqualizedError, CalibrationError, CaptureError, FxEqError, NoSiteWarning
from .modes import finalize, load_plain_state_dict, plain_state_dict
from .pipeline import Prepared, calibrate, convert, find, prepare, transform
from .replay import apply
from .report import Report
from .sites import find_sites

__all__ = [
    "AlreadyEqualizedError",
    "CalibrationError",
    "CaptureError",
    "FxEqError",
    "FxEqGraphModule",
    "NoSiteWarning",
    "Prepared",
    "Report",
    "apply",
    "calibrate",
    "capture",
    "convert",
    "find",
    "finalize",
    "find_sites",
    "load_plain_state_dict",
    "plain_state_dict",
    "prepare",
    "transform",
    "__version__",
]
