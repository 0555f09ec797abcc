"""The public pipeline: find → prepare (observe) → calibrate → convert (rewrite).

:func:`transform` runs all of it::

    model ── capture ── find_sites ── insert_observers ── calibration passes ── fold ── GraphModule
             (fx/export)  (report)     (calibration graph)  (float64 stats)     (new weights,
                                                                                 original graph)

The steps are public too, in the spirit of torch.ao's prepare/convert::

    prepared = fxeq.prepare(model, example_inputs)
    fxeq.calibrate(prepared, loader)
    deployed = fxeq.convert(prepared)

Copy by default: the input model is untouched unless ``inplace=True``, in which
case its own parameters are rewritten as well, so its class, methods and
state_dict keys keep working in training code. Either way the rewrite is
transactional: nothing is written until every new tensor has been computed
and validated.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .calibrate import EMPTY_LOADER, InputFn, InputStats, batch_inputs, merge_across_ranks, run_pass
from .capture import Captured, Frontend, capture, eval_mode, unwrap
from .errors import CalibrationError, FxEqError, NoSiteWarning
from .modes import MODES, Mode, check_explicit_hooks, keep_norms, register_explicit, register_reparam
from .observe import Observed, insert_observers
from .report import Report
from .rewrite import check_not_folded, fold_site, mark_folded, site_vectors, write_parameters
from .sites import Site, SiteSearch, find_sites

__all__ = ["Prepared", "calibrate", "convert", "find", "prepare", "transform"]


@dataclass
class Prepared:
    """A model captured, searched and instrumented, waiting for calibration.

    Attributes:
        model: the model that is rewritten on :func:`convert` (the user's own
            with ``inplace=True``, else a private copy).
        original: the model as passed (unwrapped).
        captured: the deployable graph.
        search: sites and skipped concatenations.
        observed: the calibration graph.
        stats: per (site, input index), filled by :func:`calibrate`.
        new_parameters: per parameter name, the folded tensor, filled by :func:`calibrate`.
    """

    model: nn.Module
    original: nn.Module
    captured: Captured
    search: SiteSearch
    observed: Observed
    stats: dict[tuple[str, int], InputStats] = field(default_factory=dict)
    new_parameters: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def report(self) -> Report:
        """The report as it stands."""
        return Report(self.search, self.captured.frontend, dict(self.stats), folded=False)


def find(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    frontend: Frontend = "auto",
    all_concats: bool = False,
) -> Report:
    """Find the fusion sites of a model; nothing is changed.

    Args:
        model: the model.
        example_inputs: one batch of inputs (a Tensor or a tuple of Tensors).
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.
        all_concats: also count concatenations without an upsampled input.
            Default: False.

    Returns:
        An uncalibrated :class:`~fxeq.report.Report`.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None)
        >>> find(net, torch.randn(2, 3, 64, 64)).search.sites
        ()
    """
    model = unwrap(model)
    inputs = _as_tuple(example_inputs)
    captured = capture(model, inputs, frontend=frontend)
    return Report(find_sites(captured.module, all_concats=all_concats), captured.frontend)


def prepare(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    inplace: bool = False,
    frontend: Frontend = "auto",
    all_concats: bool = False,
) -> Prepared:
    """Capture the model, find its sites and build the calibration graph.

    Args:
        model: the model (DataParallel/DDP are unwrapped).
        example_inputs: one batch of inputs, on the model's device. A batch of
            one sample is repeated to two, so that torch.export keeps the
            batch size dynamic.
        inplace: rewrite ``model``'s own parameters on :func:`convert`.
            Default: False (work on a deep copy).
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.
        all_concats: also equalize concatenations with no upsampled input
            (FCN ``concat_input`` heads). Default: False.

    Raises:
        CaptureError: the model could not be captured.
        AlreadyEqualizedError: a fusing conv was already rescaled by fxeq.
    """
    original = unwrap(model)
    inputs = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in _as_tuple(example_inputs))
    try:
        target = original if inplace else copy.deepcopy(original)
    except Exception as e:
        raise FxEqError(
            f"could not copy {type(original).__name__} with copy.deepcopy ({type(e).__name__}: {e}); fxeq works "
            "on a copy unless inplace=True. Make the model deep-copyable, or pass inplace=True."
        ) from e
    captured = capture(target, inputs, frontend=frontend)
    search = find_sites(captured.module, all_concats=all_concats)
    for site in search.sites:
        check_not_folded((original, captured.module), site.convs)
    return Prepared(target, original, captured, search, insert_observers(captured.module, search))


def calibrate(
    prepared: Prepared,
    calib_loader: Iterable[Any],
    *,
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    progress: bool = False,
    min_std: float = 1e-6,
) -> Prepared:
    """Measure every site input and compute the folded weights (not yet written).

    Runs one pass over the loader per level of the site-dependency graph (one
    pass unless fusing convs feed other sites without normalization between).

    Args:
        prepared: from :func:`prepare`.
        calib_loader: re-iterable batches (a DataLoader, a list of tensors...).
        num_batches: use at most this many batches per pass. Default: all.
        input_fn: maps a batch to the model's input(s); needed when a batch
            is not a Tensor or a tuple/list with the input first.
        progress: show a tqdm progress bar. Default: False.
        min_std: smallest std accepted for an input. Default: 1e-6.

    Returns:
        ``prepared``, with ``stats`` and ``new_parameters`` filled in.

    Raises:
        CalibrationError: empty loader, failing batch, unusable statistics.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    observed = prepared.observed
    current = {
        name: prepared.captured.module.get_parameter(name).detach()
        for site in prepared.search.sites
        for conv in site.convs
        for name in (conv.weight, conv.bias)
        if name is not None
    }
    generations = prepared.search.generations()
    stats: dict[tuple[str, int], InputStats] = {}
    with eval_mode(observed.module):
        _calibrate_generations(prepared, generations, stats, current, calib_loader, num_batches=num_batches,
                               input_fn=input_fn, progress=progress, min_std=min_std)
    prepared.stats = stats
    prepared.new_parameters = current
    return prepared


def _calibrate_generations(
    prepared: Prepared,
    generations: list[tuple[Site, ...]],
    stats: dict[tuple[str, int], InputStats],
    current: dict[str, torch.Tensor],
    calib_loader: Iterable[Any],
    *,
    num_batches: int | None,
    input_fn: InputFn | None,
    progress: bool,
    min_std: float,
) -> None:
    device, dtype = _device_and_dtype(prepared.model)
    observed = prepared.observed
    for level, generation in enumerate(generations):
        active = {(site.name, inp.index) for site in generation for inp in site.inputs}
        for key, observer in observed.observers.items():
            observer.reset()
            observer.enabled = key in active
        desc = "fxeq calibration" + (f" {level + 1}/{len(generations)}" if len(generations) > 1 else "")
        run_pass(
            observed.module, calib_loader, input_fn=input_fn, num_batches=num_batches,
            device=device, dtype=dtype, progress=progress, desc=desc,
        )
        merge_across_ranks([observed.observers[key] for key in sorted(active)])
        for site in generation:
            for inp in site.inputs:
                stats[site.name, inp.index] = InputStats.of(observed.observers[site.name, inp.index])
            new = fold_site(site, *_site_stats(stats, site), current, min_std=min_std)
            current.update(new)
            for conv in site.convs:
                observed.use_weights(conv.weight, current[conv.weight], current.get(conv.bias or ""))


def convert(prepared: Prepared, *, mode: Mode = "init", keep_norm: bool = False) -> fx.GraphModule:
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
        FxEqError: :func:`calibrate` has not run.
    """
    _check_mode(mode, keep_norm)
    if prepared.search.sites and not prepared.stats:
        raise FxEqError("convert() needs calibration statistics; call fxeq.calibrate(prepared, loader) first")
    module = prepared.captured.module
    targets = (module, prepared.model)
    inplace_model = prepared.model if prepared.model is prepared.original else None
    if mode == "explicit" and inplace_model is not None:  # validate before changing anything
        check_explicit_hooks(inplace_model, [conv for site in prepared.search.sites for conv in site.convs])
    notes: dict[str, list[str]] = {}
    new = dict(prepared.new_parameters)
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
            if mode == "reparam":
                del new[conv.weight]
                register_reparam(targets, conv, std)
            elif mode == "explicit":
                new.pop(conv.weight), new.pop(conv.bias or "", None)
                register_explicit(module, inplace_model, conv, mean, std)
    write_parameters(targets, new)
    mark_folded(targets, {conv.weight: site.name for site in prepared.search.sites for conv in site.convs})
    if prepared.model is not prepared.original:
        module.eval()
    module.fxeq_report = Report(  # type: ignore[assignment]
        prepared.search, prepared.captured.frontend, dict(prepared.stats),
        folded=bool(prepared.search.sites), mode=mode, notes=notes,
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
    progress: bool = False,
    min_std: float = 1e-6,
    mode: Mode = "init",
    keep_norm: bool = False,
) -> fx.GraphModule:
    """Equalize the scales of every multi-level fusion in ``model``.

    Finds interpolate → cat → conv sites, measures each concatenation input's
    global mean and std on the calibration batches (batch norm with batch
    statistics, dropout off), and folds ``(x - mean) / std`` into the fusing
    convs' weights and biases. The result computes the original graph with new
    weights: no node is added.

    Args:
        model: the model.
        calib_loader: re-iterable calibration batches; each a Tensor, or a
            tuple/list with the input first, or anything ``input_fn`` maps.
            The first batch is also the example input for capture.
        inplace: also rewrite ``model``'s own parameters. Default: False.
        frontend: ``"auto"`` (fx, else export), ``"fx"`` or ``"export"``.
        all_concats: also equalize concatenations without upsampled inputs.
        num_batches: at most this many batches per pass. Default: all.
        input_fn: batch → input tensor(s). Default: None.
        progress: show a progress bar. Default: False.
        min_std: smallest accepted input std. Default: 1e-6.
        mode: ``"init"``, ``"reparam"`` or ``"explicit"``; see :func:`convert`
            and :mod:`fxeq.modes`. Default: ``"init"`` (as in the paper).
        keep_norm: with ``"init"``, restore per-output-channel weight norms
            where a batch norm follows. Default: False.

    Returns:
        The deployable GraphModule in eval mode, with its report at ``.fxeq_report``.
        A model without any site comes back unchanged, with a warning.

    Raises:
        CaptureError, CalibrationError, AlreadyEqualizedError: see the messages.
        Whatever is raised, the model is left exactly as it was.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        ...     weights=None, weights_backbone=None)
        >>> batches = [torch.randn(2, 3, 64, 64) for _ in range(2)]
        >>> deployed = transform(net, batches)
        >>> [s.convs[0].weight for s in deployed.fxeq_report.search.sites]
        ['classifier.0.project.0.weight']
    """
    _check_mode(mode, keep_norm)  # before any calibration work
    if iter(calib_loader) is calib_loader:
        raise TypeError(
            "calib_loader must be re-iterable (a DataLoader, a list of batches...), not a one-shot "
            f"{type(calib_loader).__name__}: fxeq reads it once for capture and again per calibration pass. "
            "Wrap it: list(batches)."
        )
    first = next(iter(calib_loader), None)
    if first is None:
        raise CalibrationError(EMPTY_LOADER)
    device, dtype = _device_and_dtype(unwrap(model))
    example = batch_inputs(first, input_fn, device=device, dtype=dtype)
    prepared = prepare(model, example, inplace=inplace, frontend=frontend, all_concats=all_concats)
    if not prepared.search.sites:
        warnings.warn(
            f"fxeq found no fusion site in {type(prepared.original).__name__}: it looks for a channel "
            "concatenation (torch.cat, dim=1) with an upsampled input (F.interpolate, nn.Upsample, "
            "aten.upsample_*) whose output feeds a conv. The model is returned unchanged. "
            f"{len(prepared.search.skipped)} concatenations were skipped; see .fxeq_report"
            + ("" if all_concats else ", or pass all_concats=True for same-resolution concatenations")
            + ".",
            NoSiteWarning,
            stacklevel=2,
        )
        return convert(prepared, mode=mode)
    calibrate(prepared, calib_loader, num_batches=num_batches, input_fn=input_fn,
              progress=progress, min_std=min_std)
    return convert(prepared, mode=mode, keep_norm=keep_norm)


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


def _as_tuple(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return None, None
