"""Report: what fxeq found, measured and folded, as a table and as JSON.

Every site appears with its fusing convs, each input's channel slice,
producer, upsample mode and factor, and (after calibration) mean, std and
samples seen, plus what was folded and the caveats that apply. Every channel
concatenation that was not a site appears with the reason.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ._version import __version__
from .calibration import Calibration, InputStats
from .modes import STRATEGIES
from .sites import FusingConv, Site, SiteSearch

__all__ = ["Report", "plural", "versions"]


def versions() -> dict[str, str]:
    """Versions of Python, torch, torchvision and fxeq, for reproducible reports."""
    import torchvision

    return {
        "python": platform.python_version(), "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__), "fxeq": __version__,
    }


def _conv_notes(conv: FusingConv, mode: str) -> list[str]:
    """Caveats of the equalizer at one conv, for a mode."""
    note = STRATEGIES[mode].note
    if mode == "explicit":
        return [note]
    notes = [note] if note else []
    if conv.bias is None:
        notes.append("no bias: the mean was not folded (adding a bias would change state_dict keys)")
    elif conv.padded:
        notes.append("mean fold is exact away from zero-padded borders only")
    if conv.followed_by_norm and conv.bias is not None:
        notes.append("a normalization follows: the mean fold has no effect in training")
    return notes


@dataclass
class Report:
    """The outcome of fxeq on one model.

    Attributes:
        search: the sites and skipped concatenations.
        frontend: ``"fx"`` or ``"export"``.
        stats: per (site, input index), the calibration statistics (empty
            before calibration).
        folded: whether the equalizer was put into the model.
        mode: how: ``"init"``, ``"reparam"`` or ``"explicit"``.
        notes: per fusing-conv weight name, remarks added by the rewrite.
        extra: free-form fields added by callers (e.g. the CLI's command line).

    Example:
        >>> report = Report(SiteSearch((), ()), "fx")
        >>> print(report.table())
        fxeq: 0 sites, 0 concatenations skipped (frontend fx, not calibrated)
    """

    search: SiteSearch
    frontend: Literal["fx", "export"]
    stats: Mapping[tuple[str, int], InputStats] = field(default_factory=dict)
    folded: bool = False
    mode: Literal["init", "reparam", "explicit"] = "init"
    notes: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None

    def calibration_summary(self) -> dict[str, Any] | None:
        """Passes, batches, time and semantics of the calibration, or None before it."""
        c = self.calibration
        if c is None:
            return None
        semantics = ("one pass: sites downstream of another site are approximate" if c.one_pass and c.passes
                     else "one site at a time, each measured after the folds upstream of it")
        return {"passes": c.passes, "batches": c.batches, "seconds": round(c.seconds, 3), "semantics": semantics}

    def disequilibrium(self, site: Site) -> float | None:
        """Largest over smallest input std at a site, or None before calibration."""
        stds = [self.stats[site.name, i.index].std for i in site.inputs if (site.name, i.index) in self.stats]
        return max(stds) / min(stds) if stds and min(stds) > 0 else None

    def _conv_notes(self, conv: FusingConv) -> list[str]:
        return (_conv_notes(conv, self.mode) if self.folded else []) + self.notes.get(conv.weight, [])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        sites = []
        for site in self.search.sites:
            inputs = []
            for inp in site.inputs:
                entry: dict[str, Any] = {
                    "index": inp.index, "node": inp.node, "channels": list(inp.channels),
                    "producer": inp.producer, "upsample": inp.upsample,
                    "scale": list(inp.scale) if inp.scale else None,
                }
                stat = self.stats.get((site.name, inp.index))
                if stat is not None:
                    entry.update(mean=stat.mean, std=stat.std, count=stat.count, samples=stat.samples)
                inputs.append(entry)
            convs = [
                {
                    "node": c.node, "module": c.module, "weight": c.weight, "bias": c.bias, "groups": c.groups,
                    "dtype": c.dtype,
                    "padded": c.padded, "followed_by_norm": c.followed_by_norm,
                    "folded_scale": self.folded, "folded_mean": self.folded and c.bias is not None,
                    "notes": self._conv_notes(c),
                }
                for c in site.convs
            ]
            sites.append({
                "name": site.name, "convs": convs, "inputs": inputs, "depends_on": list(site.depends_on),
                "disequilibrium": self.disequilibrium(site), "notes": list(site.notes),
            })
        return {
            "frontend": self.frontend, "folded": self.folded, "mode": self.mode,
            "calibration": self.calibration_summary(), "sites": sites,
            "skipped": [{"node": s.node, "reason": s.reason} for s in self.search.skipped],
            "versions": versions(), **self.extra,
        }

    def to_json(self, **kwargs: Any) -> str:
        """The report as JSON text (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    def table(self) -> str:
        """The report as a plain-text table."""
        state = f"mode {self.mode}" if self.folded else ("calibrated" if self.stats else "not calibrated")
        lines = [
            f"fxeq: {plural(len(self.search.sites), 'site')}, "
            f"{plural(len(self.search.skipped), 'concatenation')} skipped "
            f"(frontend {self.frontend}, {state})"
        ]
        summary = self.calibration_summary()
        if summary is not None:
            lines.append(f"calibration: {summary['semantics']}; {plural(summary['passes'], 'pass', 'passes')}, "
                         f"{plural(summary['batches'], 'batch', 'batches')}, {summary['seconds']:.2f} s")
        for site in self.search.sites:
            convs = ", ".join(c.module for c in site.convs)
            ratio = self.disequilibrium(site)
            ratio_text = f"; std max/min {ratio:.2f}" if ratio is not None else ""
            lines.append(f"site {site.name} -> {convs}{ratio_text}")
            lines.append(
                f"  {'in':>3} {'channels':>11}  {'upsample':<16} {'mean':>10} {'std':>10} {'samples':>7}  producer"
            )
            for inp in site.inputs:
                stat = self.stats.get((site.name, inp.index))
                up = f"{inp.upsample} x{_scale(inp.scale)}" if inp.upsample else "-"
                mean, std, samples = (
                    (f"{stat.mean:.4g}", f"{stat.std:.4g}", str(stat.samples)) if stat else ("-", "-", "-")
                )
                lines.append(
                    f"  {inp.index:>3} {f'{inp.channels[0]}:{inp.channels[1]}':>11}  {up:<16} "
                    f"{mean:>10} {std:>10} {samples:>7}  {inp.producer}"
                )
            for conv in site.convs:
                for note in self._conv_notes(conv):
                    lines.append(f"  note ({conv.module}): {note}")
            for note in site.notes:
                lines.append(f"  note: {note}")
            if site.depends_on:
                lines.append(f"  calibrated after: {', '.join(site.depends_on)}")
        for skipped in self.search.skipped:
            lines.append(f"skipped {skipped.node}: {skipped.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _scale(scale: tuple[float, ...] | None) -> str:
    if not scale:
        return "?"
    if len(set(scale)) == 1:
        return f"{scale[0]:.3g}"
    return "/".join(f"{s:.3g}" for s in scale)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and the noun in agreement; ``nouns`` for irregular plurals.

    Example:
        >>> plural(1, "site"), plural(2, "batch", "batches")
        ('1 site', '2 batches')
    """
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
