"""Calibration cost: what ``fxeq.calibrate`` costs over the forward passes it cannot avoid.

fxeq calibrates the user's eager model: forward pre-hooks on the fusing convs
observe their inputs, with normalization layers using batch statistics and
everything else in eval mode (fxeq's ``calibration_mode``), one pass over the
data per generation of chained sites, each forward stopped once the last
observed conv of the pass has fired. Two baselines, over the same batches,
under ``torch.no_grad``:

* ``eval``: the model in eval mode, what inference costs;
* ``batch stats``: the model under ``calibration_mode``, normalization in
  train mode and everything else in eval mode: the floor that calibration's
  semantics set (batch statistics cost more than running statistics).

and fxeq itself:

* ``fxeq.calibrate``: all passes, folds included; per pass, the wall time that
  the report records (``Report.calibration.pass_seconds``), its mean
  (total / passes) and its slowest pass;
* ``one_pass=True``: every site observed in a single pass, the old shortcut.

The targets printed next to the results (not asserted): each pass at most
1.05x the batch-statistics forward, in time (the slowest pass) and in peak
memory (the peak while a pass runs); and for a model with a single pass, the
whole ``fxeq.calibrate`` call at most 1.05x too (what the user waits for,
folds and bookkeeping included). Peak memory is the most that torch held
during the call above what it held before (``torch.cuda.max_memory_allocated``
on CUDA; on CPU the torch profiler's allocation events, see
``_common.cpu_peak_memory``). The passes are told apart from the folds between
them by wrapping the calibrated model's own ``forward`` (an attribute of the
benchmark's model, nothing of fxeq's): on CPU in a profiler range, on CUDA by
the allocator's peak per forward. The peak of the whole call also counts the
folds: each site's new weights are computed in float64 and kept for
:func:`fxeq.convert`, weight-sized memory that does not grow with the input.
At ``--quick`` sizes it outweighs the activations, so the whole call's peak is
several times the forward's there and close to it at full size; the table
shows both.

``--breakdown`` adds the pieces of a pass, each over the same batches under
``calibration_mode``: a no-op forward pre-hook on every fusing conv (what
hooking costs, through torch's public ``register_forward_pre_hook``), fxeq's
observers (``fxeq.observe.SiteObservers``) without the early stop and with
it, and a forward through ``torch.func.functional_call`` with the folded
weights swapped in (how passes after the first see the upstream folds).

Time is the median of interleaved repetitions (eval, batch stats, fxeq,
eval, ...). The one-off steps are timed once: ``fxeq.prepare`` (deep copy,
capture and find) and ``fxeq.convert`` (writing the folded weights).

Run ``python benchmarks/calibration_cost.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

import fxeq
from fxeq._model import calibration_mode
from fxeq.observe import SiteObservers
from fxeq.report import CalibrationSummary

from _common import (
    Option, build_model, cpu_peak_memory, describe_model, find_options, fusing_conv_modules, interleaved_times,
    markdown_table, parser, peak_memory, random_images, run_models, skipped_section, start, stopwatch,
)

__all__ = ["MODELS", "TARGETS", "bench_model", "main"]

TARGETS = {"time_per_pass": 1.05, "time_single_pass_call": 1.05, "memory": 1.05}
"""Most per pass, and for the whole call of a single-pass model, in batch-statistics forwards of the same batches."""

MODELS: tuple[str, ...] = (
    "deeplabv3_resnet50", "upernet_convnext_tiny", "pspnet_resnet50", "deeplabv3plus_resnet50", "segformer_mit_b2",
    "unet_resnet34", "hf_upernet_swin",
)
"""The default models: the README's calibration table and the small Hugging Face Swin UperNet."""

_BREAKDOWN = ("hooks", "observers", "observers_stop", "functional_call")
_NOTES = {
    "hooks": "batch stats + a no-op forward pre-hook on every fusing conv (`register_forward_pre_hook`), no early stop",
    "observers": "batch stats + every site observed by `fxeq.observe.SiteObservers`, no early stop",
    "observers_stop": "batch stats + every site observed, forward stopped after the last fusing conv",
    "functional_call": "batch stats through `torch.func.functional_call` with the folded weights, no hooks",
    "one_pass": "`fxeq.calibrate(..., one_pass=True)`",
}

PASS_RANGE = "fxeq-benchmark: calibration forward"
"""The profiler range around each forward of the calibrated model, which separates the passes' memory from the
folds'."""


class _ForwardProbe:
    """Marks each forward of a model by wrapping its ``forward`` while installed.

    On CPU each forward runs in a profiler range named :data:`PASS_RANGE`; on
    CUDA the allocator's peak is reset when a forward starts and read when it
    ends (also when fxeq stops it early). A calibration pass is a sequence of
    such forwards, so their peaks are the passes' peaks, without the folds.
    The wrapper is an instance attribute, removed afterwards; ``functools.wraps``
    keeps the signature that fxeq reads to map a batch to keyword arguments.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.peaks: list[int] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[_ForwardProbe]:
        own = vars(self.model).get("forward")  # a forward the model already replaced on itself, restored after
        original = self.model.forward
        cuda = self.device.type == "cuda"

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                with torch.profiler.record_function(PASS_RANGE):
                    return original(*args, **kwargs)
            finally:
                if cuda:
                    self.peaks.append(torch.cuda.max_memory_allocated(self.device))

        vars(self.model)["forward"] = forward
        try:
            yield self
        finally:
            del vars(self.model)["forward"]
            if own is not None:
                vars(self.model)["forward"] = own


def _passes_peak(call: Callable[[], Any], model: nn.Module, device: torch.device) -> tuple[int, int | None]:
    """Peak bytes of the whole call and peak while the model's forwards ran (the passes), above the start."""
    probe = _ForwardProbe(model, device)
    if device.type == "cpu":
        with probe.installed():
            return cpu_peak_memory(call, inside=PASS_RANGE)
    whole = peak_memory(call, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    with probe.installed():
        call()
    torch.cuda.synchronize(device)
    return whole, max(probe.peaks) - base if probe.peaks else None


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


def _no_op(module: nn.Module, args: tuple[Any, ...]) -> None:
    return None


def _hooked(model: nn.Module, convs: Sequence[str], batches: Sequence[torch.Tensor]) -> None:
    handles = [model.get_submodule(name).register_forward_pre_hook(_no_op) for name in convs]
    try:
        _batch_stats(model, batches)
    finally:
        for handle in handles:
            handle.remove()


def _observed(model: nn.Module, prepared: fxeq.Prepared, batches: Sequence[torch.Tensor], *,
              stop_early: bool) -> None:
    with calibration_mode(model), torch.no_grad(), \
            SiteObservers(model, prepared.search.sites, stop_early=stop_early) as observers:
        for x in batches:
            observers.run(model, (x,), {})


def _breakdown_calls(model: nn.Module, prepared: fxeq.Prepared,
                     batches: Sequence[torch.Tensor]) -> dict[str, Callable[[], None]]:
    if prepared.calibration is None:
        raise RuntimeError("calibrate the prepared model before timing the pieces of a pass")
    folded = dict(prepared.calibration.parameters)
    convs = sorted(fusing_conv_modules(prepared.report))

    def swapped(x: torch.Tensor) -> Any:
        return torch.func.functional_call(model, folded, (x,), strict=False)

    return {
        "hooks": lambda: _hooked(model, convs, batches),
        "observers": lambda: _observed(model, prepared, batches, stop_early=False),
        "observers_stop": lambda: _observed(model, prepared, batches, stop_early=True),
        "functional_call": lambda: _batch_stats(model, batches, swapped),
    }


def _calibration(prepared: fxeq.Prepared) -> CalibrationSummary:
    """What the report records of the last calibration: passes, batches, seconds per pass."""
    summary = prepared.report.calibration
    if summary is None:
        raise RuntimeError("the prepared model was not calibrated")
    return summary


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time and measure the memory of calibration against both baselines for one model."""
    model = build_model(name, seed=args.seed).to(device)
    batches = random_images(args.batches, args.batch, args.size, seed=args.seed + 1, device=device)
    prepared, t_prepare = stopwatch(lambda: fxeq.prepare(model, batches[0], **find_options(name)), device)
    passes = _calibration(fxeq.calibrate(prepared, batches, progress=False)).passes
    pass_seconds: list[tuple[float, ...]] = []

    def calibrate() -> None:
        fxeq.calibrate(prepared, batches, progress=False)
        pass_seconds.append(_calibration(prepared).pass_seconds)  # read before the next call replaces it

    calls: dict[str, Callable[[], Any]] = {
        "eval": lambda: _eval(model, batches),
        "batch_stats": lambda: _batch_stats(model, batches),
        "fxeq": calibrate,
        "one_pass": lambda: fxeq.calibrate(prepared, batches, progress=False, one_pass=True),
    }
    if args.breakdown:
        calls.update(_breakdown_calls(model, prepared, batches))
    times = interleaved_times(calls, reps=args.reps, warmup=args.warmup, device=device)
    medians = {k: statistics.median(v) for k, v in times.items()}
    # The last `reps` calls of fxeq are the timed ones.
    per_pass = [[timed[k] for timed in pass_seconds[-args.reps:]] for k in range(passes)]
    pass_medians = [statistics.median(p) for p in per_pass]
    memory: dict[str, int | None] = {k: peak_memory(calls[k], device) for k in ("eval", "batch_stats")}
    memory["fxeq"], memory["fxeq_passes"] = _passes_peak(calibrate, prepared.model, device)
    folded = prepared.calibration.parameters if prepared.calibration else {}
    folded_bytes = sum(t.numel() * t.element_size() for t in folded.values())
    _, t_convert = stopwatch(lambda: fxeq.convert(prepared), device)
    base, floor = medians["eval"], medians["batch_stats"]
    slowest = max(pass_medians)

    def memory_vs(key: str, reference_key: str, minus: int = 0) -> float | None:
        value, reference = memory[key], memory[reference_key]
        return (value - minus) / reference if value is not None and reference else None

    memory_ratio = memory_vs("fxeq_passes", "batch_stats")
    total_ratio = medians["fxeq"] / floor
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
            "mean_pass_vs_batch_stats": medians["fxeq"] / passes / floor,
            "total_vs_batch_stats": total_ratio,
            "one_pass_vs_batch_stats": medians["one_pass"] / floor,
            "batch_stats_vs_eval": floor / base,
            "slowest_pass_vs_eval": slowest / base,
            "total_vs_eval": medians["fxeq"] / base,
            **{f"{k}_vs_batch_stats": medians[k] / floor for k in _BREAKDOWN if k in medians},
        },
        "time_target": TARGETS["time_per_pass"],
        "time_meets_target": slowest / floor <= TARGETS["time_per_pass"],
        # Only a single-pass model's whole call is held to the per-pass target; None for the others.
        "call_meets_target": total_ratio <= TARGETS["time_single_pass_call"] if passes == 1 else None,
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


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def _verdict(value: float | None, meets: bool, target: float) -> str:
    return "n/a" if value is None else f"**{value:.3f}x** ({'meets' if meets else 'misses'} {target:g}x)"


def _call_verdict(r: dict[str, Any]) -> str:
    if r["call_meets_target"] is None:
        return f"{_x(r['ratio']['total_vs_batch_stats'])} ({r['passes']} passes: per-pass target)"
    return _verdict(r["ratio"]["total_vs_batch_stats"], r["call_meets_target"], TARGETS["time_single_pass_call"])


def _markdown(results: list[dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace) -> list[str]:
    time_rows, memory_rows, breakdown_rows, setup_rows = [], [], [], []
    for r in results:
        m, q, p = r["median_s"], r["ratio"], r["peak_bytes"]
        time_rows.append([
            r["model"], r["sites"], r["passes"], f"{m['eval']:.3f}", f"{m['batch_stats']:.3f}",
            f"{m['fxeq']:.3f}", " / ".join(f"{t:.3f}" for t in r["pass_median_s"]),
            _verdict(q["slowest_pass_vs_batch_stats"], r["time_meets_target"], r["time_target"]),
            _call_verdict(r), _x(q["mean_pass_vs_batch_stats"]), _x(q["total_vs_eval"]),
            f"{m['one_pass']:.3f} ({_x(q['one_pass_vs_batch_stats'])})", _x(q["batch_stats_vs_eval"]),
        ])
        mr = r["memory_ratio"]
        passes_peak = p["fxeq_passes"]
        memory_rows.append([
            r["model"], _mib(p["eval"]), _mib(p["batch_stats"]), _mib(passes_peak), _mib(p["fxeq"]),
            _mib(r["folded_bytes"]), _mib(None if passes_peak is None else passes_peak - p["batch_stats"]),
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
    sections = [
        f"## time: calibration vs the eval and batch-statistics forwards\n\n"
        f"{args.batches} batches of {args.batch}x3x{args.size}x{args.size} ({images} images) on {args.device}; "
        f"median seconds over {args.reps} interleaved repetitions after {args.warmup} warm-up, no_grad. `eval`: "
        "the model in eval mode; `batch stats`: under `calibration_mode` (normalization with batch statistics, "
        "everything else eval), the floor calibration's semantics set; `fxeq`: `fxeq.calibrate`, all passes; "
        "`per pass`: each pass's median, as the report records it (`Report.calibration.pass_seconds`; passes "
        "stop after the last fusing conv they observe); `slowest pass`: its verdict against the per-pass target; "
        "`whole call`: fxeq / batch stats, with its own verdict where the model needs a single pass (then the "
        "whole call is held to the same target); `mean pass` = fxeq / passes / batch stats; `one_pass=True`: "
        "every site in one pass.\n\n"
        + markdown_table(
            ["model", "sites", "passes", "eval s", "batch stats s", "fxeq s", "per pass s",
             "slowest pass / batch stats", "whole call / batch stats", "mean pass / batch stats", "fxeq / eval",
             "one_pass=True s (/ batch stats)", "batch stats / eval"],
            time_rows,
        ),
        "## peak memory\n\n"
        "MiB that torch held during the call above what it held before. `fxeq, passes`: the peak while the "
        "model's forwards ran during calibration (on CPU from the profiler's allocation events inside them, on "
        "CUDA from the allocator's peak per forward), which is what the target is about; `fxeq, all`: the peak "
        "over the whole call, folds included. After each generation of sites, calibration folds them in float64 "
        "and keeps the folded weights and biases (`folded weights`, all generations) for the later passes and "
        "`fxeq.convert`: weight-sized memory that does not grow with the input. `extra` is what the passes held "
        "beyond the batch-statistics forward; where it is about the folded weights of the earlier generations, "
        "the observers cost nothing, and the ratio only says how small the activations are beside the weights: "
        "at `--quick` sizes the ratios are far above 1 for that reason alone, at full size they approach 1. The "
        "verdict is fxeq, passes / batch stats (target in parentheses).\n\n"
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
    sections.append("## models\n\n" + "\n".join(f"- `{r['model']}`: `{r['constructor']}`" for r in results))
    return sections + skipped_section(skipped)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + "\n\nCompares fxeq.calibrate with the eval forward and the "
               "batch-statistics forward over the same batches (time and peak memory); see the module docstring.",
               quick="unet_resnet18 and upernet_resnet18, 2 batches of 2x3x64x64, 2 repetitions, 1 warm-up",
               epilog="The committed CPU results (benchmarks/results/calibration_cost-cpu.*) record the command "
               "they ran with; their sizes fit a 2-core CPU in minutes.",
               full_models=MODELS, device=True, options={
                   "size": Option("image height and width", 512, 64),
                   "batch": Option("images per batch, at least 2", 8, 2),
                   "batches": Option("calibration batches per pass", 8, 2),
                   "reps": Option("timed repetitions of each", 5, 2),
                   "warmup": Option("untimed warm-up rounds", 1, 1),
               })
    p.add_argument("--breakdown", action="store_true",
                   help="also time the pieces of a pass: hooks, observers, early stop, functional_call")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    run = start("calibration_cost", args)
    device = torch.device(args.device)
    return run_models(run, lambda name: bench_model(name, args, device),
                      lambda results, skipped: _markdown(results, skipped, args), {"targets": TARGETS})


if __name__ == "__main__":
    sys.exit(main())
