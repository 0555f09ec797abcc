"""Latency parity: the model fxeq deploys costs what the original costs.

fxeq folds the equalizer ``(x - mu) / sigma`` into the fusing convs' weights,
so the deployed graph is the original graph with other numbers in it. This
benchmark checks that claim with a clock, next to the two alternatives that
add work at run time. Per model it times four variants:

* ``original``: the model as built, eager.
* ``fxeq``: for inference, the GraphModule that ``fxeq.convert`` returns.
  For the training step, the private copy of the model it was captured from
  (``Prepared.model``), which convert rewrote too: the GraphModule is captured
  in eval mode (torch.export bakes eval-mode batch norm into the graph), so it
  cannot train, whereas the copy keeps the user's own class, which trains like
  the original. Both share the folded parameters.
* ``explicit``: the paper's literal module, ``(x - mu_i) / sigma_i`` on each
  concatenation input: ``fxeq.transform(..., mode="explicit")``, timed like
  ``fxeq`` (its GraphModule, with the constant nodes before each fusing conv,
  for inference; the rewritten copy, with a forward pre-hook on each fusing
  conv, for training).
* ``batchnorm``: the alternative the paper rejects, a batch norm after every
  upsampled input (:class:`UpsampledBatchNorm`, a forward pre-hook on each
  fusing conv).

Inference runs in eval mode under ``torch.no_grad``; the training step is a
forward and a backward of the output's sum in train mode. CPU runs in float32;
CUDA, when present, in float32 and under bfloat16 autocast, timed with CUDA
events. fxeq captures and calibrates the model on each device it is timed on
(random batches of the timed size), so that a GPU run spends no CPU time on
calibration. After warm-up the variants run round-robin (A B C D A B C D ...)
and the tables give medians and each variant's ratio to the original.

It also checks that the transformed graph's node sequence (op, target) is the
one ``fxeq.capture`` gives for the original model: fxeq must add no node.

Run ``python benchmarks/latency.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

import fxeq
from fxeq.report import Report
from fxeq.sites import Site

from _common import (
    Option, build_model, describe_model, find_options, fusing_conv_modules, interleaved_times, markdown_table,
    output_tensor, parser, random_images, run_models, skipped_section, start,
)

__all__ = ["UpsampledBatchNorm", "attach_batchnorms", "main"]

VARIANTS = ("original", "fxeq", "explicit", "batchnorm")
_VARIANT_NOTES = {
    "original": "the model as built",
    "fxeq": "inference: the GraphModule from `fxeq.transform`; training: the model rewritten with `inplace=True`",
    "explicit": "`fxeq.transform(..., mode=\"explicit\")`: inference, its GraphModule (`(x - mu) * (1 / sigma)` "
                "nodes before each fusing conv); training, the model rewritten with `inplace=True` (a forward "
                "pre-hook on each fusing conv)",
    "batchnorm": "pre-hook: `BatchNorm2d` on each upsampled input slice, slices concatenated again",
}


class UpsampledBatchNorm(nn.Module):
    """A ``BatchNorm2d`` on each upsampled slice of a concatenated input.

    The paper's rejected alternative puts a batch norm after every upsampled
    branch. The decoders here upsample with functional ``F.interpolate`` calls
    that no hook can reach, so this module works on what the fusing conv
    receives: it slices the concatenation, normalizes each upsampled slice with
    its own ``BatchNorm2d`` (batch statistics in train mode, running statistics
    in eval mode), passes the other slices through and concatenates again.

    Per-slice modules were chosen over one batch norm on the whole
    concatenation because only they give the alternative's semantics: a
    full-width batch norm would also normalize the inputs that were not
    upsampled, and in training compute their statistics too. The price is the
    re-concatenation, one copy of the conv input that a batch norm written
    before ``torch.cat`` would not need; this variant's cost is therefore an
    upper bound by about one elementwise pass, the cost of ``explicit``.

    The running statistics start at the report's mean and variance, so that in
    eval mode the module equalizes the upsampled inputs as ``explicit`` does.
    """

    def __init__(self, site: Site, report: Report) -> None:
        super().__init__()
        self.slices = [inp.channels for inp in site.inputs]
        norms: list[nn.Module] = []
        for inp in site.inputs:
            if inp.upsample is None:
                norms.append(nn.Identity())
                continue
            norm = nn.BatchNorm2d(inp.channels[1] - inp.channels[0])
            stat = report.stats[site.name, inp.index]
            with torch.no_grad():
                norm.running_mean.fill_(stat.mean)  # type: ignore[union-attr]
                norm.running_var.fill_(stat.std**2)  # type: ignore[union-attr]
            norms.append(norm)
        self.norms = nn.ModuleList(norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([norm(x[:, a:b]) for (a, b), norm in zip(self.slices, self.norms)], dim=1)


def _normalize_input(conv: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (conv.get_submodule("upsampled_batchnorm")(args[0]), *args[1:])


def attach_batchnorms(model: nn.Module, report: Report) -> nn.Module:
    """Give every fusing conv of ``model`` an :class:`UpsampledBatchNorm` applied to its input.

    The module is registered as a submodule of the conv, so that ``.to``,
    ``.train`` and ``.parameters`` reach it, and runs in a forward pre-hook.

    Returns:
        ``model``, modified in place.
    """
    for name, site in fusing_conv_modules(report).items():
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            raise TypeError(f"fusing conv {name} of site {site.name!r} is a {type(conv).__name__}, not a conv module")
        conv.add_module("upsampled_batchnorm", UpsampledBatchNorm(site, report))
        conv.register_forward_pre_hook(_normalize_input)
    return model


def _node_sequence(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return [(node.op, str(node.target)) for node in gm.graph.nodes]


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _precisions(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)


@contextlib.contextmanager
def _mode(models: Sequence[nn.Module], training: bool) -> Iterator[None]:
    for model in models:
        model.train(training)
    try:
        yield
    finally:
        for model in models:
            model.eval()


def _summary(times: dict[str, list[float]], **fields: Any) -> dict[str, Any]:
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        **fields,
        "median_ms": medians,
        "ratio": {k: v / medians["original"] for k, v in medians.items()},
        "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }


def _time_variants(variants: dict[str, nn.Module], x: torch.Tensor, device: torch.device, dtype: torch.dtype,
                   args: argparse.Namespace, *, training: bool) -> dict[str, Any]:
    """Interleaved timings of the variants: eval forwards under no_grad, or train-mode forward + backward steps."""
    def infer(model: nn.Module) -> None:
        with torch.no_grad(), _autocast(device, dtype):
            model(x)

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            out = output_tensor(model(x))
        out.float().sum().backward()

    run = step if training else infer
    calls = {name: (lambda m=m: run(m)) for name, m in variants.items()}
    with _mode(list(variants.values()), training=training):
        times = interleaved_times(calls, reps=args.reps, warmup=args.warmup, device=device)
    return _summary(times, mode="train" if training else "inference", device=device.type,
                    dtype=str(dtype).removeprefix("torch."))


def _variants(model: nn.Module, name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """fxeq's and the alternatives' models of one model on one device, calibrated there."""
    model.to(device)
    batches = random_images(args.calib_batches, args.batch, args.size, seed=args.seed + 1, device=device)
    options = find_options(name)
    # The deployable graph (inference) and the private copy of the model it was captured from, which convert
    # rewrote too, in the model's own class (training): both share the folded parameters.
    prepared = fxeq.calibrate(fxeq.prepare(model, batches[0], **options), batches, progress=False)
    deployed = fxeq.convert(prepared)
    fxeq_model = prepared.model
    prepared = fxeq.calibrate(fxeq.prepare(model, batches[0], **options), batches, progress=False)
    explicit = fxeq.convert(prepared, mode="explicit")
    report: Report = deployed.fxeq_report
    reference = fxeq.capture(model, (batches[0],), frontend=report.frontend).module  # type: ignore[arg-type]
    batchnorm = attach_batchnorms(copy.deepcopy(model), report)
    return {
        "report": report, "x": batches[0], "same_graph": _node_sequence(reference) == _node_sequence(deployed),
        "graph_nodes": len(deployed.graph.nodes),
        "inference": {"original": model, "fxeq": deployed, "explicit": explicit, "batchnorm": batchnorm},
        "train": {"original": model, "fxeq": fxeq_model, "explicit": prepared.model, "batchnorm": batchnorm},
    }


def bench_model(name: str, args: argparse.Namespace, devices: Sequence[torch.device]) -> dict[str, Any]:
    """Build the four variants of one model on each device (calibrated there), check the graph, time them."""
    model = build_model(name, seed=args.seed)
    entry: dict[str, Any] = {"model": name, "constructor": describe_model(name), "timings": []}
    same_graph = []
    for device in devices:
        built = _variants(model, name, args, device)
        report = built["report"]
        same_graph.append(built["same_graph"])
        entry.update({
            "frontend": report.frontend, "sites": len(report.search.sites),
            "fusing_convs": sorted(fusing_conv_modules(report)),
            "upsampled_inputs": sum(1 for s in report.search.sites for i in s.inputs if i.upsample),
            "graph_nodes": built["graph_nodes"],
        })
        for dtype in _precisions(device):
            for mode in args.modes:
                entry["timings"].append(_time_variants(built[mode], built["x"], device, dtype, args,
                                                       training=mode == "train"))
    entry["graph_identical"] = all(same_graph)
    return entry


def _markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    sections = []
    keys = list(dict.fromkeys((t["mode"], t["device"], t["dtype"]) for r in results for t in r["timings"]))
    for mode, device, dtype in keys:
        rows = []
        for result in results:
            for t in result["timings"]:
                if (t["mode"], t["device"], t["dtype"]) != (mode, device, dtype):
                    continue
                cells = [f"{t['median_ms']['original']:.1f}"]
                cells += [f"{t['median_ms'][v]:.1f} ({t['ratio'][v]:.3f}x)" for v in VARIANTS[1:]]
                rows.append([result["model"], result["sites"], *cells,
                             "yes" if result["graph_identical"] else "**no**"])
        title = "inference (eval, no_grad)" if mode == "inference" else "training step (forward + backward, train mode)"
        sections.append(
            f"## {title}, {device}, {dtype}\n\n"
            f"Median ms over {args.reps} interleaved repetitions after {args.warmup} warm-up; "
            f"input {args.batch}x3x{args.size}x{args.size}; (ratio to original).\n\n"
            + markdown_table(
                ["model", "sites", "original ms", "fxeq ms", "explicit ms", "batchnorm ms", "same graph"], rows
            )
        )
    notes = "\n".join(f"- `{k}`: {v}" for k, v in _VARIANT_NOTES.items())
    notes += ("\n- same graph: the transformed graph's (op, target) sequence equals that of "
              "`fxeq.capture(original)`")
    sections.append("## variants\n\n" + notes)
    return sections


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + "\n\nTimes original, fxeq, explicit-equalizer and batch-norm variants; "
               "see the module docstring for what each variant is.",
               quick="unet_resnet18 and upernet_resnet18 at 64x64, batch 2, 2 repetitions, 1 warm-up", options={
                   "size": Option("input height and width", 512, 64),
                   "batch": Option("batch size of the timed input, at least 2", 8, 2),
                   "reps": Option("timed repetitions per variant", 20, 2),
                   "warmup": Option("untimed warm-up calls per variant", 3, 1),
               })
    p.add_argument("--calib-batches", type=int, default=2,
                   help="random batches fxeq calibrates on, each of --batch images, on each timed device (default: 2)")
    p.add_argument("--modes", nargs="+", choices=("inference", "train"), default=["inference", "train"],
                   help="what to time (default: inference train)")
    p.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None,
                   help="devices (default: cpu, and cuda when available); CPU runs float32, CUDA float32 "
                   "and bfloat16 autocast; fxeq captures and calibrates on each device it is timed on")
    args = p.parse_args(argv)
    if args.devices is None:
        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in args.devices and not torch.cuda.is_available():
        p.error("--devices cuda: CUDA is not available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    run = start("latency", args)
    devices = [torch.device(d) for d in args.devices]
    return run_models(run, lambda name: bench_model(name, args, devices),
                      lambda results, skipped: _markdown(results, args) + skipped_section(skipped))


if __name__ == "__main__":
    sys.exit(main())
