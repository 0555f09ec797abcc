"""fxeq: scale equalization for multi-level feature fusion, as a graph pass.

Segmentation decoders upsample branch features, concatenate them and fuse
them with a conv. Bilinear upsampling shrinks variance, so the branches reach
the conv on different scales. fxeq standardizes each concatenation input with
its calibration mean and std (Kim & Kim, TMLR 2024) and folds that into the
fusing conv's weights: the deployed graph is the original one.

The package layout is the pipeline: :mod:`fxeq.capturing` → :mod:`fxeq.sites`
(find) → :mod:`fxeq.observe` → :mod:`fxeq.calibration` → :mod:`fxeq.rewrite`,
with :mod:`fxeq.modes` for the training semantics (init / reparam /
explicit), :mod:`fxeq.report` describing the outcome, :mod:`fxeq.pipeline`
running it all, and :mod:`fxeq.replay` applying a saved report again.

Example:
    >>> import torch, torchvision, fxeq
    >>> net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
    ...     weights=None, weights_backbone=None)
    >>> deployed = fxeq.transform(net, [torch.randn(2, 3, 64, 64)])
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
