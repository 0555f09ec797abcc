"""The ``fxeq`` command line: convert a checkpoint, apply a report, inspect a model, run the demo.

::

    fxeq convert CHECKPOINT [--model MODULE:CALLABLE] --calib IMAGES -o OUT   rescale, write OUT + report
    fxeq apply CHECKPOINT [--model MODULE:CALLABLE] --report REPORT -o OUT    the same, with a report's statistics
    fxeq inspect [CHECKPOINT] [--model MODULE:CALLABLE] --calib IMAGES        measure only, write nothing
    fxeq demo [--workdir DIR]                                                 convert a random DeepLabV3

CHECKPOINT is a state_dict file, built with ``--model``, or a Hugging Face
``save_pretrained`` folder, built with ``from_pretrained`` (``--model`` then
only overrides the class). This module parses arguments and maps failures to
exit codes. The work is done by :mod:`fxeq.checkpoint` (reading checkpoints
safely, writing them atomically), :mod:`fxeq.data` (calibration images),
:mod:`fxeq.pipeline` and :mod:`fxeq.replay`.

Under ``torchrun`` (``WORLD_SIZE`` > 1), convert and inspect join a process
group (gloo, or nccl for CUDA), each process calibrates on its share of the
batches, fxeq merges the statistics across processes, and rank 0 alone writes
and prints; the others wait for it at a barrier.

Exit codes: 0 done; 2 bad usage or input (a missing file, keys that do not
fit the model, too few or unreadable images, an unknown model, an output that
exists, a report that does not fit); 1 anything else, such as a
:class:`~fxeq.errors.FxEqError` from the pass; 130 interrupted (143 for
SIGTERM while writing). Errors go to stderr as ``fxeq: error: ...``, naming
the problem and the fix; ``--verbose`` adds the traceback and fxeq's debug log.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import json
import logging
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from . import __version__, checkpoint, replay
from .data import (
    GENERATED_PREFIX,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchShard,
    CalibrationImageError,
    ImageProcessorTransform,
    Preprocess,
    calibration_loader,
    generate_images,
)
from .errors import FxEqError, NoSiteWarning
from .pipeline import calibrate, prepare, transform
from .report import Report, plural, versions

__all__ = ["main"]

_DEMO_MARKER = ".fxeq-demo"
_DEMO_MODEL = "torchvision.models.segmentation:deeplabv3_resnet50"
_DEMO_KWARGS = {"weights": None, "weights_backbone": None, "num_classes": 21}
_DEMO_IMAGES = "generated-calibration-images"
_AUTO_MODEL = "transformers:AutoModelForSemanticSegmentation"
_DEFAULT_SIZE = 512
_DISTRIBUTED = ("convert", "inspect")  # the commands that calibrate, so that torchrun can share the work


@dataclass(frozen=True)
class _Loaded:
    """A model ready for calibration, with what the report records about its input."""

    model: nn.Module
    state: dict[str, torch.Tensor]  # a checkpoint file's state_dict (its dtypes); empty for a folder
    loader: DataLoader[torch.Tensor]
    preprocessing: dict[str, Any]
    device: torch.device


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
            parser.error("no command given; expected one of convert, apply, inspect, demo (fxeq COMMAND --help "
                         "shows its arguments)")
        if _ranks()[1] > 1 and args.command not in _DISTRIBUTED:
            parser.error(f"fxeq {args.command} runs in one process: under torchrun, only "
                         f"{' and '.join(f'fxeq {c}' for c in _DISTRIBUTED)} share their calibration across "
                         "processes. Run it without torchrun")
        folder = getattr(args, "checkpoint", None)
        if getattr(args, "model", "") is None and not (folder is not None and folder.is_dir()):
            parser.error("--model is required for a checkpoint file and without a checkpoint: only a Hugging Face "
                         "save_pretrained folder names its model class (in config.json). Pass e.g. --model "
                         "segmentation_models_pytorch:UPerNet")
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
    model.add_argument("--model", type=_model_spec, metavar="MODULE:CALLABLE",
                       help="builds the model, e.g. segmentation_models_pytorch:UPerNet; required unless CHECKPOINT "
                            "is a Hugging Face save_pretrained folder, whose class then defaults to "
                            f"{_AUTO_MODEL} (--model names another class, whose from_pretrained loads it). MODULE "
                            "(and any class a --trust-pickle checkpoint names) is imported with the current folder "
                            "on the path")
    model.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                       help='keyword arguments for CALLABLE (or from_pretrained), e.g. \'{"encoder_name": '
                            '"resnet18", "encoder_weights": null, "classes": 150}\'')
    model.add_argument("--trust-pickle", action="store_true",
                       help="also read checkpoints holding pickled objects (a whole nn.Module); unpickling "
                            "runs code from the file, so only for files you trust")

    capture = _Parser(add_help=False)
    capture.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                         help="graph capture: torch.fx, torch.export, or fx then export (default: auto)")
    capture.add_argument("--all-concats", action="store_true",
                         help="also equalize channel concatenations without an upsampled input")

    data = _Parser(add_help=False)
    data.add_argument("--calib", required=True, type=Path, metavar="FOLDER",
                      help=f"calibration images ({', '.join(IMAGE_SUFFIXES)}; searched recursively); use "
                           "training images")
    data.add_argument("--size", type=_positive_int, metavar="PIXELS",
                      help=f"resize the shorter side and center-crop to this (default: {_DEFAULT_SIZE}); not with "
                           "a folder's image processor, which resizes itself")
    data.add_argument("--mean", type=_rgb, metavar="R,G,B",
                      help="normalization mean on the 0..1 scale (default: ImageNet's); not with an image processor")
    data.add_argument("--std", type=_rgb, metavar="R,G,B",
                      help="normalization std (default: ImageNet's); not with an image processor")
    data.add_argument("--batch-size", type=int, default=4, metavar="N",
                      help="images per batch, at least 2 (default: 4); a last image on its own joins the batch "
                           "before it")
    data.add_argument("--num-batches", type=_positive_int, metavar="N",
                      help="use only the first N batches, over all processes (default: all)")
    data.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="where to calibrate: cpu, cuda, cuda:1... (default: cuda if available, else cpu); "
                           "under torchrun, cuda is each process's cuda:LOCAL_RANK")

    output = _Parser(add_help=False)
    output.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                        help="for a checkpoint file: the converted state_dict, .safetensors or .pt by suffix, with "
                             "the report in OUT.fxeq.json; for a save_pretrained folder: a new folder, with the "
                             f"report inside it as {checkpoint.FOLDER_REPORT}")
    output.add_argument("--force", action="store_true",
                        help="replace OUT and its report if they exist; for apply, also use a report made from "
                             "another checkpoint")

    parser = _Parser(prog="fxeq", description="Scale equalization for multi-level feature fusion.")
    parser.add_argument("--version", action="version", version=f"fxeq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")  # main() reports a missing one

    convert = commands.add_parser(
        "convert", parents=[model, capture, data, output, common], help="equalize a checkpoint's fusion convs",
        description="Measure each fusion input on the calibration images, rescale the fusing convs'\n"
                    "weights, and write a checkpoint for the same class with a JSON report.\n"
                    "Under torchrun, each process calibrates on its share of the batches; rank 0 writes.",
        epilog="examples:\n  fxeq convert upernet.pt --model segmentation_models_pytorch:UPerNet \\\n"
               "    --model-kwargs '{\"encoder_name\": \"resnet18\", \"encoder_weights\": null, \"classes\": 150}' \\\n"
               "    --calib train_images/ -o upernet.fxeq.safetensors\n"
               "  fxeq convert segformer-b0/ --calib train_images/ -o segformer-b0-fxeq/\n"
               "  torchrun --nproc-per-node 8 -m fxeq convert ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                         help="a state_dict: .pt/.pth (torch.save) or .safetensors (Lightning, mmengine and DDP "
                              "wrappers are accepted), or a Hugging Face save_pretrained folder")
    convert.set_defaults(run=_convert)

    apply = commands.add_parser(
        "apply", parents=[model, output, common], help="equalize with the statistics a report recorded",
        description="Fold the means and stds recorded in a report of fxeq convert into a checkpoint's fusing\n"
                    "convs, with no calibration images: on the checkpoint the report was made from, OUT is\n"
                    "bitwise what fxeq convert wrote. A checkpoint whose SHA-256 differs from the one the\n"
                    "report records is refused without --force.",
        epilog="example:\n  fxeq apply upernet.pt --model segmentation_models_pytorch:UPerNet --model-kwargs ... \\\n"
               "    --report run/upernet.fxeq.safetensors.fxeq.json -o upernet.fxeq.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    apply.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                       help="the checkpoint to equalize, as for convert")
    apply.add_argument("--report", required=True, type=Path, metavar="REPORT",
                       help="the report fxeq convert wrote: OUT.fxeq.json, or a converted folder (its "
                            f"{checkpoint.FOLDER_REPORT})")
    apply.set_defaults(run=_apply)

    inspect = commands.add_parser(
        "inspect", parents=[model, capture, data, common],
        help="show fusion sites and input statistics; write nothing",
        description="Print every fusion site with each input's producer, upsampling, mean and std, the "
                    "largest/smallest std ratio, and the skipped concatenations. Nothing is written.",
    )
    inspect.add_argument("checkpoint", nargs="?", type=Path, metavar="CHECKPOINT",
                         help="a state_dict or save_pretrained folder to load first (default: the model as built)")
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
    output = _checked_paths(args)
    loaded = _load(args)
    model = loaded.model
    with _process_group(loaded.device):
        with warnings.catch_warnings(), _bad_input(CalibrationImageError):  # no site: an error below, with the report
            warnings.simplefilter("ignore", NoSiteWarning)
            deployed = transform(model, loaded.loader, inplace=True, frontend=args.frontend,
                                 all_concats=args.all_concats, progress=_is_rank_zero())
        report = cast(Report, deployed.fxeq_report)
        if not report.search.sites:
            if _is_rank_zero():
                print(report.table())
            raise FxEqError(
                f"found no fusion site in {type(model).__name__}, so nothing was written: fxeq looks for a channel "
                "concatenation with an upsampled input that feeds a conv. The concatenations it skipped are "
                "listed above; pass --all-concats to include same-resolution ones."
            )
        with _rank_zero_writes() as writes:
            if writes:
                report.extra.update(_provenance(args, loaded, report))
                report_file = _save(args, output, model, loaded.state, _report_dict(report))
                print(report.table())
                print(f"\nwrote {output} (rescaled {', '.join(_fusing_convs(report.to_dict()))}; every other tensor "
                      "as in the input)")
                print(f"wrote {report_file}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    output = _checked_paths(args, args.report)
    report_file = args.report / checkpoint.FOLDER_REPORT if args.report.is_dir() else args.report
    recorded = _read_report(report_file)
    digest = _check_report_source(args, recorded)
    model, state = _load_model(args)
    with _bad_input(FxEqError, ValueError, TypeError):
        replay.apply(model, recorded)
    record = {k: v for k, v in recorded.items() if k != "output"}  # save_* records the new output
    record.update(
        command=["fxeq", *args.argv], checkpoint={"path": str(args.checkpoint.resolve()), "sha256": digest},
        model=_model_record(args, model), versions=_versions(_model_spec_of(args)),
        replayed={"report": str(report_file.resolve()), "sha256": checkpoint.sha256(report_file)},
    )
    written = _save(args, output, model, state, record)
    print(f"wrote {output} (rescaled {', '.join(_fusing_convs(recorded))} with the statistics in {report_file}; "
          "every other tensor as in the input)")
    print(f"wrote {written}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.checkpoint:
        _note_if_converted(args.checkpoint)
    loaded = _load(args)
    with _process_group(loaded.device), _bad_input(CalibrationImageError):
        example = next(iter(loaded.loader)).to(loaded.device)
        # inplace: this model is ours and calibrate() writes nothing (convert() would).
        prepared = prepare(loaded.model, example, inplace=True, frontend=args.frontend, all_concats=args.all_concats)
        if prepared.search.sites:
            calibrate(prepared, loaded.loader, progress=_is_rank_zero())
    if _is_rank_zero():
        report = prepared.report
        report.extra.update(_provenance(args, loaded, report))
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


def _is_folder(args: argparse.Namespace) -> bool:
    """Whether CHECKPOINT is a Hugging Face save_pretrained folder."""
    return args.checkpoint is not None and checkpoint.is_pretrained_folder(args.checkpoint)


def _checked_paths(args: argparse.Namespace, *inputs: Path) -> Path:
    """Refuse a converted input and an output that may not be written, before any work; return the output."""
    sources = [args.checkpoint, *inputs]
    with _bad_input():
        checkpoint.check_not_converted(args.checkpoint)
        if _is_folder(args):
            return checkpoint.check_output_folder(args.output, source=sources, force=args.force)
        return checkpoint.check_output(args.output, source=sources, force=args.force)


def _load(args: argparse.Namespace) -> _Loaded:
    """The model (with the checkpoint loaded, on the device), its state and this process's calibration batches."""
    preprocess, preprocessing = _preprocessing(args)
    rank, world = _ranks()
    with _bad_input(), warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        loader = calibration_loader(
            args.calib, size=preprocessing.get("size", _DEFAULT_SIZE), mean=preprocessing.get("mean", IMAGENET_MEAN),
            std=preprocessing.get("std", IMAGENET_STD), batch_size=args.batch_size, preprocess=preprocess,
            num_batches=args.num_batches, rank=rank, world_size=world,
        )
    for warning in skipped:  # files in --calib that are not images
        _note(f"warning: {warning.message}")
    device = _device(args.device)
    model, state = _load_model(args)
    _note(f"calibrating on {_describe(args, loader, preprocessing, device)}")
    return _Loaded(model.to(device), state, loader, preprocessing, device)


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model with the checkpoint loaded, and the checkpoint file's state_dict (empty for a folder)."""
    if _is_folder(args):
        model_class = _resolve(args.model) if args.model else None
        with _bad_input():
            return checkpoint.load_pretrained(args.checkpoint, model_class, **args.model_kwargs), {}
    with _bad_input():
        state = checkpoint.load_state_dict(args.checkpoint, trust_pickle=args.trust_pickle) if args.checkpoint else {}
    model = _build_model(args.model, args.model_kwargs)
    if args.checkpoint:
        with _bad_input():
            state = checkpoint.load_into(model, state)
    return model, state


def _preprocessing(args: argparse.Namespace) -> tuple[Preprocess | None, dict[str, Any]]:
    """How calibration images become inputs: the folder's image processor if it has one, else --size/--mean/--std.

    Returns:
        The image processor as a :data:`~fxeq.data.Preprocess` (None for
        fxeq's own resize, crop and normalization), and what the report
        records about it.
    """
    processor = None
    if _is_folder(args):
        with _bad_input():
            processor = checkpoint.load_image_processor(args.checkpoint)
    if processor is None:
        return None, {
            "kind": "resize the shorter side, center crop, normalize", "size": args.size or _DEFAULT_SIZE,
            "mean": list(args.mean or IMAGENET_MEAN), "std": list(args.std or IMAGENET_STD),
        }
    config = args.checkpoint / checkpoint.PREPROCESSOR_CONFIG
    given = [flag for flag in ("--size", "--mean", "--std") if getattr(args, flag[2:]) is not None]
    if given:
        raise _UsageError(
            f"{' and '.join(given)}: {config} holds the model's image processor, which resizes and normalizes "
            "the calibration images as the model expects, so fxeq does not; edit that file in a copy of the "
            "folder to calibrate at another size"
        )
    return ImageProcessorTransform(processor), {
        "kind": "image processor", "class": type(processor).__name__, "file": str(config.resolve()),
        "settings": json.loads(processor.to_json_string()),
    }


def _resolve(spec: str) -> Any:
    """Import MODULE and find CALLABLE in it."""
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
    return target


def _build_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import MODULE, find CALLABLE in it and call it with ``kwargs``."""
    build = _resolve(spec)
    try:
        model = build(**kwargs)
    except Exception as e:  # whatever the builder raises is about --model-kwargs
        raise _UsageError(
            f"--model {spec} with --model-kwargs {json.dumps(kwargs)} failed ({type(e).__name__}: {e}); check "
            "the keyword arguments (weights must be null: fxeq never downloads them)"
        ) from e
    if not isinstance(model, nn.Module):
        raise _UsageError(f"--model {spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _save(
    args: argparse.Namespace, output: Path, model: nn.Module, state: dict[str, torch.Tensor], report: dict[str, Any]
) -> Path:
    """Write the equalized model and its report as the input was: a checkpoint file, or a save_pretrained folder."""
    model.to("cpu")
    with _bad_input(FileExistsError):  # another run took the name after the checks
        if _is_folder(args):
            processor = args.checkpoint / checkpoint.PREPROCESSOR_CONFIG
            return checkpoint.save_converted_folder(functools.partial(checkpoint.save_pretrained, model), output,
                                                    report, force=args.force,
                                                    copy=[processor] if processor.is_file() else [])
        # Same keys and dtypes as the input: an fp16 checkpoint stays fp16.
        converted = {k: v.to(dtype=state[k].dtype) for k, v in model.state_dict().items()}
        return checkpoint.save_converted(converted, output, report, force=args.force)


def _read_report(file: Path) -> dict[str, Any]:
    """The report that ``fxeq apply`` replays, refusing what is not a conversion's."""
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise _UsageError(
            f"--report {file} does not exist; pass the report fxeq convert wrote: OUT.fxeq.json beside a converted "
            f"checkpoint file, or the converted folder (its {checkpoint.FOLDER_REPORT})"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _UsageError(f"--report {file} is not a readable JSON file ({e}); expected the report fxeq convert "
                          "wrote") from e
    if not isinstance(data, dict) or not isinstance(data.get("sites"), list):
        raise _UsageError(f"--report {file} is not an fxeq report (a JSON object with a 'sites' list); expected the "
                          "report fxeq convert wrote")
    if data.get("folded") is not True:
        raise _UsageError(
            f"--report {file} records a measurement (\"folded\": false, as fxeq inspect --json prints), not a "
            "conversion; pass the report fxeq convert wrote, or run fxeq convert"
        )
    return data


def _check_report_source(args: argparse.Namespace, recorded: dict[str, Any]) -> str:
    """Refuse, without --force, a checkpoint other than the one the report was made from; return its SHA-256."""
    digest = checkpoint.sha256(args.checkpoint)
    source = recorded.get("checkpoint")
    source = source if isinstance(source, dict) else {}
    expected = source.get("sha256")
    if expected == digest:
        return digest
    if expected is None:
        problem = (f"--report {args.report} does not record the checkpoint it was made from (the reports fxeq "
                   "convert writes do), so fxeq cannot check that its statistics were measured on "
                   f"{args.checkpoint}")
    else:
        problem = (f"{args.checkpoint} is not the checkpoint the report was made from: its SHA-256 is {digest}, "
                   f"the report's checkpoint ({source.get('path')}) had {expected}; the statistics were measured "
                   "on other weights")
    if not args.force:
        raise _UsageError(f"{problem}. Apply the report to its own checkpoint, or pass --force to apply it anyway "
                          "(e.g. to the same weights saved in another format)")
    _note(f"warning: {problem}; applying it anyway (--force)")
    return digest


def _device(name: str) -> torch.device:
    """The device to calibrate on; under torchrun, ``cuda`` is each process's ``cuda:LOCAL_RANK``."""
    if name == "cuda" and _ranks()[1] > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as e:  # torch raises RuntimeError or AssertionError here
        raise _UsageError(f"--device {name}: not usable here ({e}); use --device cpu or an available device") from e
    return device


# ---------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------

def _ranks() -> tuple[int, int]:
    """This process's rank and the number of processes: torch.distributed's, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)


def _is_rank_zero() -> bool:
    return _ranks()[0] == 0


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[None]:
    """torch.distributed, initialized from torchrun's environment for the block, when it started several processes.

    gloo on the CPU, nccl on CUDA. A process group the caller initialized is
    used as it is.
    """
    if _ranks()[1] < 2 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _rank_zero_writes() -> Iterator[bool]:
    """Whether this process writes the output: rank 0 alone; the others wait at a barrier until it is done or failed."""
    try:
        yield _is_rank_zero()
    finally:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()


# ---------------------------------------------------------------------------
# Messages and the report
# ---------------------------------------------------------------------------

def _describe(
    args: argparse.Namespace, loader: DataLoader[torch.Tensor], preprocessing: dict[str, Any], device: torch.device
) -> str:
    """What calibration runs on, e.g. ``5 images from calib/ (64x64, 2 batches of up to 3, cpu)``."""
    shard = cast(BatchShard, loader.batch_sampler)
    found = len(cast(Any, loader.dataset))
    images = plural(shard.images, "image") + (f" of the {found}" if shard.images < found else "")
    how = (f"{preprocessing['class']} from {preprocessing['file']}" if "class" in preprocessing
           else f"{preprocessing['size']}x{preprocessing['size']}")
    batches = plural(len(shard.batches), "batch", "batches") + f" of up to {max(map(len, shard.batches))}"
    ranks = f"; {shard.world_size} processes, batch k on rank k % {shard.world_size}" if shard.world_size > 1 else ""
    return f"{images} from {args.calib} ({how}, {batches}, {device}{ranks})"


def _provenance(args: argparse.Namespace, loaded: _Loaded, report: Report) -> dict[str, Any]:
    """What the JSON report records about the run, so that it can be repeated and checked.

    The output's path and SHA-256 are added by :mod:`fxeq.checkpoint` as it writes.
    """
    shard = cast(BatchShard, loaded.loader.batch_sampler)
    record: dict[str, Any] = {"command": ["fxeq", *args.argv]}
    if args.checkpoint is not None:
        record["checkpoint"] = {"path": str(args.checkpoint.resolve()), "sha256": checkpoint.sha256(args.checkpoint)}
    record["model"] = _model_record(args, loaded.model)
    record["calibration"] = {
        **(report.calibration_summary() or {}), "folder": str(args.calib.resolve()), "images": shard.images,
        "batches": len(shard.batches), "batch_size": args.batch_size, "num_batches": args.num_batches,
        "device": str(loaded.device), "processes": shard.world_size,
    }
    record["preprocessing"] = loaded.preprocessing
    return record


def _model_spec_of(args: argparse.Namespace) -> str:
    return cast(str, args.model or _AUTO_MODEL)


def _model_record(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    cls = type(model)
    return {"spec": _model_spec_of(args), "kwargs": args.model_kwargs, "class": f"{cls.__module__}.{cls.__qualname__}"}


def _report_dict(report: Report) -> dict[str, Any]:
    return {**report.to_dict(), "versions": _versions(report.extra["model"]["spec"])}


def _versions(spec: str) -> dict[str, str]:
    """fxeq's and its dependencies' versions, and that of the package --model names (e.g. transformers)."""
    found = versions()
    package = spec.partition(":")[0].split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", None)
    if isinstance(version, str):
        found[package] = version
    return found


def _fusing_convs(report: dict[str, Any]) -> list[str]:
    """The fusing convs of a report dict, sorted."""
    return sorted({c.get("module") or c["weight"].rpartition(".")[0] for s in report["sites"] for c in s["convs"]})


def _demo_workdir(path: Path) -> Path:
    if path.exists() and not (path / _DEMO_MARKER).is_file() and not (path.is_dir() and not any(path.iterdir())):
        raise _UsageError(
            f"{path} exists and was not made by fxeq demo (it has no {_DEMO_MARKER} file); pass --workdir "
            "with a new or empty folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / _DEMO_MARKER).write_text("made by fxeq demo, which may replace the files in this folder\n")
    return path


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
    where = "in" if report_file.name == checkpoint.FOLDER_REPORT else "beside"
    _note(
        f"{path} is a checkpoint converted by fxeq convert ({report_file} lies {where} it). Its fusing convs "
        "were rescaled; the fusion inputs measured below are not, so their std ratios are the same as "
        "before. The conversion, from the report:\n" + "\n".join(lines)
    )


def _site_summary(site: dict[str, Any]) -> str:
    """One site of a JSON report: its convs and the std ratio that conversion divided out."""
    convs = ", ".join(c.get("module") or c["weight"].rpartition(".")[0] for c in site["convs"])
    ratio = site["disequilibrium"]
    return f"  site {site['name']} -> {convs}; std max/min {'-' if ratio is None else f'{ratio:.2f}'} divided out"


def _note(text: str) -> None:
    """A message on stderr, from rank 0 only under torchrun."""
    if _is_rank_zero():
        print(f"fxeq: {text}", file=sys.stderr)


def _fail(message: str, code: int, error: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(error)
    rank, world = _ranks()
    where = f"rank {rank} of {world}: " if world > 1 else ""
    print(f"fxeq: error: {where}{message}", file=sys.stderr)
    return code
