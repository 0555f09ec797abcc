"""Shared pieces of the fxeq benchmarks: model zoo, timing, memory, result files.

Every benchmark script writes two files into its results folder: a JSON file
holding every measured number, and a markdown file holding the tables. Both
record where and how they were measured (CPU model and GPU name, library
versions and git commit, the exact command line, a timestamp and the CPU load
average), so that a table pasted into the README can be traced back to a run.
No figure in either file is typed in by hand.

The scripts import this module as ``_common`` (Python puts a script's own
folder first on ``sys.path``), so they run as ``python benchmarks/<name>.py``
from any working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fxeq
from fxeq.report import Report
from fxeq.sites import Site

__all__ = [
    "DEFAULT_RESULTS",
    "FULL_MODELS",
    "QUICK_MODELS",
    "Run",
    "build_model",
    "defaults",
    "describe_model",
    "fusing_conv_modules",
    "interleaved_times",
    "markdown_table",
    "output_tensor",
    "parser",
    "peak_memory",
    "random_images",
    "start",
    "stopwatch",
]

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"

# ---------------------------------------------------------------------------
# Model zoo: name -> (library, constructor, encoder). Weights are never loaded.
# ---------------------------------------------------------------------------

_ZOO: dict[str, tuple[str, str, str | None]] = {
    "deeplabv3_resnet50": ("torchvision", "deeplabv3_resnet50", None),
    "deeplabv3_resnet101": ("torchvision", "deeplabv3_resnet101", None),
    "upernet_convnext_tiny": ("smp", "UPerNet", "tu-convnext_tiny"),
    "pspnet_resnet50": ("smp", "PSPNet", "resnet50"),
    "deeplabv3plus_resnet50": ("smp", "DeepLabV3Plus", "resnet50"),
    "segformer_mit_b2": ("smp", "Segformer", "mit_b2"),
    "unet_resnet34": ("smp", "Unet", "resnet34"),
    "unet_resnet18": ("smp", "Unet", "resnet18"),
    "upernet_resnet18": ("smp", "UPerNet", "resnet18"),
}

FULL_MODELS: tuple[str, ...] = (
    "deeplabv3_resnet50", "deeplabv3_resnet101", "upernet_convnext_tiny", "pspnet_resnet50",
    "deeplabv3plus_resnet50", "segformer_mit_b2", "unet_resnet34",
)
QUICK_MODELS: tuple[str, ...] = ("unet_resnet18", "upernet_resnet18")

NUM_CLASSES = 21


def describe_model(name: str) -> str:
    """The constructor call that :func:`build_model` makes for ``name``.

    Example:
        >>> describe_model("unet_resnet18")
        "smp.Unet(encoder_name='resnet18', encoder_weights=None, classes=21)"
    """
    library, constructor, encoder = _ZOO[name]
    if library == "torchvision":
        return (f"torchvision.models.segmentation.{constructor}(weights=None, weights_backbone=None, "
                f"num_classes={NUM_CLASSES})")
    return f"smp.{constructor}(encoder_name={encoder!r}, encoder_weights=None, classes={NUM_CLASSES})"


def build_model(name: str, *, seed: int = 0) -> nn.Module:
    """A zoo model with random weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    library, constructor, encoder = _ZOO[name]
    torch.manual_seed(seed)
    if library == "torchvision":
        import torchvision

        build = getattr(torchvision.models.segmentation, constructor)
        model = build(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    else:
        import segmentation_models_pytorch as smp

        model = getattr(smp, constructor)(encoder_name=encoder, encoder_weights=None, classes=NUM_CLASSES)
    return model.eval()


def random_images(count: int, batch: int, size: int, *, seed: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """``count`` batches of standard-normal images ``(batch, 3, size, size)``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator).to(device) for _ in range(count)]


def output_tensor(output: Any) -> torch.Tensor:
    """The logits of a segmentation model (torchvision returns ``{"out": ...}``)."""
    if isinstance(output, Mapping):
        return output["out"]
    return output


def fusing_conv_modules(report: Report) -> dict[str, Site]:
    """Every fusing conv of a report, by module name, with its site.

    The report names parameters (``decoder.fuse.0.weight``); the owning module
    of the original model is the name without ``.weight``.
    """
    return {conv.weight.rsplit(".", 1)[0]: site for site in report.search.sites for conv in site.convs}


# ---------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stopwatch(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once; return its result and the wall time in seconds (device synchronized)."""
    _synchronize(device)
    begin = time.perf_counter()
    result = fn()
    _synchronize(device)
    return result, time.perf_counter() - begin


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    begin_s = time.perf_counter()
    fn()
    return time.perf_counter() - begin_s


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (A B C A B C ...).

    Interleaving spreads slow drifts (frequency scaling, other processes,
    allocator state) over every variant alike instead of charging them to
    whichever ran last. Each function first runs ``warmup`` times, round-robin
    too. CUDA calls are timed with CUDA events.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return times


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes that torch allocated while ``fn`` ran, above what was allocated before.

    On CUDA this is ``torch.cuda.max_memory_allocated`` after a reset. On CPU
    it is the running maximum of the torch profiler's allocation events: torch
    allocates CPU tensors with ``malloc``, which ``tracemalloc`` does not see,
    and the process's peak RSS also counts the memory glibc keeps cached after
    a free, so neither measures what the pass itself needs.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------------------
# Environment, command line and result files
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    """Where, with what and how this run happens: device, versions, command, timestamp."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu,
            "cuda": torch.version.cuda if gpu else None,
            "platform": platform.platform(),
            "load_average_1m": _load_average(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "timm": _version("timm"),
            "segmentation_models_pytorch": _version("segmentation_models_pytorch"),
            "fxeq": fxeq.__version__,
            "fxeq_git": _git_commit(),
        },
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def parser(description: str, *, quick: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares.

    Args:
        description: what the benchmark measures (shown by ``--help``).
        quick: what ``--quick`` runs instead.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke-test settings: {quick}")
    p.add_argument("--models", nargs="+", choices=sorted(_ZOO), metavar="NAME",
                   help=f"models to run (default: {' '.join(FULL_MODELS)}; with --quick: "
                   f"{' '.join(QUICK_MODELS)}); choices: {', '.join(sorted(_ZOO))}")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS,
                   help="folder for the result files, JSON, markdown and any plots (default: benchmarks/results/)")
    p.add_argument("--tag", default="",
                   help="suffix of the result file names, to keep runs apart (default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice; the number used is recorded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images (default: 0)")
    return p


class Run:
    """One benchmark run: its settings, environment record and result files.

    Example (in a script)::

        run = start("latency", args)
        ...
        run.write({"results": rows}, markdown_sections)
    """

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.environment = environment()
        self.begin = time.perf_counter()
        self.models = list(args.models or (QUICK_MODELS if args.quick else FULL_MODELS))

    @property
    def stem(self) -> str:
        """File name stem: ``latency``, ``latency-quick``, ``latency-<tag>``..."""
        return self.name + ("-quick" if self.args.quick else "") + (f"-{self.args.tag}" if self.args.tag else "")

    def path(self, suffix: str) -> Path:
        """Path of a result file with this run's stem (``.json``, ``.md``, ``.png``)."""
        return self.args.out / f"{self.stem}{suffix}"

    def write(self, data: Mapping[str, Any], sections: Sequence[str]) -> tuple[Path, Path]:
        """Write ``<stem>.json`` (environment, settings, data) and ``<stem>.md`` (tables).

        Returns:
            The JSON and markdown paths.
        """
        self.args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()}
        record = {
            "benchmark": self.name,
            "environment": self.environment,
            "settings": {**settings, "models": self.models},
            "duration_s": round(time.perf_counter() - self.begin, 1),
            "load_average_1m_end": _load_average(),
            **data,
        }
        json_path, md_path = self.path(".json"), self.path(".md")
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        env = self.environment
        device = env["device"]
        where = f"{device['cpu']} ({device['cpu_count']} CPUs, {device['torch_threads']} torch threads)"
        if device["gpu"]:
            where += f"; {device['gpu']} (CUDA {device['cuda']})"
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        header = [
            f"# fxeq benchmark: {self.name}",
            "",
            f"- device: {where}",
            f"- versions: {versions}",
            f"- command: `{env['command']}`",
            f"- timestamp: {env['timestamp']} (took {record['duration_s']} s; "
            f"1-minute CPU load average {device['load_average_1m']} at start, "
            f"{record['load_average_1m_end']} at end)",
            "",
        ]
        md_path.write_text("\n".join(header) + "\n" + "\n\n".join(s.rstrip() for s in sections) + "\n")
        print(md_path.read_text())
        print(f"wrote {json_path} and {md_path}")
        return json_path, md_path


def start(name: str, args: argparse.Namespace) -> Run:
    """Apply the shared options (threads) and open the run record."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return Run(name, args)


def defaults(args: argparse.Namespace, full: Mapping[str, Any], quick: Mapping[str, Any]) -> None:
    """Fill the options left at None with the full or ``--quick`` value."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x"]]))
        | a | b |
        |---|---|
        | 1 | x |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
