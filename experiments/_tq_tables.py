"""train_quality tables: the markdown report of a run.

Settings, per protocol the mIoU and the paired difference to ``none``, the
configs where equalization did not help, the step-0 gradient RMS per input
slice (with the sigma each slice was divided by) and the ``fxeq.finalize``
check. Every figure comes from the run's records.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from _common import markdown_table
from _tq_experiment import DEFAULT_LR, WEIGHT_DECAY

__all__ = ["markdown_sections"]


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def _config_tables(summary: Sequence[dict[str, Any]], modes: Sequence[str]) -> list[str]:
    sections = []
    for protocol in dict.fromkeys(e["protocol"] for e in summary):
        rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for e in summary:
            if e["protocol"] == protocol:
                rows.setdefault((f"{e['arch']}/{e['encoder']}", e["optimizer"]), {})[e["mode"]] = e
        miou_rows = [[model, opt, *(_pm(m[k]["miou_mean"], m[k]["miou_std"]) if k in m else "-" for k in modes)]
                     for (model, opt), m in rows.items()]
        others = [k for k in modes if k != "none"]
        diff_rows = [[model, opt, *(_pm(m[k].get("diff_vs_none_mean"), m[k].get("diff_vs_none_std"), signed=True)
                                    if k in m else "-" for k in others)]
                     for (model, opt), m in rows.items()]
        sections.append(f"## {protocol}: mIoU (%) on the held-out set, mean ± std over seeds\n\n"
                        + markdown_table(["model", "optimizer", *modes], miou_rows))
        if "none" in modes and others:
            sections.append(f"## {protocol}: paired difference to `none` (mIoU points), mean ± std over seeds\n\n"
                            + markdown_table(["model", "optimizer", *others], diff_rows))
    return sections


def _not_helped(summary: Sequence[dict[str, Any]]) -> str:
    compared = [e for e in summary if e.get("diff_vs_none_mean") is not None]
    if not compared:
        return "No equalized config has a `none` run of the same seed to compare with."
    worse = [e for e in compared if e["diff_vs_none_mean"] <= 0]
    if not worse:
        return "Every equalized config scored above `none` on average over its seeds."
    lines = [f"- {e['protocol']} {e['arch']}/{e['encoder']} {e['optimizer']} {e['mode']}: "
             f"{_pm(e['diff_vs_none_mean'], e['diff_vs_none_std'], signed=True)}" for e in worse]
    return "Configs whose mean paired difference to `none` is zero or negative:\n\n" + "\n".join(lines)


def _grad_tables(runs: Sequence[dict[str, Any]], modes: Sequence[str]) -> str:
    groups: dict[tuple[str, str, str], dict[str, list[list[float]]]] = {}
    sigmas: dict[tuple[str, str, str], list[list[float]]] = {}
    for run in runs:
        for conv, rms in run["grad_rms_step0"].items():
            key = (run["protocol"], f"{run['arch']}/{run['encoder']}", conv)
            groups.setdefault(key, {}).setdefault(run["mode"], []).append(rms)
            if conv in run.get("sigma", {}):
                sigmas.setdefault(key, []).append(run["sigma"][conv])
    parts = [("## Step-0 gradient RMS per input slice of each fusing conv\n\n"
              "Mean over seeds (and optimizers: the step-0 gradient does not depend on them). For `reparam` the "
              "gradient of `parametrizations.weight.original`, otherwise of the conv weight; one number per "
              "concatenation input, in input order. `sigma`: each input's calibration std, mean over the "
              "equalized runs; the `reparam` gradient is the `init` gradient divided by it.")]
    for (protocol, model, conv), by_mode in groups.items():
        rows = [[mode, " ".join(f"{statistics.fmean(col):.2g}" for col in zip(*by_mode[mode]))]
                for mode in modes if mode in by_mode]
        if (protocol, model, conv) in sigmas:
            rows.append(["sigma", " ".join(f"{statistics.fmean(col):.2g}"
                                           for col in zip(*sigmas[protocol, model, conv]))])
        parts.append(f"{protocol}, {model}, `{conv}`:\n\n" + markdown_table(["mode", "slice RMS"], rows))
    return "\n\n".join(parts)


def _finalize_table(summary: Sequence[dict[str, Any]]) -> str:
    rows = [[e["protocol"], f"{e['arch']}/{e['encoder']}", e["optimizer"], e["mode"],
             f"{e['finalize_max_abs_logit_diff']:.2e}", f"{100 * e['finalize_changed_predictions']:.3f}",
             f"{e['miou_before_finalize_mean']:.2f}", f"{e['miou_mean']:.2f}"]
            for e in summary if "finalize_max_abs_logit_diff" in e]
    if not rows:
        return ""
    return ("## fxeq.finalize: change of the evaluation output (eval mode)\n\n"
            "Largest logit change and share of changed predictions: worst seed; mIoU: mean over seeds. "
            "`explicit` pads the standardized input with zeros, the finalized conv the raw input, so a "
            "padded fusing conv differs at the borders; `reparam` involves no mean. The mIoU tables above "
            "are measured after finalize.\n\n"
            + markdown_table(["protocol", "model", "optimizer", "mode", "max abs logit diff",
                              "% predictions changed", "mIoU before", "mIoU after"], rows))


def _settings_text(args: argparse.Namespace, lr: Mapping[str, float], pretraining: Sequence[dict[str, Any]],
                   data: str) -> str:
    lines = [
        "## Settings",
        "",
        f"- data: {data}",
        f"- models: smp {', '.join(args.models)}, encoder_weights=None"
        + (f", {', '.join(f'{k}={v!r}' for k, v in args.model_kwargs.items())}" if args.model_kwargs else ""),
        (f"- {args.iters} iterations, batch {args.batch}, size {args.size}, cross-entropy, train-mode batch norm, "
         "poly learning-rate schedule (power 0.9)"),
        "- optimizers: " + ", ".join(f"{o} lr {lr[o]:g} weight decay {WEIGHT_DECAY[o]:g}"
                                     + (" momentum 0.9" if o == "sgd" else "") for o in args.optimizers),
        f"- fxeq calibration: the first {args.calib_batches} training batches of the run's seed",
        "- held-out set: " + (f"{args.eval_images} synthetic images (one fixed seed)" if args.images is None
                              else f"the last {args.val_fraction:g} of the files by name"),
    ]
    if "finetune" in args.protocols:
        if args.encoder_weights:
            lines.append(f"- finetune: encoder weights from `{args.encoder_weights}`")
        else:
            task_a = ", ".join(f"{p['arch']}/{p['encoder']} seed {p['seed']}: {p['task_a_miou']:.1f}"
                               for p in pretraining) or "none finished"
            lines.append(f"- finetune: encoder pretrained on synthetic task A for {args.pretrain_iters} iterations "
                         f"(AdamW lr {DEFAULT_LR['adamw']:g}), fresh decoder; task-A mIoU after pretraining: "
                         f"{task_a}")
    return "\n".join(lines)


def markdown_sections(args: argparse.Namespace, lr: Mapping[str, float], runs: Sequence[dict[str, Any]],
                      summary: Sequence[dict[str, Any]], pretraining: Sequence[dict[str, Any]],
                      data: str) -> list[str]:
    """The markdown report: settings, mIoU and paired-difference tables, gradients, finalize check."""
    sections = [_settings_text(args, lr, pretraining, data), *_config_tables(summary, args.modes)]
    if "none" in args.modes:
        sections.append("## Where equalization did not help\n\n" + _not_helped(summary))
    sections += [_grad_tables(runs, args.modes), _finalize_table(summary)]
    return [s for s in sections if s]
