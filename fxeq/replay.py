"""Replay: apply the statistics a report recorded, with no calibration data.

A report (:meth:`fxeq.report.Report.to_dict`, or the ``.fxeq.json`` file that
the command line and the training callbacks write) holds, per fusion site,
every fusing conv's parameter names, groups and weight shape, every input's
channel slice, the mean and std fxeq measured, and the shapes of the batch
the model was captured with. :func:`apply` folds those statistics into a
model built the same way::

    report ── sites, slices, mean, std ──┐
    model  ── conv parameters ───────────┴── check convs ── check slices ── fold (float64) ── rewrite, mark
                                                            (a probe batch)                  (fxeq.rewrite)

The result is bitwise what ``fxeq.transform(model, batches, inplace=True)``
wrote when it produced the report, in its mode, chained sites and convs
without a bias included: the fold of each site needs only its own
statistics and the conv's weights before the fold. Use it to reproduce a
training run's initialization from its report, or to equalize a model where
the calibration data is not available.

Every fusing conv must exist in the model, as a conv with the report's
groups, bias and (when recorded) dtype and shape; and the model's fusion sites
must concatenate exactly the report's channel slices, which :func:`apply`
checks by capturing the model on ``example_inputs`` or, without them, on a
random probe shaped like the batch the report records. Anything else raises
:class:`~fxeq.errors.FxEqError` naming the conv, what was expected and what
was found, before anything is written.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._model import checked_model, model_device_and_dtype, probe_inputs
from .errors import CaptureError, FxEqError
from .fold import fold_site
from .pipeline import find
from .report import Report
from .rewrite import check_not_equalized, equalize
from .sites import FusingConv, Site, is_conv_module

__all__ = ["apply"]

ReportSource = Report | Mapping[str, Any] | str | os.PathLike[str]
"""A :class:`~fxeq.report.Report`, its ``to_dict()``, its ``to_json()`` text, or the path of its JSON file."""


def apply(
    model: nn.Module,
    report: ReportSource,
    *,
    inplace: bool = True,
    example_inputs: torch.Tensor | tuple[Any, ...] | dict[str, Any] | None = None,
) -> nn.Module:
    """Apply the means and stds recorded in a report, with no calibration data.

    Args:
        model: a model of the architecture the report was written for, with
            the weights it had before equalization (DDP and torch.compile
            wrappers are unwrapped).
        report: a :class:`~fxeq.report.Report`, the text of its ``to_json()``, a
            dict from its ``to_dict()``, or the path of its JSON file (``*.fxeq.json``).
        inplace: rewrite ``model``'s own parameters; else those of a deep copy.
            Default: True.
        example_inputs: one batch of inputs, to capture the model on and
            compare its fusion sites with the report's. Default: None (a
            random batch of the shapes the report records).

    Returns:
        ``model`` (or its equalized copy), marked as equalized, as
        :func:`fxeq.transform` marks it.

    Raises:
        TypeError: ``report`` or ``model`` is of the wrong type.
        ValueError: the file, text or dict is not an fxeq report.
        AlreadyEqualizedError: fxeq already equalized the model.
        FxEqError: the report does not fit the model, or holds no usable
            statistics. Nothing was written.

    Example:
        >>> import fxeq
        >>> from fxeq._examples import Fuse  # x ── a ──┐;  x ── pool ── b ── interpolate ──┴─ cat ── fuse
        >>> net = Fuse()
        >>> twin = copy.deepcopy(net)
        >>> report = fxeq.transform(net, [torch.randn(2, 3, 8, 8)], inplace=True).fxeq_report
        >>> torch.equal(apply(twin, report.to_dict()).fuse.weight, net.fuse.weight)
        True
    """
    recorded = _read(report)
    target = checked_model(model)
    check_not_equalized(target)
    _check_report(recorded)
    parameters: dict[str, torch.Tensor] = {}
    for site in recorded.search.sites:
        parameters.update(_checked_parameters(target, site))
    _compare_sites(target, recorded, example_inputs)
    if not inplace:
        target = copy.deepcopy(target)
        parameters = {name: target.get_parameter(name).detach() for name in parameters}
    means = {k: s.mean for k, s in recorded.stats.items()}
    stds = {k: s.std for k, s in recorded.stats.items()}
    folded: dict[str, torch.Tensor] = {}
    for site in recorded.search.sites:
        mean = {i.index: means[site.name, i.index] for i in site.inputs}
        std = {i.index: stds[site.name, i.index] for i in site.inputs}
        smallest = min([*std.values(), 1e-6])  # any std the report holds passed fxeq's checks when written
        folded.update(fold_site(site, mean, std, parameters, min_std=smallest))
    mode = recorded.mode if recorded.folded else "init"
    equalize(recorded.search.sites, means, stds, folded, model=target, mode=mode,
             keep_norm=bool(recorded.norms_kept), norms=recorded.norms_kept)
    return model if inplace else target


# ---------------------------------------------------------------------------
# Reading the report
# ---------------------------------------------------------------------------


def _read(report: ReportSource) -> Report:
    """The report, from any of the forms :func:`apply` takes."""
    if isinstance(report, Report):
        return report
    if isinstance(report, Mapping):
        return Report.from_dict(report)
    if isinstance(report, str) and report.lstrip().startswith("{"):  # Report.to_json() text
        return Report.from_json(report)
    if isinstance(report, (str, os.PathLike)):
        return Report.read(Path(report))
    raise TypeError(
        "report must be an fxeq Report, a dict from Report.to_dict(), the text of Report.to_json() or the "
        f"path of a .fxeq.json file, got {type(report).__name__}"
    )


def _check_report(report: Report) -> None:
    """Refuse a report whose statistics or structure cannot be replayed, naming the site."""
    seen: dict[str, str] = {}
    for site in report.search.sites:
        if not site.inputs:
            raise FxEqError(f"site {site.name!r}: the report lists no inputs; it is damaged, write it again.")
        if not site.convs:
            raise FxEqError(f"site {site.name!r}: the report lists no fusing conv; it is damaged, write it again.")
        stop = 0
        for inp in site.inputs:
            start, end = inp.channels
            if start != stop or end <= start:
                raise FxEqError(
                    f"site {site.name!r}, input {inp.index}: expected channels starting at {stop}, found "
                    f"{start}:{end}. A report's slices tile the concatenation in order; this one is damaged, "
                    "write it again with fxeq.transform."
                )
            stop = end
            stat = report.stats.get((site.name, inp.index))
            if stat is None:
                raise FxEqError(
                    f"site {site.name!r}, input {inp.index} (channels {start}:{end}): the report holds no mean and "
                    "std; expected a calibrated report. Reports of fxeq.find (uncalibrated) have none: use "
                    "the report of fxeq.transform or fxeq.convert."
                )
            if not (math.isfinite(stat.mean) and math.isfinite(stat.std)) or stat.std <= 0:
                raise FxEqError(
                    f"site {site.name!r}, input {inp.index}: expected a finite mean and a finite std above 0, found "
                    f"mean={stat.mean!r}, std={stat.std!r}. The report is damaged; write it again with "
                    "fxeq.transform."
                )
        for conv in site.convs:
            if conv.weight in seen:
                raise FxEqError(
                    f"conv {_module(conv)}: the report lists it in sites {seen[conv.weight]!r} and {site.name!r}; "
                    "expected each fusing conv in one site. The report is damaged; write it again."
                )
            seen[conv.weight] = site.name


# ---------------------------------------------------------------------------
# Checking the model
# ---------------------------------------------------------------------------


def _checked_parameters(model: nn.Module, site: Site) -> dict[str, torch.Tensor]:
    """The current tensors of a recorded site's conv parameters, after checking each conv against the report."""
    slices = ", ".join(f"{i.channels[0]}:{i.channels[1]}" for i in site.inputs)
    found: dict[str, torch.Tensor] = {}
    for conv in site.convs:
        where = f"conv {_module(conv)} (site {site.name!r})"
        weight = _parameter(model, conv.weight, where, "weight")
        owner = model.get_submodule(conv.module) if conv.module else model
        # the conv module owning this weight, when there is one (functional convs have none)
        module_conv = owner if is_conv_module(owner) and owner.weight is weight else None
        transposed = is_conv_module(module_conv, transposed=True)
        if weight.dim() < 3 or transposed != conv.transposed:
            kind = type(owner).__name__ if module_conv is not None else f"a {weight.dim()}-D parameter"
            expected = "a transposed conv weight (in, out / groups, *kernel)" if conv.transposed else \
                "a conv weight (out, in / groups, *kernel)"
            raise FxEqError(
                f"{where}: expected {expected}, found {kind} of shape {tuple(weight.shape)}. The model is not the "
                "one the report was written for; build the same architecture and configuration."
            )
        groups = module_conv.groups if module_conv is not None else conv.groups
        if groups != conv.groups:
            raise FxEqError(
                f"{where}: expected groups={conv.groups}, found groups={groups}. The model is not the one the "
                "report was written for; build the same architecture and configuration."
            )
        channels = weight.shape[0] if conv.transposed else weight.shape[1] * conv.groups
        if channels != site.channels:
            raise FxEqError(
                f"{where}: expected {site.channels} input channels (the report's slices {slices}), found "
                f"{channels} ({conv.weight} of shape {tuple(weight.shape)}, groups={conv.groups}). The model is "
                "not the one the report was written for; build the same architecture and configuration."
            )
        if conv.shape is not None and tuple(weight.shape) != conv.shape:
            raise FxEqError(
                f"{where}: expected weight shape {conv.shape}, found {tuple(weight.shape)}. The model is not the "
                "one the report was written for; build the same architecture and configuration."
            )
        dtype = str(weight.dtype).removeprefix("torch.")
        if conv.dtype is not None and dtype != conv.dtype:
            raise FxEqError(
                f"{where}: expected dtype {conv.dtype}, found {dtype}; the statistics were "
                f"measured in {conv.dtype}. Apply the report to the model in {conv.dtype} (e.g. model.to(torch."
                f"{conv.dtype}), then cast it), or calibrate this model with fxeq.transform."
            )
        found[conv.weight] = weight.detach()
        if conv.bias is not None:
            bias = _parameter(model, conv.bias, where, "bias")
            out = weight.shape[1] * conv.groups if conv.transposed else weight.shape[0]
            if tuple(bias.shape) != (out,):
                raise FxEqError(
                    f"{where}: expected bias {conv.bias} of shape ({out},), found "
                    f"{tuple(bias.shape)}. The model is not the one the report was written for."
                )
            found[conv.bias] = bias.detach()
        elif module_conv is not None and module_conv.bias is not None:
            raise FxEqError(
                f"{where}: expected no bias (the report folded no mean into this conv), found "
                f"{conv.module + '.' if conv.module else ''}bias. The model is not the one the report was "
                "written for; build it with the same configuration (bias=False on this conv)."
            )
    return found


def _parameter(model: nn.Module, name: str, where: str, what: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        pass
    names = [n for n, _ in model.named_parameters()]
    close = next((n for n in names if n.endswith("." + name) or name.endswith("." + n)), None)
    hint = (f" It has {close!r}: apply the report to the module that fxeq equalized (a wrapper adds or removes "
            "a prefix such as 'net.')." if close else
            " The model is not the one the report was written for; build the same architecture and configuration.")
    raise FxEqError(
        f"{where}: expected {what} parameter {name!r}, found no such parameter in {type(model).__name__}.{hint}"
    )


def _compare_sites(
    model: nn.Module, report: Report, example_inputs: torch.Tensor | tuple[Any, ...] | dict[str, Any] | None
) -> None:
    """Capture the model (on ``example_inputs``, else on a probe) and require its fusion sites to be the report's."""
    if example_inputs is None:
        if not report.example:
            warnings.warn(
                "the report records no input shapes (it was written before fxeq 0.3), so fxeq.apply cannot check "
                "that the model concatenates the report's channel slices; pass example_inputs=batch to check them",
                UserWarning, stacklevel=3,
            )
            return
        device, _ = model_device_and_dtype(model)
        try:
            example_inputs = probe_inputs(report.example, device=device)
        except ValueError as e:
            raise FxEqError(f"cannot build a probe batch from the report's input shapes ({e}); pass "
                            "example_inputs=batch to fxeq.apply") from e
    try:
        search = find(model, example_inputs, frontend=report.frontend, all_concats=True).search
    except CaptureError as e:
        raise FxEqError(
            f"could not capture the model to check that it concatenates the report's channel slices: {e}\nPass "
            "example_inputs=batch with a batch the model takes."
        ) from e
    convs = {c.weight: site for site in search.sites for c in site.convs}
    for entry in report.search.sites:
        expected = [i.channels for i in entry.inputs]
        for conv in entry.convs:
            where = f"conv {_module(conv)} (site {entry.name!r})"
            site = convs.get(conv.weight)
            if site is None:
                fusing = sorted(c.module or "<root>" for s in search.sites for c in s.convs) or "none"
                raise FxEqError(
                    f"{where}: expected it to read a concatenation with slices {_slices(expected)}, found that it "
                    f"reads none that fxeq can equalize in this model (its fusing convs: {fusing}). The model is "
                    "not the one the report was written for."
                )
            actual = [i.channels for i in site.inputs]
            if actual != expected:
                raise FxEqError(
                    f"{where}: expected input slices {_slices(expected)}, found {_slices(actual)}. The model "
                    "concatenates its features differently from the one the report was written for."
                )
    reported = {c.weight for entry in report.search.sites for c in entry.convs}
    extra = [c for s in search.sites if any(i.upsample for i in s.inputs) for c in s.convs
             if c.weight not in reported]
    if extra:
        names = ", ".join(sorted(c.module or "<root>" for e in report.search.sites for c in e.convs)) or "none"
        raise FxEqError(
            f"conv {_module(extra[0])}: expected only the report's fusing convs ({names}), found that this conv "
            "also fuses upsampled features, with no statistics in the report. Use the report written for this "
            "model, or calibrate it with fxeq.transform."
        )


def _module(conv: FusingConv) -> str:
    return conv.module or "<root>"


def _slices(slices: Sequence[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in slices) + "]"
