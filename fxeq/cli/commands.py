"""The four commands: convert, apply, inspect, demo.

Each checks everything it can before any work (inputs first, then the
output), says what it is doing on stderr (rank 0 only, not with
``--quiet``), and hands the work to the library: :func:`fxeq.prepare`,
:func:`fxeq.calibrate`, :func:`fxeq.convert` and :func:`fxeq.apply`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .._text import plural
from .._torchvision import torchvision
from .._version import versions
from ..errors import CaptureError
from ..files import place, staged
from ..pipeline import Prepared, calibrate, convert, prepare
from ..plot import PLOT_EXTRA
from ..replay import apply as apply_report
from ..report import FOLDER_REPORT, Report, converted_report, report_path
from . import checkpoints, hf, outputs
from .errors import UsageError, bad_input, for_cli
from .images import GENERATED_PREFIX, BatchShard, CalibrationImageError, generate_images
from .loading import Loaded, describe_calibration, is_folder, load, load_model, model_record, model_spec
from .parser import build_parser
from .torchrun import is_rank_zero, note, process_group, rank_zero_writes

__all__ = ["COMMANDS"]

_DEMO_MARKER = ".fxeq-demo"
_DEMO_MODEL = "torchvision.models.segmentation:deeplabv3_resnet50"
_DEMO_KWARGS = {"weights": None, "weights_backbone": None, "num_classes": 21}
_DEMO_IMAGES = "generated-calibration-images"


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    output = _checked_paths(args)
    _check_plot(args, args.checkpoint, args.calib, output, output if is_folder(args) else report_path(output))
    loaded = load(args)
    with bad_input():
        outputs.check_not_converted(args.checkpoint, loaded.report)
    with process_group(loaded.device) as backend:
        prepared = _prepared(args, loaded)
        if not prepared.search.sites:
            if is_rank_zero():
                print(for_cli(prepared.report.table()))
            raise UsageError(
                f"found no fusion site in {type(loaded.model).__name__}, so nothing was written: fxeq looks for a "
                "channel concatenation with an interpolated input that feeds a conv. The concatenations it "
                "skipped are listed above; pass --all-concats to include same-resolution ones and learned "
                "upsampling."
            )
        _calibrated(args, loaded, prepared)
        convert(prepared)
        report = prepared.report
        with rank_zero_writes() as writes:
            if writes:
                report.extra.update(_provenance(args, loaded, report, backend))
                report.versions = _versions(model_spec(args))
                report_file = _save(args, output, loaded.model, loaded.state, report.to_dict())
                print(for_cli(report.table()))
                print(f"\nwrote {output} (rescaled {', '.join(_fusing_convs(report))}; every other tensor as in the "
                      "input)")
                print(f"wrote {report_file}")
                _plot(args, report, type(loaded.model).__name__)
    return 0


def _apply(args: argparse.Namespace) -> int:
    output = _checked_paths(args, args.report)
    report_file = args.report / FOLDER_REPORT if args.report.is_dir() else args.report
    recorded = _read_report(report_file)
    digest = _check_report_source(args, recorded)
    model, state, embedded = load_model(args)
    with bad_input():
        outputs.check_not_converted(args.checkpoint, embedded)
    with bad_input(ValueError, TypeError):
        apply_report(model, recorded)
    record = {k: v for k, v in recorded.to_dict().items() if k != "output"}  # save_* records the new output
    record.update(
        command=["fxeq", *args.argv], checkpoint={"path": str(args.checkpoint.resolve()), "sha256": digest},
        model=model_record(args, model), versions=_versions(model_spec(args)),
        replayed={"report": str(report_file.resolve()), "sha256": outputs.digest(report_file)},
    )
    written = _save(args, output, model, state, record)
    print(f"wrote {output} (rescaled {', '.join(_fusing_convs(recorded))} with the statistics in {report_file}; "
          "every other tensor as in the input)")
    print(f"wrote {written}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    _check_plot(args, args.checkpoint, args.calib)
    converted, conversion = _note_if_converted(args) if args.checkpoint else (False, None)
    loaded = load(args)
    if converted and is_folder(args):
        # The library refuses a model loaded from a folder holding fxeq's report, lest it be equalized twice;
        # inspect only measures it, as it is (the note above said so).
        hf.forget_source(loaded.model)
    if loaded.report is not None and not converted:
        with contextlib.suppress(ValueError):
            conversion = Report.from_dict(loaded.report)
        note("the checkpoint holds the report of fxeq's ScaleEqualization callback: it was equalized during "
             "training. The fusion inputs measured below are as the equalized model computes them.")
        converted = True
    with process_group(loaded.device) as backend:
        prepared = _prepared(args, loaded)
        if prepared.search.sites:
            # On an equalized checkpoint every upstream fold is in the weights already: measure the model as it
            # is (one pass), or the downstream sites would be measured after folding their upstream sites twice.
            _calibrated(args, loaded, prepared, one_pass=converted)
            if converted and prepared.calibration is not None:
                # that one pass is exact: each site is measured after the folds upstream of it, which the
                # weights hold, so the report must not call downstream sites approximate
                summary = dataclasses.replace(prepared.calibration.summary, one_pass=False)
                prepared.calibration = dataclasses.replace(prepared.calibration, summary=summary)
    if is_rank_zero():
        report = prepared.report
        report.extra.update(_provenance(args, loaded, report, backend))
        report.versions = _versions(model_spec(args))
        print(report.to_json() if args.json else for_cli(report.table()))
        # after fxeq, a converted model's convs receive what is measured now over what its conversion folded
        folded = {k: v.std for k, v in conversion.stats.items()} if conversion is not None else None
        _plot(args, report, type(loaded.model).__name__, folded)
    return 0


def _demo(args: argparse.Namespace) -> int:
    _check_demo_workdir(args.workdir)
    segmentation = torchvision("models.segmentation")  # one clear sentence if torchvision cannot run here
    with torch.random.fork_rng(devices=[]):  # the same random weights on every run: the same report
        torch.manual_seed(0)
        state = segmentation.deeplabv3_resnet50(**_DEMO_KWARGS).state_dict()
    workdir = args.workdir  # everything is checked: the demo's files may be written
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / _DEMO_MARKER).write_text("made by fxeq demo, which may replace the files in this folder\n")
    source = workdir / "deeplabv3_resnet50.pt"
    output = workdir / "deeplabv3_resnet50.fxeq.safetensors"
    images = workdir / _DEMO_IMAGES
    for old in images.glob(f"{GENERATED_PREFIX}*.png"):
        old.unlink()
    outputs.save_state_dict(state, source)
    note(f"saved a randomly initialized deeplabv3_resnet50 (nothing downloaded) to {source}", quiet=args.quiet)
    generate_images(images, args.images, size=args.size)
    note(f"GENERATED {args.images} synthetic calibration images (random multi-scale textures, not real data) "
         f"in {images}", quiet=args.quiet)
    argv = ["convert", str(source), "--model", _DEMO_MODEL, "--model-kwargs", json.dumps(_DEMO_KWARGS),
            "--calib", str(images), "--size", str(args.size), "-o", str(output)]
    # The folder is the demo's own, so its earlier output may be replaced.
    if output.exists() or report_path(output).exists():
        argv.append("--force")
    argv += [flag for flag, on in (("--verbose", args.verbose), ("--quiet", args.quiet)) if on]
    note("running: fxeq " + shlex.join(argv), quiet=args.quiet)
    convert_args = build_parser().parse_args(argv)
    convert_args.argv = argv
    code = _convert(convert_args)  # raises on failure
    print(
        "\nThis demo calibrated a random model on GENERATED textures, to show the workflow. For a real "
        "conversion, calibrate on a few hundred images from your model's training set, at its training "
        "resolution:\n  fxeq convert your.pt --model MODULE:CALLABLE --model-kwargs JSON --calib "
        "train_images/ -o your.fxeq.safetensors"
    )
    return code


COMMANDS = {"convert": _convert, "apply": _apply, "inspect": _inspect, "demo": _demo}
"""The commands, by name."""


# ---------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------


def _prepared(args: argparse.Namespace, loaded: Loaded) -> Prepared:
    """The model captured on the first batch and searched, with CaptureError told in the command line's words."""
    model = loaded.model
    note(f"finding the fusion sites of {type(model).__name__} on the first batch (frontend {args.frontend})",
         quiet=args.quiet)
    with bad_input(CalibrationImageError):
        example = next(iter(loaded.loader)).to(loaded.device)
    try:
        # inplace: this model is fxeq's own copy, loaded from the checkpoint; it needs no deployable graph.
        prepared = prepare(model, example, inplace=True, frontend=args.frontend, all_concats=args.all_concats)
    except CaptureError as e:
        raise _capture_failure(args, loaded, example, e) from e
    sites = prepared.search.sites
    if sites:
        convs = ", ".join(c.module for s in sites for c in s.convs)
        note(f"found {plural(len(sites), 'fusion site')} ({convs}); calibrating on "
             f"{describe_calibration(args, loaded)}", quiet=args.quiet)
    return prepared


def _calibrated(args: argparse.Namespace, loaded: Loaded, prepared: Prepared, *, one_pass: bool = False) -> None:
    progress = None if is_rank_zero() and not args.quiet else False  # None: a bar only on a terminal
    with bad_input(CalibrationImageError):
        calibrate(prepared, loaded.loader, progress=progress, min_std=args.min_std, one_pass=one_pass)


def _capture_failure(args: argparse.Namespace, loaded: Loaded, example: torch.Tensor, error: CaptureError
                     ) -> UsageError:
    """A model that does not run on the images as prepared, or that the chosen frontend cannot capture."""
    name = type(loaded.model).__name__
    if error.stage == "run":
        cause = error.__cause__ or error
        detail = str(cause).strip().splitlines()[0].rstrip(".") if str(cause).strip() else "(no message)"
        pre = loaded.preprocessing
        if "class" in pre:
            how = f"as its image processor prepares them ({pre['file']})"
            fix = "edit that image processor's size in a copy of the folder"
        else:
            how = f"at --size {pre['size']} with --channels {pre['channels']}"
            fix = ("pass a --size the model takes (many need a multiple of 32), --channels with its input "
                   "channels, or check --model-kwargs")
        return UsageError(f"{name} does not run on the calibration images {how} (a batch of shape "
                          f"{tuple(example.shape)}): {type(cause).__name__}: {detail}. Fix: {fix}")
    listed = "; ".join(f"{n}: {t}" for n, t in error.failures.items())
    if args.frontend != "auto":
        return UsageError(f"--frontend {args.frontend} could not capture {name} ({listed}); pass --frontend auto "
                          "to try every frontend")
    return UsageError(f"no frontend could capture {name} ({listed}); fxeq needs a forward that torch.fx, "
                      "torch.export or a concrete trace can record (--verbose shows the traceback)")


# ---------------------------------------------------------------------------
# Checks, reports and outputs
# ---------------------------------------------------------------------------


def _checked_paths(args: argparse.Namespace, *inputs: Path) -> Path:
    """Refuse a bad or converted input, then an output that may not be written, before any work; return it."""
    sources = [args.checkpoint, *inputs]
    with bad_input():
        if not is_folder(args):
            checkpoints.check_file(args.checkpoint)
        outputs.check_not_converted(args.checkpoint)
        if is_folder(args):
            return outputs.check_output_folder(args.output, source=sources, force=args.force)
        return outputs.check_output(args.output, source=sources, force=args.force)


def _save(args: argparse.Namespace, output: Path, model: nn.Module, state: dict[str, torch.Tensor],
          report: dict[str, Any]) -> Path:
    """Write the equalized model and its report as the input was: a checkpoint file, or a save_pretrained folder."""
    model.to("cpu")
    with bad_input(OSError):  # another run took the name after the checks; a full disk
        if is_folder(args):
            processor = args.checkpoint / hf.PREPROCESSOR_CONFIG
            return outputs.save_converted_folder(functools.partial(hf.save_pretrained, model), output, report,
                                                 force=args.force, copy=[processor] if processor.is_file() else [])
        # Same keys and dtypes as the input: an fp16 checkpoint stays fp16.
        converted = {k: v.to(dtype=state[k].dtype) for k, v in model.state_dict().items()}
        return outputs.save_converted(converted, output, report, force=args.force)


def _check_plot(args: argparse.Namespace, *inputs_and_outputs: Path | None) -> None:
    """Refuse a --plot that cannot be written, or would land on or in an input or output, before any work."""
    plot = args.plot
    if plot is None:
        return
    if plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: the plot is written as PNG, so its path must end in .png; pass e.g. "
                         f"--plot {plot.with_suffix('.png')}")
    if plot.is_dir():
        raise UsageError(f"--plot {plot} is a folder; pass the path of a .png file to write")
    if not plot.parent.is_dir():
        raise UsageError(f"--plot {plot}: the folder {plot.parent} does not exist; create it first, or write into "
                         "an existing folder")
    where = plot.resolve()
    for given in filter(None, inputs_and_outputs):
        if where == given.resolve() or given.resolve() in where.parents:
            raise UsageError(f"--plot {plot} is {'inside ' if where != given.resolve() else ''}{given}, an input "
                             "or output of this command, which the plot would change; write it elsewhere")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}; or leave --plot out")


def _plot(args: argparse.Namespace, report: Report, title: str,
          folded: Mapping[tuple[str, int], float] | None = None) -> None:
    """Draw the report to --plot (checked by :func:`_check_plot`), placed whole: an existing file is replaced."""
    if getattr(args, "plot", None) is None:
        return
    with bad_input(ImportError, OSError, ValueError), staged(args.plot) as tmp:
        tmp.mkdir()  # the plot is drawn in a folder of its own, under its own name (the suffix picks the format)
        place(report.plot(tmp / args.plot.name, title=title, folded=folded), args.plot, replace=True)
    if getattr(args, "json", False):  # stdout holds the JSON alone
        note(f"wrote {args.plot}", quiet=args.quiet)
    else:
        print(f"wrote {args.plot}")


def _read_report(file: Path) -> Report:
    """The report that ``fxeq apply`` replays, refusing what is not a conversion's."""
    try:
        report = Report.read(file)
    except FileNotFoundError as e:
        raise UsageError(
            f"--report {file} does not exist; pass the report fxeq convert wrote: OUT.fxeq.json beside a converted "
            f"checkpoint file, or the converted folder (its {FOLDER_REPORT})"
        ) from e
    except ValueError as e:
        raise UsageError(f"--report {e}") from e  # the message begins with the file
    if not report.folded:
        raise UsageError(
            f"--report {file} records a measurement (\"folded\": false, as fxeq inspect --json prints), not a "
            "conversion; pass the report fxeq convert wrote, or run fxeq convert"
        )
    return report


def _check_report_source(args: argparse.Namespace, recorded: Report) -> str:
    """Refuse, without --force, a checkpoint other than the one the report was made from; return its SHA-256."""
    digest = outputs.digest(args.checkpoint)
    source = recorded.extra.get("checkpoint")
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
        raise UsageError(f"{problem}. Apply the report to its own checkpoint, or pass --force to apply it anyway "
                         "(e.g. to the same weights saved in another format)")
    note(f"warning: {problem}; applying it anyway (--force)")
    return digest


def _provenance(args: argparse.Namespace, loaded: Loaded, report: Report, backend: str | None) -> dict[str, Any]:
    """What the JSON report records about the run, so that it can be repeated and checked.

    The output's path and SHA-256 are added by :mod:`fxeq.cli.outputs` as it writes.
    """
    shard = cast(BatchShard, loaded.loader.batch_sampler)
    record: dict[str, Any] = {"command": ["fxeq", *args.argv]}
    if args.checkpoint is not None:
        record["checkpoint"] = {"path": str(args.checkpoint.resolve()),
                                "sha256": outputs.digest(args.checkpoint)}
    record["model"] = model_record(args, loaded.model)
    record["calibration_data"] = {
        "folder": str(args.calib.resolve()), "images": shard.images, "batches": len(shard.batches),
        "batch_size": args.batch_size, "num_batches": args.num_batches, "device": str(loaded.device),
        "processes": shard.world_size,
        "process_group": backend,  # what merged the statistics across processes (None: no torchrun)
    }
    record["preprocessing"] = loaded.preprocessing
    return record


def _versions(spec: str) -> dict[str, str]:
    """fxeq's and its dependencies' versions, and that of the package --model names (e.g. transformers)."""
    found = versions()
    package = spec.partition(":")[0].split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", None)
    if isinstance(version, str):
        found[package] = version
    return found


def _fusing_convs(report: Report) -> list[str]:
    """The fusing convs of a report, sorted."""
    return sorted({c.module or "<root>" for s in report.search.sites for c in s.convs})


def _check_demo_workdir(path: Path) -> None:
    """Refuse a --workdir that the demo did not make, and that is no empty folder: its files are not the demo's."""
    if path.exists() and not (path / _DEMO_MARKER).is_file() and not (path.is_dir() and not any(path.iterdir())):
        raise UsageError(
            f"--workdir {path} exists and was not made by fxeq demo (it has no {_DEMO_MARKER} file); pass "
            "--workdir with a new or empty folder"
        )


def _note_if_converted(args: argparse.Namespace) -> tuple[bool, Report | None]:
    """Say that the checkpoint was equalized by fxeq, with its report's summary, if it was (even with --quiet);
    return whether, and its report where it could be read."""
    path = args.checkpoint
    report_file = converted_report(path)
    if report_file is None:
        return False, None
    report: Report | None = None
    try:
        report = Report.read(report_file)
        trainer = report.extra.get("trainer")
        if isinstance(trainer, dict):  # a training callback's report, in a checkpoint folder it saved
            lines = [f"  equalized during training by fxeq's {trainer.get('framework', 'training')} callback at "
                     f"step {trainer.get('global_step', '?')}"]
        else:
            source = report.extra.get("checkpoint", {}).get("path", "(not recorded)")
            lines = [f"  converted from {source}"]
        for site in report.search.sites:
            ratio = report.disequilibrium(site)
            lines.append(f"  site {site.name} -> {', '.join(c.module for c in site.convs)}; std max/min "
                         f"{'-' if ratio is None else f'{ratio:.2f}'} divided out")
    except (OSError, ValueError, AttributeError) as e:  # a report that is not fxeq's, or edited
        lines = [f"  (the report could not be read: {type(e).__name__}: {e})"]
        report = None
    where = "in" if Path(path).is_dir() else "beside"
    note(
        f"{path} is a checkpoint equalized by fxeq ({report_file} lies {where} it). Its fusing convs were "
        "rescaled; the fusion inputs measured below are not, so their std ratios are the same as before (each "
        "site is measured on the model as it is: every upstream fold is already in its weights). The "
        "conversion, from the report:\n" + "\n".join(lines),
    )  # shown with --quiet too: it says what the measurement means
    return True, report
