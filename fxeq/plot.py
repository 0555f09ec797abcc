"""The report as a picture: each site's input scales before fxeq and after it (needs matplotlib, the ``plot`` extra).

One panel per fusion site, in the shape of the paper's Figure 2: a bar per
concatenation input with the std it reaches the fusing conv with as measured
(before fxeq), beside the std the conv effectively receives after the fold
(the measured std divided by the folded one: 1 by construction, where the
statistics are those the fold used). Inputs are labelled by index, producer
and upsampling, upsampled ones in another colour, and the panel's title gives
the fusing conv and the largest/smallest std ratio before and after. Chained
sites show what one-site-at-a-time calibration measured: a downstream site
after the folds upstream of it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_report"]

_PLOT_EXTRA = "pip install -e '.[plot]' (in your clone of fxeq)"
_COLUMNS = 3
_LABEL = 34  # characters of an input's label kept under its bar


def plot_report(report: Any, path: str | os.PathLike[str]) -> Path:
    """Draw ``report`` (a :class:`fxeq.report.Report`) as a PNG at ``path`` (its folder must exist); return the path.

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
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg", force=False)
        from matplotlib import pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"drawing the report needs matplotlib, which is not installed: {_PLOT_EXTRA}") from e
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"the plot is written as PNG; end its path with .png, got {target.name!r}")
    sites = [s for s in report.search.sites if all((s.name, i.index) in report.stats for i in s.inputs)]
    if not sites:
        raise ValueError("the report has no calibrated fusion site to draw (fxeq.find's reports, and reports of "
                         "models without sites, have no statistics); calibrate first")
    columns = min(_COLUMNS, len(sites))
    rows = math.ceil(len(sites) / columns)
    widest = max(len(s.inputs) for s in sites)
    figure, axes = plt.subplots(rows, columns, figsize=(max(4.2, 0.9 * widest + 1.6) * columns, 4.6 * rows),
                                squeeze=False)
    for ax, site in zip(axes.flat, sites, strict=False):
        _panel(ax, report, site)
    for ax in list(axes.flat)[len(sites):]:
        ax.axis("off")
    state = f"mode {report.mode}" if report.folded else "measured, not yet folded"
    figure.suptitle(f"fxeq: scale of each fusion input at its fusing conv ({state}; frontend {report.frontend})",
                    fontsize=12)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (_COLOURS["upsampled"], _COLOURS["kept"])]
    handles.append(plt.Line2D([0], [0], color=_COLOURS["after"], marker="D", linestyle=""))
    figure.legend(handles, ["before fxeq: upsampled input", "before fxeq: not upsampled",
                            "after fxeq: what the conv receives"], loc="lower center", ncol=3, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


_COLOURS = {"upsampled": "#d95f02", "kept": "#1b9e77", "after": "#303030"}


def _panel(ax: Any, report: Any, site: Any) -> None:
    stds = [report.stats[site.name, i.index].std for i in site.inputs]
    ratio = max(stds) / min(stds)
    positions = range(len(stds))
    colours = [_COLOURS["upsampled" if i.upsample else "kept"] for i in site.inputs]
    ax.bar(positions, stds, color=colours, width=0.6)
    ax.plot(positions, [1.0] * len(stds), "D", color=_COLOURS["after"], markersize=7)
    ax.axhline(1.0, color=_COLOURS["after"], linewidth=0.8, linestyle=":")
    for x, std in zip(positions, stds, strict=True):
        ax.annotate(f"{std:.3g}", (x, std), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(list(positions))
    ax.set_xticklabels([_label(i) for i in site.inputs], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("std of the input (its scale)")
    ax.set_ylim(0, max(1.15, max(stds) * 1.18))
    convs = ", ".join(c.module or "<root>" for c in site.convs)
    after = "1.00" if report.folded else "1.00 once folded"
    chained = f"\n(after {', '.join(site.depends_on)})" if site.depends_on else ""
    ax.set_title(f"{site.name} -> {convs}\nstd max/min {ratio:.2f} before, {after} after{chained}", fontsize=9)


def _label(inp: Any) -> str:
    producer = inp.producer if len(inp.producer) <= _LABEL else "..." + inp.producer[-(_LABEL - 3):]
    up = f", {inp.upsample} x{_factor(inp.scale)}" if inp.upsample else ""
    return f"{inp.index}: {producer}{up}"


def _factor(scale: tuple[float, ...] | None) -> str:
    if not scale:
        return "?"
    return f"{scale[0]:.3g}" if len(set(scale)) == 1 else "/".join(f"{s:.3g}" for s in scale)
