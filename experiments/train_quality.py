"""Training quality: does scale equalization change what a segmentation model learns?

fxeq is the same function at step 0 in every mode, but not the same under
gradient descent (see the README, "Training semantics: init, reparam,
explicit"): the fold (``init``) rescales the gradient of each weight slice by
the input's sigma and, with a batch norm after the fusing conv, lowers SGD's
effective learning rate. This harness trains the same initial weights once
per mode and compares the held-out mIoU, paired per seed:

* ``none``: no fxeq at all.
* ``init``: the paper's auxiliary initializer, folded into the weights.
* ``init_keep_norm``: the fold, then each output channel's weight norm restored.
* ``reparam``: ``W = W_raw * (1 / sigma)`` as a torch parametrization.
* ``explicit``: ``(x - mu) / sigma`` as a forward pre-hook on each fusing conv.

Two protocols:

* ``scratch``: the whole model starts from random weights and trains on task B.
* ``finetune`` (the paper's, in miniature): an encoder pretrained on task A
  (the whole model trained on A, the encoder kept), or the encoder weights in
  ``--encoder-weights``, paired with a fresh decoder, then fine-tuned on task B.

The pieces live beside this script: ``_tq_data.py`` (the synthetic tasks and
a user's folders), ``_tq_experiment.py`` (training, finalize, evaluation and
the summary over seeds) and ``_tq_tables.py`` (the markdown report); the
options, environment record and result files come from the benchmarks'
``benchmarks/_common.py``, and the results go to ``benchmarks/results/`` as
theirs do. The files are written again after every run (marked partial until
the last), and ``--budget-s`` starts no new run once that many seconds have
passed, so that a run under a time limit keeps what it trained.

Run ``python experiments/train_quality.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # _common: options, result files

from _common import Option, parser, start  # noqa: E402 - found through the path above
from _tq_data import TASK_A_CLASSES, TASK_B, FolderSource, Source, SyntheticSource, SyntheticTask  # noqa: E402
from _tq_experiment import (  # noqa: E402
    DEFAULT_LR, MODES, OPTIMIZERS, PROTOCOLS, WEIGHT_DECAY, Progress, Setting, run_all, summarize,
)
from _tq_tables import markdown_sections  # noqa: E402

__all__ = ["build_parser", "main", "parse_args", "parse_lr"]

def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    return parse


def _choices(values: Sequence[str], allowed: Sequence[str], option: str) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")


def parse_lr(text: str | None, optimizers: Sequence[str]) -> dict[str, float]:
    """``"0.02"`` for every optimizer or ``"sgd=0.02,adamw=5e-4"``; unnamed ones keep their default.

    Example:
        >>> parse_lr("sgd=0.02", ["sgd", "adamw"])
        {'sgd': 0.02, 'adamw': 0.001}
    """
    lr = {name: DEFAULT_LR[name] for name in optimizers}
    if not text:
        return lr
    if "=" not in text:
        return dict.fromkeys(optimizers, float(text))
    for item in text.split(","):
        name, _, value = item.partition("=")
        _choices([name.strip()], OPTIMIZERS, "--lr")
        lr[name.strip()] = float(value)
    return lr


def _options() -> dict[str, Option]:
    """The options whose defaults differ between a full run (a GPU's) and ``--quick`` (a smoke test)."""
    words, ints = _csv(str), _csv(int)
    return {
        "archs": Option("comma-separated smp architectures", ["UPerNet", "PSPNet"], ["PSPNet"], words),
        "encoders": Option("comma-separated smp encoders (random init unless --encoder-weights)", ["resnet18"],
                           ["resnet18"], words),
        "optimizers": Option(f"comma-separated, from {', '.join(OPTIMIZERS)}", list(OPTIMIZERS), ["sgd"], words),
        "modes": Option(f"comma-separated, from {', '.join(MODES)}", list(MODES), ["none", "init", "reparam"], words),
        "seeds": Option("comma-separated seeds (weights, batches and dropout)", [0, 1, 2], [0], ints),
        "protocol": Option("scratch, finetune or both", "both", "both", str),
        "iters": Option("training iterations per run", 400, 20),
        "pretrain_iters": Option("iterations of task-A pretraining for the finetune protocol", 400, 10),
        "batch": Option("batch size (at least 2: calibration needs train-mode batch statistics)", 8, 4),
        "size": Option("image size", 128, 64),
        "eval_images": Option("images in the synthetic held-out set", 128, 16),
        "calib_batches": Option("fxeq calibration batches", 4, 2),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; those left unset are filled from the full or ``--quick`` defaults."""
    options = _options()
    full = {k: o.full for k, o in options.items()}
    paragraphs = (
        (f"the defaults train 2 architectures x 3 seeds x 2 protocols x 2 optimizers x 5 modes for "
         f"{full['iters']} iterations each (plus {full['pretrain_iters']}-iteration pretraining per architecture "
         "and seed): a GPU run. Each result file records how long its run took (duration_s)."),
        ("--quick: PSPNet/resnet18 (the fastest smp model with an upsampled fusion), SGD, size 64, batch 4, "
         "20 iterations, 1 seed, modes none/init/reparam, both protocols, 1 CPU thread: a smoke test."),
        ("a CPU-sized UPerNet run: python experiments/train_quality.py --archs UPerNet "
         "--model-kwargs '{\"decoder_channels\": 64}' --seeds 0,1 --iters 100 --pretrain-iters 100 --batch 4 "
         "--size 64 --eval-images 64 --threads 1"),
    )
    epilog = "\n\n".join(textwrap.fill(text, 100, break_on_hyphens=False) for text in paragraphs)
    p = parser(__doc__.split("\n\n")[0], quick="see below", zoo=False, device=True, epilog=epilog, options=options)
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON of further smp constructor arguments, e.g. \'{"decoder_channels": 64}\' '
                   "(default: {})")
    p.add_argument("--lr", default=None,
                   help="learning rate: one value for all optimizers, or sgd=...,adamw=... "
                   f"(default: sgd={DEFAULT_LR['sgd']:g}, adamw={DEFAULT_LR['adamw']:g})")
    p.add_argument("--classes", type=int, default=6,
                   help="classes of the synthetic tasks (2 to 12), or of --images/--masks (default: 6)")
    p.add_argument("--images", type=Path, default=None, help="folder of your images (task B instead of synthetic)")
    p.add_argument("--masks", type=Path, default=None,
                   help="folder of PNG masks with class ids, stems matching --images; ids >= --classes are ignored")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="with --images: held-out fraction, the last files by name (default: 0.2)")
    p.add_argument("--encoder-weights", type=Path, default=None,
                   help="finetune protocol: a state_dict for model.encoder, or a whole model's (its 'encoder.' "
                   "entries), used instead of pretraining on task A; needs a single --encoders value")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new run (pretraining or training) once this many seconds have passed; the "
                   "result files then hold the runs that finished and say that the budget stopped the rest "
                   "(default: no budget)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options, filling the defaults."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick and args.threads is None:
        args.threads = 1
    _choices(args.optimizers, OPTIMIZERS, "--optimizers")
    _choices(args.modes, MODES, "--modes")
    _choices([args.protocol], (*PROTOCOLS, "both"), "--protocol")
    args.protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    if (args.images is None) != (args.masks is None):
        p.error("--images and --masks go together")
    if args.encoder_weights and len(args.encoders) != 1:
        p.error("--encoder-weights fits one encoder; pass a single --encoders value")
    args.synthetic_classes = args.classes if args.images is None else TASK_A_CLASSES
    args.models = [f"{arch}/{encoder}" for arch in args.archs for encoder in args.encoders]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; return the exit status."""
    args = parse_args(argv)
    run = start("train_quality", args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lr = parse_lr(args.lr, args.optimizers)
    if args.images is None:
        source: Source = SyntheticSource(SyntheticTask(TASK_B, args.classes, args.size), device,
                                         args.eval_images)
        data = (f"synthetic task B, {args.classes} classes (texture orientation x period), {args.eval_images} "
                "held-out images")
    else:
        source = FolderSource(args.images, args.masks, size=args.size, classes=args.classes,
                              val_fraction=args.val_fraction, device=device)
        data = f"{args.images} with masks {args.masks}, {args.classes} classes, resized to {args.size}"
    setting = Setting(source, source.eval_batches(args.batch), lr, args)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s

    def write(progress: Progress, complete: bool) -> None:
        summary = summarize(progress.runs)
        record = {"data": data, "lr": lr, "weight_decay": {o: WEIGHT_DECAY[o] for o in args.optimizers},
                  "sites": progress.sites, "pretraining": progress.pretraining, "summary": summary,
                  "budget": {"seconds": args.budget_s, "stopped": progress.stopped, "runs": len(progress.runs),
                             "planned": progress.planned},
                  "runs": progress.runs}
        sections = markdown_sections(args, lr, progress.runs, summary, progress.pretraining, data)
        if progress.stopped:
            sections.insert(0, f"**The --budget-s {args.budget_s:g} s budget stopped the run after "
                               f"{len(progress.runs)} of {progress.planned} training runs.**")
        run.write(record, sections, complete=complete)

    progress = run_all(setting, log=lambda text: print(text, file=sys.stderr, flush=True), deadline=deadline,
                       on_run=lambda done: write(done, complete=False))
    write(progress, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
