"""Variance: the method's own claims, measured.

Three measurements:

1. **Bilinear upsampling lowers variance.** For i.i.d. input, upsampling by an
   integer ratio r with ``align_corners=False`` multiplies the variance, away
   from the borders (where edge pixels are replicated), by the square of the
   per-axis factor ``mean_t((1 - t)^2 + t^2)`` over the fractional source
   offsets t of the r output phases (:func:`closed_form`). For even r the
   offsets are (2j + 1) / (2r) and the ratio is the commonly quoted
   ``(2/3 - 1/(6 r^2))^2``; for odd r they are j / r and it is
   ``(2/3 + 1/(3 r^2))^2``. Measured for r = 2..8 next to both, together with
   ``align_corners=True`` (whose ratio tends to 4/9 for large maps) and
   nearest upsampling (exactly 1: every value is repeated r^2 times).
2. **The paper's setup** (the official code release's only script):
   N, H, W, C = 16, 128, 128, 256 and x ~ Normal(0.3989, v) for v from 0.01 to
   0.99, where v is the variance; the ratio of the variance after and before
   x2 bilinear upsampling.
3. **Disequilibrium in real decoders.** Every model of the latency list at
   initialization, on random images, with batch norm using batch statistics
   as fxeq calibrates: per fusion site, the largest over the smallest input
   std before fxeq, and after. "After" is what the folded conv effectively
   reads, ``x_i / sigma_i`` (``conv(x, W / sigma) = conv(x / sigma, W)``):
   the inputs are re-measured on the rewritten model (so upstream folds
   count) over fresh batches that fxeq did not calibrate on, by fxeq's own
   observers under its calibration semantics (:func:`slice_stds`), and
   divided by fxeq's sigma_i. Equalized inputs give 1.00.

Plots (PNG) are written when matplotlib is importable (``pip install
fxeq[plot]``); otherwise they are skipped with a note.

Run ``python benchmarks/variance.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxeq
from fxeq._model import calibration_mode
from fxeq.observe import InputStats
from fxeq.observe import SiteObservers
from fxeq.report import Report
from fxeq.sites import Site

from _common import (
    Option, build_model, describe_model, find_options, markdown_table, parser, random_images, start,
)

__all__ = ["closed_form", "disequilibrium", "even_formula", "iid_ratios", "main", "paper_ratios", "slice_stds"]

PAPER_MEAN = 0.3989


def even_formula(r: int) -> float:
    """The commonly quoted ratio ``(2/3 - 1/(6 r^2))^2``, exact for even ``r`` only.

    Example:
        >>> round(even_formula(2), 4)
        0.3906
    """
    return (2 / 3 - 1 / (6 * r**2)) ** 2


def closed_form(r: int) -> float:
    """Variance ratio of i.i.d. input after bilinear upsampling by ``r`` (align_corners=False, interior).

    Output pixel k reads source position (k + 0.5) / r - 0.5 with weights
    1 - t and t, t its fractional part; the variance factor per axis is the
    mean of (1 - t)^2 + t^2 over the r phases.

    Example:
        >>> [round(closed_form(r), 4) for r in (1, 2, 3)]
        [1.0, 0.3906, 0.4952]
    """
    axis = 2 / 3 - 1 / (6 * r**2) if r % 2 == 0 else 2 / 3 + 1 / (3 * r**2)
    return axis**2


def _ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    return (after.double().var(correction=0) / before.double().var(correction=0)).item()


def iid_ratios(shape: Sequence[int], ratios: Sequence[int], *, seed: int) -> list[dict[str, float]]:
    """Measured variance ratios of standard-normal i.i.d. input ``(N, C, H, W)`` per upsampling ratio."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for r in ratios:
        bilinear = F.interpolate(x, scale_factor=r, mode="bilinear", align_corners=False)
        rows.append({
            "r": r,
            "closed_form": closed_form(r),
            "even_formula": even_formula(r),
            "bilinear_interior": _ratio(x, bilinear[..., r:-r, r:-r]),
            "bilinear_whole": _ratio(x, bilinear),
            "bilinear_align_corners": _ratio(
                x, F.interpolate(x, scale_factor=r, mode="bilinear", align_corners=True)),
            "nearest": _ratio(x, F.interpolate(x, scale_factor=r, mode="nearest")),
        })
    return rows


def paper_ratios(shape_nhwc: Sequence[int], variances: Sequence[float], *, seed: int) -> list[dict[str, float]]:
    """The paper's script: x ~ Normal(0.3989, v), ratio of variance after/before x2 bilinear upsampling."""
    n, h, w, c = shape_nhwc
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for v in variances:
        x = PAPER_MEAN + math.sqrt(v) * torch.randn(n, c, h, w, generator=generator)
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        var_x, mean_x = torch.var_mean(x, correction=0)
        var_up = torch.var(up, correction=0)
        rows.append({"v": v, "mean": mean_x.item(), "var_before": var_x.item(), "var_after": var_up.item(),
                     "ratio": (var_up / var_x).item()})
        del x, up
    return rows


def slice_stds(model: nn.Module, sites: Sequence[Site],
               batches: Sequence[torch.Tensor]) -> dict[tuple[str, int], float]:
    """Population std of each input of each site, as its fusing conv receives it, over ``batches``.

    fxeq's own observers (:class:`fxeq.observe.SiteObservers`) under its
    calibration semantics (``fxeq._model.calibration_mode``: batch
    norm with batch statistics, everything else in eval mode), all sites in
    one pass over ``model`` as it is: upstream folds count, nothing is folded.
    """
    with calibration_mode(model), torch.no_grad(), SiteObservers(model, sites) as observers:
        for x in batches:
            observers.run(model, (x,), {})
    return {key: InputStats.of(observer).std for key, observer in observers.observers.items()}


def disequilibrium(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per fusion site of one model: input stds and their max/min ratio, before and after fxeq."""
    model = build_model(name, seed=args.seed)
    calibration = random_images(args.calib_batches, args.batch, args.size, seed=args.seed + 1)
    fresh = random_images(args.fresh_batches, args.batch, args.size, seed=args.seed + 2)
    equalized = copy.deepcopy(model)
    report: Report = fxeq.transform(equalized, calibration, inplace=True, **find_options(name)).fxeq_report
    before = slice_stds(model, report.search.sites, fresh)
    after = slice_stds(equalized, report.search.sites, fresh)
    rows = []
    for site in report.search.sites:
        sigma = [report.stats[site.name, i.index].std for i in site.inputs]
        fresh_before = [before[site.name, i.index] for i in site.inputs]
        effective = [after[site.name, i.index] / s for i, s in zip(site.inputs, sigma)]
        rows.append({
            "model": name,
            "constructor": describe_model(name),
            "site": site.name,
            "conv": site.convs[0].module,
            "upsample": [f"{i.upsample} x{i.scale[0]:.3g}" if i.upsample and i.scale else i.upsample
                         for i in site.inputs],
            "sigma_calibration": sigma,
            "ratio_calibration": report.disequilibrium(site),
            "sigma_before": fresh_before,
            "ratio_before": max(fresh_before) / min(fresh_before),
            "sigma_after": effective,
            "ratio_after": max(effective) / min(effective),
        })
    return rows


def _plot(path: Path, iid: list[dict[str, float]], paper: list[dict[str, float]],
          sites: list[dict[str, Any]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (`pip install fxeq[plot]`): plots skipped."
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    rs = [row["r"] for row in iid]
    ax = axes[0]
    ax.plot(rs, [row["closed_form"] for row in iid], "k-", label="closed form")
    ax.plot(rs, [row["even_formula"] for row in iid], "k:", label="(2/3 - 1/(6r²))² (even r)")
    ax.plot(rs, [row["bilinear_interior"] for row in iid], "o", label="bilinear, interior")
    ax.plot(rs, [row["bilinear_align_corners"] for row in iid], "s", label="bilinear, align_corners=True")
    ax.plot(rs, [row["nearest"] for row in iid], "^", label="nearest")
    ax.set(xlabel="upsampling ratio r", ylabel="variance after / before", title="i.i.d. input", ylim=(0, 1.1))
    ax.legend()
    ax = axes[1]
    ax.plot([row["v"] for row in paper], [row["ratio"] for row in paper], "o-", label="measured, x2 bilinear")
    ax.axhline(closed_form(2), color="k", lw=1, label="closed form, r=2")
    ax.set(xlabel="v (variance of x)", ylabel="variance after / before",
           title=f"paper setup: x ~ N({PAPER_MEAN}, v)", ylim=(0, 1.1))
    ax.legend()
    ax = axes[2]
    labels = [f"{s['model']}: {s['conv']}" for s in sites]
    ys = range(len(sites))
    ax.barh([y + 0.2 for y in ys], [s["ratio_before"] for s in sites], height=0.4, label="before fxeq")
    ax.barh([y - 0.2 for y in ys], [s["ratio_after"] for s in sites], height=0.4, label="after fxeq")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=1)
    ax.set(xlabel="largest / smallest input std at the site", title="disequilibrium at initialization")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plots: `{path.name}`"


def _fmt(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3g}" for v in values)


def _markdown(args: argparse.Namespace, iid: list[dict[str, float]], paper: list[dict[str, float]],
              sites: list[dict[str, Any]], plot_note: str) -> list[str]:
    iid_rows = [[r["r"], *(f"{r[k]:.4f}" for k in ("even_formula", "closed_form", "bilinear_interior",
                                                    "bilinear_whole", "bilinear_align_corners", "nearest"))]
                for r in iid]
    paper_rows = [[f"{r['v']:.3f}", f"{r['mean']:.4f}", f"{r['var_before']:.4f}", f"{r['var_after']:.4f}",
                   f"{r['ratio']:.4f}"] for r in paper]
    site_rows = [[s["model"], f"`{s['conv']}`", ", ".join(u or "-" for u in s["upsample"]),
                  _fmt(s["sigma_before"]), f"{s['ratio_calibration']:.2f}", f"**{s['ratio_before']:.2f}**",
                  _fmt(s["sigma_after"]), f"**{s['ratio_after']:.2f}**"] for s in sites]
    n, c, h, w = args.iid_shape
    pn, ph, pw, pc = args.paper_shape
    return [
        "## bilinear upsampling of i.i.d. input\n\n"
        f"x ~ N(0, 1) of shape (N, C, H, W) = ({n}, {c}, {h}, {w}); variance after / before upsampling by r. "
        "Interior: r pixels cropped at each border (edge pixels are replicated there). Closed form: "
        "(2/3 - 1/(6r²))² for even r, (2/3 + 1/(3r²))² for odd r; the first formula holds for even r only. "
        f"For align_corners=True the ratio tends to 4/9 = {4 / 9:.4f} for large maps.\n\n"
        + markdown_table(["r", "(2/3 - 1/(6r²))²", "closed form", "bilinear interior", "bilinear whole map",
                          "align_corners=True", "nearest"], iid_rows),
        "## the paper's setup\n\n"
        f"N, H, W, C = {pn}, {ph}, {pw}, {pc}; x ~ N({PAPER_MEAN}, v), v the variance; x2 bilinear, "
        f"align_corners=False (closed form {closed_form(2):.4f}, borders included here).\n\n"
        + markdown_table(["v", "mean of x", "var before", "var after", "ratio"], paper_rows),
        "## disequilibrium at initialization, before and after fxeq\n\n"
        f"Random images {args.batch}x3x{args.size}x{args.size}; fxeq calibrated on {args.calib_batches} batches, "
        f"stds re-measured on {args.fresh_batches} fresh batches; batch norm with batch statistics. "
        "sigma before: each input's std at the fusing conv; after: std of x_i / sigma_i as the folded conv "
        "effectively reads it (1.00 = equalized). Ratio: largest / smallest.\n\n"
        + markdown_table(["model", "fusing conv", "inputs (upsampling)", "sigma before", "ratio (fxeq calibration)",
                          "ratio before", "sigma after", "ratio after"], site_rows),
        plot_note,
    ]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + "\n\nUpsampling variance against the closed form, the paper's "
               "variance script, and the disequilibrium of real decoders before and after fxeq.",
               quick="small tensors (i.i.d. 2x4x32x32, paper setup N,H,W,C = 2,32,32,16 at 3 variances) and "
               "unet_resnet18, upernet_resnet18 at 64x64", options={
                   "iid_shape": Option("shape of the i.i.d. input", [4, 8, 128, 128], [2, 4, 32, 32],
                                       nargs=4, metavar=("N", "C", "H", "W")),
                   "paper_shape": Option("shape of the paper's setup", [16, 128, 128, 256], [2, 32, 32, 16],
                                         nargs=4, metavar=("N", "H", "W", "C")),
                   "variances": Option("number of variances v, evenly spaced from 0.01 to 0.99", 8, 3),
                   "size": Option("image size of the disequilibrium survey", 512, 64),
                   "batch": Option("images per batch, at least 2", 2, 2),
                   "calib_batches": Option("batches fxeq calibrates on", 2, 1),
                   "fresh_batches": Option("other batches the stds are re-measured on", 2, 1),
               })
    p.add_argument("--ratios", type=int, nargs="+", default=list(range(2, 9)),
                   help="integer upsampling ratios (default: 2 3 4 5 6 7 8)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plots")
    args = p.parse_args(argv)
    if min(args.ratios) < 1:
        p.error("--ratios must be positive integers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    run = start("variance", args)
    print("variance: i.i.d. upsampling", file=sys.stderr, flush=True)
    iid = iid_ratios(args.iid_shape, args.ratios, seed=args.seed)
    print("variance: paper setup", file=sys.stderr, flush=True)
    k = args.variances
    variances = [0.01 + (0.99 - 0.01) * i / (k - 1) for i in range(k)] if k > 1 else [0.01]
    paper = paper_ratios(args.paper_shape, variances, seed=args.seed)
    sites = []
    for name in run.models:
        print(f"variance: disequilibrium of {name}", file=sys.stderr, flush=True)
        sites += disequilibrium(name, args)
    if args.no_plot:
        plot_note = "Plots not requested (--no-plot)."
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_note = _plot(run.path(".png"), iid, paper, sites)
    run.write({"iid": iid, "paper": paper, "sites": sites, "plots": plot_note}, _markdown(args, iid, paper, sites,
                                                                                          plot_note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
