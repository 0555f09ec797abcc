"""Calibration cost: what fxeq's calibration costs over a plain forward pass.

fxeq calibrates by running the batches through a calibration graph: the
captured graph with an observer on every site input and batch norm using batch
statistics, one pass per level of the site-dependency graph. This benchmark
runs ``fxeq.calibrate`` and a plain ``torch.no_grad`` forward of the model over
the same batches, and reports:

* time: medians of interleaved repetitions (plain, calibrate, plain, ...), as
  a ratio to the plain eager forward and to a plain forward of the captured
  graph (which separates the observers' cost from the graph frontend's);
* peak memory: the most memory torch held during each pass above what it held
  before (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the torch
  profiler's allocation events, see ``_common.peak_memory``);
* the one-off steps that run no calibration forward: capture, find sites,
  insert observers, the whole of ``fxeq.prepare`` (which also deep-copies the
  model), and ``fxeq.convert`` (writing the folded weights).

The targets printed next to the results (not asserted) are at most 1.05x the
plain forward's time on CUDA and 1.10x on CPU, and at most 1.05x its peak
memory.

Run ``python benchmarks/calibration_cost.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

import fxeq
from fxeq.observe import insert_observers

from _common import (
    build_model, defaults, describe_model, interleaved_times, markdown_table, parser, peak_memory,
    random_images, start, stopwatch,
)

__all__ = ["TARGETS", "bench_model", "main"]

TARGETS = {"time_cuda": 1.05, "time_cpu": 1.10, "memory": 1.05}


def _plain(module: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            module(x)


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time and measure the memory of calibration against plain forwards for one model."""
    model = build_model(name, seed=args.seed).to(device)
    batches = random_images(args.batches, args.batch, args.size, seed=args.seed + 1, device=device)
    example = (batches[0],)
    captured, t_capture = stopwatch(lambda: fxeq.capture(model, example), device)
    search, t_find = stopwatch(lambda: fxeq.find_sites(captured.module), device)
    _, t_observe = stopwatch(lambda: insert_observers(captured.module, search), device)
    prepared, t_prepare = stopwatch(lambda: fxeq.prepare(model, batches[0]), device)
    graph = captured.module.eval()
    calls = {
        "plain": lambda: _plain(model, batches),
        "plain_captured": lambda: _plain(graph, batches),
        "calibrate": lambda: fxeq.calibrate(prepared, batches),
    }
    times = interleaved_times(calls, reps=args.reps, warmup=args.warmup, device=device)
    medians = {k: statistics.median(v) for k, v in times.items()}
    memory = {k: peak_memory(fn, device) for k, fn in calls.items()}
    _, t_convert = stopwatch(lambda: fxeq.convert(prepared), device)
    time_target = TARGETS["time_cuda" if device.type == "cuda" else "time_cpu"]
    time_ratio = medians["calibrate"] / medians["plain"]
    memory_ratio = memory["calibrate"] / memory["plain"] if memory["plain"] else None
    memory_ratio_captured = memory["calibrate"] / memory["plain_captured"] if memory["plain_captured"] else None
    return {
        "model": name,
        "constructor": describe_model(name),
        "device": device.type,
        "frontend": captured.frontend,
        "sites": len(search.sites),
        "passes": len(search.generations()),
        "median_s": medians,
        "times_s": times,
        "time_ratio": time_ratio,
        "time_ratio_captured": medians["calibrate"] / medians["plain_captured"],
        "time_target": time_target,
        "time_meets_target": time_ratio <= time_target,
        "peak_bytes": memory,
        "memory_ratio": memory_ratio,
        "memory_ratio_captured": memory_ratio_captured,
        "memory_target": TARGETS["memory"],
        "memory_meets_target": memory_ratio is not None and memory_ratio <= TARGETS["memory"],
        "setup_s": {"capture": t_capture, "find_sites": t_find, "insert_observers": t_observe,
                    "prepare": t_prepare, "convert": t_convert},
    }


def _markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f}"

    cost_rows, setup_rows = [], []
    for r in results:
        m, p = r["median_s"], r["peak_bytes"]
        cost_rows.append([
            r["model"], r["device"], r["sites"], r["passes"],
            f"{m['plain']:.3f}", f"{m['plain_captured']:.3f}", f"{m['calibrate']:.3f}",
            f"**{r['time_ratio']:.3f}x** ({'meets' if r['time_meets_target'] else 'misses'} {r['time_target']}x)",
            f"{r['time_ratio_captured']:.3f}x",
            mib(p["plain"]), mib(p["plain_captured"]), mib(p["calibrate"]),
            (f"**{r['memory_ratio']:.3f}x** ({'meets' if r['memory_meets_target'] else 'misses'} "
             f"{r['memory_target']}x)") if r["memory_ratio"] is not None else "n/a",
            f"{r['memory_ratio_captured']:.3f}x" if r["memory_ratio_captured"] is not None else "n/a",
        ])
        s = r["setup_s"]
        setup_rows.append([r["model"], r["device"], r["frontend"],
                           *(f"{s[k]:.3f}" for k in ("capture", "find_sites", "insert_observers", "prepare",
                                                    "convert"))])
    images = args.batches * args.batch
    return [
        f"## calibration vs plain forward\n\n"
        f"{args.batches} batches of {args.batch}x3x{args.size}x{args.size} ({images} images); time: median s over "
        f"{args.reps} interleaved repetitions after {args.warmup} warm-up; peak: MiB torch held above its level "
        "before the pass. `plain`: the model, eval, no_grad; `plain captured`: the captured graph, same; "
        "`calibrate`: `fxeq.calibrate` (all passes). Ratios are calibrate / plain (targets in parentheses) and "
        "calibrate / plain captured (vs captured), which leaves out the difference between eager and graph "
        "execution.\n\n"
        + markdown_table(
            ["model", "device", "sites", "passes", "plain s", "plain captured s", "calibrate s",
             "time ratio", "vs captured", "plain peak MiB", "plain captured peak MiB", "calibrate peak MiB",
             "memory ratio", "vs captured"],
            cost_rows,
        ),
        "## one-off steps (no calibration forward)\n\n"
        "Seconds, once each. `prepare` = deep copy + capture + find sites + insert observers; `convert` writes the "
        "folded weights.\n\n"
        + markdown_table(["model", "device", "frontend", "capture s", "find sites s", "insert observers s",
                          "prepare s", "convert s"], setup_rows),
    ]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + "\n\nCompares fxeq.calibrate with a plain no_grad forward over the "
               "same batches (time and peak memory), and times the steps without calibration forwards.",
               quick="unet_resnet18 and upernet_resnet18, 2 batches of 2x3x64x64, 2 repetitions, 1 warm-up")
    p.add_argument("--size", type=int, help="image height and width (default: 512; --quick: 64)")
    p.add_argument("--batch", type=int, help="images per batch, at least 2 (default: 8; --quick: 2)")
    p.add_argument("--batches", type=int, help="calibration batches per pass (default: 8; --quick: 2)")
    p.add_argument("--reps", type=int, help="timed repetitions of each pass (default: 5; --quick: 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up passes of each (default: 1; --quick: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device (default: cuda when available, else cpu)")
    args = p.parse_args(argv)
    defaults(args, full={"size": 512, "batch": 8, "batches": 8, "reps": 5, "warmup": 1},
             quick={"size": 64, "batch": 2, "batches": 2, "reps": 2, "warmup": 1})
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.batch < 2:
        p.error("--batch must be at least 2 (calibration runs batch norm with batch statistics)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    run = start("calibration_cost", args)
    device = torch.device(args.device)
    results = []
    for name in run.models:
        print(f"calibration_cost: {name}", file=sys.stderr, flush=True)
        results.append(bench_model(name, args, device))
    run.write({"targets": TARGETS, "results": results}, _markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
