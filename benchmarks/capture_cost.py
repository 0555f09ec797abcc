"""Capture cost: what ``fxeq.find`` and ``fxeq.prepare`` cost next to one static ``torch.export`` of the same model.

fxeq needs a graph only to find the fusion sites (calibration runs the eager
model). The target is that finding costs at most 3x one static export of the
same model (printed next to the results, not asserted). Per model, in one
process, interleaved (static, find, ..., static, find, ...) after the untimed
rounds, medians and their ratio to the static export:

* ``static export``: ``torch.export.export(model, (x,))`` in eval mode under
  ``torch.no_grad``, no dynamic shapes: the floor any graph capture pays.
* ``find``: ``fxeq.find(model, x)``: one eager forward, then
  ``torch.fx.symbolic_trace``, else a static ``torch.export``, else the
  concrete trace; shape propagation and the site search.
* ``find, concrete``: ``fxeq.find(model, x, frontend="concrete")``: the eager
  forward recorded op by op (``make_fx`` over real tensors).
* ``prepare``: ``fxeq.prepare(model, x)``, what ``fxeq.transform`` pays before
  calibrating by default: a deep copy and a capture that gives a deployable
  graph (fx, else export with a dynamic batch size).
* ``prepare, inplace``: ``fxeq.prepare(model, x, inplace=True)``: no copy, and
  no deployable graph needed (fx, else a static export, else concrete).
* ``prepare, inplace, concrete``: the same with ``frontend="concrete"``, the
  candidate default for ``inplace=True``.

The sites that the concrete trace finds are compared with those of the
automatic choice: the same fusing convs with the same input channel slices.
A variant that cannot capture a model (MONAI's FlexibleUNet with a resnet
backbone defeats fx and export) is shown as failing, with the reason, and is
not timed again.

Once each, after that, the parts ``fxeq.find`` is made of: an eager forward,
``fxeq.capture`` with each frontend alone (each including its own eager
forward; fx may fail, which ``"auto"`` pays before falling back to export)
and a bare ``torch.export.export`` with the batch size ``Dim.AUTO``.

``--dynamic`` also times ``fxeq.find(model, x, dynamic=True)`` once per model
exported by torch.export: symbolic heights and widths, what capture did
before (it does not apply to fx, whose graphs are shape-generic). It costs
minutes on the Hugging Face UperNet with a Swin backbone.

The models: every model of ``tests/test_zoo.py`` (torchvision deeplabv3 and
smp UPerNet, PSPNet, DeepLabV3+, Segformer and Unet on resnet18 and
convnext_atto), a small Hugging Face UperNet on a Swin backbone, MONAI's 2-D
BasicUNet, FlexibleUNet (resnet18) and DynUNet, and Ultralytics YOLOv8n from
its yaml; each built from code with random weights (nothing downloaded), and
skipped, with the reason, where its library is missing.

Run ``python benchmarks/capture_cost.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

import fxeq

from _common import (
    OTHER_LIBRARIES, TEST_ZOO, Option, build_model, describe_error, describe_model, find_options,
    interleaved_times, markdown_table, parser, run_models, skipped_section, start,
)

__all__ = ["MODELS", "QUICK", "TARGET", "VARIANTS", "bench_model", "main", "site_signature"]

TARGET = 3.0
"""Most that ``fxeq.find`` may cost, in static exports of the same model."""

MODELS: tuple[str, ...] = (*TEST_ZOO, *OTHER_LIBRARIES)
QUICK: tuple[str, ...] = ("unet_resnet18", "upernet_resnet18", "monai_flexibleunet_resnet18")
"""fx, export and the one model only the concrete trace captures."""

VARIANTS: dict[str, str] = {
    "static_export": "`torch.export.export(model, (x,))`",
    "find": "`fxeq.find(model, x)`",
    "find_concrete": "`fxeq.find(model, x, frontend=\"concrete\")`",
    "prepare": "`fxeq.prepare(model, x)` (copy, deployable graph: what `transform` pays)",
    "prepare_inplace": "`fxeq.prepare(model, x, inplace=True)`",
    "prepare_inplace_concrete": "`fxeq.prepare(model, x, inplace=True, frontend=\"concrete\")`",
}
"""What is timed, interleaved, per model."""


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as they were, after a bare export.

    A forward that stores tensors on its module (Ultralytics' Detect head
    caches its anchors) leaves fake tensors there when exported, which breaks
    the next copy of the model (torch.export warns that such attributes must
    be buffers). fxeq restores a model after capturing it; the bare exports
    timed here as the baseline must too, or they would break the variants
    timed after them.
    """
    saved = [(module, dict(vars(module))) for module in model.modules()]
    try:
        yield
    finally:
        for module, attributes in saved:
            vars(module).clear()
            vars(module).update(attributes)


def _static_export(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad(), _attributes_kept(model):
        torch.export.export(model, (x,))


def _batch_dynamic_export(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad(), _attributes_kept(model):
        torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def _eager(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def _once(fn: Callable[[], Any]) -> dict[str, Any]:
    """Seconds of one call, and the error it raised (None when it worked)."""
    begin = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a frontend's failure is a result here
        return {"s": time.perf_counter() - begin, "error": describe_error(e)}
    return {"s": time.perf_counter() - begin, "error": None}


def site_signature(report: fxeq.Report) -> list[tuple[list[str], list[tuple[int, int]]]]:
    """The sites as comparable data: per site, its fusing conv modules and its inputs' channel slices, sorted.

    Example:
        >>> import torch.nn.functional as F
        >>> class Fuse(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fuse = nn.Conv2d(6, 2, 1)
        ...     def forward(self, x):
        ...         return self.fuse(torch.cat([x, F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0)], 1))
        >>> site_signature(fxeq.find(Fuse(), torch.randn(2, 3, 8, 8)))
        [(['fuse'], [(0, 3), (3, 6)])]
    """
    return sorted((sorted(c.module for c in s.convs), [tuple(i.channels) for i in s.inputs])
                  for s in report.search.sites)


def warm_up() -> None:
    """One export of a tiny model, so that no zoo model pays the process's first-export costs."""
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    _static_export(tiny, torch.randn(2, 3, 8, 8))
    fxeq.find(tiny, torch.randn(2, 3, 8, 8))
    fxeq.find(tiny, torch.randn(2, 3, 8, 8), frontend="concrete")


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time static export against fxeq's captures for one model, compare the frontends' sites, time find's parts."""
    model = build_model(name, seed=args.seed)
    options = find_options(name)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 1))
    reports: dict[str, fxeq.Report] = {}
    calls = {
        "static_export": lambda: _static_export(model, x),
        "find": lambda: reports.__setitem__("find", fxeq.find(model, x, **options)),
        "find_concrete": lambda: reports.__setitem__("concrete", fxeq.find(model, x, frontend="concrete", **options)),
        "prepare": lambda: fxeq.prepare(model, x, **options),
        # inplace=True writes nothing until convert, which is never called here
        "prepare_inplace": lambda: reports.__setitem__(
            "prepare_inplace", fxeq.prepare(model, x, inplace=True, **options).report),
        "prepare_inplace_concrete": lambda: fxeq.prepare(model, x, inplace=True, frontend="concrete", **options),
    }
    failures: dict[str, str] = {}
    times = interleaved_times(calls, reps=args.reps, warmup=args.warmup, device=torch.device("cpu"),
                              failures=failures)
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    floor = medians.get("static_export")
    ratio = {k: v / floor for k, v in medians.items()} if floor else {}
    found, concrete = reports.get("find"), reports.get("concrete")
    signatures = {k: site_signature(r) for k, r in reports.items()}
    parts = {
        "eager_forward": _once(lambda: _eager(model, x)),
        "capture_fx": _once(lambda: fxeq.capture(model, x, frontend="fx")),
        "capture_export": _once(lambda: fxeq.capture(model, x, frontend="export")),
        "capture_concrete": _once(lambda: fxeq.capture(model, x, frontend="concrete")),
        "export_dynamic_batch": _once(lambda: _batch_dynamic_export(model, x)),
    }
    dynamic: dict[str, Any] | None = None
    exported = found is not None and found.frontend == "export"
    if exported and args.dynamic is not None and (not args.dynamic or name in args.dynamic):
        print(f"capture_cost: {name}: fxeq.find(dynamic=True)", file=sys.stderr, flush=True)
        dynamic = _once(lambda: fxeq.find(model, x, dynamic=True, **options))
    return {
        "model": name,
        "constructor": describe_model(name),
        "frontend": found.frontend if found else None,
        "prepare_inplace_frontend": reports["prepare_inplace"].frontend if "prepare_inplace" in reports else None,
        "sites": len(found.search.sites) if found else None,
        "concrete_sites": len(concrete.search.sites) if concrete else None,
        "fusing_convs": {k: sorted(c for convs, _ in s for c in convs) for k, s in signatures.items()},
        "concrete_agrees": (signatures["concrete"] == signatures["find"]
                            if "concrete" in signatures and "find" in signatures else None),
        "times_s": times,
        "median_s": medians,
        "failed": failures,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": {k: v <= TARGET for k, v in ratio.items() if k != "static_export"},
        "concrete_vs_auto_inplace": (medians["prepare_inplace_concrete"] / medians["prepare_inplace"]
                                     if {"prepare_inplace", "prepare_inplace_concrete"} <= medians.keys() else None),
        "parts_s": parts,
        "dynamic_find": dynamic,
        "dynamic_ratio": dynamic["s"] / floor if dynamic and not dynamic["error"] and floor else None,
    }


def _cell(r: dict[str, Any], key: str) -> str:
    """Median seconds and ratio to the static export with its verdict, or why there is none."""
    if key in r["failed"]:
        return "fails"
    seconds = f"{r['median_s'][key]:.2f}"
    if key not in r["ratio"]:
        return f"{seconds} (no static export)"
    verdict = "meets" if r["meets_target"][key] else "misses"
    return f"{seconds} (**{r['ratio'][key]:.2f}x**, {verdict} {r['target']:g}x)"


def _agreement(r: dict[str, Any]) -> str:
    if r["concrete_agrees"] is None:
        return "n/a (a frontend failed)"
    if r["frontend"] == "concrete":
        return f"auto is concrete ({r['sites']})"
    if r["concrete_agrees"]:
        return f"yes ({r['sites']})"
    return f"**no**: auto {r['sites']}, concrete {r['concrete_sites']}"


def _dynamic(r: dict[str, Any]) -> str:
    d = r["dynamic_find"]
    if d is None:
        return "not run" if r["frontend"] == "export" else f"n/a ({r['frontend']})"
    if d["error"]:
        return f"failed after {d['s']:.1f} s"
    return f"{d['s']:.2f}" + (f" ({r['dynamic_ratio']:.1f}x)" if r["dynamic_ratio"] else "")


def _verdict_text(results: list[dict[str, Any]]) -> str:
    """How the concrete trace compares with the automatic choice under inplace=True, counted from the results."""
    compared = [r for r in results if r["concrete_vs_auto_inplace"] is not None and r["frontend"] != "concrete"]
    if not compared:
        return ""
    faster = [r for r in compared if r["concrete_vs_auto_inplace"] < 1]
    agree = [r for r in compared if r["concrete_agrees"]]
    ratios = sorted(r["concrete_vs_auto_inplace"] for r in compared)
    only = [r["model"] for r in results if r["frontend"] == "concrete"]
    text = (f"With `inplace=True`, the concrete trace took {ratios[0]:.2f}x to {ratios[-1]:.2f}x the automatic "
            f"choice (median {statistics.median(ratios):.2f}x): faster on {len(faster)} of {len(compared)} models "
            f"that fx or export captures, and it found the same sites on {len(agree)} of them.")
    disagree = [r["model"] for r in compared if not r["concrete_agrees"]]
    if disagree:
        text += f" Different sites: {', '.join(disagree)}."
    if only:
        text += f" Only the concrete trace captured {', '.join(only)}."
    return text


def _markdown(results: list[dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace) -> list[str]:
    rows, part_rows = [], []
    for r in results:
        rows.append([r["model"], r["frontend"] or "fails", r["sites"] if r["sites"] is not None else "-",
                     "fails" if "static_export" in r["failed"] else f"{r['median_s']['static_export']:.2f}",
                     *(_cell(r, k) for k in list(VARIANTS)[1:]),
                     "-" if r["concrete_vs_auto_inplace"] is None else f"{r['concrete_vs_auto_inplace']:.2f}x",
                     _agreement(r), _dynamic(r)])
        p = r["parts_s"]

        def part(key: str) -> str:
            return f"{p[key]['s']:.2f}" + (" (fails)" if p[key]["error"] else "")

        part_rows.append([r["model"], part("eager_forward"), part("capture_fx"), part("capture_export"),
                          part("capture_concrete"), part("export_dynamic_batch")])
    failures = [f"- `{r['model']}`, {k}: {v}" for r in results for k, v in r["failed"].items()]
    variants = "; ".join(f"`{k}`: {v}" for k, v in VARIANTS.items())
    sections = [
        "## fxeq.find and fxeq.prepare vs one static export\n\n"
        f"Input {args.batch}x3x{args.size}x{args.size}, eval mode, no_grad; median seconds over {args.reps} "
        f"interleaved repetition(s) after {args.warmup} untimed round(s), ratio to the static export and "
        f"verdict against the {TARGET:g}x target. {variants}. `frontend`: the one `fxeq.find` chose; `concrete / "
        "auto, inplace`: prepare with inplace=True, concrete over the automatic choice; `concrete finds the same "
        "sites`: the same fusing convs with the same input slices as `fxeq.find`'s (site count in parentheses); "
        "`dynamic=True`: `fxeq.find(model, x, dynamic=True)` once (symbolic H/W, the old capture), seconds and "
        "ratio to the static export.\n\n"
        + markdown_table(["model", "frontend", "sites", "static export s", "fxeq.find s", "find, concrete s",
                          "fxeq.prepare s", "prepare, inplace s", "prepare, inplace, concrete s",
                          "concrete / auto, inplace", "concrete finds the same sites", "dynamic=True s"], rows),
    ]
    verdict = _verdict_text(results)
    if verdict:
        sections.append("## concrete trace as the inplace=True default?\n\n" + verdict)
    if failures:
        sections.append("## what failed\n\n" + "\n".join(failures))
    sections += [
        "## what fxeq.find is made of\n\n"
        "Seconds, once each. `fxeq.capture` with one frontend includes its own eager forward; `(fails)`: that "
        "frontend cannot capture the model (fx fails on models whose forward checks shapes), and `fxeq.find` "
        "pays the attempt before falling back to the next. `export, dynamic batch`: a bare "
        "`torch.export.export` with the batch size `Dim.AUTO`, static H/W (fxeq's export for a deployable "
        "graph, without its shape propagation and eager forward).\n\n"
        + markdown_table(["model", "eager forward s", "capture fx s", "capture export s", "capture concrete s",
                          "export, dynamic batch s"], part_rows),
        "## models\n\n" + "\n".join(f"- `{r['model']}`: `{r['constructor']}`" for r in results),
    ]
    return sections + skipped_section(skipped)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + "\n\nTimes fxeq.find and fxeq.prepare, with the automatic frontend and "
               "the concrete trace, against a static torch.export of the same model; see the module docstring.",
               quick=f"{', '.join(QUICK)}, 1 repetition, no untimed round",
               full_models=MODELS, quick_models=QUICK, options={
                   "size": Option("input height and width", 64, 64),
                   "batch": Option("batch size", 2, 2),
                   "reps": Option("timed repetitions of each", 3, 1),
                   "warmup": Option("untimed rounds before them", 1, 0),
               })
    p.add_argument("--dynamic", nargs="*", metavar="NAME", default=None,
                   help="also time fxeq.find(dynamic=True) once, for the named models or, with no name, for "
                   "every model exported by torch.export (can take minutes; default: off)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    run = start("capture_cost", args)
    warm_up()
    return run_models(run, lambda name: bench_model(name, args),
                      lambda results, skipped: _markdown(results, skipped, args), {"target": TARGET})


if __name__ == "__main__":
    sys.exit(main())
