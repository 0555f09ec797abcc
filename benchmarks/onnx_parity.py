"""ONNX parity: the model fxeq deploys is the original graph on the runtime users deploy with.

Per model, the original and the GraphModule that ``fxeq.transform`` returns are
exported with ``torch.onnx.export(..., dynamo=True)`` (static shapes, one
input). The benchmark checks that the two ONNX graphs have the same node
sequence (op types, in order) and the same initializer names and shapes, and
that ONNX Runtime (CPU execution provider) computes the PyTorch outputs of
each; then it times the two sessions side by side: after warm-up they run
interleaved (A B A B ...), and the table gives medians and the ratio of fxeq
to the original, which must sit at 1.00 within noise (nothing is asserted).
The graphs' node counts and whether their op sequences agree come first in
the table, so that it can go into the README as it is.

Needs ``onnx``, ``onnxscript`` and ``onnxruntime``: ``pip install -e '.[onnx]'``.

Run ``python benchmarks/onnx_parity.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxeq

from _common import (
    Option, build_model, describe_model, find_options, interleaved_times, markdown_table, output_tensor, parser,
    random_images, run_models, skipped_section, start,
)

__all__ = ["main"]

_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
_INSTALL = "pip install -e '.[onnx]'"


def _runtime() -> Any:
    """ONNX Runtime, or an exit that names the missing packages and the extra that installs them."""
    missing = [name for name in _PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"onnx_parity: this benchmark needs onnx, onnxscript and onnxruntime; missing: "
                         f"{', '.join(missing)}. Install them with: {_INSTALL}")
    import onnxruntime  # noqa: PLC0415 - optional

    return onnxruntime


class _First(nn.Module):
    """The first tensor a model returns (torchvision's dict, Hugging Face's ModelOutput), for a one-output ONNX."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return output_tensor(self.model(x))


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Any:
    import onnx  # noqa: PLC0415 - optional

    torch.onnx.export(_First(model).eval(), (x,), str(path), dynamo=True, external_data=False, verbose=False)
    return onnx.load(str(path))


def _signature(graph: Any) -> dict[str, Any]:
    """What must not change: the node sequence and the initializers' names and shapes."""
    return {"ops": [n.op_type for n in graph.graph.node],
            "initializers": sorted((i.name, tuple(i.dims)) for i in graph.graph.initializer)}


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Export the original and fxeq's graph of one model, compare them, and time both in ONNX Runtime."""
    ort = _runtime()
    model = build_model(name, seed=args.seed).eval()
    batches = random_images(args.calib_batches, args.batch, args.size, seed=args.seed + 1)
    deployed = fxeq.transform(copy.deepcopy(model), batches, dynamic=False, progress=False, **find_options(name))
    x = batches[0]
    with tempfile.TemporaryDirectory() as folder:
        graphs = {v: _export(m, x, Path(folder) / f"{v}.onnx") for v, m in (("original", model), ("fxeq", deployed))}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads or 0
    sessions = {v: ort.InferenceSession(g.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for v, g in graphs.items()}
    feed = {v: {s.get_inputs()[0].name: x.numpy()} for v, s in sessions.items()}
    with torch.no_grad():
        expected = {"original": output_tensor(model(x)), "fxeq": output_tensor(deployed(x))}
    error = {v: float((torch.from_numpy(sessions[v].run(None, feed[v])[0]) - expected[v]).abs().max())
             for v in sessions}
    calls = {v: (lambda v=v: sessions[v].run(None, feed[v])) for v in sessions}
    times = interleaved_times(calls, reps=args.reps, warmup=args.warmup, device=torch.device("cpu"))
    times_ms = {v: [t * 1e3 for t in ts] for v, ts in times.items()}
    medians = {v: statistics.median(t) for v, t in times_ms.items()}
    signatures = {v: _signature(g) for v, g in graphs.items()}
    return {
        "model": name, "constructor": describe_model(name), "sites": len(deployed.fxeq_report.search.sites),
        "onnx_nodes": {v: len(s["ops"]) for v, s in signatures.items()},
        "same_nodes": signatures["original"]["ops"] == signatures["fxeq"]["ops"],
        "same_initializers": signatures["original"]["initializers"] == signatures["fxeq"]["initializers"],
        "max_abs_error_vs_torch": error, "times_ms": times_ms, "median_ms": medians,
        "ratio": medians["fxeq"] / medians["original"],
    }


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def _markdown(results: list[dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace) -> list[str]:
    rows = [[r["model"], r["sites"], r["onnx_nodes"]["original"], r["onnx_nodes"]["fxeq"], _yes(r["same_nodes"]),
             f"{r['median_ms']['original']:.1f}", f"{r['median_ms']['fxeq']:.1f}", f"{r['ratio']:.3f}x"]
            for r in results]
    checks = [[r["model"], _yes(r["same_initializers"]), f"{r['max_abs_error_vs_torch']['original']:.1e}",
               f"{r['max_abs_error_vs_torch']['fxeq']:.1e}"] for r in results]
    return [
        f"## ONNX: the original and fxeq's graph, ONNX Runtime on the CPU\n\n"
        f"`torch.onnx.export(..., dynamo=True)` of the model and of the GraphModule `fxeq.transform` returns "
        f"(static shapes); input {args.batch}x3x{args.size}x{args.size}, float32; ONNX Runtime's CPU execution "
        f"provider, median ms over {args.reps} interleaved runs after {args.warmup} warm-up, and fxeq / original. "
        "`same sequence`: the two graphs' op types, in order, are identical.\n\n"
        + markdown_table(["model", "sites", "ONNX nodes, original", "ONNX nodes, fxeq", "same sequence",
                          "ORT CPU original ms", "ORT CPU fxeq ms", "ratio"], rows),
        "## checks\n\n`same initializers`: the same names and shapes (only the fusing convs' values differ); "
        "`max abs(ORT - torch)`: the largest difference between ONNX Runtime's output and PyTorch's, per model."
        "\n\n"
        + markdown_table(["model", "same initializers", "max abs(ORT - torch), original",
                          "max abs(ORT - torch), fxeq"], checks),
        "## models\n\n" + "\n".join(f"- `{r['model']}`: `{r['constructor']}`" for r in results),
        *skipped_section(skipped),
    ]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0] + f"\n\nNeeds onnx, onnxscript and onnxruntime: {_INSTALL}.",
               quick="unet_resnet18 and upernet_resnet18 at 64x64, batch 2, 3 runs, 1 warm-up", options={
                   "size": Option("input height and width", 256, 64),
                   "batch": Option("batch size, at least 2", 2, 2),
                   "reps": Option("timed runs per model", 20, 3),
                   "warmup": Option("untimed runs per model", 3, 1),
               })
    p.add_argument("--calib-batches", type=int, default=2, help="random calibration batches (default: 2)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    _runtime()
    run = start("onnx_parity", args)
    return run_models(run, lambda name: bench_model(name, args),
                      lambda results, skipped: _markdown(results, skipped, args))


if __name__ == "__main__":
    sys.exit(main())
