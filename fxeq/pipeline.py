"""The public pipeline: find → prepare → calibrate → convert (rewrite).

:func:`transform` runs all of it::

    model ── capture ─── find_sites ──── calibration passes ────── fold ──── GraphModule
             (fx/export,  (a graph, for    (the eager model, hooks    (new weights,
              one batch)   analysis only)   at the fusing convs,       original graph)
                                            one pass per generation)

The steps are public too, in the spirit of torch.ao's prepare/convert::

    prepared = fxeq.prepare(model, example_inputs)
    fxeq.calibrate(prepared, loader)
    deployed = fxeq.convert(prepared)

Copy by default: the input model is untouched unless ``inplace=True``, in which
case its own parameters are rewritten as well, so its class, methods and
state_dict keys keep working in training code, at any input size. Either way
the rewrite is transactional: nothing is written until every new tensor has
been computed and validated, and capture and calibration restore every
buffer and training flag they touch.

The returned GraphModule shares the rewritten parameters. From the export
frontend it is specialized to the first batch's spatial size (its batch size
stays dynamic unless ``dynamic=False``) and refuses another size with the fix,
unless ``dynamic=True``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .calibration import (
    Calibration,
    CalibrationData,
    InputFn,
    InputStats,
    batch_inputs,
    calibrate_sites,
    check_arguments,
    model_device_and_dtype,
)
from .capturing import Captured, Dynamic, Frontend, FxEqGraphModule, Inputs, as_inputs, capture, unwrap
from .errors import AlreadyEqualizedError, FxEqError, NoSiteWarning
from .modes import MODES, STRATEGIES, Mode, keep_norms
from .observe import observation_point
from .report import Report
from .rewrite import check_not_equalized, copy_into, mark_folded, resolve_parameters, site_vectors
from .sites import Site, SiteSearch, Skipped, find_sites

__all__ = ["Prepared", "calibrate", "convert", "find", "prepare", "transform"]

Example = torch.Tensor | tuple[Any, ...] | dict[str, Any]


@dataclass
class Prepared:
    """A model captured and searched, waiting for calibration.

    Attributes:
        model: the model that is calibrated and rewritten (the user's own
            with ``inplace=True``, else a private copy).
        original: the model as passed (unwrapped).
        captured: the deployable graph.
        search: sites and skipped concatenations.
        calibration: filled by :func:`calibrate`.
        converted: the mode :func:`convert` used, once it has run.
    """

    model: nn.Module
    original: nn.Module
    captured: Captured
    search: SiteSearch
    calibration: Calibration | None = None
    converted: str | None = None

    @property
    def stats(self) -> dict[tuple[str, int], InputStats]:
        """Per (site, input index), the measured statistics (empty before calibration)."""
        return self.calibration.stats if self.calibration else {}

    @property
    def report(self) -> Report:
        """The report as it stands."""
        return Report(self.search, self.captured.frontend, dict(self.stats), folded=self.converted is not None,
                      mode=self.converted or "init", calibration=self.calibration)


def find(
    model: nn.Module,
    example_inputs: Example,
    *,
    frontend: Frontend = "auto",
    all_concats: bool = False,
    dynamic: Dynamic = False,
) -> Report:
    """Find the fusion sites of a model; nothing is changed.

    Args:
        model: the model.
        example_inputs: one batch: a Tensor, a tuple of positional inputs, or
            a dict of keyword arguments.
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.
        all_concats: also count concatenations without an upsampled input.
            Default: False.
        dynamic: which sizes an export keeps symbolic (see :func:`prepare`);
            finding sites needs none. Default: False.

    Returns:
        An uncalibrated :class:`~fxeq.report.Report`.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None)
        >>> find(net, torch.randn(2, 3, 64, 64)).search.sites
        ()
    """
    model = _checked_model(model)
    with torch.no_grad():
        captured = capture(model, as_inputs(example_inputs), frontend=frontend, dynamic=dynamic)
    return Report(_observable(find_sites(captured.module, all_concats=all_concats), model), captured.frontend)


def prepare(
    model: nn.Module,
    example_inputs: Example | Inputs,
    *,
    inplace: bool = False,
    frontend: Frontend = "auto",
    all_concats: bool = False,
    dynamic: Dynamic = "batch",
) -> Prepared:
    """Capture the model and find its sites.

    Args:
        model: the model (DataParallel, DDP and torch.compile are unwrapped).
        example_inputs: one batch of inputs on the model's device: a Tensor,
            a tuple of positional inputs, or a dict of keyword arguments. With
            ``dynamic="batch"``, a batch of one sample is repeated to two, so
            that torch.export keeps the batch size dynamic.
        inplace: rewrite ``model``'s own parameters on :func:`convert`.
            Default: False (work on a deep copy).
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.
        all_concats: also equalize concatenations with no upsampled input
            (FCN ``concat_input`` heads). Default: False.
        dynamic: which sizes an export keeps symbolic: ``"batch"`` (the
            returned GraphModule takes any batch size), ``False`` (none: the
            cheapest capture) or ``True`` (any size; can cost minutes). See
            :func:`fxeq.capturing.capture`. Default: ``"batch"``.

    Raises:
        ValueError: the model has parameters on the meta device.
        CaptureError: the model could not run or be captured.
        AlreadyEqualizedError: fxeq already equalized a conv of the model.
    """
    original = _checked_model(model)
    args, kwargs = as_inputs(example_inputs)
    if dynamic == "batch":
        args, kwargs = pytree.tree_map_only(torch.Tensor, _at_least_two, (args, kwargs))
    try:
        target = original if inplace else copy.deepcopy(original)
    except Exception as e:
        raise FxEqError(
            f"could not copy {type(original).__name__} with copy.deepcopy ({type(e).__name__}: {e}); fxeq works "
            "on a copy unless inplace=True. Make the model deep-copyable, or pass inplace=True."
        ) from e
    with torch.no_grad():
        captured = capture(target, (args, kwargs), frontend=frontend, dynamic=dynamic)
    search = _observable(find_sites(captured.module, all_concats=all_concats), target)
    return Prepared(target, original, captured, search)


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
        one_pass: measure chained sites in a single pass on the unfolded
            model (faster, approximate downstream). Default: False.

    Returns:
        ``prepared``, with ``calibration`` filled in.

    Raises:
        AlreadyEqualizedError: ``prepared`` was already converted.
        CalibrationError: empty loader, failing batch, unusable statistics.
    """
    if prepared.converted is not None:
        raise AlreadyEqualizedError(
            f"this Prepared was already converted (mode={prepared.converted!r}); calibrating it again would "
            "measure the equalized model and equalize twice. Call fxeq.prepare on the original model instead."
        )
    data = calib_loader if isinstance(calib_loader, CalibrationData) else CalibrationData(calib_loader)
    prepared.calibration = calibrate_sites(
        prepared.model, prepared.search, data, num_batches=num_batches, input_fn=input_fn,
        progress=progress, min_std=min_std, one_pass=one_pass,
    )
    return prepared


def convert(prepared: Prepared, *, mode: Mode = "init", keep_norm: bool = False) -> FxEqGraphModule:
    """Put the measured equalizer into the model; return the deployable graph.

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
        The captured GraphModule, in eval mode unless it shares modules with
        an ``inplace=True`` model, with its :class:`~fxeq.report.Report` at
        ``.fxeq_report``. In ``"init"`` mode its graph is exactly the captured
        one. With ``inplace=True`` the user's model holds the same equalizer.

    Raises:
        ValueError: unknown mode, or ``keep_norm`` outside ``"init"``.
        AlreadyEqualizedError: ``prepared`` was already converted.
        FxEqError: :func:`calibrate` has not run.
    """
    _check_mode(mode, keep_norm)
    if prepared.converted is not None:
        raise AlreadyEqualizedError(
            f"this Prepared was already converted (mode={prepared.converted!r}); converting again would "
            "equalize twice. Use the module the first convert returned."
        )
    if prepared.search.sites and prepared.calibration is None:
        raise FxEqError("convert() needs calibration statistics; call fxeq.calibrate(prepared, loader) first")
    module = prepared.captured.module
    targets = (module, prepared.model)
    inplace_model = prepared.model if prepared.model is prepared.original else None
    strategy = STRATEGIES[mode]
    notes: dict[str, list[str]] = {}
    new = dict(prepared.calibration.parameters) if prepared.calibration else {}
    installs = []
    for site in prepared.search.sites:
        mean, std = site_vectors(site, *_site_stats(prepared.stats, site))
        for conv in site.convs:
            if keep_norm and conv.batch_norm is None:
                notes.setdefault(conv.weight, []).append(
                    "keep_norm refused: no batch norm reads this conv, so its output depends on the weight norm"
                )
            elif keep_norm:
                original = module.get_parameter(conv.weight)
                new[conv.weight], bias = keep_norms(original, new[conv.weight], new.get(conv.bias or ""))
                if conv.bias is not None and bias is not None:
                    new[conv.bias] = bias
                notes.setdefault(conv.weight, []).append("keep_norm: per-output-channel weight norms restored")
            for kind, name in (("weight", conv.weight), ("bias", conv.bias)):
                if name is not None and kind not in strategy.writes:
                    new.pop(name, None)
            installs.append((conv, mean, std))
    writes = resolve_parameters(targets, new)  # validate everything before changing anything
    if strategy.install is not None:
        for conv, mean, std in installs:
            strategy.install(module, inplace_model, conv, mean, std)
    copy_into(writes)
    mark_folded(targets, {conv.weight: site.name for site in prepared.search.sites for conv in site.convs})
    prepared.converted = mode
    if prepared.model is not prepared.original:
        module.eval()
    module.fxeq_report = Report(
        prepared.search, prepared.captured.frontend, dict(prepared.stats),
        folded=bool(prepared.search.sites), mode=mode, notes=notes, calibration=prepared.calibration,
    )
    return module


def transform(
    model: nn.Module,
    calib_loader: Iterable[Any],
    *,
    inplace: bool = False,
    frontend: Frontend = "auto",
    all_concats: bool = False,
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    progress: bool | None = None,
    min_std: float = 1e-6,
    mode: Mode = "init",
    keep_norm: bool = False,
    one_pass: bool = False,
    dynamic: Dynamic = "batch",
) -> FxEqGraphModule:
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
        inplace: also rewrite ``model``'s own parameters. Default: False.
        frontend: ``"auto"`` (fx, else export), ``"fx"`` or ``"export"``.
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
        one_pass: measure chained sites in one pass on the unfolded model
            (approximate downstream; the report says so). Default: False.
        dynamic: which sizes an export keeps symbolic: ``"batch"`` (default:
            the returned GraphModule takes any batch size), ``False`` (none:
            the cheapest capture) or ``True`` (any size; can cost minutes).

    Returns:
        The deployable GraphModule in eval mode, with its report at
        ``.fxeq_report``. From the export frontend it accepts any batch size
        (unless ``dynamic=False``) but only the first batch's spatial size
        (unless ``dynamic=True``); with ``inplace=True`` your own model takes
        every size. A model without any
        site comes back unchanged, with a warning.

    Raises:
        CaptureError, CalibrationError, AlreadyEqualizedError: see the messages.
        Whatever is raised, the model is left exactly as it was.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        ...     weights=None, weights_backbone=None)
        >>> batches = [torch.randn(2, 3, 64, 64) for _ in range(2)]
        >>> deployed = transform(net, batches)
        >>> [s.convs[0].module for s in deployed.fxeq_report.search.sites]
        ['classifier.0.project.0']
    """
    _check_mode(mode, keep_norm)  # before any work
    check_arguments(num_batches=num_batches, min_std=min_std)
    original = _checked_model(model)
    data = CalibrationData(calib_loader)
    device, dtype = model_device_and_dtype(original)
    example = batch_inputs(data.first(), input_fn, model=original, device=device, dtype=dtype)
    prepared = prepare(original, example, inplace=inplace, frontend=frontend, all_concats=all_concats,
                       dynamic=dynamic)
    if not prepared.search.sites:
        reasons = "".join(f"\n  {s.node}: {s.reason}" for s in prepared.search.skipped[:8])
        warnings.warn(
            f"fxeq found no fusion site in {type(original).__name__}: it looks for a channel "
            "concatenation (torch.cat, dim=1) with an upsampled input (F.interpolate, nn.Upsample, "
            "aten.upsample_*) whose output feeds a conv. The model is returned unchanged."
            + (f" Skipped concatenations:{reasons}" if reasons else "")
            + ("" if all_concats else "\nPass all_concats=True for same-resolution concatenations."),
            NoSiteWarning,
            stacklevel=2,
        )
        return convert(prepared, mode=mode)
    calibrate(prepared, data, num_batches=num_batches, input_fn=input_fn, progress=progress,
              min_std=min_std, one_pass=one_pass)
    return convert(prepared, mode=mode, keep_norm=keep_norm)


def _checked_model(model: nn.Module) -> nn.Module:
    """Unwrap the model and refuse what fxeq cannot work on, before any work."""
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"{type(model).__name__} has tensors on the meta device (e.g. {meta}): they hold no values to "
            "calibrate or rescale. Load real weights first, e.g. model.to_empty(device='cpu') and then "
            "model.load_state_dict(state)."
        )
    check_not_equalized(model)
    return model


def _observable(search: SiteSearch, model: nn.Module) -> SiteSearch:
    """Move the sites fxeq cannot equalize in ``model`` itself to the skipped list.

    The graph may not show everything: a conv whose input a pre-hook cannot
    observe, or a weight tied to a module the graph never calls.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    keep: list[Site] = []
    skipped = list(search.skipped)
    for site in search.sites:
        point = observation_point(model, site)
        tied = [n for c in site.convs for name in (c.weight, c.bias) if name
                for n in names.get(id(_parameter(model, name)), []) if n != name]
        if isinstance(point, str):
            skipped.append(Skipped(site.name, point))
        elif tied:
            skipped.append(Skipped(site.name, f"its conv {site.convs[0].module} shares parameters with "
                                   f"{', '.join(tied)} (tied parameters); rescaling them would change those too"))
        else:
            keep.append(site)
    if len(keep) == len(search.sites):
        return search
    names = {s.name for s in keep}
    kept = [replace(s, depends_on=tuple(d for d in s.depends_on if d in names)) for s in keep]
    return SiteSearch(tuple(kept), tuple(skipped))


def _parameter(model: nn.Module, name: str) -> object:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _at_least_two(t: torch.Tensor) -> torch.Tensor:
    """A batch of one sample, repeated: torch.export specializes a batch size of 1."""
    return torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t


def _check_mode(mode: str, keep_norm: bool) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if keep_norm and mode != "init":
        raise ValueError(f"keep_norm applies to mode='init' only, got mode={mode!r}")


def _site_stats(stats: dict[tuple[str, int], InputStats], site: Site) -> tuple[dict[int, float], dict[int, float]]:
    """Per input index, a site's measured means and stds."""
    return (
        {i.index: stats[site.name, i.index].mean for i in site.inputs},
        {i.index: stats[site.name, i.index].std for i in site.inputs},
    )
