"""The command line's arguments: one parser, its subcommands, and the checks of single values."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import __version__
from ..capturing import FRONTENDS
from ..report import FOLDER_REPORT
from .images import CHANNELS, IMAGE_SUFFIXES

__all__ = ["AUTO_MODEL", "DEFAULT_SIZE", "DEMO_MIN_SIZE", "build_parser", "subcommand_parser"]

AUTO_MODEL = "transformers:AutoModelForSemanticSegmentation"
DEFAULT_SIZE = 512
DEMO_MIN_SIZE = 9
"""The smallest image on which the demo's DeepLabV3 has a fusion site: its ASPP map (1/8 of the image) is 2x2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``fxeq: error: ...``, like every other error.

    The usage (a screen of options) is left to ``--help``, which the line names.
    """

    def error(self, message: str) -> NoReturn:
        missing = re.fullmatch(r"argument (--[\w-]+): expected one argument", message)
        if missing:  # argparse reads "-0.2,0.2" as an option, not as the flag's value
            message += f"; a value that starts with '-' is written {missing.group(1)}=-VALUE"
        shows = "the commands" if " " not in self.prog else "the arguments"
        self.exit(2, f"fxeq: error: {message} ({self.prog} --help shows {shows})\n")


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (for its usage line in an error)."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():  # noqa: SLF001 - argparse
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and command in choices:
            return choices[command]
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``fxeq`` parser with its four commands."""
    common = _Parser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and fxeq's debug log")
    common.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars or progress notes on stderr (the report, warnings and errors still "
                             "print); bars show only when stderr is a terminal anyway")

    model = _Parser(add_help=False)
    model.add_argument("--model", type=_model_spec, metavar="MODULE:CALLABLE",
                       help="builds the model, e.g. segmentation_models_pytorch:UPerNet; required unless CHECKPOINT "
                            "is a Hugging Face save_pretrained folder, whose class then defaults to "
                            f"{AUTO_MODEL} (--model names another class, whose from_pretrained loads it). MODULE "
                            "(and any class a --trust-pickle checkpoint names) is imported with the current folder "
                            "on the path")
    model.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                       help='keyword arguments for CALLABLE (or from_pretrained), e.g. \'{"encoder_name": '
                            '"resnet18", "encoder_weights": null, "classes": 150}\'')
    model.add_argument("--trust-pickle", action="store_true",
                       help="also read checkpoints holding pickled objects (a whole nn.Module); unpickling "
                            "runs code from the file, so only for files you trust")

    capture = _Parser(add_help=False)
    capture.add_argument("--frontend", choices=("auto", *FRONTENDS), default="auto",
                         help="how fxeq finds the fusion sites: fx (torch.fx), export (torch.export) or concrete (a "
                              "trace of one eager forward on the first batch); auto tries fx, then export, then the "
                              "concrete trace. The command line rewrites the weights of the model it loaded and "
                              "saves them, so it needs no deployable graph and may use any of them (default: auto)")
    capture.add_argument("--all-concats", action="store_true",
                         help="also equalize channel concatenations without an interpolated input (same-resolution "
                              "features, learned upsampling such as a transposed conv)")

    data = _Parser(add_help=False)
    data.add_argument("--calib", required=True, type=Path, metavar="FOLDER",
                      help=f"calibration images ({', '.join(IMAGE_SUFFIXES)}; searched recursively); use "
                           "training images")
    data.add_argument("--size", type=_positive_int, metavar="PIXELS",
                      help=f"resize the shorter side and center-crop to this (default: {DEFAULT_SIZE}); not with "
                           "a folder's image processor, which resizes itself")
    data.add_argument("--channels", type=int, choices=tuple(CHANNELS), default=None, metavar="N",
                      help="the model's input channels, how images are decoded: 1 grayscale, 3 RGB, 4 RGBA "
                           "(default: 3); not with an image processor")
    data.add_argument("--mean", type=_numbers, metavar="M[,M...]",
                      help="normalization mean per channel on the 0..1 scale, one value per --channels (default: "
                           "ImageNet's for RGB, their average 0.449 for grayscale, none for RGBA); not with an "
                           "image processor")
    data.add_argument("--std", type=_numbers, metavar="S[,S...]",
                      help="normalization std per channel (default: ImageNet's for RGB, 0.226 for grayscale, "
                           "none for RGBA); not with an image processor")
    data.add_argument("--batch-size", type=_batch_size, default=4, metavar="N",
                      help="images per batch, at least 2 (default: 4); a last image on its own joins the batch "
                           "before it")
    data.add_argument("--num-batches", type=_positive_int, metavar="N",
                      help="use only the first N batches, over all processes (default: all)")
    data.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="where to calibrate: cpu, cuda, cuda:1... (default: cuda if available, else cpu); "
                           "under torchrun, cuda is each process's cuda:LOCAL_RANK")
    data.add_argument("--min-std", type=_positive_float, default=1e-6, metavar="S",
                      help="smallest input std accepted; a smaller one means a constant branch (default: 1e-6)")
    data.add_argument("--plot", type=Path, metavar="PNG",
                      help="also draw each site's input stds before and after fxeq as a PNG, replacing an existing "
                           "one; not inside an input or output (needs matplotlib: pip install -e '.[plot]')")

    output = _Parser(add_help=False)
    output.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                        help="for a checkpoint file: the converted state_dict, .safetensors or .pt by suffix, with "
                             "the report in OUT.fxeq.json; for a save_pretrained folder: a new folder, with the "
                             f"report inside it as {FOLDER_REPORT}")
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
    convert.set_defaults(command_name="convert")

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
                            f"{FOLDER_REPORT})")
    apply.set_defaults(command_name="apply")

    inspect = commands.add_parser(
        "inspect", parents=[model, capture, data, common],
        help="show fusion sites and input statistics; write nothing",
        description="Print every fusion site with each input's producer, upsampling, mean and std, the "
                    "largest/smallest std ratio, and the skipped concatenations. Nothing is written.",
    )
    inspect.add_argument("checkpoint", nargs="?", type=Path, metavar="CHECKPOINT",
                         help="a state_dict or save_pretrained folder to load first (default: the model as built)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(command_name="inspect")

    demo = commands.add_parser(
        "demo", parents=[common], help="convert a randomly initialized DeepLabV3 on generated images",
        description="Build torchvision's deeplabv3_resnet50 (no weights downloaded), save its state_dict, "
                    "generate synthetic calibration textures, and run fxeq convert on them.",
    )
    demo.add_argument("--workdir", type=Path, default=Path("fxeq-demo"),
                      help="folder for the demo's files: new, empty, or made by an earlier demo, whose "
                           "files are then replaced (default: ./fxeq-demo)")
    demo.add_argument("--size", type=_demo_size, default=128, metavar="PIXELS",
                      help=f"image size, at least {DEMO_MIN_SIZE} (default: 128)")
    demo.add_argument("--images", type=_demo_images, default=8, metavar="N",
                      help="number of images to generate, at least 2 (default: 8)")
    demo.set_defaults(command_name="demo")
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


def _int_at_least(text: str, least: int) -> int | None:
    """``text`` as a whole number of at least ``least``, else None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= least else None


def _positive_int(text: str) -> int:
    value = _int_at_least(text, 1)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _batch_size(text: str) -> int:
    value = _int_at_least(text, 2)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"expected at least 2 images per batch, got {text!r}: calibration runs batch normalization with batch "
            "statistics (as in training), which needs 2 samples where a feature map is 1x1 (e.g. ASPP image "
            "pooling). Pass --batch-size 2 or more"
        )
    return value


def _demo_size(text: str) -> int:
    value = _positive_int(text)
    if value < DEMO_MIN_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected at least {DEMO_MIN_SIZE} pixels, got {text!r}: deeplabv3_resnet50 computes its ASPP features "
            "at 1/8 of the image, and its fusion site (the pooled branch, upsampled to them) exists only where they "
            f"are larger than 1x1. Pass --size {DEMO_MIN_SIZE} or more, e.g. the default 128"
        )
    return value


def _demo_images(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 images, got {text!r}: calibration batches hold at "
                                         "least 2. Pass --images 2 or more")
    return value


def _numbers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, one per channel, such as "
                                         f"0.485,0.456,0.406, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number such as 1e-6, got {text!r}")
    return value
