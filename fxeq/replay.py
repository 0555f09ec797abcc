"""Replay: apply the statistics a report recorded, with no calibration data.

A report (:meth:`fxeq.report.Report.to_dict`, or the ``.fxeq.json`` file that
the command line and the training callbacks write) holds, per fusion site,
every fusing conv's parameter names and groups, every input's channel slice,
and the mean and std fxeq measured. :func:`apply` folds those into a model
built the same way, without capturing or running it::

    report ── sites, slices, mean, std ──┐
    model  ── conv parameters ───────────┴── check ── fold (float64) ── write all ── mark

The result is bitwise what ``fxeq.transform(model, batches, inplace=True)``
wrote when it produced the report, chained sites and convs without a bias
included: the fold of each site needs only its own statistics and the conv's
weights before the fold. Use it to reproduce a training run's initialization
from its report, or to equalize a model where the calibration data is not
available.

Every fusing conv must exist in the model, as a conv reading exactly the
report's channel slices, with the report's groups, bias and (when recorded)
dtype and shape; anything else raises :class:`~fxeq.errors.FxEqError` naming
the conv, what was expected and what was found, before anything is written.
With ``example_inputs`` the model is also captured and its sites are compared
with the report's.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capturing import Frontend, unwrap
from .errors import FxEqError
from .modes import keep_norms
from .pipeline import find
from .report import Report
from .rewrite import check_not_equalized, fold_site, mark_folded, write_parameters
from .sites import FusingConv, Site, SiteInput

__all__ = ["apply"]

ReportSource = Report | Mapping[str, Any] | str | os.PathLike[str]
"""A :class:`~fxeq.report.Report`, its ``to_dict()``, or the path of its JSON file."""

_KEEP_NORM_NOTE = "keep_norm: per-output-channel weight norms restored"


@dataclass(frozen=True)
class _RecordedConv:
    """A fusing conv as the report describes it; ``dtype`` and ``shape`` only where recorded."""

    conv: FusingConv
    dtype: str | None
    shape: tuple[int, ...] | None
    keep_norm: bool


@dataclass(frozen=True)
class _RecordedSite:
    """A site as the report describes it, with its statistics per input index."""

    site: Site
    mean: dict[int, float]
    std: dict[int, float]
    convs: tuple[_RecordedConv, ...]


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
        example_inputs: one batch of inputs. If given, the model is captured
            and its fusion sites must be the report's. Default: None (the
            report is checked against the model's parameters only).

    Returns:
        ``model`` (or its equalized copy), marked as equalized, as
        :func:`fxeq.transform` marks it.

    Raises:
        TypeError: ``report`` or ``model`` is of the wrong type.
        ValueError: the file or dict is not an fxeq report.
        AlreadyEqualizedError: fxeq already equalized the model.
        FxEqError: the report does not fit the model, or holds no usable
            statistics. Nothing was written.

    Example:
        >>> import torch.nn.functional as F, fxeq
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b, self.fuse = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 2, 1)
        ...     def forward(self, x):
        ...         b = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0)
        ...         return self.fuse(torch.cat([self.a(x), b], 1))
        >>> net = Net()
        >>> twin = copy.deepcopy(net)
        >>> report = fxeq.transform(net, [torch.randn(2, 3, 8, 8)], inplace=True).fxeq_report
        >>> torch.equal(apply(twin, report.to_dict()).fuse.weight, net.fuse.weight)
        True
    """
    data = _report_dict(report)
    target = unwrap(model)
    if not isinstance(target, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_equalized(target)
    recorded = _recorded_sites(data)
    if example_inputs is not None:
        _compare_with_capture(target, recorded, data, example_inputs)
    if not inplace:
        target = copy.deepcopy(target)
    parameters: dict[str, torch.Tensor] = {}
    for entry in recorded:
        parameters.update(_checked_parameters(target, entry))
    new: dict[str, torch.Tensor] = {}
    for entry in recorded:
        smallest = min([*entry.std.values(), 1e-6])  # any std the report holds passed fxeq's checks when written
        folded = fold_site(entry.site, entry.mean, entry.std, parameters, min_std=smallest)
        for rc in entry.convs:
            conv = rc.conv
            if rc.keep_norm:
                folded[conv.weight], bias = keep_norms(parameters[conv.weight], folded[conv.weight],
                                                       folded.get(conv.bias or ""))
                if conv.bias is not None and bias is not None:
                    folded[conv.bias] = bias
        new.update(folded)
    write_parameters([target], new)
    mark_folded([target], {rc.conv.weight: entry.site.name for entry in recorded for rc in entry.convs})
    return model if inplace else target


# ---------------------------------------------------------------------------
# Reading the report
# ---------------------------------------------------------------------------


def _report_dict(report: ReportSource) -> Mapping[str, Any]:
    """The report as a dict, refusing what is not a calibrated "init" report."""
    if isinstance(report, Report):
        data: Any = report.to_dict()
        source = "the report"
    elif isinstance(report, Mapping):
        data, source = report, "the dict"
    elif isinstance(report, str) and report.lstrip().startswith("{"):  # Report.to_json() text
        source = "the JSON text"
        try:
            data = json.loads(report)
        except json.JSONDecodeError as e:
            raise ValueError(f"the report text is not valid JSON ({e}); expected Report.to_json()'s output") from e
    elif isinstance(report, (str, os.PathLike)):
        path = Path(report)
        source = str(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e}); expected an fxeq report (*.fxeq.json)") from e
    else:
        raise TypeError(
            "report must be an fxeq Report, a dict from Report.to_dict(), the text of Report.to_json() or the "
            "path of a .fxeq.json file, "
            f"got {type(report).__name__}"
        )
    if not isinstance(data, Mapping) or not isinstance(data.get("sites"), list):
        raise ValueError(
            f"{source} is not an fxeq report: expected a JSON object with a 'sites' list, as Report.to_dict(), "
            "`fxeq convert` and the training callbacks write"
        )
    mode = data.get("mode", "init")
    if data.get("folded") and mode != "init":
        raise FxEqError(
            f"the report was written with mode={mode!r}; fxeq.apply reproduces the weight fold (mode 'init') "
            f"only. Reproduce that run with fxeq.transform(model, loader, mode={mode!r}) on calibration data."
        )
    return data


def _recorded_sites(data: Mapping[str, Any]) -> list[_RecordedSite]:
    """Sites, statistics and conv records from a report dict."""
    recorded: list[_RecordedSite] = []
    seen: dict[str, str] = {}
    try:
        for entry in data["sites"]:
            name = str(entry["name"])
            inputs: list[SiteInput] = []
            mean: dict[int, float] = {}
            std: dict[int, float] = {}
            for inp in entry["inputs"]:
                index, channels = int(inp["index"]), (int(inp["channels"][0]), int(inp["channels"][1]))
                m, s = inp.get("mean"), inp.get("std")
                if m is None or s is None:
                    raise FxEqError(
                        f"site {name!r}, input {index} (channels {channels[0]}:{channels[1]}): the report holds no "
                        "mean and std; expected a calibrated report. Reports of fxeq.find, and of `fxeq inspect` "
                        "without --calib, have none: use the report that fxeq.transform or `fxeq convert` wrote."
                    )
                if not (math.isfinite(m) and math.isfinite(s)) or s <= 0:
                    raise FxEqError(
                        f"site {name!r}, input {index}: expected a finite mean and a finite std above 0, found "
                        f"mean={m!r}, std={s!r}. The report is damaged; write it again with fxeq.transform."
                    )
                inputs.append(SiteInput(index, str(inp.get("node", "")), channels, str(inp.get("producer", ""))))
                mean[index], std[index] = float(m), float(s)
            _check_slices(name, inputs)
            convs: list[_RecordedConv] = []
            for c in entry["convs"]:
                weight = str(c["weight"])
                if weight in seen:
                    raise FxEqError(
                        f"conv {_module(weight)}: the report lists it in sites {seen[weight]!r} and {name!r}; "
                        "expected each fusing conv in one site. The report is damaged; write it again."
                    )
                seen[weight] = name
                conv = FusingConv(
                    str(c.get("node", "")), weight.rpartition(".")[0], weight, c.get("bias"),
                    int(c.get("groups", 1)), bool(c.get("padded", False)), bool(c.get("followed_by_norm", False)),
                )
                shape = c.get("shape")
                keep_norm = c.get("keep_norm", _KEEP_NORM_NOTE in c.get("notes", ()))
                convs.append(_RecordedConv(conv, _dtype_name(c["dtype"]) if c.get("dtype") else None,
                                           tuple(int(k) for k in shape) if shape else None, bool(keep_norm)))
            if not convs:
                raise FxEqError(f"site {name!r}: the report lists no fusing conv; it is damaged, write it again.")
            site = Site(name, tuple(inputs), tuple(rc.conv for rc in convs), tuple(entry.get("depends_on", ())))
            recorded.append(_RecordedSite(site, mean, std, tuple(convs)))
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(
            f"the report's sites are incomplete ({type(e).__name__}: {e}); expected the fields that "
            "Report.to_dict() writes (name, inputs with index, channels, mean, std; convs with weight, bias, groups)"
        ) from e
    return recorded


def _check_slices(site: str, inputs: Sequence[SiteInput]) -> None:
    """The report's slices must tile the concatenation's channels, in order."""
    stop = 0
    for inp in inputs:
        start, end = inp.channels
        if start != stop or end <= start:
            raise FxEqError(
                f"site {site!r}, input {inp.index}: expected channels starting at {stop}, found {start}:{end}. "
                "A report's slices tile the concatenation in order; this one is damaged, write it again with "
                "fxeq.transform."
            )
        stop = end
    if not inputs:
        raise FxEqError(f"site {site!r}: the report lists no inputs; it is damaged, write it again.")


# ---------------------------------------------------------------------------
# Checking the model
# ---------------------------------------------------------------------------


def _checked_parameters(model: nn.Module, entry: _RecordedSite) -> dict[str, torch.Tensor]:
    """The current tensors of a recorded site's conv parameters, after checking each conv against the report."""
    site = entry.site
    slices = ", ".join(f"{i.channels[0]}:{i.channels[1]}" for i in site.inputs)
    found: dict[str, torch.Tensor] = {}
    for rc in entry.convs:
        conv = rc.conv
        where = f"conv {_module(conv.weight)} (site {site.name!r})"
        weight = _parameter(model, conv.weight, where, "weight")
        owner = model.get_submodule(conv.module) if conv.module else model
        # the conv module owning this weight, when there is one (functional convs have none)
        module_conv = owner if isinstance(owner, nn.modules.conv._ConvNd) and owner.weight is weight else None
        if weight.dim() < 3 or isinstance(owner, nn.modules.conv._ConvTransposeNd):
            kind = type(owner).__name__ if module_conv is not None else f"a {weight.dim()}-D parameter"
            raise FxEqError(
                f"{where}: expected a conv weight (out, in / groups, *kernel), found {kind} of shape "
                f"{tuple(weight.shape)}. The model is not the one the report was written for; build the same "
                "architecture and configuration."
            )
        groups = module_conv.groups if module_conv is not None else conv.groups
        if groups != conv.groups:
            raise FxEqError(
                f"{where}: expected groups={conv.groups}, found groups={groups}. The model is not the one the "
                "report was written for; build the same architecture and configuration."
            )
        channels = weight.shape[1] * conv.groups
        if channels != site.channels:
            raise FxEqError(
                f"{where}: expected {site.channels} input channels (the report's slices {slices}), found "
                f"{channels} ({conv.weight} of shape {tuple(weight.shape)}, groups={conv.groups}). The model is "
                "not the one the report was written for; build the same architecture and configuration."
            )
        if rc.shape is not None and tuple(weight.shape) != rc.shape:
            raise FxEqError(
                f"{where}: expected weight shape {rc.shape}, found {tuple(weight.shape)}. The model is not the "
                "one the report was written for; build the same architecture and configuration."
            )
        if rc.dtype is not None and _dtype_name(weight.dtype) != rc.dtype:
            raise FxEqError(
                f"{where}: expected dtype {rc.dtype}, found {_dtype_name(weight.dtype)}; the statistics were "
                f"measured in {rc.dtype}. Apply the report to the model in {rc.dtype} (e.g. model.to(torch."
                f"{rc.dtype}), then cast it), or calibrate this model with fxeq.transform."
            )
        found[conv.weight] = weight.detach()
        if conv.bias is not None:
            bias = _parameter(model, conv.bias, where, "bias")
            if tuple(bias.shape) != (weight.shape[0],):
                raise FxEqError(
                    f"{where}: expected bias {conv.bias} of shape ({weight.shape[0]},), found "
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


def _compare_with_capture(
    model: nn.Module,
    recorded: Sequence[_RecordedSite],
    data: Mapping[str, Any],
    example_inputs: torch.Tensor | tuple[Any, ...] | dict[str, Any],
) -> None:
    """Capture the model on one batch and require its fusion sites to be the report's."""
    named = data.get("frontend")
    frontend: Frontend = "fx" if named == "fx" else "export" if named == "export" else "auto"
    search = find(model, example_inputs, frontend=frontend, all_concats=True).search
    convs = {c.weight: site for site in search.sites for c in site.convs}
    for entry in recorded:
        expected = [i.channels for i in entry.site.inputs]
        for rc in entry.convs:
            where = f"conv {_module(rc.conv.weight)} (site {entry.site.name!r})"
            site = convs.get(rc.conv.weight)
            if site is None:
                fusing = sorted(_module(w) for w in convs) or "none"
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
    reported = {rc.conv.weight for entry in recorded for rc in entry.convs}
    extra = [c.weight for s in search.sites if any(i.upsample for i in s.inputs) for c in s.convs
             if c.weight not in reported]
    if extra:
        raise FxEqError(
            f"conv {_module(extra[0])}: expected only the report's fusing convs "
            f"({', '.join(sorted(_module(w) for w in reported)) or 'none'}), found that this conv also fuses "
            "upsampled features, with no statistics in the report. Use the report written for this model, or "
            "calibrate it with fxeq.transform."
        )


def _module(weight: str) -> str:
    return weight.rpartition(".")[0] or "<root>"


def _slices(slices: Sequence[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in slices) + "]"


def _dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float32`` and ``"torch.float32"`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")
