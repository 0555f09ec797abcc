"""Shared pieces of the fxeq benchmarks: model zoo, timing, memory, result files.

Every benchmark script writes two files into its results folder: a JSON file
holding every measured number, and a markdown file holding the tables. Both
record where and how they were measured (CPU model and GPU name, library
versions and git commit, the exact command line, a timestamp and the CPU load
average), so that a table pasted into the README can be traced back to a run.
No figure in either file is typed in by hand.

Full runs write into ``benchmarks/results/`` (committed); ``--quick`` smoke
runs write into ``benchmarks/results/tmp/``, which git ignores, unless
``--out`` says otherwise.

Each script writes its files again after every model, marked ``"complete":
false`` until the last, so that a run stopped by a time limit (``gpu.sh``)
keeps what it measured.

The scripts import this module as ``_common`` (Python puts a script's own
folder first on ``sys.path``), so they run as ``python benchmarks/<name>.py``
from any working directory; the tests put this folder on ``sys.path`` too.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.util
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fxeq._version import versions
from fxeq.report import Report
from fxeq.sites import Site

__all__ = [
    "DEFAULT_RESULTS",
    "FULL_MODELS",
    "OTHER_LIBRARIES",
    "Option",
    "QUICK_MODELS",
    "QUICK_RESULTS",
    "Run",
    "TEST_ZOO",
    "ZOO",
    "ZooModel",
    "available",
    "build_model",
    "build_smp",
    "cpu_peak_memory",
    "describe_error",
    "describe_model",
    "find_options",
    "fusing_conv_modules",
    "interleaved_times",
    "markdown_table",
    "output_tensor",
    "parser",
    "peak_memory",
    "quiet_profiler",
    "random_images",
    "run_models",
    "skipped_section",
    "start",
    "stopwatch",
]

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = DEFAULT_RESULTS / "tmp"  # git-ignored: smoke runs never dirty the tree

# ---------------------------------------------------------------------------
# Model zoo: name -> library, constructor and arguments. Weights are never loaded.
# ---------------------------------------------------------------------------

NUM_CLASSES = 21

# Where each library's constructors live, and how describe_model spells that.
_LIBRARIES: dict[str, tuple[str, str]] = {
    "torchvision": ("torchvision.models.segmentation", "torchvision.models.segmentation"),
    "segmentation_models_pytorch": ("segmentation_models_pytorch", "smp"),
    "transformers": ("transformers", "transformers"),
    "monai": ("monai.networks.nets", "monai.networks.nets"),
    "ultralytics": ("ultralytics.nn.tasks", "ultralytics.nn.tasks"),
}

# A small Hugging Face UperNet on a Swin backbone, built from config classes
# (no download): the model whose export with symbolic H/W took minutes.
_HF_SWIN = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 4}
_HF_UPERNET = {"hidden_size": 64, "use_auxiliary_head": False}


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: a constructor call with random weights, and what fxeq needs to find its sites.

    Attributes:
        library: the package that builds it (a key of the libraries table).
        constructor: the class or function name in that package.
        kwargs: the constructor's arguments.
        find: arguments that :func:`fxeq.find` and :func:`fxeq.prepare` need
            for this model (``all_concats=True`` where it upsamples with
            transposed convs). Default: none.
    """

    library: str
    constructor: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    find: Mapping[str, Any] = field(default_factory=dict)


def _smp(arch: str, encoder: str) -> ZooModel:
    return ZooModel("segmentation_models_pytorch", arch,
                    {"encoder_name": encoder, "encoder_weights": None, "classes": NUM_CLASSES})


def _torchvision(name: str) -> ZooModel:
    return ZooModel("torchvision", name, {"weights": None, "weights_backbone": None, "num_classes": NUM_CLASSES})


_MONAI_2D = {"spatial_dims": 2, "in_channels": 3, "out_channels": NUM_CLASSES}

ZOO: dict[str, ZooModel] = {
    "deeplabv3_resnet50": _torchvision("deeplabv3_resnet50"),
    "deeplabv3_resnet101": _torchvision("deeplabv3_resnet101"),
    "upernet_convnext_tiny": _smp("UPerNet", "tu-convnext_tiny"),
    "pspnet_resnet50": _smp("PSPNet", "resnet50"),
    "deeplabv3plus_resnet50": _smp("DeepLabV3Plus", "resnet50"),
    "segformer_mit_b2": _smp("Segformer", "mit_b2"),
    "unet_resnet34": _smp("Unet", "resnet34"),
    "unet_resnet18": _smp("Unet", "resnet18"),
    "upernet_resnet18": _smp("UPerNet", "resnet18"),
    "pspnet_resnet18": _smp("PSPNet", "resnet18"),
    "deeplabv3plus_resnet18": _smp("DeepLabV3Plus", "resnet18"),
    "segformer_resnet18": _smp("Segformer", "resnet18"),
    "upernet_convnext_atto": _smp("UPerNet", "tu-convnext_atto"),
    "pspnet_convnext_atto": _smp("PSPNet", "tu-convnext_atto"),
    "deeplabv3plus_convnext_atto": _smp("DeepLabV3Plus", "tu-convnext_atto"),
    "segformer_convnext_atto": _smp("Segformer", "tu-convnext_atto"),
    "unet_convnext_atto": _smp("Unet", "tu-convnext_atto"),
    "hf_upernet_swin": ZooModel("transformers", "UperNetForSemanticSegmentation"),
    # MONAI's 2-D U-Nets: interpolation in UpCat; resnet18 FlexibleUNet only the concrete trace captures
    # (a pooling module built in forward, .data in a cat); DynUNet upsamples with transposed convs.
    "monai_basicunet": ZooModel("monai", "BasicUNet", {**_MONAI_2D, "upsample": "nontrainable"}),
    "monai_flexibleunet_resnet18": ZooModel("monai", "FlexibleUNet", {
        "in_channels": 3, "out_channels": NUM_CLASSES, "backbone": "resnet18", "pretrained": False,
        "spatial_dims": 2}),
    "monai_dynunet": ZooModel("monai", "DynUNet", {
        **_MONAI_2D, "kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2]},
        find={"all_concats": True}),
    # Ultralytics YOLOv8n from its yaml: nn.Upsample -> Concat -> C2f.cv1 in the neck.
    "yolov8n": ZooModel("ultralytics", "DetectionModel", {"cfg": "yolov8n.yaml", "verbose": False}),
}
"""Every model the benchmarks can build, by name (``--models`` takes these names)."""

FULL_MODELS: tuple[str, ...] = (
    "deeplabv3_resnet50", "deeplabv3_resnet101", "upernet_convnext_tiny", "pspnet_resnet50",
    "deeplabv3plus_resnet50", "segformer_mit_b2", "unet_resnet34",
)
"""The full-size models of the latency, variance and ONNX tables (calibration_cost.py has its own list)."""
QUICK_MODELS: tuple[str, ...] = ("unet_resnet18", "upernet_resnet18")
"""What ``--quick`` runs: one fx-captured model with 4 chained sites, one exported with 2."""
TEST_ZOO: tuple[str, ...] = (
    "deeplabv3_resnet50", "upernet_resnet18", "pspnet_resnet18", "deeplabv3plus_resnet18", "segformer_resnet18",
    "unet_resnet18", "upernet_convnext_atto", "pspnet_convnext_atto", "deeplabv3plus_convnext_atto",
    "segformer_convnext_atto", "unet_convnext_atto",
)
"""The models of ``tests/test_zoo.py``, which imports this list: torchvision deeplabv3 and five smp decoders on two
encoders."""
OTHER_LIBRARIES: tuple[str, ...] = (
    "hf_upernet_swin", "monai_basicunet", "monai_flexibleunet_resnet18", "monai_dynunet", "yolov8n",
)
"""Small models of Hugging Face transformers, MONAI and Ultralytics, each skipped where its library is missing."""


def available(name: str) -> str | None:
    """Why zoo model ``name`` cannot be built here, or None when it can.

    Example:
        >>> available("unet_resnet18") is None
        True
    """
    library = ZOO[name].library
    if importlib.util.find_spec(library) is None:
        return f"{library} is not installed (pip install -e '.[test]' installs every model library)"
    return None


def _call(entry: ZooModel) -> str:
    prefix = _LIBRARIES[entry.library][1]
    if entry.library == "transformers":
        swin = ", ".join(f"{k}={v!r}" for k, v in _HF_SWIN.items())
        head = ", ".join(f"{k}={v!r}" for k, v in _HF_UPERNET.items())
        return (f"{prefix}.{entry.constructor}(UperNetConfig(backbone_config=SwinConfig({swin}, drop_path_rate=0.0, "
                f"out_features=['stage1', 'stage2', 'stage3', 'stage4']), {head}, num_labels={NUM_CLASSES}))")
    return f"{prefix}.{entry.constructor}({', '.join(f'{k}={v!r}' for k, v in entry.kwargs.items())})"


def describe_model(name: str) -> str:
    """The constructor call that :func:`build_model` makes for ``name`` (and the options fxeq is given).

    Example:
        >>> describe_model("unet_resnet18")
        "smp.Unet(encoder_name='resnet18', encoder_weights=None, classes=21)"
        >>> describe_model("monai_dynunet").endswith("; fxeq: all_concats=True")
        True
    """
    entry = ZOO[name]
    options = ", ".join(f"{k}={v!r}" for k, v in entry.find.items())
    return _call(entry) + (f"; fxeq: {options}" if options else "")


def find_options(name: str) -> dict[str, Any]:
    """What :func:`fxeq.find` and :func:`fxeq.prepare` need for zoo model ``name`` (usually nothing)."""
    return dict(ZOO[name].find)


def build_smp(arch: str, encoder: str, *, classes: int = NUM_CLASSES, seed: int = 0,
              **kwargs: Any) -> nn.Module:
    """An smp model with random weights drawn after ``torch.manual_seed(seed)``; never downloads weights.

    Args:
        arch: an smp class name (``UPerNet``, ``PSPNet``, ``Unet``...).
        encoder: an smp encoder name.
        classes: output classes. Default: 21.
        seed: seed of the random weights. Default: 0.
        kwargs: further constructor arguments (``decoder_channels``...).

    Raises:
        ValueError: ``arch`` is not an smp model class.
    """
    import segmentation_models_pytorch as smp

    constructor = getattr(smp, arch, None)
    if not isinstance(constructor, type) or not issubclass(constructor, nn.Module):
        raise ValueError(f"unknown smp architecture {arch!r}; use a class name such as UPerNet, PSPNet, Unet")
    torch.manual_seed(seed)
    return constructor(encoder_name=encoder, encoder_weights=None, classes=classes, **kwargs)


def _offline_ultralytics() -> None:
    """Ultralytics reads its settings from, and writes them to, YOLO_CONFIG_DIR on import: a temporary one here,
    and offline, so that building from a yaml never reaches the network."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if "YOLO_CONFIG_DIR" not in os.environ:
        folder = tempfile.TemporaryDirectory(prefix="fxeq-bench-ultralytics-")
        atexit.register(folder.cleanup)
        os.environ["YOLO_CONFIG_DIR"] = folder.name


def build_model(name: str, *, seed: int = 0) -> nn.Module:
    """A zoo model with random weights drawn after ``torch.manual_seed(seed)``, in eval mode.

    Constructors that print (MONAI's BasicUNet lists its features) are kept quiet.
    """
    entry = ZOO[name]
    if entry.library == "ultralytics":
        _offline_ultralytics()
    module = importlib.import_module(_LIBRARIES[entry.library][0])
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        if entry.library == "transformers":
            swin = module.SwinConfig(**_HF_SWIN, drop_path_rate=0.0,
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
            config = module.UperNetConfig(backbone_config=swin, **_HF_UPERNET, num_labels=NUM_CLASSES)
            model = getattr(module, entry.constructor)(config)
        else:
            model = getattr(module, entry.constructor)(**entry.kwargs)
    return model.eval()


def random_images(count: int, batch: int, size: int, *, seed: int,
                  device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """``count`` batches of standard-normal images ``(batch, 3, size, size)``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator).to(device) for _ in range(count)]


def output_tensor(output: Any) -> torch.Tensor:
    """The logits of a segmentation model (torchvision returns ``{"out": ...}``, Hugging Face ``.logits``)."""
    if isinstance(output, Mapping):
        return output["out"] if "out" in output else output["logits"]
    return getattr(output, "logits", output)


def fusing_conv_modules(report: Report) -> dict[str, Site]:
    """Every fusing conv of a report, by module name, with its site."""
    return {conv.module: site for site in report.search.sites for conv in site.convs}


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
    fns: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device,
    failures: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (A B C A B C ...).

    Interleaving spreads slow drifts (frequency scaling, other processes,
    allocator state) over every variant alike instead of charging them to
    whichever ran last. Each function first runs ``warmup`` times, round-robin
    too. CUDA calls are timed with CUDA events.

    Args:
        failures: where a function may fail (a capture frontend that cannot
            trace a model): its error (:func:`describe_error`) goes here under its name,
            it is not called again, and it has no times. Without it, every
            error propagates. Default: None.
    """
    live = dict(fns)

    def call(name: str, fn: Callable[[], Any]) -> float | None:
        if failures is None:
            return _time_once(fn, device)
        try:
            return _time_once(fn, device)
        except Exception as e:  # noqa: BLE001 - recorded for the table, which says which variant failed and why
            failures[name] = describe_error(e)
            del live[name]
            return None

    for _ in range(warmup):
        for name, fn in list(live.items()):
            call(name, fn)
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in list(live.items()):
            seconds = call(name, fn)
            if seconds is not None:
                times[name].append(seconds)
    return {name: t for name, t in times.items() if name in live}


def describe_error(e: BaseException, limit: int = 200) -> str:
    """An error in one line for a table: its type and its first two lines (a CaptureError's second line
    names the frontend that failed and why), at most ``limit`` characters.

    Example:
        >>> describe_error(ValueError("could not capture X; tried fx:\\n  fx: TraceError: no"))
        'ValueError: could not capture X; tried fx: fx: TraceError: no'
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {' '.join(lines[:2]) or '(no message)'}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    return cpu_peak_memory(fn)[0]


def cpu_peak_memory(fn: Callable[[], Any], inside: str | None = None) -> tuple[int, int | None]:
    """CPU peak bytes while ``fn`` ran, and the peak while it was inside ``torch.profiler.record_function(inside)``.

    Both are running maxima of the profiler's allocation events over the
    whole call (so memory allocated before such a range and still held
    counts inside it); the second is None without ``inside`` or when no
    such range ran.
    """
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in events
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    ranges = [(event.start_ns(), event.end_ns()) for event in events if inside is not None and event.name() == inside]
    current = peak = 0
    peak_inside: int | None = None
    for when, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
        if any(begin <= when <= end for begin, end in ranges):
            peak_inside = max(peak_inside or 0, current)
    return peak, peak_inside


# What the profiler's C++ side writes to stderr on every start and stop, on a
# CUDA build without a GPU, and when a tensor allocated before profiling is
# freed during it: not ours to show.
_PROFILER_NOISE = ("profiler_start", "profiler_stop", "gpuGetDeviceCount failed",
                   "allocated before the profiling started")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Drop the torch profiler's own stderr lines (``USDT: profiler_start``...); pass every other line on.

    Kineto writes them from C++ straight to file descriptor 2, so
    ``contextlib.redirect_stderr`` cannot catch them: the descriptor itself is
    pointed at a temporary file for the duration, and what is not profiler
    noise is copied back to stderr afterwards.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(noise in line for noise in _PROFILER_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


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


# Libraries the zoo builds from and runtimes a benchmark uses, which fxeq.report.versions() does not cover;
# the ones not installed are left out of the markdown header.
_MODEL_LIBRARIES = ("timm", "segmentation_models_pytorch", "transformers", "monai", "ultralytics", "onnx",
                    "onnxscript", "onnxruntime")


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
        dirty = subprocess.run(  # results written by an earlier run in a series are not code changes
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
            cwd=root, capture_output=True, text=True, check=True).stdout.strip()
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
            **versions(),
            **{package: _version(package) for package in _MODEL_LIBRARIES},
            "fxeq_git": _git_commit(),
        },
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Option:
    """A benchmark option whose default differs between a full run and ``--quick``.

    Attributes:
        help: what it sets; ``--help`` adds both defaults.
        full: the default of a full run.
        quick: the default with ``--quick``.
        type: how to read one value. Default: int.
        nargs: as in argparse (``4`` for a shape). Default: one value.
        metavar: as in argparse. Default: the option's name in capitals.
    """

    help: str
    full: Any
    quick: Any
    type: Callable[[str], Any] = int
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None


def _shown(value: Any, nargs: int | str | None) -> str:
    """A default as the user types it: ``1 2`` for several arguments, ``a,b`` for a list read from one."""
    if isinstance(value, (list, tuple)):
        return (" " if nargs is not None else ",").join(map(str, value))
    return str(value)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that fills each :class:`Option` left unset with its full or ``--quick`` default."""

    def __init__(self, options: Mapping[str, Option], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = dict(options)

    def add_options(self) -> None:
        """Add the :class:`Option` entries (after the shared options, so that ``--help`` lists those first)."""
        for key, option in self.options.items():
            self.add_argument("--" + key.replace("_", "-"), type=option.type, nargs=option.nargs, default=None,
                              metavar=option.metavar,
                              help=f"{option.help} (default: {_shown(option.full, option.nargs)}; "
                              f"--quick: {_shown(option.quick, option.nargs)})")

    def parse_args(  # type: ignore[override] # one signature of argparse's overloads
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        for key, option in self.options.items():
            if getattr(parsed, key) is None:
                setattr(parsed, key, option.quick if parsed.quick else option.full)
        if "batch" in self.options and parsed.batch < 2:
            self.error("--batch must be at least 2: batch norm with batch statistics (fxeq calibrates with them, "
                       "training uses them) and a dynamic batch size need 2 samples")
        device = getattr(parsed, "device", "")
        if device == "auto":
            parsed.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            self.error(f"--device {device}: CUDA is not available here")
        return parsed


def parser(description: str, *, quick: str, options: Mapping[str, Option] | None = None, zoo: bool = True,
           device: bool = False, full_models: Sequence[str] = FULL_MODELS, quick_models: Sequence[str] = QUICK_MODELS,
           epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares.

    ``--quick``, ``--out``, ``--tag`` and ``--threads`` always; ``--models``
    (from the zoo) and ``--seed`` unless ``zoo=False``, for a benchmark that
    names its models and seeds its own way; the script's own sizes as
    :class:`Option` entries, filled in by ``parse_args`` (and ``--batch``
    checked to be at least 2).

    Args:
        description: what the benchmark measures (shown by ``--help``).
        quick: what ``--quick`` runs instead.
        options: per option name (``calib_batches`` is ``--calib-batches``),
            its help and its full and quick defaults. Default: none.
        zoo: add ``--models`` and ``--seed``. Default: True.
        device: add ``--device`` (a torch device; default cuda when
            available, else cpu; refused when CUDA is asked for and missing). Default: False.
        full_models: the models of a full run. Default: :data:`FULL_MODELS`.
        quick_models: the models of a ``--quick`` run. Default: :data:`QUICK_MODELS`.
        epilog: text shown after the options. Default: none.

    Example:
        >>> p = parser("demo", quick="tiny", options={"size": Option("image size", 512, 64)})
        >>> p.parse_args(["--quick"]).size, p.parse_args([]).size, p.parse_args(["--size", "8"]).size
        (64, 512, 8)
    """
    p = _Parser(options or {}, description=description, epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(full_models=list(full_models), quick_models=list(quick_models))
    p.add_argument("--quick", action="store_true", help=f"smoke-test settings: {quick}")
    if zoo:
        p.add_argument("--models", nargs="+", choices=sorted(ZOO), metavar="NAME",
                       help=f"models to run (default: {' '.join(full_models)}; with --quick: "
                       f"{' '.join(quick_models)}); choices: {', '.join(sorted(ZOO))}")
    if device:
        p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the result files, JSON, markdown and any plots (default: benchmarks/results/; "
                   "with --quick: benchmarks/results/tmp/, which git ignores)")
    p.add_argument("--tag", default="",
                   help="suffix of the result file names, to keep runs apart (default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice; the number used is recorded)")
    if zoo:
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images (default: 0)")
    p.add_options()
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
        if args.out is None:
            args.out = QUICK_RESULTS if args.quick else DEFAULT_RESULTS
        self.environment = environment()
        self.begin = time.perf_counter()
        fallback = getattr(args, "quick_models" if args.quick else "full_models", None)
        if fallback is None:
            fallback = QUICK_MODELS if args.quick else FULL_MODELS
        self.models = list(getattr(args, "models", None) or fallback)

    @property
    def stem(self) -> str:
        """File name stem: ``latency``, ``latency-quick``, ``latency-<tag>``..."""
        return self.name + ("-quick" if self.args.quick else "") + (f"-{self.args.tag}" if self.args.tag else "")

    def path(self, suffix: str) -> Path:
        """Path of a result file with this run's stem (``.json``, ``.md``, ``.png``)."""
        return self.args.out / f"{self.stem}{suffix}"

    def write(self, data: Mapping[str, Any], sections: Sequence[str], *, complete: bool = True) -> tuple[Path, Path]:
        """Write ``<stem>.json`` (environment, settings, data) and ``<stem>.md`` (tables).

        Args:
            complete: whether the run is over. A partial write (after each
                model) says so in both files and prints nothing. Default: True.

        Returns:
            The JSON and markdown paths.
        """
        self.args.out.mkdir(parents=True, exist_ok=True)
        hidden = {"full_models", "quick_models"}
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items() if k not in hidden}
        record = {
            "benchmark": self.name,
            "complete": complete,
            "environment": self.environment,
            "settings": {**settings, "models": self.models},
            "duration_s": round(time.perf_counter() - self.begin, 1),
            "load_average_1m_end": _load_average(),
            **data,
        }
        json_path, md_path = self.path(".json"), self.path(".md")
        _write_atomically(json_path, json.dumps(record, indent=2) + "\n")
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
        if not complete:
            header[1:1] = ["", "**Partial: the run had not finished when this was written.**"]
        _write_atomically(md_path, "\n".join(header) + "\n" + "\n\n".join(s.rstrip() for s in sections) + "\n")
        if complete:
            print(md_path.read_text())
            print(f"wrote {json_path} and {md_path}")
        return json_path, md_path


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so that a run killed mid-write leaves the previous file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def start(name: str, args: argparse.Namespace) -> Run:
    """Apply the shared options (threads) and open the run record."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return Run(name, args)


def run_models(run: Run, bench: Callable[[str], dict[str, Any]],
               markdown: Callable[[list[dict[str, Any]], dict[str, str]], list[str]],
               data: Mapping[str, Any] | None = None) -> int:
    """Benchmark each of the run's models in turn, writing the result files after each; return the exit status.

    A model whose library is missing is skipped, with the reason under
    ``"skipped"`` (and in ``markdown``'s second argument).

    Args:
        run: from :func:`start`.
        bench: measures one model by name; returns its JSON record.
        markdown: the markdown sections, from the records so far and the skipped models.
        data: further JSON fields (targets...). Default: none.
    """
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}

    def write(complete: bool) -> None:
        run.write({**(data or {}), "results": results, "skipped": skipped}, markdown(results, skipped),
                  complete=complete)

    for name in run.models:
        reason = available(name)
        if reason is not None:
            skipped[name] = reason
            print(f"{run.name}: {name} skipped: {reason}", file=sys.stderr, flush=True)
            continue
        print(f"{run.name}: {name}", file=sys.stderr, flush=True)
        results.append(bench(name))
        write(complete=False)
    write(complete=True)
    return 0


def skipped_section(skipped: Mapping[str, str]) -> list[str]:
    """A markdown section listing the models that were not run and why (none when every model ran)."""
    return ["## not run\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in skipped.items())] if skipped else []


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
