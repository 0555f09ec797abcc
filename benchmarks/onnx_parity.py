"""ONNX parity: the model fxeq deploys is the original graph on the runtime users deploy with.

Per model, the original and the GraphModule that ``fxeq.transform`` returns are
exported with ``torch.onnx.export(..., dynamo=True)`` (static shapes, one
input). The benchmark checks that the two ONNX graphs have the same node
sequence (op types, in order) and the same initializer names and shapes, and
that ONNX Runtime (CPU execution provider) computes the PyTorch outputs of
each; then it times the two sessions side by side: after warm-up they run
interleaved (A B A B ...), and the table gives medians and the ratio of fxeq
to the original, which must sit at 1.00 within noise (nothing is asserted).

Needs ``onnx``, ``onnxscript`` and ``onnxruntime``: ``pip install -e '.[onnx]'``.

Run ``python benchmarks/onnx_parity.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxeq

from _common import build_model, defaults, describe_model, markdown_table, output_tensor, parser, random_images, start

__all__ = ["main"]

_EXTRA = "pip install -e '.[onnx]' (onnx, onnxscript and onnxruntime)"


def _runtime() -> Any:
    try:
        import onnx  # noqa: F401, PLC0415 - optional
        import onnxruntime  # noqa: PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError as e:
        raise SystemExit(f"onnx_parity: this benchmark needs {_EXTRA}; missing: {e.name}") from e
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
    deployed = fxeq.transform(copy.deepcopy(model), batches, dynamic=False, progress=False)
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
    for v in sessions:  # warm-up
        for _ in range(args.warmup):
            sessions[v].run(None, feed[v])
    times: dict[str, list[float]] = {v: [] for v in sessions}
    for _ in range(args.reps):
        for v in sessions:
            begin = time.perf_counter()
            sessions[v].run(None, feed[v])
            times[v].append((time.perf_counter() - begin) * 1000)
    medians = {v: statistics.median(t) for v, t in times.items()}
    signatures = {v: _signature(g) for v, g in graphs.items()}
    return {
        "model": name, "constructor": describe_model(name), "sites": len(deployed.fxeq_report.search.sites),
        "onnx_nodes": len(signatures["original"]["ops"]),
        "same_nodes": signatures["original"]["ops"] == signatures["fxeq"]["ops"],
        "same_initializers": signatures["original"]["initializers"] == signatures["fxeq"]["initializers"],
        "max_abs_error_vs_torch": error, "times_ms": times, "median_ms": medians,
        "ratio": medians["fxeq"] / medians["original"],
    }


def _markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    rows = [[r["model"], r["sites"], r["onnx_nodes"], "yes" if r["same_nodes"] else "**no**",
             "yes" if r["same_initializers"] else "**no**", f"{r['median_ms']['original']:.1f}",
             f"{r['median_ms']['fxeq']:.1f}", f"**{r['ratio']:.3f}x**",
             f"{max(r['max_abs_error_vs_torch'].values()):.1e}"] for r in results]
    return [
        f"## ONNX Runtime, CPU execution provider\n\nInput {args.batch}x3x{args.size}x{args.size}, float32; median ms "
        f"over {args.reps} interleaved runs after {args.warmup} warm-up.\n\n"
        + markdown_table(["model", "sites", "ONNX nodes", "same nodes", "same initializers", "original ms",
                          "fxeq ms", "ratio", "max |ORT - torch|"], rows),
        "## what is compared\n\n- same nodes: the exported graphs' op types, in order, are identical\n"
        "- same initializers: the same names and shapes (only the values of the fusing convs differ)\n"
        "- max |ORT - torch|: ONNX Runtime's output against PyTorch's, for either model",
    ]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__.split("\n\n")[0], quick="unet_resnet18 and upernet_resnet18 at 64x64, batch 2, 3 runs")
    p.add_argument("--size", type=int, help="input height and width (default: 256; --quick: 64)")
    p.add_argument("--batch", type=int, help="batch size (default: 2; --quick: 2)")
    p.add_argument("--reps", type=int, help="timed runs per model (default: 20; --quick: 3)")
    p.add_argument("--warmup", type=int, help="untimed runs per model (default: 3; --quick: 1)")
    p.add_argument("--calib-batches", type=int, default=2, help="random calibration batches (default: 2)")
    args = p.parse_args(argv)
    defaults(args, full={"size": 256, "batch": 2, "reps": 20, "warmup": 3},
             quick={"size": 64, "batch": 2, "reps": 3, "warmup": 1})
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parse(argv)
    _runtime()
    run = start("onnx_parity", args)
    results = []
    for name in run.models:
        print(f"onnx_parity: {name}", file=sys.stderr, flush=True)
        results.append(bench_model(name, args))
    run.write({"results": results}, _markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
