"""Calibration cost: what ``fxeq.calibrate`` costs over the forward passes it cannot avoid.

fxeq calibrates the user's eager model: forward pre-hooks on the fusing convs
observe their inputs, with normalization layers using batch statistics and
everything else in eval mode (``fxeq.calibration.calibration_mode``), one
pass over the data per generation of chained sites, each forward stopped
once the last observed conv of the pass has fired. Two baselines, over the
same batches, under ``torch.no_grad``:

* ``eval``: the model in eval mode, what inference costs;
* ``batch stats``: the model under ``calibration_mode``, normalization in
  train mode and everything else in eval mode: the floor that calibration's
  semantics set (batch statistics cost more than running statistics).

and fxeq itself:

* ``fxeq.calibrate``: all passes (``Calibration.passes``), folds included;
  per pass, its mean (total / passes) and its slowest pass (each pass timed
  by wrapping fxeq's internal pass loop, ``fxeq.calibration._run_pass``);
* ``one_pass=True``: every site observed in a single pass, the old shortcut.

The target printed next to the results (not asserted) is at most 1.05x the
batch-statistics forward per pass, in time (the slowest pass) and in peak
memory (the peak while a pass runs). Peak memory is the most that torch held
during the call above what it held before (``torch.cuda.max_memory_allocated``
on CUDA, for the whole call only; on CPU the torch profiler's allocation
events, see ``_common.cpu_peak_memory``). The peak of the whole call also
counts the folds between passes: each site's new weights are computed in
float64 and kept for :func:`fxeq.convert`, weight-sized memory that does not
grow with the input. At ``--quick`` sizes it outweighs the activations, so
the whole call's peak is several times the forward's there and close to it
at full size; the table shows both.

``--breakdown`` adds the pieces of a pass, each over the same batches under
``calibration_mode``: the forward pre-hooks with their observers switched
off, the observers without the early stop, the observers with it, and a
forward through ``torch.func.functional_call`` with the folded weights
swapped in (how passes after the first see the upstream folds).

Time is the median of interleaved repetitions (eval, batch stats, fxeq,
eval, ...). The one-off steps are timed once: ``fxeq.prepare`` (deep copy,
capture and find) and ``fxeq.convert`` (writing the folded weights).

Run ``python benchmarks/calibration_cost.py --help`` for the options.
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
import fxeq.calibration
from fxeq._model import calibration_mode
from fxeq.observe import SiteObservers

from _common import (
    build_model, cpu_peak_memory, defaults, describe_model, interleaved_times, markdown_table, parser, peak_memory,
    random_images, start, stopwatch,
)

__all__ = ["TARGETS", "bench_model", "main"]

TARGETS = {"time_per_pass": 1.05, "memory": 1.05}
"""Most per pass, in batch-statistics forwards of the same batches."""

_BREAKDOWN = ("hooks", "observers", "observers_stop", "functional_call")
_NOTES = {
    "eval": "the model in eval mode",
    "batch_stats": "`calibration_mode`: normalization with batch statistics, everything else eval",
    "fxeq": "`fxeq.calibrate(prepared, batches)`, all passes",
    "one_pass": "`fxeq.calibrate(..., one_pass=True)`",
    "hooks": "batch stats + fxeq's pre-hooks on every fusing conv, observers switched off, no early stop",
    "observers": "batch stats + every site observed, no early stop",
    "observers_stop": "batch stats + every site observed, forward stopped after the last fusing conv",
    "functional_call": "batch stats through `torch.func.functional_call` with the folded weights, no hooks",
}


PASS_RANGE = "fxeq calibration pass"
"""The profiler range around each pass, which separates the passes' memory from the folds'."""


class _PassClock:
    """Times every pass of fxeq's calibration, by wrapping its internal pass loop while active.

    ``fxeq.calibration.calibrate_sites`` looks ``_run_pass`` up in its module
    on each pass, so replacing the module attribute times every pass. Each
    timed call goes to the list in ``self.sink``, and runs inside a
    profiler range named :data:`PASS_RANGE`.
    """

    def __init__(self) -> None:
        self.sink: list[float] | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        original: Callable[..., int] = fxeq.calibration._run_pass

        def timed(*args: Any, **kwargs: Any) -> int:
            begin = time.perf_counter()
            try:
                with torch.profiler.record_function(PASS_RANGE):
                    return original(*args, **kwargs)
            finally:
                if self.sink is not None:
                    self.sink.append(time.perf_counter() - begin)

        fxeq.calibration._run_pass = timed
        try:
            yield
        finally:
            fxeq.calibration._run_pass = original

    def into(self, sink: list[float], fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            self.sink = sink
            try:
                fn()
            finally:
                self.sink = None
        return call


def _eval(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)


def _batch_stats(model: nn.Module, batches: Sequence[torch.Tensor],
                 forward: Callable[[torch.Tensor], Any] | None = None) -> None:
    with calibration_mode(model), torch.no_grad():
        for x in batches:
            (forward or model)(x)


def _observed(model: nn.Module, prepared: fxeq.Prepared, batches: Sequence[torch.Tensor], *, enabled: bool,
              stop_early: bool) -> None:
    with calibration_mode(model), torch.no_grad(), \
            SiteObservers(model, prepared.search.sites, stop_early=stop_early) as observers:
        for observer in observers.observers.values():
            observer.enabled = enabled
        for x in batches:
            observers.run(model, (x,), {})


def _breakdown_calls(model: nn.Module, prepared: fxeq.Prepared,
                     batches: Sequence[torch.Tensor]) -> dict[str, Callable[[], None]]:
    if prepared.calibration is None:
        raise RuntimeError("calibrate the prepared model before timing the pieces of a pass")
    folded = dict(prepared.calibration.parameters)

    def swapped(x: torch.Tensor) -> Any:
        return torch.func.functional_call(model, folded, (x,), strict=False)

    return {
        "hooks": lambda: _observed(model, prepared, batches, enabled=False, stop_early=False),
        "observers": lambda: _observed(model, prepared, batches, enabled=True, stop_early=False),
        "observers_stop": lambda: _observed(model, prepared, batches, enabled=True, stop_early=True),
        "functional_call": lambda: _batch_stats(model, batches, swapped),
    }


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time and measure the memory of calibration against both baselines for one model."""
    model = build_model(name, seed=args.seed).to(device)
    batches = random_images(args.batches, args.batch, args.size, seed=args.seed + 1, device=device)
    prepared, t_prepare = stopwatch(lambda: fxeq.prepare(model, batches[0]), device)
    fxeq.calibrate(prepared, batches, progress=False)
    passes = prepared.calibration.passes  # type: ignore[union-attr]
    clock = _PassClock()
    pass_times: list[float] = []
    one_pass_times: list[float] = []
    calls: dict[str, Callable[[], Any]] = {
        "eval": lambda: _eval(model, batches),
        "batch_stats": lambda: _batch_stats(model, batches),
        "fxeq": clock.into(pass_times, lambda: fxeq.calibrate(prepared, batches, progress=False)),
        "one_pass": clock.into(one_pass_times,
                               lambda: fxeq.calibrate(prepared, batches, progress=False, one_pass=True)),
    }
    if args.breakdown:
        calls.update(_breakdown_calls(model, prepared, batches))
    with clock.active():
        times = interleaved_times(calls, reps=args.reps, warmup=args.warmup, device=device)
    medians = {k: statistics.median(v) for k, v in times.items()}
    # The last `reps` calls of fxeq are the timed ones, `passes` passes each.
    per_pass = [pass_times[-args.reps * passes:][k::passes] for k in range(passes)]
    pass_medians = [statistics.median(p) for p in per_pass]
    memory: dict[str, int | None] = {k: peak_memory(calls[k], device) for k in ("eval", "batch_stats")}
    if device.type == "cpu":
        with clock.active():
            memory["fxeq"], memory["fxeq_passes"] = cpu_peak_memory(calls["fxeq"], inside=PASS_RANGE)
    else:
        memory["fxeq"], memory["fxeq_passes"] = peak_memory(calls["fxeq"], device), None
    folded_bytes = sum(t.numel() * t.element_size() for t in prepared.calibration.parameters.values())
    _, t_convert = stopwatch(lambda: fxeq.convert(prepared), device)
    base, floor = medians["eval"], medians["batch_stats"]
    slowest = max(pass_medians)
    mean_pass = medians["fxeq"] / passes
    def memory_vs(key: str, base: str, minus: int = 0) -> float | None:
        value, reference = memory[key], memory[base]
        return (value - minus) / reference if value is not None and reference else None

    memory_ratio = memory_vs("fxeq_passes", "batch_stats")
    return {
        "model": name,
        "constructor": describe_model(name),
        "device": device.type,
        "frontend": prepared.captured.frontend,
        "sites": len(prepared.search.sites),
        "passes": passes,
        "times_s": times,
        "median_s": medians,
        "pass_times_s": per_pass,
        "pass_median_s": pass_medians,
        "ratio": {
            "slowest_pass_vs_batch_stats": slowest / floor,
            "mean_pass_vs_batch_stats": mean_pass / floor,
            "total_vs_batch_stats": medians["fxeq"] / floor,
            "one_pass_vs_batch_stats": medians["one_pass"] / floor,
            "batch_stats_vs_eval": floor / base,
            "slowest_pass_vs_eval": slowest / base,
            "total_vs_eval": medians["fxeq"] / base,
            **{f"{k}_vs_batch_stats": medians[k] / floor for k in _BREAKDOWN if k in medians},
        },
        "time_target": TARGETS["time_per_pass"],
        "time_meets_target": slowest / floor <= TARGETS["time_per_pass"],
        "peak_bytes": memory,
        "folded_bytes": folded_bytes,
        "memory_ratio": {
            "passes_vs_batch_stats": memory_ratio,
            "passes_vs_eval": memory_vs("fxeq_passes", "eval"),
            "fxeq_vs_batch_stats": memory_vs("fxeq", "batch_stats"),
            "fxeq_without_folded_vs_batch_stats": memory_vs("fxeq", "batch_stats", folded_bytes),
        },
        "memory_target": TARGETS["memory"],
        "memory_meets_target": memory_ratio is not None and memory_ratio <= TARGETS["memory"],
        "setup_s": {"prepare": t_prepare, "convert": t_convert},
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def _verdict(value: float | None, meets: bool, target: float) -> str:
    return "n/a" if value is None else f"**{value:.3f}x** ({'meets' if meets else 'misses'} {target:g}x)"


def _markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    time_rows, memory_rows, breakdown_rows, setup_rows = [], [], [], []
    for r in results:
        m, q, p = r["median_s"], r["ratio"], r["peak_bytes"]
        time_rows.append([
            r["model"], r["sites"], r["passes"], f"{m['eval']:.3f}", f"{m['batch_stats']:.3f}",
            f"{m['fxeq']:.3f}", " / ".join(f"{t:.3f}" for t in r["pass_median_s"]),
            _verdict(q["slowest_pass_vs_batch_stats"], r["time_meets_target"], r["time_target"]),
            _x(q["mean_pass_vs_batch_stats"]), _x(q["total_vs_batch_stats"]), _x(q["total_vs_eval"]),
            f"{m['one_pass']:.3f} ({_x(q['one_pass_vs_batch_stats'])})", _x(q["batch_stats_vs_eval"]),
        ])
        mr = r["memory_ratio"]
        memory_rows.append([
            r["model"], _mib(p["eval"]), _mib(p["batch_stats"]),
            "n/a" if p["fxeq_passes"] is None else _mib(p["fxeq_passes"]), _mib(p["fxeq"]),
            _mib(r["folded_bytes"]),
            "n/a" if p["fxeq_passes"] is None else _mib(p["fxeq_passes"] - p["batch_stats"]),
            _verdict(mr["passes_vs_batch_stats"], r["memory_meets_target"], r["memory_target"]),
            _x(mr["passes_vs_eval"]), _x(mr["fxeq_vs_batch_stats"]),
        ])
        if all(k in m for k in _BREAKDOWN):
            breakdown_rows.append([r["model"], f"{m['batch_stats']:.3f}",
                                   *(f"{m[k]:.3f} ({_x(q[f'{k}_vs_batch_stats'])})" for k in _BREAKDOWN),
                                   f"{m['one_pass']:.3f} ({_x(q['one_pass_vs_batch_stats'])})"])
        s = r["setup_s"]
        setup_rows.append([r["model"], r["frontend"], f"{s['prepare']:.3f}", f"{s['convert']:.3f}"])
    images = args.batches * args.batch
    device = results[0]["device"] if results else args.device
    sections = [
        f"## time: calibration vs the eval and batch-statistics forwards\n\n"
        f"{args.batches} batches of {args.batch}x3x{args.size}x{args.size} ({images} images) on {device}; "
        f"median seconds over {args.reps} interleaved repetitions after {args.warmup} warm-up, no_grad. `eval`: "
        "the model in eval mode; `batch stats`: under `calibration_mode` (normalization with batch statistics, "
        "everything else eval), the floor calibration's semantics set; `fxeq`: `fxeq.calibrate`, all passes; "
        "`per pass`: each pass's median (passes stop after the last fusing conv they observe); the verdict "
        "is the slowest pass / batch stats (target in parentheses); `mean pass` = fxeq / passes / batch "
        "stats; `one_pass=True`: every site in one pass.\n\n"
        + markdown_table(
            ["model", "sites", "passes", "eval s", "batch stats s", "fxeq s", "per pass s",
             "slowest pass / batch stats", "mean pass / batch stats", "fxeq / batch stats", "fxeq / eval",
             "one_pass=True s (/ batch stats)", "batch stats / eval"],
            time_rows,
        ),
        "## peak memory\n\n"
        "MiB that torch held during the call above what it held before. `fxeq, passes`: the peak while a "
        "calibration pass ran (on CPU, from the profiler's allocation events inside each pass), which is "
        "what the target is about; `fxeq, all`: the peak over the whole call, folds included. After each "
        "generation of sites, calibration folds them in float64 and keeps the folded weights and biases "
        "(`folded weights`, all generations) for the later passes and `fxeq.convert`: weight-sized memory "
        "that does not grow with the input. `extra` is what the passes held beyond the batch-statistics "
        "forward; where it is about the folded weights of the earlier generations, the observers cost "
        "nothing, and the ratio only says how small the activations are beside the weights: at `--quick` "
        "sizes the ratios are far above 1 for that reason alone, at full size they approach 1. The verdict "
        "is fxeq, passes / batch stats (target in parentheses).\n\n"
        + markdown_table(["model", "eval MiB", "batch stats MiB", "fxeq, passes MiB", "fxeq, all MiB",
                          "folded weights MiB", "extra MiB", "fxeq, passes / batch stats", "fxeq, passes / eval",
                          "fxeq, all / batch stats"], memory_rows),
    ]
    if breakdown_rows:
        notes = "; ".join(f"`{k}`: {_NOTES[k]}" for k in (*_BREAKDOWN, "one_pass"))
        sections.append(
            "## the pieces of a pass (`--breakdown`)\n\n"
            f"Median seconds over the same batches and repetitions (ratio to batch stats). {notes}.\n\n"
            + markdown_table(["model", "batch stats s", "hooks s", "observers s", "observers + early stop s",
                              "functional_call s", "one_pass=True s"], breakdown_rows))
    sections.append(
        "## one-off steps\n\nSeconds, once each: `fxeq.prepare` (deep copy, capture, find sites), "
        "`fxeq.convert` (write the folded weights).\n\n"
        + markdown_table(["model", "frontend", "prepare s", "convert s"], setup_rows))
    return sections


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + "\n\nCompares fxeq.calibrate with the eval forward and the "
               "batch-statistics forward over the same batches (time and peak memory); see the module docstring.",
               quick="unet_resnet18 and upernet_resnet18, 2 batches of 2x3x64x64, 2 repetitions, 1 warm-up",
               epilog="The committed CPU results (benchmarks/results/calibration_cost-cpu.*) record the command "
               "they ran with; their sizes fit a 2-core CPU in minutes.")
    p.add_argument("--size", type=int, help="image height and width (default: 512; --quick: 64)")
    p.add_argument("--batch", type=int, help="images per batch, at least 2 (default: 8; --quick: 2)")
    p.add_argument("--batches", type=int, help="calibration batches per pass (default: 8; --quick: 2)")
    p.add_argument("--reps", type=int, help="timed repetitions of each (default: 5; --quick: 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up rounds (default: 1; --quick: 1)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the pieces of a pass: hooks, observers, early stop, functional_call")
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
