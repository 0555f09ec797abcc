"""The ``fxeq`` command line: convert a checkpoint, inspect a model, run the demo.

::

    fxeq convert CHECKPOINT --model MODULE:CALLABLE --calib IMAGES -o OUT   rescale, write OUT + report
    fxeq inspect [CHECKPOINT] --model MODULE:CALLABLE --calib IMAGES        measure only, write nothing
    fxeq demo [--workdir DIR]                                               convert a random DeepLabV3

This module parses arguments and maps failures to exit codes. The work is
done by :mod:`fxeq.checkpoint` (reading state_dicts safely, writing them
atomically), :mod:`fxeq.data` (calibration images) and :mod:`fxeq.pipeline`.

Exit codes: 0 done; 2 bad usage or input (a missing file, keys that do not
fit the model, too few or unreadable images, an unknown model, an output that
exists); 1 anything else, such as a :class:`~fxeq.errors.FxEqError` from the
pass; 130 interrupted (143 for SIGTERM while writing).
Errors go to stderr as ``fxeq: error: ...``, naming the problem and the fix;
``--verbose`` adds the traceback and fxeq's debug log.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import logging
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any, NoReturn, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import __version__, checkpoint
from .data import (
    GENERATED_PREFIX,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UnreadableImageError,
    _plural,
    calibration_loader,
    generate_images,
)
from .errors import FxEqError, NoSiteWarning
from .pipeline import calibrate, prepare, transform
from .report import Report

__all__ = ["main"]

_DEMO_MARKER = ".fxeq-demo"
_DEMO_MODEL = "torchvision.models.segmentation:deeplabv3_resnet50"
_DEMO_KWARGS = {"weights": None, "weights_backbone": None, "num_classes": 21}
_DEMO_IMAGES = "generated-calibration-images"


class _UsageError(Exception):
    """Bad usage or input: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors read ``fxeq: error: ...`` like every other error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"fxeq: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name. Default: ``sys.argv[1:]``.

    Returns:
        The exit code: 0 done, 2 bad usage or input, 1 any other failure.

    Example:
        >>> main(["convert", "missing.pt", "--model", "torchvision.models:resnet18",
        ...       "--calib", "no-such-folder", "-o", "out.pt"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("no command given; expected one of convert, inspect, demo (fxeq COMMAND --help shows "
                         "its arguments)")
    except SystemExit as e:  # argparse exits for --help and --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    if os.getcwd() not in sys.path:  # like python -m: --model and pickled classes can name ./module.py
        sys.path.append(os.getcwd())
    if args.verbose:
        logging.basicConfig()
        logging.getLogger("fxeq").setLevel(logging.DEBUG)
    try:
        return int(args.run(args))
    except _UsageError as e:
        return _fail(str(e), 2, e, args.verbose)
    except FxEqError as e:
        return _fail(str(e), 1, e, args.verbose)
    except KeyboardInterrupt as e:
        return _fail("interrupted", 130, e, args.verbose)
    except Exception as e:  # noqa: BLE001 - the last resort: a message, and the traceback on request
        hint = "" if args.verbose else "\n(run again with --verbose for the traceback)"
        return _fail(f"{type(e).__name__}: {e}{hint}", 1, e, args.verbose)


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and fxeq's debug log")

    model = _Parser(add_help=False)
    model.add_argument("--model", required=True, type=_model_spec, metavar="MODULE:CALLABLE",
                       help="builds the model, e.g. segmentation_models_pytorch:UPerNet; MODULE (and any class "
                            "a --trust-pickle checkpoint names) is imported with the current folder on the path")
    model.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                       help='keyword arguments for CALLABLE, e.g. \'{"encoder_name": "resnet18", '
                            '"encoder_weights": null, "classes": 150}\'')
    model.add_argument("--trust-pickle", action="store_true",
                       help="also read checkpoints holding pickled objects (a whole nn.Module); unpickling "
                            "runs code from the file, so only for files you trust")
    model.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                       help="graph capture: torch.fx, torch.export, or fx then export (default: auto)")
    model.add_argument("--all-concats", action="store_true",
                       help="also equalize channel concatenations without an upsampled input")

    data = _Parser(add_help=False)
    data.add_argument("--calib", required=True, type=Path, metavar="FOLDER",
                      help=f"calibration images ({', '.join(IMAGE_SUFFIXES)}; searched recursively); use "
                           "training images")
    data.add_argument("--size", type=_positive_int, default=512, metavar="PIXELS",
                      help="resize the shorter side and center-crop to this (default: 512)")
    data.add_argument("--mean", type=_rgb, default=IMAGENET_MEAN, metavar="R,G,B",
                      help="normalization mean on the 0..1 scale (default: ImageNet's)")
    data.add_argument("--std", type=_rgb, default=IMAGENET_STD, metavar="R,G,B",
                      help="normalization std (default: ImageNet's)")
    data.add_argument("--batch-size", type=int, default=4, metavar="N",
                      help="images per batch, at least 2 (default: 4)")
    data.add_argument("--num-batches", type=_positive_int, metavar="N", help="use at most N batches (default: all)")
    data.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="where to calibrate: cpu, cuda, cuda:1... (default: cuda if available, else cpu)")

    parser = _Parser(prog="fxeq", description="Scale equalization for multi-level feature fusion.")
    parser.add_argument("--version", action="version", version=f"fxeq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")  # main() reports a missing one

    convert = commands.add_parser(
        "convert", parents=[model, data, common], help="equalize a checkpoint's fusion convs",
        description="Measure each fusion input on the calibration images, rescale the fusing convs'\n"
                    "weights, and write a state_dict for the same class with a JSON report beside it.",
        epilog="example:\n  fxeq convert upernet.pt --model segmentation_models_pytorch:UPerNet \\\n"
               "    --model-kwargs '{\"encoder_name\": \"resnet18\", \"encoder_weights\": null, \"classes\": 150}' \\\n"
               "    --calib train_images/ -o upernet.fxeq.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                         help="a state_dict: .pt/.pth (torch.save) or .safetensors; Lightning, mmengine and "
                              "DDP wrappers are accepted")
    convert.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                         help="the converted state_dict, .safetensors or .pt by suffix; the report goes to "
                              "OUT.fxeq.json")
    convert.add_argument("--force", action="store_true", help="replace OUT and its report if they exist")
    convert.set_defaults(run=_convert)

    inspect = commands.add_parser(
        "inspect", parents=[model, data, common], help="show fusion sites and input statistics; write nothing",
        description="Print every fusion site with each input's producer, upsampling, mean and std, the "
                    "largest/smallest std ratio, and the skipped concatenations. Nothing is written.",
    )
    inspect.add_argument("checkpoint", nargs="?", type=Path, metavar="CHECKPOINT",
                         help="a state_dict to load first (default: the model as built)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser(
        "demo", parents=[common], help="convert a randomly initialized DeepLabV3 on generated images",
        description="Build torchvision's deeplabv3_resnet50 (no weights downloaded), save its state_dict, "
                    "generate synthetic calibration textures, and run fxeq convert on them.",
    )
    demo.add_argument("--workdir", type=Path, default=Path("fxeq-demo"),
                      help="folder for the demo's files: new, empty, or made by an earlier demo, whose "
                           "files are then replaced (default: ./fxeq-demo)")
    demo.add_argument("--size", type=_positive_int, default=128, metavar="PIXELS",
                      help="image size (default: 128)")
    demo.add_argument("--images", type=_positive_int, default=8, metavar="N",
                      help="number of images to generate (default: 8)")
    demo.set_defaults(run=_demo)
    return parser


def _model_spec(text: str) -> str:
    module, sep, attr = text.partition(":")
    if not (module and sep and attr):
        raise argparse.ArgumentTypeError(
            f"expected MODULE:CALLABLE, e.g. segmentation_models_pytorch:UPerNet, got {text!r}"
        )
    return text


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({e}): {text!r}; pass a JSON object such as '{{\"classes\": 150}}' "
            "(double quotes inside, null for None)"
        ) from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"classes\": 150}}', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _rgb(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers R,G,B such as 0.485,0.456,0.406, "
                                         f"got {text!r}")
    return values


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def _convert(args: argparse.Namespace) -> int:
    with _bad_input():
        checkpoint.check_not_converted(args.checkpoint)
        output = checkpoint.check_output(args.output, source=args.checkpoint, force=args.force)
    model, state, loader = _load(args)
    with warnings.catch_warnings(), _bad_input(UnreadableImageError):  # no site: an error below, with the report
        warnings.simplefilter("ignore", NoSiteWarning)
        deployed = transform(model, loader, inplace=True, frontend=args.frontend, all_concats=args.all_concats,
                             num_batches=args.num_batches, progress=True)
    report = cast(Report, deployed.fxeq_report)
    if not report.search.sites:
        print(report.table())
        raise FxEqError(
            f"found no fusion site in {type(model).__name__}, so nothing was written: fxeq looks for a channel "
            "concatenation with an upsampled input that feeds a conv. The concatenations it skipped are listed "
            "above; pass --all-concats to include same-resolution ones."
        )
    # Same keys and dtypes as the input: an fp16 checkpoint stays fp16.
    converted = {k: v.to(device="cpu", dtype=state[k].dtype) for k, v in model.state_dict().items()}
    report.extra.update(_provenance(args, loader))
    with _bad_input(FileExistsError):  # another run took the name after check_output
        report_file = checkpoint.save_converted(converted, output, _report_dict(report), force=args.force)
    rescaled = sorted({c.module for s in report.search.sites for c in s.convs})
    print(report.table())
    print(f"\nwrote {output} (rescaled {', '.join(rescaled)}; every other tensor as in the input)")
    print(f"wrote {report_file}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.checkpoint:
        _note_if_converted(args.checkpoint)
    model, _, loader = _load(args)
    with _bad_input(UnreadableImageError):
        example = next(iter(loader)).to(_device(args.device))
        # inplace: this model is ours and calibrate() writes nothing (convert() would).
        prepared = prepare(model, example, inplace=True, frontend=args.frontend, all_concats=args.all_concats)
        if prepared.search.sites:
            calibrate(prepared, loader, num_batches=args.num_batches, progress=True)
    report = prepared.report
    report.extra.update(_provenance(args, loader))
    print(json.dumps(_report_dict(report), indent=2) if args.json else report.table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    workdir = _demo_workdir(args.workdir)
    source = workdir / "deeplabv3_resnet50.pt"
    output = workdir / "deeplabv3_resnet50.fxeq.safetensors"
    images = workdir / _DEMO_IMAGES
    for old in images.glob(f"{GENERATED_PREFIX}*.png"):
        old.unlink()
    checkpoint.save_state_dict(_build_model(_DEMO_MODEL, _DEMO_KWARGS).state_dict(), source)
    _note(f"saved a randomly initialized deeplabv3_resnet50 (nothing downloaded) to {source}")
    generate_images(images, args.images, size=args.size)
    _note(f"GENERATED {args.images} synthetic calibration images (random multi-scale textures, not real data) "
          f"in {images}")
    argv = ["convert", str(source), "--model", _DEMO_MODEL, "--model-kwargs", json.dumps(_DEMO_KWARGS),
            "--calib", str(images), "--size", str(args.size), "-o", str(output)]
    # The folder is the demo's own, so its earlier output may be replaced.
    if output.exists() or checkpoint.report_path(output).exists():
        argv.append("--force")
    if args.verbose:
        argv.append("--verbose")
    _note("running: fxeq " + shlex.join(argv))
    convert_args = _parser().parse_args(argv)
    convert_args.argv = argv
    code = _convert(convert_args)  # raises on failure
    print(
        "\nThis demo calibrated a random model on GENERATED textures, to show the workflow. For a real "
        "conversion, calibrate on a few hundred images from your model's training set, at its training "
        "resolution:\n  fxeq convert your.pt --model MODULE:CALLABLE --model-kwargs JSON --calib "
        "train_images/ -o your.fxeq.safetensors"
    )
    return code


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _bad_input(*errors: type[Exception]) -> Iterator[None]:
    """Report failures to read the user's files and values as usage errors (exit code 2).

    Args:
        errors: the exception types that mean bad input here. Default:
            OSError, TypeError and ValueError, raised by fxeq.checkpoint and
            fxeq.data for files and values they cannot use.
    """
    caught = errors or (OSError, TypeError, ValueError)
    try:
        yield
    except caught as e:
        raise _UsageError(str(e)) from e


def _load(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor], DataLoader[torch.Tensor]]:
    """The model (with the checkpoint loaded, on the device), its state and the calibration batches."""
    with _bad_input(), warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        loader = calibration_loader(args.calib, size=args.size, mean=args.mean, std=args.std,
                                    batch_size=args.batch_size)
    for warning in skipped:  # files in --calib that are not images
        _note(f"warning: {warning.message}")
    device = _device(args.device)
    with _bad_input():
        state = checkpoint.load_state_dict(args.checkpoint, trust_pickle=args.trust_pickle) if args.checkpoint else {}
    model = _build_model(args.model, args.model_kwargs)
    if args.checkpoint:
        with _bad_input():
            state = checkpoint.load_into(model, state)
    used = f", at most {args.num_batches} used" if args.num_batches else ""
    _note(f"calibrating on {_plural(_count(loader), 'image')} from {args.calib} ({args.size}x{args.size}, "
          f"{_plural(len(loader), 'batch', 'batches')} of up to {args.batch_size}{used}, {device})")
    return model.to(device), state, loader


def _build_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import MODULE, find CALLABLE in it and call it with ``kwargs``."""
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:  # any import failure is the --model argument's
        raise _UsageError(
            f"--model {spec}: could not import {module_name!r} ({type(e).__name__}: {e}); install it, or run "
            "fxeq from the folder that holds it"
        ) from e
    for part in attr.split("."):
        if not hasattr(target, part):
            close = difflib.get_close_matches(part, dir(target), n=3)
            raise _UsageError(
                f"--model {spec}: {getattr(target, '__name__', module_name)} has no attribute {part!r}"
                + (f"; did you mean {' or '.join(close)}?" if close else "")
            )
        target = getattr(target, part)
    if not callable(target):
        raise _UsageError(f"--model {spec}: {attr} is a {type(target).__name__}, not a class or function")
    try:
        model = target(**kwargs)
    except Exception as e:  # whatever the builder raises is about --model-kwargs
        raise _UsageError(
            f"--model {spec} with --model-kwargs {json.dumps(kwargs)} failed ({type(e).__name__}: {e}); check "
            "the keyword arguments (weights must be null: fxeq never downloads them)"
        ) from e
    if not isinstance(model, nn.Module):
        raise _UsageError(f"--model {spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as e:  # torch raises RuntimeError or AssertionError here
        raise _UsageError(f"--device {name}: not usable here ({e}); use --device cpu or an available device") from e
    return device


def _demo_workdir(path: Path) -> Path:
    if path.exists() and not (path / _DEMO_MARKER).is_file() and not (path.is_dir() and not any(path.iterdir())):
        raise _UsageError(
            f"{path} exists and was not made by fxeq demo (it has no {_DEMO_MARKER} file); pass --workdir "
            "with a new or empty folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / _DEMO_MARKER).write_text("made by fxeq demo, which may replace the files in this folder\n")
    return path


def _provenance(args: argparse.Namespace, loader: DataLoader[torch.Tensor]) -> dict[str, Any]:
    """What the JSON report records about the run, so that it can be repeated and checked.

    The output's path and SHA-256 are added by :func:`fxeq.checkpoint.save_converted`.
    """
    record: dict[str, Any] = {"command": ["fxeq", *args.argv]}
    if args.checkpoint is not None:
        record["checkpoint"] = {"path": str(args.checkpoint.resolve()), "sha256": checkpoint.sha256(args.checkpoint)}
    record["model"] = {"spec": args.model, "kwargs": args.model_kwargs}
    record["calibration"] = {
        "folder": str(args.calib.resolve()), "images": _count(loader),
        "batches": len(loader), "size": args.size, "mean": list(args.mean), "std": list(args.std),
        "batch_size": args.batch_size, "num_batches": args.num_batches, "device": args.device,
    }
    return record


def _note_if_converted(path: Path) -> None:
    """Say that ``path`` was written by fxeq convert, with its report's summary, if it was."""
    report_file = checkpoint.converted_report(path)
    if report_file is None:
        return
    try:
        report = json.loads(report_file.read_text())
        lines = [f"  converted from {report['checkpoint']['path']}", *map(_site_summary, report["sites"])]
    except (OSError, ValueError, LookupError, TypeError) as e:  # a report that is not fxeq's, or edited
        lines = [f"  (the report could not be read: {type(e).__name__}: {e})"]
    _note(
        f"{path} is a checkpoint converted by fxeq convert ({report_file} lies beside it). Its fusing convs "
        "were rescaled; the fusion inputs measured below are not, so their std ratios are the same as "
        "before. The conversion, from the report:\n" + "\n".join(lines)
    )


def _site_summary(site: dict[str, Any]) -> str:
    """One site of a JSON report: its convs and the std ratio that conversion divided out."""
    convs = ", ".join(c.get("module") or c["weight"].rpartition(".")[0] for c in site["convs"])
    ratio = site["disequilibrium"]
    return f"  site {site['name']} -> {convs}; std max/min {'-' if ratio is None else f'{ratio:.2f}'} divided out"


def _count(loader: DataLoader[torch.Tensor]) -> int:
    return len(cast(Sized, loader.dataset))


def _report_dict(report: Report) -> dict[str, Any]:
    data = report.to_dict()
    package = report.extra["model"]["spec"].partition(":")[0].split(".")[0]  # e.g. segmentation_models_pytorch
    version = getattr(sys.modules.get(package), "__version__", None)
    if isinstance(version, str):
        data["versions"][package] = version
    return data


def _note(text: str) -> None:
    print(f"fxeq: {text}", file=sys.stderr)


def _fail(message: str, code: int, error: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(error)
    print(f"fxeq: error: {message}", file=sys.stderr)
    return code
