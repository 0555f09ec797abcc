"""Rewrite: put the measured equalizer into a model, transactionally, in any mode.

One entry, :func:`equalize`, used by :func:`fxeq.convert` (the captured graph
and, with ``inplace=True``, the user's model), by :func:`fxeq.apply` (a
report's statistics, no data) and so by the training callbacks and the
benchmarks::

    folded tensors ── keep_norm policy ── what the mode writes ── validate all ── install ── write ── mark
    (fxeq.fold)       (init only)          (STRATEGIES)           (shapes)        (hooks,    (copy_)  (AlreadyEqualized
                                                                                   params)              next time)

Nothing is written until every tensor has been computed and validated, so a
failure leaves the model exactly as it was. The mark on each rewritten conv
module (:func:`mark_folded`) makes a second run refuse, since the fold
leaves the concatenation's inputs as they were and a second run would divide
the weights again (:func:`check_not_equalized`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from ._model import resolve_owner
from .errors import AlreadyEqualizedError, FxEqError
from .fold import keep_norms, site_vectors
from .modes import STRATEGIES, Mode, check_mode
from .report import converted_report
from .sites import Site

__all__ = [
    "Rewritten", "check_not_equalized", "copy_into", "equalize", "mark_folded", "resolve_parameters",
    "write_parameters",
]

_MARK = "_fxeq_folded"
_KEEP_NORM = "keep_norm: per-output-channel weight norms restored"


@dataclass(frozen=True)
class Rewritten:
    """What :func:`equalize` did, per fusing-conv weight name.

    Attributes:
        writes: the conv's tensors that were written (``"weight"``, ``"bias"``).
        notes: remarks for the report (keep_norm applied or refused).
        keep_norm: the convs whose weight norms were restored.
    """

    writes: dict[str, tuple[str, ...]]
    notes: dict[str, list[str]]
    keep_norm: frozenset[str] = frozenset()


def equalize(
    sites: Sequence[Site],
    mean: Mapping[tuple[str, int], float],
    std: Mapping[tuple[str, int], float],
    folded: Mapping[str, torch.Tensor],
    *,
    graph: fx.GraphModule | None = None,
    model: nn.Module | None = None,
    mode: Mode = "init",
    keep_norm: bool = False,
    norms: Collection[str] | None = None,
) -> Rewritten:
    """Write the equalizer of ``sites`` into ``graph`` and ``model`` in ``mode``, all or nothing.

    Args:
        sites: the sites to equalize.
        mean: per (site name, input index), the mean folded.
        std: per (site name, input index), the std folded.
        folded: per parameter name, the folded tensor (:func:`fxeq.fold.fold_site`),
            for every fusing conv's weight (and bias where the mean folds).
        graph: the captured graph module, or None.
        model: the model whose own parameters are rewritten too (it may share
            them with ``graph``), or None. At least one of the two.
        mode: see :mod:`fxeq.modes`. Default: ``"init"``.
        keep_norm: restore each output channel's weight norm after the fold,
            where a batch norm alone reads the conv (refused elsewhere, with
            a note). Default: False.
        norms: with ``keep_norm``, exactly the convs (weight names) whose norms
            to restore, as a report recorded them, instead of that policy.
            Default: None.

    Returns:
        :class:`Rewritten`.

    Raises:
        ValueError: unknown mode, or ``keep_norm`` with a mode it does not apply to.
        FxEqError: a parameter's shape differs from its new tensor's; nothing is written.
    """
    check_mode(mode, keep_norm)
    modules = [m for m in (graph, model) if m is not None]
    if not modules:
        raise ValueError("equalize needs a graph or a model to write into: pass graph=..., model=... or both")
    strategy = STRATEGIES[mode]
    new = dict(folded)
    notes: dict[str, list[str]] = {}
    kept: set[str] = set()
    writes: dict[str, tuple[str, ...]] = {}
    installs = []
    for site in sites:
        keys = [(site.name, i.index) for i in site.inputs]
        mean_vec, std_vec = site_vectors(site, {k[1]: mean[k] for k in keys}, {k[1]: std[k] for k in keys})
        for conv in site.convs:
            if keep_norm and norms is not None and conv.weight not in norms:
                pass  # the recorded run did not restore this conv's norms
            elif keep_norm and norms is None and (conv.batch_norm is None or conv.transposed):
                why = "no batch norm reads this conv, so its output depends on the weight norm" \
                    if conv.batch_norm is None else "a transposed conv's output channels are not its weight's rows"
                notes.setdefault(conv.weight, []).append(f"keep_norm refused: {why}")
            elif keep_norm:
                original = modules[0].get_parameter(conv.weight)
                new[conv.weight], bias = keep_norms(original, new[conv.weight], new.get(conv.bias or ""))
                if conv.bias is not None and bias is not None and conv.bias in new:
                    new[conv.bias] = bias
                notes.setdefault(conv.weight, []).append(_KEEP_NORM)
                kept.add(conv.weight)
            written = []
            for kind, name in (("weight", conv.weight), ("bias", conv.bias)):
                if name is None or name not in new:
                    continue
                if kind in strategy.writes:
                    written.append(kind)
                else:
                    new.pop(name)
            writes[conv.weight] = tuple(written)
            installs.append((conv, mean_vec, std_vec))
    pairs = resolve_parameters(modules, new)  # validate everything before changing anything
    if strategy.install is not None:
        for conv, mean_vec, std_vec in installs:
            strategy.install(graph, model, conv, mean_vec, std_vec)
    copy_into(pairs)
    mark_folded(modules, {conv.weight: site.name for site in sites for conv in site.convs})
    return Rewritten(writes, notes, frozenset(kept))


def check_not_equalized(model: nn.Module) -> None:
    """Refuse a model any conv of which fxeq already equalized, in any mode.

    The fold leaves the concatenation's inputs as they were, so a second run
    would measure the same statistics and divide the weights again. Two
    traces tell: the mark (set by :func:`mark_folded`), which lives on the
    conv modules and survives ``copy.deepcopy``, "reparam" parametrizations
    and :func:`fxeq.finalize`; and, for a Hugging Face model loaded with
    ``from_pretrained`` from a local folder, fxeq's report in that folder
    (``name_or_path``), since no mark survives ``save_pretrained``.

    Raises:
        AlreadyEqualizedError: naming the conv, or the folder and its report.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 1, 1))
        >>> mark_folded([net], {"0.weight": "cat"})
        >>> check_not_equalized(net)
        Traceback (most recent call last):
        ...
        fxeq.errors.AlreadyEqualizedError: conv 0 was already equalized by fxeq (site 'cat'); equalizing again \
would divide its weight twice. Use the model as it is, or start again from the original checkpoint.
    """
    for path, module in model.named_modules():
        marks = module.__dict__.get(_MARK)
        if marks:
            site = next(iter(marks.values()))
            raise AlreadyEqualizedError(
                f"conv {path or type(module).__name__} was already equalized by fxeq (site {site!r}); "
                "equalizing again would divide its weight twice. Use the model as it is, or start again "
                "from the original checkpoint."
            )
    source = getattr(model, "name_or_path", None)
    report = converted_report(source) if isinstance(source, str) and source and Path(source).is_dir() else None
    if report is not None:
        raise AlreadyEqualizedError(
            f"{type(model).__name__} was loaded from {source}, which fxeq already equalized ({report} lies in "
            "it); equalizing again would divide its fusing convs' weights twice. Load the original checkpoint "
            "instead, or use this model as it is."
        )


def resolve_parameters(
    modules: Iterable[nn.Module], new: Mapping[str, torch.Tensor]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Match new tensors to the named parameters of each module, validating every one.

    A module that does not hold a name is skipped. Parameters shared between
    modules appear once.

    Raises:
        FxEqError: a parameter's shape differs from its new tensor's.
    """
    targets: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for module in modules:
        for name, tensor in new.items():
            owner, local = resolve_owner(module, name)
            param = getattr(owner, local, None) if owner is not None else None
            if not isinstance(param, nn.Parameter):
                continue
            if param.shape != tensor.shape:
                raise FxEqError(f"parameter {name} has shape {tuple(param.shape)}, expected {tuple(tensor.shape)}")
            targets[id(param)] = (param, tensor)
    return list(targets.values())


def write_parameters(modules: Iterable[nn.Module], new: Mapping[str, torch.Tensor]) -> None:
    """Copy new tensors into the named parameters of each module, all validated first.

    Raises:
        FxEqError: a parameter's shape differs from its new tensor's (nothing is written).
    """
    copy_into(resolve_parameters(modules, new))


def copy_into(pairs: Iterable[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Write each tensor into its parameter (see :func:`resolve_parameters`)."""
    with torch.no_grad():
        for param, tensor in pairs:
            param.copy_(tensor)


def mark_folded(modules: Iterable[nn.Module], weight_sites: Mapping[str, str]) -> None:
    """Record on each weight's owning module that fxeq equalized it (see :func:`check_not_equalized`)."""
    for module in modules:
        for name, site in weight_sites.items():
            owner, local = resolve_owner(module, name)
            if owner is not None:
                owner.__dict__.setdefault(_MARK, {})[local] = site
