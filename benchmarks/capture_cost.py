"""Capture cost: what ``fxeq.find`` costs next to one static ``torch.export`` of the same model.

fxeq needs a graph only to find the fusion sites (calibration runs the eager
model), so capture exports with a dynamic batch size but static heights and
widths: symbolic spatial sizes cost minutes on some models. The target is
that capture plus find costs at most 3x one static export of the same model
(printed next to the results, not asserted). Per model, in one process:

* ``static export``: ``torch.export.export(model, (x,))`` in eval mode under
  ``torch.no_grad``, no dynamic shapes: the floor any graph capture pays.
* ``fxeq.find``: ``fxeq.find(model, x)``: one eager forward,
  ``torch.fx.symbolic_trace`` or, where it fails, ``torch.export`` with a
  dynamic batch size, shape propagation and the site search.

Both run interleaved (static, find, static, find, ...) after one untimed
round, and the table gives medians and their ratio. One export of a tiny
model runs first, so that no model pays the process's first-export costs.
Once each, after that, the parts that ``fxeq.find`` is made of: an eager
forward, ``fxeq.capture`` with each frontend alone (each including its own
eager forward; fx may fail, which ``"auto"`` pays before falling back to
export) and a bare ``torch.export.export`` with the batch size ``Dim.AUTO``.

``--dynamic`` also times ``fxeq.find(model, x, dynamic=True)`` once per model
exported by torch.export: symbolic heights and widths, what capture did
before (it does not apply to fx, whose graphs are shape-generic). It costs
minutes on the Hugging Face UperNet with a Swin backbone.

The models: every model of ``tests/test_zoo.py`` (torchvision deeplabv3 and
smp UPerNet, PSPNet, DeepLabV3+, Segformer and Unet on resnet18 and
convnext_atto) and, when ``transformers`` is importable, a small UperNet on
a Swin backbone built from config classes (nothing downloaded).

Run ``python benchmarks/capture_cost.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import fxeq
from fxeq.errors import CaptureError

from _common import (
    QUICK_MODELS, TEST_ZOO, available, build_model, defaults, describe_model, interleaved_times, markdown_table,
    parser, start,
)

__all__ = ["TARGET", "bench_model", "main"]

TARGET = 3.0
"""Most that ``fxeq.find`` may cost, in static exports of the same model."""

FULL = (*TEST_ZOO, "hf_upernet_swin")


def _static_export(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.export.export(model, (x,))


def _batch_dynamic_export(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def _eager(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def _once(fn: Callable[[], Any]) -> dict[str, Any]:
    """Seconds of one call, or the first line of the error it raised."""
    begin = time.perf_counter()
    try:
        fn()
    except CaptureError as e:
        lines = str(e).splitlines()
        return {"s": time.perf_counter() - begin, "error": lines[min(1, len(lines) - 1)].strip()}
    return {"s": time.perf_counter() - begin, "error": None}


def warm_up() -> None:
    """One export of a tiny model, so that no zoo model pays the process's first-export costs."""
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    _static_export(tiny, torch.randn(2, 3, 8, 8))
    fxeq.find(tiny, torch.randn(2, 3, 8, 8))


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time static export against ``fxeq.find`` for one model, and find's parts."""
    model = build_model(name, seed=args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 1))
    found: list[fxeq.Report] = []
    calls = {
        "static_export": lambda: _static_export(model, x),
        "find": lambda: found.append(fxeq.find(model, x)),
        "prepare": lambda: fxeq.prepare(model, x, inplace=True),  # what transform pays; writes nothing
        "prepare_static": lambda: fxeq.prepare(model, x, inplace=True, dynamic=False),
    }
    times = interleaved_times(calls, reps=args.reps, warmup=args.warmup, device=torch.device("cpu"))
    report = found[-1]
    medians = {k: statistics.median(v) for k, v in times.items()}
    parts = {
        "eager_forward": _once(lambda: _eager(model, x)),
        "capture_fx": _once(lambda: fxeq.capture(model, x, frontend="fx")),
        "capture_export": _once(lambda: fxeq.capture(model, x, frontend="export")),
        "export_dynamic_batch": _once(lambda: _batch_dynamic_export(model, x)),
    }
    dynamic: dict[str, Any] | None = None
    if report.frontend == "export" and args.dynamic is not None and (not args.dynamic or name in args.dynamic):
        print(f"capture_cost: {name}: fxeq.find(dynamic=True)", file=sys.stderr, flush=True)
        dynamic = _once(lambda: fxeq.find(model, x, dynamic=True))
    ratio = medians["find"] / medians["static_export"]
    prepare_ratio = medians["prepare"] / medians["static_export"]
    static_ratio = medians["prepare_static"] / medians["static_export"]
    return {
        "model": name,
        "constructor": describe_model(name),
        "frontend": report.frontend,
        "sites": len(report.search.sites),
        "times_s": times,
        "median_s": medians,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "prepare_ratio": prepare_ratio,
        "prepare_meets_target": prepare_ratio <= TARGET,
        "prepare_static_ratio": static_ratio,
        "prepare_static_meets_target": static_ratio <= TARGET,
        "parts_s": parts,
        "dynamic_find": dynamic,
        "dynamic_ratio": dynamic["s"] / medians["static_export"] if dynamic and not dynamic["error"] else None,
    }


def _markdown(results: list[dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace) -> list[str]:
    rows, part_rows = [], []
    for r in results:
        m, d = r["median_s"], r["dynamic_find"]
        if d is None:
            dynamic = "n/a (fx)" if r["frontend"] == "fx" else "not run"
        elif d["error"]:
            dynamic = f"failed after {d['s']:.1f} s"
        else:
            dynamic = f"{d['s']:.2f} ({r['dynamic_ratio']:.1f}x)"
        rows.append([r["model"], r["frontend"], r["sites"], f"{m['static_export']:.2f}", f"{m['find']:.2f}",
                     f"**{r['ratio']:.2f}x** ({'meets' if r['meets_target'] else 'misses'} {r['target']:g}x)",
                     f"{m['prepare']:.2f}",
                     f"**{r['prepare_ratio']:.2f}x** ({'meets' if r['prepare_meets_target'] else 'misses'} "
                     f"{r['target']:g}x)", f"{m['prepare_static']:.2f}",
                     f"**{r['prepare_static_ratio']:.2f}x** ("
                     f"{'meets' if r['prepare_static_meets_target'] else 'misses'} {r['target']:g}x)", dynamic])
        p = r["parts_s"]

        def part(key: str) -> str:
            return f"{p[key]['s']:.2f}" + (" (fails)" if p[key]["error"] else "")

        part_rows.append([r["model"], part("eager_forward"), part("capture_fx"), part("capture_export"),
                          part("export_dynamic_batch"), f"{m['static_export']:.2f}"])
    sections = [
        "## fxeq.find and fxeq.prepare vs one static export\n\n"
        f"Input {args.batch}x3x{args.size}x{args.size}, eval mode, no_grad; median seconds over {args.reps} "
        f"interleaved repetition(s) after {args.warmup} untimed round(s). `static export`: "
        "`torch.export.export(model, (x,))`; `fxeq.find`: `fxeq.find(model, x)` (eager forward, fx or a static "
        "export, shape propagation, site search); `fxeq.prepare`: what `fxeq.transform` pays before "
        "calibrating by default (the same with the export's batch size dynamic, so that the returned module "
        "takes any batch size); `prepare, dynamic=False`: `fxeq.prepare(model, x, dynamic=False)`, the "
        "cheapest capture (the returned module takes only this batch size); ratios to the static export "
        "(target in parentheses); `dynamic=True`: `fxeq.find(model, x, dynamic=True)` once (symbolic H/W, the old "
        "capture), seconds and ratio to the static export.\n\n"
        + markdown_table(["model", "frontend", "sites", "static export s", "fxeq.find s", "ratio",
                          "fxeq.prepare s", "ratio", "prepare, dynamic=False s", "ratio", "dynamic=True s"], rows),
        "## what fxeq.find is made of\n\n"
        "Seconds, once each. `fxeq.capture` with one frontend includes its own eager forward; `(fails)`: that "
        "frontend cannot capture the model (fx fails on models whose forward checks shapes), and `fxeq.find` "
        "pays the attempt before falling back to export. `export, dynamic batch`: a bare "
        "`torch.export.export` with the batch size `Dim.AUTO`, static H/W (fxeq's export, without its "
        "shape propagation and eager forward).\n\n"
        + markdown_table(["model", "eager forward s", "capture fx s", "capture export s",
                          "export, dynamic batch s", "static export s (median)"], part_rows),
        "## models\n\n" + "\n".join(f"- `{r['model']}`: `{r['constructor']}`" for r in results),
    ]
    if skipped:
        sections.append("## not run\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in skipped.items()))
    return sections


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + "\n\nTimes fxeq.find against a static torch.export of the same model, "
               "and the parts of fxeq.find; see the module docstring.",
               quick="unet_resnet18 and upernet_resnet18, 1 repetition, no untimed round",
               full_models=FULL, quick_models=QUICK_MODELS)
    p.add_argument("--size", type=int, default=64, help="input height and width (default: 64)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
    p.add_argument("--reps", type=int, help="timed repetitions of each (default: 3; --quick: 1)")
    p.add_argument("--warmup", type=int, help="untimed rounds before them (default: 1; --quick: 0)")
    p.add_argument("--dynamic", nargs="*", metavar="NAME", default=None,
                   help="also time fxeq.find(dynamic=True) once, for the named models or, with no name, for "
                   "every model exported by torch.export (can take minutes; default: off)")
    args = p.parse_args(argv)
    defaults(args, full={"reps": 3, "warmup": 1}, quick={"reps": 1, "warmup": 0})
    if args.batch < 2:
        p.error("--batch must be at least 2 (fxeq keeps the batch size dynamic, which needs 2 samples)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    run = start("capture_cost", args)
    warm_up()
    results, skipped = [], {}
    for name in run.models:
        reason = available(name)
        if reason is not None:
            skipped[name] = reason
            continue
        print(f"capture_cost: {name}", file=sys.stderr, flush=True)
        results.append(bench_model(name, args))
    run.write({"target": TARGET, "results": results, "skipped": skipped}, _markdown(results, skipped, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
