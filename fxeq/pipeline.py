"""The public pipeline: find → prepare → calibrate → convert.

:func:`transform` runs all of it::

    model ── capture ───── find_sites ──── calibration passes ────── rewrite ──── GraphModule
             (fx, export,   (a graph, for    (the eager model, hooks    (new weights,   (or, inplace=True,
              concrete)      analysis only)   at the fusing convs,       original        your model)
                                              one pass per generation)   graph)

The steps are public too, in the spirit of torch.ao's prepare/convert::

    prepared = fxeq.prepare(model, example_inputs)
    fxeq.calibrate(prepared, loader)
    deployed = fxeq.convert(prepared)

Each step checks its arguments and hands over to its stage:
:mod:`fxeq.capturing`, :mod:`fxeq.sites`, :mod:`fxeq.calibration` and
:mod:`fxeq.rewrite`.

Copy by default: the input model is untouched, and the deployable graph of a
copy is returned (fx, which takes any size, or export specialized to the first
batch's shape, unless ``dynamic`` says otherwise). With
``inplace=True`` the model's own parameters are rewritten and the model itself
is returned, so its class, methods and state_dict keys keep working in
training code, at any input size; no deployable graph is needed then, so a
model that neither fx nor export can capture is found on a concrete trace.
Either way the rewrite is transactional: nothing is written until every new
tensor has been computed and validated, and capture and calibration restore
every buffer and training flag they touch.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._model import Inputs, as_inputs, checked_model, input_signature, model_device_and_dtype
from ._text import plural
from .batches import CalibrationData, InputFn, batch_inputs, check_arguments
from .calibration import Calibration, calibrate_sites
from .capturing import FRONTENDS, Captured, Dynamic, FrontendChoice, FxEqGraphModule, capture
from .errors import AlreadyEqualizedError, CaptureError, FxEqError, NoSiteWarning
from .modes import Mode, check_mode
from .observe import InputStats
from .report import Report
from .rewrite import Rewritten, check_not_equalized, equalize
from .sites import SiteSearch, find_sites

__all__ = ["Prepared", "calibrate", "convert", "find", "prepare", "transform"]

Example = torch.Tensor | tuple[Any, ...] | dict[str, Any]


@dataclass
class Prepared:
    """A model captured and searched, waiting for calibration.

    Attributes:
        model: the model that is calibrated and rewritten (the user's own
            with ``inplace=True``, else a private copy).
        original: the model as passed (unwrapped).
        captured: the graph the sites were found in.
        search: sites and skipped concatenations.
        example: the shapes and dtypes of the batch the model was captured with.
        calibration: filled by :func:`calibrate`.
        rewritten: what :func:`convert` wrote, once it has run.
        converted: the mode :func:`convert` used, once it has run.
        keep_norm: whether :func:`convert` was asked to keep weight norms.
    """

    model: nn.Module
    original: nn.Module
    captured: Captured
    search: SiteSearch
    example: dict[str, Any] | None = None
    calibration: Calibration | None = None
    rewritten: Rewritten | None = None
    converted: Mode | None = None
    keep_norm: bool = False

    @property
    def inplace(self) -> bool:
        """Whether the user's own model is rewritten."""
        return self.model is self.original

    @property
    def stats(self) -> dict[tuple[str, int], InputStats]:
        """Per (site, input index), the measured statistics (empty before calibration)."""
        return self.calibration.stats if self.calibration else {}

    @property
    def report(self) -> Report:
        """The report as it stands."""
        rewritten = self.rewritten
        return Report(
            self.search, self.captured.frontend, dict(self.stats), folded=bool(rewritten and self.search.sites),
            mode=self.converted or "init", keep_norm=self.keep_norm,
            notes=dict(rewritten.notes) if rewritten else {}, writes=dict(rewritten.writes) if rewritten else {},
            norms_kept=rewritten.keep_norm if rewritten else frozenset(),
            calibration=self.calibration.summary if self.calibration else None, example=self.example,
        )


def find(
    model: nn.Module,
    example_inputs: Example,
    *,
    frontend: FrontendChoice = "auto",
    all_concats: bool = False,
    dynamic: Dynamic = False,
) -> Report:
    """Find the fusion sites of a model; nothing is changed.

    Args:
        model: the model.
        example_inputs: one batch: a Tensor, a tuple of positional inputs, or
            a dict of keyword arguments.
        frontend: ``"auto"``, ``"fx"``, ``"export"`` or ``"concrete"``.
            Default: ``"auto"`` (any graph will do: none is returned).
        all_concats: also count concatenations without an upsampled input.
            Default: False.
        dynamic: which sizes an export keeps symbolic (see :func:`prepare`);
            finding sites needs none. Default: False.

    Returns:
        An uncalibrated :class:`~fxeq.report.Report`.

    Example:
        >>> from fxeq._examples import Fuse  # x ── a ──┐;  x ── pool ── b ── interpolate ──┴─ cat ── fuse
        >>> [c.module for s in find(Fuse(), torch.randn(2, 3, 8, 8)).search.sites for c in s.convs]
        ['fuse']
    """
    model = checked_model(model)
    with torch.no_grad():
        captured = capture(model, as_inputs(example_inputs), frontend=frontend, dynamic=dynamic, deployable=False)
    search = find_sites(captured.module, all_concats=all_concats, model=model)
    return Report(search, captured.frontend, example=input_signature(as_inputs(example_inputs)))


def prepare(
    model: nn.Module,
    example_inputs: Example | Inputs,
    *,
    inplace: bool = False,
    frontend: FrontendChoice = "auto",
    all_concats: bool = False,
    dynamic: Dynamic = False,
) -> Prepared:
    """Capture the model and find its sites.

    Args:
        model: the model (DataParallel, DDP and torch.compile are unwrapped).
        example_inputs: one batch of inputs on the model's device: a Tensor,
            a tuple of positional inputs, or a dict of keyword arguments.
        inplace: rewrite ``model``'s own parameters on :func:`convert`, which
            then returns the model itself. Default: False (work on a deep copy
            and return its deployable graph).
        frontend: ``"auto"``, ``"fx"``, ``"export"`` or ``"concrete"`` (only
            with ``inplace=True``: its graph is not deployable). Default: ``"auto"``.
        all_concats: also equalize concatenations with no upsampled input
            (FCN ``concat_input`` heads, learned upsampling). Default: False.
        dynamic: which sizes an export keeps symbolic: ``False`` (none: the
            returned GraphModule takes inputs of the example's shape; the
            cheapest capture), ``"batch"`` (any batch size; can cost several
            times a static export) or ``True`` (any size; can cost minutes). See
            :func:`fxeq.capturing.capture`. Default: False.

    Raises:
        ValueError: the model has parameters on the meta device, or
            ``frontend="concrete"`` without ``inplace=True``.
        CaptureError: the model could not run or be captured.
        AlreadyEqualizedError: fxeq already equalized a conv of the model.
    """
    return _prepare(_checked_model(model), example_inputs, inplace=inplace, frontend=frontend,
                    all_concats=all_concats, dynamic=dynamic)


def _prepare(original: nn.Module, example_inputs: Example | Inputs, *, inplace: bool, frontend: FrontendChoice,
             all_concats: bool, dynamic: Dynamic) -> Prepared:
    """:func:`prepare` for a model :func:`_checked_model` already accepted."""
    if frontend == "concrete" and not inplace:
        raise ValueError(
            "frontend='concrete' records one eager forward, which finds the sites but is no graph to deploy; "
            "pass inplace=True to rewrite your model itself, or frontend='auto' for a deployable graph"
        )
    args, kwargs = as_inputs(example_inputs)
    try:
        target = original if inplace else copy.deepcopy(original)
    except Exception as e:
        raise FxEqError(
            f"could not copy {type(original).__name__} with copy.deepcopy ({type(e).__name__}: {e}); fxeq works "
            "on a copy unless inplace=True. Make the model deep-copyable, or pass inplace=True."
        ) from e
    with torch.no_grad():
        try:
            # With inplace=True no graph is returned, so an export may be fully static (the cheapest).
            captured = capture(target, (args, kwargs), frontend=frontend, dynamic=dynamic if not inplace else False,
                               deployable=not inplace)
        except CaptureError as e:
            if inplace or frontend != "auto" or e.stage != "trace":
                raise
            raise _no_deployable_graph(target, (args, kwargs), e, all_concats) from e
    search = find_sites(captured.module, all_concats=all_concats, model=target)
    return Prepared(target, original, captured, search, example=input_signature((args, kwargs)))


def calibrate(
    prepared: Prepared,
    calib_loader: Iterable[Any] | CalibrationData,
    *,
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    progress: bool | None = None,
    min_std: float = 1e-6,
    one_pass: bool = False,
) -> Prepared:
    """Measure every site input and compute the folded weights (not yet written).

    Runs the prepared model eagerly over the loader, one pass per generation
    of chained sites (see :mod:`fxeq.calibration`).

    Args:
        prepared: from :func:`prepare`.
        calib_loader: batches (a DataLoader, a list of tensors...); it must be
            re-iterable when the model has chained sites.
        num_batches: use at most this many batches per pass. Default: all.
        input_fn: maps a batch to the model's input; needed when a batch is
            not a Tensor, a tuple/list with the input first, or a dict of
            keyword arguments. It may return a Tensor, a tuple or a dict.
        progress: show a progress bar; None shows one when stderr is a
            terminal. Default: None.
        min_std: smallest std accepted for an input. Default: 1e-6.
        one_pass: measure chained sites in a single pass on the model as it
            is (faster, approximate downstream). Default: False.

    Returns:
        ``prepared``, with ``calibration`` filled in.

    Raises:
        AlreadyEqualizedError: ``prepared`` was already converted, or fxeq
            equalized its model since it was prepared (another ``Prepared`` of
            the same model, with ``inplace=True``).
        CalibrationError: empty loader, failing batch, unusable statistics.
    """
    _check_not_converted(prepared, "calibrating it again would measure the equalized model and equalize twice. "
                                   "Call fxeq.prepare on the original model instead.")
    data = calib_loader if isinstance(calib_loader, CalibrationData) else CalibrationData(calib_loader)
    prepared.calibration = calibrate_sites(
        prepared.model, prepared.search, data, num_batches=num_batches, input_fn=input_fn,
        progress=progress, min_std=min_std, one_pass=one_pass,
    )
    return prepared


def convert(prepared: Prepared, *, mode: Mode = "init", keep_norm: bool = False) -> nn.Module:
    """Put the measured equalizer into the model; return the deployable graph, or the model with ``inplace=True``.

    Args:
        prepared: calibrated by :func:`calibrate`.
        mode: ``"init"`` folds into the weights (the paper's initializer);
            ``"reparam"`` parametrizes each fusing conv's weight as
            ``W_raw * (1 / sigma)``; ``"explicit"`` inserts ``(x - mu) / sigma``
            before each fusing conv. See :mod:`fxeq.modes`. Default: ``"init"``.
        keep_norm: with ``"init"``, restore each fusing conv's per-output-channel
            weight norm after the fold. Applied only where a batch norm follows
            the conv; the report says where it was refused. Default: False.

    Returns:
        Without ``inplace``: the captured :class:`~fxeq.capturing.FxEqGraphModule`,
        in eval mode; in ``"init"`` mode its graph is exactly the captured one.
        With ``inplace=True``: the user's model, rewritten. Either way the
        :class:`~fxeq.report.Report` is at ``.fxeq_report``.

    Raises:
        ValueError: unknown mode, or ``keep_norm`` outside ``"init"``.
        AlreadyEqualizedError: ``prepared`` was already converted, or its model
            was equalized since it was prepared.
        FxEqError: :func:`calibrate` has not run.
    """
    check_mode(mode, keep_norm)
    _check_not_converted(prepared, "converting again would equalize twice. Use the module the first convert "
                                   "returned.")
    sites = prepared.search.sites
    if sites and prepared.calibration is None:
        raise FxEqError("convert() needs calibration statistics; call fxeq.calibrate(prepared, loader) first")
    graph = None if prepared.inplace else prepared.captured.module
    if sites:
        stats = prepared.stats
        prepared.rewritten = equalize(
            sites, {k: s.mean for k, s in stats.items()}, {k: s.std for k, s in stats.items()},
            prepared.calibration.parameters if prepared.calibration else {},
            graph=graph, model=prepared.model, mode=mode, keep_norm=keep_norm,
        )
    else:
        prepared.rewritten = Rewritten({}, {})
    prepared.converted, prepared.keep_norm = mode, keep_norm
    result: nn.Module = prepared.model if graph is None else graph
    if graph is not None:
        graph.eval()
    result.fxeq_report = prepared.report  # type: ignore[assignment]
    return result


def transform(
    model: nn.Module,
    calib_loader: Iterable[Any],
    *,
    inplace: bool = False,
    frontend: FrontendChoice = "auto",
    all_concats: bool = False,
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    progress: bool | None = None,
    min_std: float = 1e-6,
    mode: Mode = "init",
    keep_norm: bool = False,
    one_pass: bool = False,
    dynamic: Dynamic = False,
) -> nn.Module:
    """Equalize the scales of every multi-level fusion in ``model``.

    Finds interpolate → cat → conv sites, measures each concatenation input's
    global mean and std on the calibration batches as its fusing conv receives
    it (batch norm with batch statistics, dropout off, chained sites one at a
    time), and folds ``(x - mean) / std`` into the fusing convs' weights and
    biases. The result computes the original graph with new weights: no node
    is added.

    Args:
        model: the model.
        calib_loader: calibration batches; each a Tensor, a tuple/list with
            the input first, a dict of keyword arguments (Hugging Face), or
            anything ``input_fn`` maps. Every batch is used, the first one
            also to capture the model. Re-iterable when the model has chained
            sites (a list, a DataLoader).
        inplace: rewrite ``model``'s own parameters and return it. Default: False.
        frontend: ``"auto"``, ``"fx"``, ``"export"`` or ``"concrete"`` (with
            ``inplace=True``). Default: ``"auto"``.
        all_concats: also equalize concatenations without upsampled inputs.
        num_batches: at most this many batches per pass. Default: all.
        input_fn: batch → the model's input (Tensor, tuple or dict). Default: None.
        progress: show a progress bar; None (default) shows one when stderr
            is a terminal.
        min_std: smallest accepted input std. Default: 1e-6.
        mode: ``"init"``, ``"reparam"`` or ``"explicit"``; see :func:`convert`
            and :mod:`fxeq.modes`. Default: ``"init"`` (as in the paper).
        keep_norm: with ``"init"``, restore per-output-channel weight norms
            where a batch norm follows. Default: False.
        one_pass: measure chained sites in one pass on the model as it is
            (approximate downstream; the report says so). Default: False.
        dynamic: which sizes an export keeps symbolic: ``False`` (default:
            none; the returned GraphModule takes inputs shaped as the first
            batch, and the capture is the cheapest), ``"batch"`` (any batch
            size; can cost several times a static export) or ``True`` (any
            size; can cost minutes).

    Returns:
        Without ``inplace``: the deployable GraphModule in eval mode. From the
        export frontend it accepts inputs shaped as the first batch (any batch
        size with ``dynamic="batch"``, any size with ``dynamic=True``).
        With ``inplace=True``: your model, rewritten, which takes every size.
        The report is at ``.fxeq_report``. A model without any site comes back
        unchanged, with a warning.

    Raises:
        CaptureError, CalibrationError, AlreadyEqualizedError: see the messages.
        Whatever is raised, the model is left exactly as it was.

    Example:
        >>> from fxeq._examples import Fuse  # x ── a ──┐;  x ── pool ── b ── interpolate ──┴─ cat ── fuse
        >>> deployed = transform(Fuse(), [torch.randn(2, 3, 8, 8) for _ in range(2)])
        >>> [s.convs[0].module for s in deployed.fxeq_report.search.sites], type(deployed).__name__
        (['fuse'], 'Fuse')
    """
    check_mode(mode, keep_norm)  # before any work
    check_arguments(num_batches=num_batches, min_std=min_std)
    original = _checked_model(model)
    data = CalibrationData(calib_loader)
    device, dtype = model_device_and_dtype(original)
    example = batch_inputs(data.first(), input_fn, model=original, device=device, dtype=dtype)
    prepared = _prepare(original, example, inplace=inplace, frontend=frontend, all_concats=all_concats,
                        dynamic=dynamic)
    if not prepared.search.sites:
        warnings.warn(no_site_message(original, prepared.search), NoSiteWarning, stacklevel=2)
        return convert(prepared, mode=mode)
    calibrate(prepared, data, num_batches=num_batches, input_fn=input_fn, progress=progress,
              min_std=min_std, one_pass=one_pass)
    return convert(prepared, mode=mode, keep_norm=keep_norm)


def no_site_message(model: nn.Module, search: SiteSearch) -> str:
    """What to say when a model has no fusion site: what fxeq looks for, what it skipped, and each fix once."""
    reasons = "".join(f"\n  {s.node}: {s.reason}" for s in search.skipped[:8])
    more = len(search.skipped) - 8
    fixes = dict.fromkeys(s.fix for s in search.skipped if s.fix)
    return (
        f"fxeq found no fusion site in {type(model).__name__}: it looks for a channel "
        "concatenation (torch.cat, dim=1) with an upsampled input (F.interpolate, nn.Upsample, "
        "aten.upsample_*) whose output feeds a conv. The model is returned unchanged."
        + (f" Skipped concatenations:{reasons}" if reasons else "")
        + (f"\n  ... and {more} more" if more > 0 else "")
        + "".join(f"\nFix for the concatenations above: {fix}." for fix in fixes)
    )


def _checked_model(model: nn.Module) -> nn.Module:
    """Unwrap the model and refuse what fxeq cannot work on, before any work."""
    model = checked_model(model)
    check_not_equalized(model)
    return model


def _check_not_converted(prepared: Prepared, consequence: str) -> None:
    """Refuse a Prepared that was converted, or whose model was equalized since (by another Prepared)."""
    if prepared.converted is not None:
        raise AlreadyEqualizedError(f"this Prepared was already converted (mode={prepared.converted!r}); "
                                    + consequence)
    try:
        check_not_equalized(prepared.model)
    except AlreadyEqualizedError as e:
        raise AlreadyEqualizedError(
            f"{e} The model of this Prepared was equalized after fxeq.prepare (by another Prepared of the same "
            "model with inplace=True?); " + consequence
        ) from e


def _no_deployable_graph(model: nn.Module, example: Inputs, error: CaptureError, all_concats: bool) -> CaptureError:
    """The error for a model no graph frontend captures: whether ``inplace=True`` would work, found out."""
    try:
        concrete = capture(model, example, frontend="concrete")
    except CaptureError as e:
        failures = {**error.failures, **e.failures}
        listed = "\n".join(f"  {n}: {t}" for n, t in failures.items())
        needs = "; ".join(FRONTENDS[n].needs for n in failures if n in FRONTENDS)
        return CaptureError(
            f"could not capture {type(model).__name__} as a graph; tried fx, export and a concrete trace:\n{listed}"
            f"\n{needs}.", stage="trace", failures=failures,
        )
    found = find_sites(concrete.module, all_concats=all_concats, model=model)
    if not found.sites:
        return CaptureError(
            f"{error}\nA concrete trace of one eager forward works but finds no fusion site in it, so fxeq would "
            "not change this model anyway" + (f": {no_site_message(model, found)}" if found.skipped else "."),
            stage="trace", failures=error.failures,
        )
    return CaptureError(
        f"{error}\nA concrete trace of one eager forward works and finds {plural(len(found.sites), 'fusion site')}, "
        "but it is no graph to deploy. Pass inplace=True: fxeq then rewrites your model itself (its class, "
        "methods and every input size) and needs no deployable graph.",
        stage="trace", failures=error.failures,
    )
