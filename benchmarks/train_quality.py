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
options, environment record and result files shared by every benchmark come
from ``_common.py``.

Run ``python benchmarks/train_quality.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from _common import defaults, parser, start
from _tq_data import TASK_A_CLASSES, TASK_B, FolderSource, Source, SyntheticSource, SyntheticTask
from _tq_experiment import DEFAULT_LR, MODES, OPTIMIZERS, PROTOCOLS, WEIGHT_DECAY, Setting, run_all, summarize
from _tq_tables import markdown_sections

__all__ = ["build_parser", "main", "parse_args", "parse_lr"]

_FULL: dict[str, Any] = {
    "archs": ["UPerNet", "PSPNet"], "encoders": ["resnet18"], "optimizers": list(OPTIMIZERS),
    "modes": list(MODES), "seeds": [0, 1, 2], "iters": 400, "pretrain_iters": 400, "batch": 8, "size": 128,
    "eval_images": 128, "calib_batches": 4, "protocol": "both", "threads": None,
}
_QUICK: dict[str, Any] = {
    "archs": ["PSPNet"], "encoders": ["resnet18"], "optimizers": ["sgd"],
    "modes": ["none", "init", "reparam"], "seeds": [0], "iters": 20, "pretrain_iters": 10, "batch": 4, "size": 64,
    "eval_images": 16, "calib_batches": 2, "protocol": "both", "threads": 1,
}


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


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; ``None`` defaults are filled from the full or ``--quick`` settings."""
    full, quick = _FULL, _QUICK
    paragraphs = (
        (f"the defaults train 2 architectures x 3 seeds x 2 protocols x 2 optimizers x 5 modes for "
         f"{full['iters']} iterations each (plus {full['pretrain_iters']}-iteration pretraining per architecture "
         "and seed): a GPU run. Each result file records how long its run took (duration_s)."),
        ("--quick: PSPNet/resnet18 (the fastest smp model with an upsampled fusion), SGD, size 64, batch 4, "
         "20 iterations, 1 seed, modes none/init/reparam, both protocols, 1 CPU thread: a smoke test."),
        ("a CPU-sized UPerNet run: python benchmarks/train_quality.py --archs UPerNet "
         "--model-kwargs '{\"decoder_channels\": 64}' --seeds 0,1 --iters 100 --pretrain-iters 100 --batch 4 "
         "--size 64 --eval-images 64 --threads 1"),
    )
    epilog = "\n\n".join(textwrap.fill(text, 100, break_on_hyphens=False) for text in paragraphs)
    p = parser(__doc__.split("\n\n")[0], quick="see below", zoo=False, epilog=epilog)

    def option(name: str, kind: Callable[[str], Any], text: str) -> None:
        key = name.removeprefix("--").replace("-", "_")
        show = ",".join(map(str, full[key])) if isinstance(full[key], list) else full[key]
        shown_quick = ",".join(map(str, quick[key])) if isinstance(quick[key], list) else quick[key]
        p.add_argument(name, type=kind, default=None, help=f"{text} (default: {show}; --quick: {shown_quick})")

    option("--archs", _csv(str), "comma-separated smp architectures")
    option("--encoders", _csv(str), "comma-separated smp encoders (random init unless --encoder-weights)")
    option("--optimizers", _csv(str), f"comma-separated, from {', '.join(OPTIMIZERS)}")
    option("--modes", _csv(str), f"comma-separated, from {', '.join(MODES)}")
    option("--seeds", _csv(int), "comma-separated seeds (weights, batches and dropout)")
    option("--protocol", str, "scratch, finetune or both")
    option("--iters", int, "training iterations per run")
    option("--pretrain-iters", int, "iterations of task-A pretraining for the finetune protocol")
    option("--batch", int, "batch size (at least 2: calibration needs train-mode batch statistics)")
    option("--size", int, "image size")
    option("--eval-images", int, "images in the synthetic held-out set")
    option("--calib-batches", int, "fxeq calibration batches")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options, filling the defaults."""
    p = build_parser()
    args = p.parse_args(argv)
    defaults(args, _FULL, _QUICK)
    _choices(args.optimizers, OPTIMIZERS, "--optimizers")
    _choices(args.modes, MODES, "--modes")
    _choices([args.protocol], (*PROTOCOLS, "both"), "--protocol")
    args.protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    if args.batch < 2:
        p.error("--batch must be at least 2: fxeq calibrates with train-mode batch statistics")
    if (args.images is None) != (args.masks is None):
        p.error("--images and --masks go together")
    if args.encoder_weights and len(args.encoders) != 1:
        p.error("--encoder-weights fits one encoder; pass a single --encoders value")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.synthetic_classes = args.classes if args.images is None else TASK_A_CLASSES
    args.models = [f"{arch}/{encoder}" for arch in args.archs for encoder in args.encoders]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
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
    runs, pretraining, sites = run_all(setting, log=lambda text: print(text, file=sys.stderr, flush=True))
    summary = summarize(runs)
    data_record = {"data": data, "lr": lr, "weight_decay": {o: WEIGHT_DECAY[o] for o in args.optimizers},
                   "sites": sites, "pretraining": pretraining, "summary": summary, "runs": runs}
    run.write(data_record, markdown_sections(args, lr, runs, summary, pretraining, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
