"""The report as a picture: each site's input scales before fxeq and after it (needs matplotlib, the ``plot`` extra).

One panel per fusion site, in the shape of the paper's Figure 2::

    decoder.fusion_block.0  (site cat_1, after cat)
    std max/min 1.28 -> 1.00
      |  ▆▆ ▒▒    ▆▆ ▒▒    ▆▆ ▒▒       ▆▆  before fxeq: the input's std as measured
      |  ▆▆ ▒▒    ▆▆ ▒▒    ▆▆ ▒▒       ▒▒  after fxeq: what the fusing conv receives
      +---------------------------------
         0: ...    1: ...   2: ...        (producer, upsampling, channels)

Before is the std each input reaches its fusing conv with, as measured:
chained sites show what one-site-at-a-time calibration measured, a
downstream site after the folds upstream of it. After is that std divided by
the std the fold used: 1 by construction in a fresh conversion, approximate
(marked) for downstream sites measured in one pass, and, for a converted
model measured again (``folded=``), what its conv really receives now.
The std axis is logarithmic, so equal ratios look equal.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._text import factor

__all__ = ["PLOT_EXTRA", "plot_report"]

PLOT_EXTRA = "pip install -e '.[plot]' (in your clone of fxeq)"
_LABEL = 34  # characters of a producer kept beside its bars
_COLOURS = {"upsampled": "#d95f02", "kept": "#1b9e77", "after": "#7570b3"}


def plot_report(
    report: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    folded: Mapping[tuple[str, int], float] | None = None,
) -> Path:
    """Draw ``report`` (a :class:`fxeq.report.Report`) as a PNG at ``path`` (its folder must exist); return the path.

    Args:
        report: a calibrated report.
        path: where the PNG goes (``.png``).
        title: what the picture is of (e.g. the model's name); shown first. Default: None.
        folded: per (site, input index), the std a conversion folded, when
            ``report`` measured a model that was converted before (the
            command line's ``inspect`` of a converted checkpoint): after is
            then the measured std over this one. Default: None (the report's
            own statistics were folded, or will be).

    Raises:
        ImportError: matplotlib is not installed (the message names the extra).
        ValueError: the report has no calibrated site to draw, or ``path`` is not a ``.png``.

    Example:
        >>> import tempfile
        >>> from fxeq.observe import InputStats
        >>> from fxeq.sites import FusingConv, Site, SiteInput, SiteSearch
        >>> from fxeq.report import Report
        >>> inputs = (SiteInput(0, "a", (0, 2), "a (ReLU)"), SiteInput(1, "b", (2, 4), "b (ReLU)", "bilinear", (4.0, 4.0)))
        >>> site = Site("cat", inputs, (FusingConv("c", "fuse", "fuse.weight", None, 1, False, False),))
        >>> stats = {("cat", 0): InputStats(0.4, 0.6, 64, 2), ("cat", 1): InputStats(0.4, 0.3, 64, 2)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     plot_report(Report(SiteSearch((site,), ()), "fx", stats, folded=True), Path(d) / "r.png").name
        'r.png'
    """
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional; no pyplot, so no backend is switched
        from matplotlib.lines import Line2D  # noqa: PLC0415
        from matplotlib.patches import Patch  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"drawing the report needs matplotlib, which is not installed: {PLOT_EXTRA}") from e
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"the plot is written as PNG; end its path with .png, got {target.name!r}")
    sites = [s for s in report.search.sites if all((s.name, i.index) in report.stats for i in s.inputs)]
    if not sites:
        raise ValueError("the report has no calibrated fusion site to draw (fxeq.find's reports, and reports of "
                         "models without sites, have no statistics); calibrate first")
    columns = 1 if len(sites) <= 4 else 2
    rows = math.ceil(len(sites) / columns)
    per_row = [max(len(s.inputs) for s in sites[r * columns:(r + 1) * columns]) for r in range(rows)]
    figure = Figure(figsize=(7.5 * columns, sum(0.42 * n + 1.3 for n in per_row) + 1.2), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw={"height_ratios": per_row})
    for ax, site in zip(axes.flat, sites, strict=False):
        _panel(ax, report, site, folded)
    for ax in list(axes.flat)[len(sites):]:
        ax.set_visible(False)
    figure.suptitle(_heading(report, title, folded is not None), fontsize=11)
    handles = [Patch(color=_COLOURS["upsampled"], label="before fxeq: upsampled input"),
               Patch(color=_COLOURS["kept"], label="before fxeq: input not upsampled"),
               Patch(color=_COLOURS["after"], label="after fxeq: what the fusing conv receives"),
               Line2D([0], [0], color="#303030", linestyle=":", label="std 1")]
    figure.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False, fontsize=8.5)
    figure.savefig(target, dpi=110)
    return target


def _heading(report: Any, title: str | None, measured_again: bool) -> str:
    samples = max((s.samples for s in report.stats.values()), default=0)
    if measured_again:
        state = "a converted model, measured again"
    elif report.folded:
        state = f"mode {report.mode}"
    else:
        state = "measured, not yet folded"
    calibration = getattr(report, "calibration", None)
    one_pass = "\none pass: sites downstream of another are approximate" \
        if calibration is not None and calibration.one_pass else ""
    return (f"{title + ': ' if title else ''}the scale of each fusion input at its fusing conv\n{state}; "
            f"{samples} samples per input; frontend {report.frontend}{one_pass}")


def _after(report: Any, site: Any, folded: Mapping[tuple[str, int], float] | None) -> tuple[list[float], str]:
    """What the conv receives after fxeq, per input, and how to read it ("", "≈" or "once folded")."""
    stds = [report.stats[site.name, i.index].std for i in site.inputs]
    if folded is not None and all((site.name, i.index) in folded for i in site.inputs):
        return [s / folded[site.name, i.index] for s, i in zip(stds, site.inputs, strict=True)], ""
    calibration = getattr(report, "calibration", None)
    approximate = calibration is not None and calibration.one_pass and bool(site.depends_on)
    return [1.0] * len(stds), "≈" if approximate else "" if report.folded else "once folded"


def _panel(ax: Any, report: Any, site: Any, folded: Mapping[tuple[str, int], float] | None) -> None:
    stds = [report.stats[site.name, i.index].std for i in site.inputs]
    after, how = _after(report, site, folded)
    rows = list(range(len(stds)))
    colours = [_COLOURS["upsampled" if i.upsample else "kept"] for i in site.inputs]
    height = 0.38
    ax.barh([y - height / 2 for y in rows], stds, height, color=colours)
    ax.barh([y + height / 2 for y in rows], after, height, color=_COLOURS["after"],
            alpha=0.45 if how else 1.0, hatch="//" if how else None)
    ax.axvline(1.0, color="#303030", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    low, high = min(*stds, *after), max(*stds, *after)
    ax.set_xlim(low / 1.5, high * 1.6)
    ticks = [t for t in _TICKS if low / 1.5 <= t <= high * 1.6]
    if len(ticks) >= 2:  # else matplotlib's own log ticks, for a range beyond the table's
        ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter("{x:g}")
    ax.xaxis.set_minor_formatter("")
    for y, value in zip(rows, stds, strict=True):
        ax.annotate(f" {value:.3g}", (value, y - height / 2), va="center", fontsize=7)
    for y, value in zip(rows, after, strict=True):
        ax.annotate(f" {'≈' if how == '≈' else ''}{value:.3g}", (value, y + height / 2), va="center", fontsize=7)
    ax.set_yticks(rows)
    ax.set_yticklabels([_label(i) for i in site.inputs], fontsize=7.5)
    ax.invert_yaxis()  # input 0 on top
    ax.set_xlabel("std of the input at the conv (log axis)", fontsize=8)
    ratio = max(stds) / min(stds)
    ratio_after = max(after) / min(after)
    convs = ", ".join(c.module or "<root>" for c in site.convs)
    after_sites = ", ".join(site.depends_on[:2]) + (f" and {len(site.depends_on) - 2} more"
                                                    if len(site.depends_on) > 2 else "")
    chained = f", calibrated after {after_sites}" if site.depends_on else ""  # a title that fits its panel
    after_text = f"{ratio_after:.2f}" + (f" ({how})" if how == "once folded" else " (approximate)" if how else "")
    ax.set_title(f"{convs}  (site {site.name}{chained})\nstd max/min {ratio:.2f} before → {after_text} after",
                 fontsize=9, loc="left")


_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
          1000.0)


def _label(inp: Any) -> str:
    """Two lines: index, producer; upsampling and channels."""
    producer = inp.producer if len(inp.producer) <= _LABEL else "…" + inp.producer[-(_LABEL - 1):]
    up = f"{inp.upsample} x{factor(inp.scale)}" if inp.upsample else "not upsampled"
    if inp.padded:
        up += ", padded"
    return f"{inp.index}: {producer}\n{up}, ch {inp.channels[0]}:{inp.channels[1]}"
