"""The ``fxeq`` command line: convert a checkpoint, apply a report, inspect a model, run the demo.

::

    fxeq convert CHECKPOINT [--model MODULE:CALLABLE] --calib IMAGES -o OUT   rescale, write OUT + report
    fxeq apply CHECKPOINT [--model MODULE:CALLABLE] --report REPORT -o OUT    the same, with a report's statistics
    fxeq inspect [CHECKPOINT] [--model MODULE:CALLABLE] --calib IMAGES        measure only, write nothing
    fxeq demo [--workdir DIR]                                                 convert a random DeepLabV3

CHECKPOINT is a state_dict file, built with ``--model``, or a Hugging Face
``save_pretrained`` folder, built with ``from_pretrained`` (``--model`` then
only overrides the class). The package, a module per concept:

* :mod:`~fxeq.cli.parser`: the arguments; :mod:`~fxeq.cli.commands`: the four
  commands; :mod:`~fxeq.cli.loading`: the model, images and device they work on;
* :mod:`~fxeq.cli.checkpoints`: reading checkpoint files safely;
  :mod:`~fxeq.cli.hf`: ``save_pretrained`` folders; :mod:`~fxeq.cli.outputs`:
  checking and writing outputs (atomically, through :mod:`fxeq.files`);
  :mod:`~fxeq.cli.images`: calibration images; :mod:`~fxeq.cli.torchrun`:
  several processes; :mod:`~fxeq.cli.errors`: exit codes and flags in messages.

Exit codes: 0 done; 2 bad usage or input: anything caused by what was passed
(a missing file, keys that do not fit the model, unreadable images, a size
the model cannot take, a frontend that cannot capture it, no fusion site, an
output that exists), with one line naming the flag; 1 fxeq's own failure;
130 interrupted (143 for SIGTERM while writing). Errors go to stderr as
``fxeq: error: ...``; ``--verbose`` adds the traceback and fxeq's debug log.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from .._torchvision import TorchvisionError
from ..errors import FxEqError
from .commands import COMMANDS
from .errors import UsageError, for_cli, one_line
from .parser import build_parser, subcommand_parser
from .torchrun import ranks

__all__ = ["main"]

_DISTRIBUTED = ("convert", "inspect")  # the commands that calibrate, so that torchrun can share the work


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name. Default: ``sys.argv[1:]``.

    Returns:
        The exit code: 0 done, 2 bad usage or input, 1 fxeq's own failure, 130 interrupted.

    Example:
        >>> main(["convert", "missing.pt", "--model", "torchvision.models:resnet18",
        ...       "--calib", "no-such-folder", "-o", "out.pt"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("no command given; expected one of convert, apply, inspect, demo")
        command = subcommand_parser(parser, args.command)
        if ranks()[1] > 1 and args.command not in _DISTRIBUTED:
            command.error(f"fxeq {args.command} runs in one process: under torchrun, only "
                          f"{' and '.join(f'fxeq {c}' for c in _DISTRIBUTED)} share their calibration across "
                          "processes. Run it without torchrun")
        folder = getattr(args, "checkpoint", None)
        if getattr(args, "model", "") is None and not (folder is not None and folder.is_dir()):
            command.error("--model is required for a checkpoint file and without a checkpoint: only a Hugging Face "
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
        return int(COMMANDS[args.command](args))
    except (UsageError, TorchvisionError) as e:
        return _fail(one_line(str(e)), 2, e, args.verbose)
    except FxEqError as e:  # the model or the data the user passed: a graph, calibration or rewrite problem
        return _fail(for_cli(one_line(str(e), e.__cause__)), 2, e, args.verbose)
    except KeyboardInterrupt as e:
        return _fail("interrupted; fxeq places each output whole or not at all, so none is half-written", 130, e,
                     args.verbose)
    except Exception as e:  # noqa: BLE001 - the last resort: fxeq's own failure, with the traceback on request
        hint = "" if args.verbose else (" (this is fxeq's failure, not yours: run again with --verbose for the "
                                        "traceback, and report it)")
        return _fail(f"{type(e).__name__}: {one_line(str(e))}{hint}", 1, e, args.verbose)


def _fail(message: str, code: int, error: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(error)
    rank, world = ranks()
    where = f"rank {rank} of {world}: " if world > 1 else ""
    print(f"fxeq: error: {where}{message}", file=sys.stderr)
    return code
