"""The Python steps of ``gpu.sh``: the torchrun step's inputs and record, and the run's summary.

``gpu.sh`` runs the benchmarks, each under its own time limit, and calls this
module between them:

* ``prepare-torchrun WORK``: a random smp UPerNet checkpoint and generated
  images in ``WORK``, for ``torchrun ... fxeq convert``;
* ``torchrun-record WORK OUT TAG EXIT SECONDS``: ``OUT/torchrun-TAG.json`` and
  ``.md`` from the convert's exit status, time, log and JSON report, with the
  process-group backend that the report records or, for NCCL, the log shows
  (``NCCL_DEBUG=INFO`` and ``TORCH_CPP_LOG_LEVEL=INFO`` make NCCL and torch
  say so);
* ``summary OUT TAG STEPS``: the key figures of every result file of the run
  (latency ratios per precision, calibration pass ratios, the torchrun
  convert, the training-quality table), with each step's exit status and
  time from the ``STEPS`` file; printed and written to ``OUT/gpu-TAG.md``.

A result file that is missing or partial (a step stopped by its time limit)
is said to be so; nothing here fails because a step did.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import markdown_table

__all__ = ["main", "prepare_torchrun", "summary", "torchrun_record"]

TORCHRUN_MODEL = {"encoder_name": "resnet18", "encoder_weights": None, "classes": 3}
"""The smp UPerNet that the torchrun step converts."""

_NCCL = re.compile(r"ProcessGroupNCCL|NCCL INFO")
"""What the log shows when NCCL started: ``NCCL_DEBUG=INFO`` lines, and torch's at ``TORCH_CPP_LOG_LEVEL=INFO``.
gloo says nothing there, so a CPU run's group is known only where the report records it."""


def prepare_torchrun(work: Path, *, images: int, size: int) -> None:
    """A random smp UPerNet state_dict (``upernet.pt``) and ``images`` generated PNGs (``images/``) in ``work``."""
    import segmentation_models_pytorch as smp  # noqa: PLC0415 - only this step needs it
    import torch  # noqa: PLC0415

    from fxeq.cli.images import generate_images  # noqa: PLC0415

    torch.manual_seed(0)
    torch.save(smp.UPerNet(**TORCHRUN_MODEL).state_dict(), work / "upernet.pt")
    generate_images(work / "images", images, size=size)


def torchrun_record(work: Path, out: Path, tag: str, exit_code: int, seconds: float) -> dict[str, Any]:
    """Write ``torchrun-<tag>.json`` and ``.md``: how the convert under torchrun went, from its log and report."""
    log = (work / "torchrun.log").read_text(errors="replace") if (work / "torchrun.log").exists() else ""
    report_file = work / "upernet.fxeq.safetensors.fxeq.json"
    record: dict[str, Any] = {"exit": exit_code, "seconds": seconds,
                              "process_group": "nccl (seen in the log)" if _NCCL.search(log) else None,
                              "model": f"smp.UPerNet(**{TORCHRUN_MODEL})", "log_tail": log.splitlines()[-15:]}
    if report_file.exists():
        report = json.loads(report_file.read_text())
        data = report["calibration_data"]
        recorded = data.get("process_group")  # the backend the command line ran with
        if recorded:
            record["process_group"] = f"{recorded} (recorded in the report)"
        record.update(processes=data["processes"], device=data["device"], images=data["images"],
                      fusing_convs=sorted(c["module"] for s in report["sites"] for c in s["convs"]),
                      calibration=report["calibration"], versions=report["versions"], command=report["command"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"torchrun-{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"torchrun-{tag}.md").write_text("# fxeq: convert under torchrun --nproc_per_node=1\n\n"
                                            + _torchrun_text(record) + "\n")
    return record


def _torchrun_text(record: dict[str, Any]) -> str:
    group = record.get("process_group") or "no NCCL in the log, none recorded in the report"
    text = f"exit {record['exit']} after {record['seconds']:.0f} s; process group: {group}"
    if "processes" in record:
        calibration = record["calibration"]
        text += (f"; {record['processes']} process(es) on {record['device']}, {record['images']} images; fusing "
                 f"convs {', '.join(record['fusing_convs'])}; calibration {calibration['passes']} passes in "
                 f"{calibration['seconds']:.2f} s")
    else:
        text += "; no report was written"
    return text


# ---------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------


def _load(out: Path, name: str) -> tuple[dict[str, Any] | None, str]:
    """A result file's record and a note: missing, partial or nothing to say."""
    path = out / f"{name}.json"
    if not path.exists():
        return None, f"{path.name}: missing (the step failed or did not run)"
    record = json.loads(path.read_text())
    partial = record.get("complete") is False
    return record, f"{path.name}: partial, the step was stopped" if partial else ""


def _latency(record: dict[str, Any]) -> str:
    rows = []
    for r in record["results"]:
        for t in r["timings"]:
            q = t["ratio"]
            rows.append([r["model"], t["mode"], t["dtype"], f"{t['median_ms']['original']:.1f}",
                         *(f"{q[k]:.3f}x" for k in ("fxeq", "explicit", "batchnorm")),
                         "yes" if r["graph_identical"] else "**no**"])
    return ("latency: median ms of the original, and each variant's ratio to it\n\n"
            + markdown_table(["model", "mode", "dtype", "original ms", "fxeq", "explicit", "BN after upsample",
                              "same graph"], rows))


def _calibration(record: dict[str, Any]) -> str:
    rows = []
    for r in record["results"]:
        q, m = r["ratio"], r["memory_ratio"]
        call = "-" if r.get("call_meets_target") is None else (
            f"{q['total_vs_batch_stats']:.3f}x ({'meets' if r['call_meets_target'] else 'misses'})")
        memory = m["passes_vs_batch_stats"]
        rows.append([r["model"], r["passes"], f"{q['slowest_pass_vs_batch_stats']:.3f}x "
                     f"({'meets' if r['time_meets_target'] else 'misses'})", call,
                     f"{q['total_vs_batch_stats']:.3f}x", "n/a" if memory is None else f"{memory:.3f}x"])
    target = record.get("targets", {}).get("time_per_pass", 1.05)
    return (f"calibration: against the batch-statistics forward (target {target:g}x per pass, and for the whole "
            "call of a single-pass model)\n\n"
            + markdown_table(["model", "passes", "slowest pass", "whole call, single pass", "all passes",
                              "peak memory, passes"], rows))


def _train_quality(record: dict[str, Any]) -> str:
    modes = [m for m in record["settings"]["modes"] if m != "none"]
    groups: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for e in record["summary"]:
        groups.setdefault((e["protocol"], f"{e['arch']}/{e['encoder']}", e["optimizer"]), {})[e["mode"]] = e

    def diff(e: dict[str, Any] | None) -> str:
        if e is None or e.get("diff_vs_none_mean") is None:
            return "-"
        std = e.get("diff_vs_none_std")
        return f"{e['diff_vs_none_mean']:+.2f}" + (f" ± {std:.2f}" if std is not None else "")

    rows = [[protocol, model, optimizer,
             f"{by_mode['none']['miou_mean']:.2f}" if "none" in by_mode else "-",
             *(diff(by_mode.get(m)) for m in modes)] for (protocol, model, optimizer), by_mode in groups.items()]
    budget = record.get("budget") or {}
    runs = f"{budget.get('runs', len(record['runs']))} of {budget.get('planned', '?')} runs"
    if budget.get("stopped"):
        runs += ", the rest stopped by --budget-s"
    seeds = ",".join(map(str, record["settings"]["seeds"]))
    return (f"train quality: paired difference to `none` in mIoU points, mean ± std over seeds {seeds} ({runs})\n\n"
            + markdown_table(["protocol", "model", "optimizer", "none (mIoU)", *modes], rows))


def _steps(path: Path | None) -> list[str]:
    if path is None or not path.exists():
        return []
    return [f"  {line}" for line in path.read_text().splitlines() if line.strip()]


_RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "latency": _latency,
    "calibration_cost": _calibration,
    "torchrun": lambda record: "torchrun --nproc_per_node=1 fxeq convert: " + _torchrun_text(record),
    "train_quality": _train_quality,
}
"""The result files of a gpu.sh run, in the order of its steps, and how each is summarized."""


def summary(out: Path, tag: str, steps: Path | None = None) -> str:
    """The key figures of a run's result files, as text; also written to ``OUT/gpu-<tag>.md``."""
    parts: list[str] = []
    notes: list[str] = []
    device: dict[str, Any] | None = None
    for name, render in _RENDER.items():
        record, note = _load(out, f"{name}-{tag}")
        if note:
            notes.append(note)
        if record is not None:
            device = device or record.get("environment", {}).get("device")
            parts.append(render(record))
    where = "unknown device" if device is None else device["gpu"] or f"{device['cpu']} (no GPU)"
    lines = [f"# gpu.sh summary: {where}", "", "steps (exit status and seconds):", *_steps(steps), ""]
    lines += [*(f"- {n}" for n in notes), ""] if notes else []
    text = "\n".join(lines) + "\n" + "\n\n".join(parts) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{tag}.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """The command line that gpu.sh calls; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare-torchrun", help="checkpoint and images for the torchrun step")
    prepare.add_argument("work", type=Path)
    prepare.add_argument("--images", type=int, default=16)
    prepare.add_argument("--size", type=int, default=256)
    record = commands.add_parser("torchrun-record", help="record how the torchrun step went")
    record.add_argument("work", type=Path)
    record.add_argument("out", type=Path)
    record.add_argument("tag")
    record.add_argument("exit", type=int)
    record.add_argument("seconds", type=float)
    summarize = commands.add_parser("summary", help="print and write the key figures of a run")
    summarize.add_argument("out", type=Path)
    summarize.add_argument("tag")
    summarize.add_argument("steps", type=Path, nargs="?", default=None)
    args = p.parse_args(argv)
    if args.command == "prepare-torchrun":
        prepare_torchrun(args.work, images=args.images, size=args.size)
    elif args.command == "torchrun-record":
        print(_torchrun_text(torchrun_record(args.work, args.out, args.tag, args.exit, args.seconds)))
    else:
        print(summary(args.out, args.tag, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
