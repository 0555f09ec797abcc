"""Report: what fxeq found, measured and wrote; its one schema, its files, and its picture.

Every site appears with its fusing convs (parameter names, groups, kind,
weight shape, what the rewrite wrote), each input's channel slice,
producer, upsample mode and factor, and (after calibration) mean, std and
samples seen, plus the caveats that apply. Every channel concatenation that
was not a site appears with the reason.

This module owns the schema: :meth:`Report.to_dict` writes it and
:meth:`Report.from_dict` reads it back (replay, the command line's
``apply`` and ``inspect`` read reports only through it). It also owns the
names of report files, which are how a checkpoint says "fxeq converted
me" (:func:`report_path`, :data:`FOLDER_REPORT`, :func:`converted_report`),
and their atomic writing (:func:`write_report`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from ._text import factor, plural
from ._version import versions
from .files import write_json
from .fold import folds_mean
from .modes import STRATEGIES, Mode, check_mode
from .observe import InputStats
from .sites import FusingConv, Site, SiteInput, SiteSearch, Skipped

__all__ = [
    "FOLDER_REPORT", "CalibrationSummary", "Frontend", "Report", "converted_report", "report_path", "write_report",
]

Frontend = Literal["fx", "export", "concrete"]
"""The frontend that captured a graph (see :mod:`fxeq.capturing`)."""

FOLDER_REPORT = "fxeq.json"
"""The report's name inside a folder fxeq wrote or equalized (a ``save_pretrained`` or training folder)."""

_SUFFIX = ".fxeq.json"


class _Outdated(Exception):
    """A report entry in the schema of fxeq before 0.3 (named by the message)."""


# ---------------------------------------------------------------------------
# Report files: how a checkpoint says that fxeq converted it
# ---------------------------------------------------------------------------


def report_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the report of a converted checkpoint file goes: beside it, ``.fxeq.json`` appended.

    (A folder's report goes inside it, as :data:`FOLDER_REPORT`.)

    Example:
        >>> report_path("out/model.safetensors").name
        'model.safetensors.fxeq.json'
    """
    path = Path(checkpoint)
    return path.with_name(path.name + _SUFFIX)


def converted_report(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The report that marks a checkpoint as equalized by fxeq, or None.

    A file counts when its report lies beside it (``X`` and ``X.fxeq.json``);
    a folder when it holds :data:`FOLDER_REPORT`, or a report beside one of
    its files (``model.safetensors.fxeq.json``, as training callbacks before
    fxeq 0.3 wrote) or ``model.fxeq.json`` (likewise). Links are resolved
    first: a link to a converted checkpoint is a converted checkpoint.

    Example:
        >>> converted_report("model.pt") is None
        True
    """
    path = Path(checkpoint).resolve()
    if path.is_dir():
        found = [path / FOLDER_REPORT, *sorted(path.glob(f"*{_SUFFIX}"))]
        return next((p for p in found if p.is_file()), None)
    report = report_path(path)
    return report if report.exists() else None


def write_report(report: Report | Mapping[str, Any], path: str | os.PathLike[str], *, replace: bool = True) -> Path:
    """Write a report's JSON atomically (see :mod:`fxeq.files`); a folder gets :data:`FOLDER_REPORT` inside.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_report(Report(SiteSearch((), ()), "fx"), d).name
        'fxeq.json'
    """
    data = report.to_dict() if isinstance(report, Report) else dict(report)
    target = Path(path)
    return write_json(data, target / FOLDER_REPORT if target.is_dir() else target, replace=replace)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSummary:
    """How a calibration run went: passes over the data, batches, time.

    Attributes:
        passes: passes over the data (one per generation of chained sites).
        batches: batches run over all passes (and all ranks under torch.distributed).
        seconds: wall time of all passes.
        one_pass: whether the one-pass shortcut was used (downstream sites approximate).
        pass_seconds: wall time of each pass.
    """

    passes: int
    batches: int
    seconds: float
    one_pass: bool = False
    pass_seconds: tuple[float, ...] = ()

    @property
    def semantics(self) -> str:
        """How the statistics of chained sites were measured, in words."""
        if self.one_pass and self.passes:
            return "one pass: sites downstream of another site are approximate"
        return "one site at a time, each measured after the folds upstream of it"


@dataclass
class Report:
    """The outcome of fxeq on one model.

    Attributes:
        search: the sites and skipped concatenations.
        frontend: the frontend that found them: ``"fx"``, ``"export"`` or ``"concrete"``.
        stats: per (site, input index), the calibration statistics (empty
            before calibration).
        folded: whether the equalizer was put into the model.
        mode: how: ``"init"``, ``"reparam"`` or ``"explicit"``.
        keep_norm: whether ``keep_norm=True`` was asked for.
        notes: per fusing-conv weight name, remarks added by the rewrite.
        writes: per fusing-conv weight name, the tensors the rewrite wrote.
        norms_kept: the fusing-conv weights whose output-channel norms the
            rewrite restored (``keep_norm=True`` where a batch norm follows).
        calibration: how calibration went, or None before it.
        example: the shapes and dtypes of the batch the model was captured
            with (a probe of that shape lets :func:`fxeq.apply` check slices).
        versions: the versions recorded when the report was written (None:
            this process's, filled in by :meth:`to_dict`).
        extra: free-form fields added by callers (e.g. the CLI's command line).

    Example:
        >>> report = Report(SiteSearch((), ()), "fx")
        >>> print(report.table())
        fxeq: 0 sites, 0 concatenations skipped (frontend fx, not calibrated)
        >>> Report.from_dict(report.to_dict()).to_dict() == report.to_dict()
        True
    """

    search: SiteSearch
    frontend: Frontend
    stats: Mapping[tuple[str, int], InputStats] = field(default_factory=dict)
    folded: bool = False
    mode: Mode = "init"
    keep_norm: bool = False
    notes: dict[str, list[str]] = field(default_factory=dict)
    writes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    norms_kept: frozenset[str] = frozenset()
    calibration: CalibrationSummary | None = None
    example: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def calibration_summary(self) -> dict[str, Any] | None:
        """Passes, batches, time and semantics of the calibration, or None before it."""
        c = self.calibration
        if c is None:
            return None
        return {"passes": c.passes, "batches": c.batches, "seconds": round(c.seconds, 3),
                "pass_seconds": [round(s, 4) for s in c.pass_seconds], "one_pass": c.one_pass,
                "semantics": c.semantics}

    def disequilibrium(self, site: Site) -> float | None:
        """Largest over smallest input std at a site, or None before calibration."""
        stds = [self.stats[site.name, i.index].std for i in site.inputs if (site.name, i.index) in self.stats]
        return max(stds) / min(stds) if stds and min(stds) > 0 else None

    def conv_notes(self, conv: FusingConv) -> list[str]:
        """The caveats of the equalizer at one conv, as the rewrite left it."""
        notes: list[str] = []
        if self.folded:
            note = STRATEGIES[self.mode].note
            if note:
                notes.append(note)
            if self.mode != "explicit":
                if conv.bias is None:
                    notes.append("no bias: the mean was not folded (adding a bias would change state_dict keys)")
                elif not folds_mean(conv):
                    notes.append(f"a transposed conv with stride {conv.stride}: each output phase has its own "
                                 "kernel taps, so the mean has no single bias and was not folded")
                elif conv.padded:
                    notes.append("mean fold is exact away from zero-padded borders only")
                if conv.followed_by_norm and folds_mean(conv):
                    notes.append("a normalization follows: the mean fold has no effect in training")
        return notes + self.notes.get(conv.weight, [])

    # -----------------------------------------------------------------------
    # The schema
    # -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serializable dict; :meth:`from_dict` reads it back."""
        sites = []
        for site in self.search.sites:
            inputs = []
            for inp in site.inputs:
                entry: dict[str, Any] = {
                    "index": inp.index, "node": inp.node, "channels": list(inp.channels),
                    "producer": inp.producer, "upsample": inp.upsample,
                    "scale": list(inp.scale) if inp.scale else None, "padded": inp.padded,
                }
                stat = self.stats.get((site.name, inp.index))
                if stat is not None:
                    entry.update(mean=stat.mean, std=stat.std, count=stat.count, samples=stat.samples)
                inputs.append(entry)
            convs = []
            for c in site.convs:
                writes = list(self.writes.get(c.weight, ()))
                convs.append({
                    "node": c.node, "module": c.module, "weight": c.weight, "bias": c.bias, "groups": c.groups,
                    "dtype": c.dtype, "shape": list(c.shape) if c.shape else None, "transposed": c.transposed,
                    "stride": list(c.stride), "padded": c.padded, "followed_by_norm": c.followed_by_norm,
                    "batch_norm": c.batch_norm, "writes": writes,
                    "folded_scale": "weight" in writes, "folded_mean": "bias" in writes,
                    "keep_norm": c.weight in self.norms_kept,
                    "notes": self.conv_notes(c), "rewrite_notes": list(self.notes.get(c.weight, ())),
                })
            sites.append({
                "name": site.name, "convs": convs, "inputs": inputs, "depends_on": list(site.depends_on),
                "disequilibrium": self.disequilibrium(site), "notes": list(site.notes),
            })
        return {
            "frontend": self.frontend, "folded": self.folded, "mode": self.mode, "keep_norm": self.keep_norm,
            "calibration": self.calibration_summary(), "example": self.example, "sites": sites,
            "skipped": [{"node": s.node, "reason": s.reason, "fix": s.fix} for s in self.search.skipped],
            "versions": self.versions or versions(), **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Read a report written by :meth:`to_dict` (a ``.fxeq.json`` file's contents).

        Fields this version does not know go to :attr:`extra`; fields that
        older versions did not write take their defaults.

        Raises:
            ValueError: ``data`` is not an fxeq report, or a field is missing or malformed (named).

        Example:
            >>> Report.from_dict({"sites": "many"})
            Traceback (most recent call last):
            ...
            ValueError: not an fxeq report: expected a JSON object with a 'sites' list (as Report.to_dict(), \
`fxeq convert` and the training callbacks write), found 'sites' of type str
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("sites"), list):
            found = type(data).__name__ if not isinstance(data, Mapping) else \
                f"'sites' of type {type(data.get('sites')).__name__}" if "sites" in data else "no 'sites'"
            raise ValueError(
                "not an fxeq report: expected a JSON object with a 'sites' list (as Report.to_dict(), `fxeq "
                f"convert` and the training callbacks write), found {found}"
            )
        where = "the report"
        try:
            sites, stats, notes, writes, kept = [], {}, {}, {}, set()
            for k, entry in enumerate(data["sites"]):
                where = f"site {entry.get('name', k)!r}"
                inputs = []
                for inp in entry["inputs"]:
                    index = int(inp["index"])
                    inputs.append(SiteInput(
                        index, str(inp.get("node", "")), (int(inp["channels"][0]), int(inp["channels"][1])),
                        str(inp.get("producer", "")), inp.get("upsample"),
                        tuple(float(s) for s in inp["scale"]) if inp.get("scale") else None,
                        bool(inp.get("padded", False)),
                    ))
                    if inp.get("mean") is not None and inp.get("std") is not None:
                        stats[str(entry["name"]), index] = InputStats(
                            float(inp["mean"]), float(inp["std"]), int(inp.get("count", 0)),
                            int(inp.get("samples", 0)))
                convs = []
                for c in entry["convs"]:
                    weight = str(c["weight"])
                    if "writes" not in c:
                        raise _Outdated(f"conv {weight}")
                    module = str(c["module"])
                    if weight != f"{module}.weight".lstrip("."):
                        raise ValueError(f"conv module {module!r} does not own weight {weight!r}")
                    convs.append(FusingConv(
                        str(c.get("node", "")), module, weight, c.get("bias"),
                        int(c.get("groups", 1)), bool(c.get("padded", False)), bool(c.get("followed_by_norm", False)),
                        c.get("batch_norm"), str(c.get("dtype") or "").removeprefix("torch.") or None,
                        bool(c.get("transposed", False)), tuple(int(s) for s in c.get("stride") or (1,)),
                        tuple(int(s) for s in c["shape"]) if c.get("shape") else None,
                    ))
                    writes[weight] = tuple(str(w) for w in c["writes"])
                    if c.get("rewrite_notes"):
                        notes[weight] = [str(n) for n in c["rewrite_notes"]]
                    if c.get("keep_norm"):
                        kept.add(weight)
                sites.append(Site(str(entry["name"]), tuple(inputs), tuple(convs),
                                  tuple(str(d) for d in entry.get("depends_on", ())),
                                  tuple(str(n) for n in entry.get("notes", ()))))
            where = "the skipped concatenations"
            skipped = tuple(Skipped(str(s["node"]), str(s["reason"]), str(s.get("fix", "")))
                            for s in data.get("skipped", ()))
            where = "the calibration summary"
            summary = data.get("calibration")
            calibration = None if not summary else CalibrationSummary(
                int(summary["passes"]), int(summary["batches"]), float(summary["seconds"]),
                bool(summary.get("one_pass", False)), tuple(float(s) for s in summary.get("pass_seconds", ())))
        except _Outdated as e:
            version = (data.get("versions") or {}).get("fxeq", "before 0.3")
            raise ValueError(
                f"the report was written by fxeq {version}, which did not record which tensors of each conv it "
                f"wrote ({e} has no 'writes') nor whether it restored weight norms, so it cannot be applied or "
                "read exactly; convert the original checkpoint again with this version."
            ) from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(
                f"the report's entry for {where} is incomplete or malformed ({type(e).__name__}: {e}); expected the "
                "fields that Report.to_dict() writes (sites with name, inputs with index and channels, convs with "
                "weight). Write the report again with fxeq.transform or `fxeq convert`."
            ) from e
        mode = data.get("mode", "init")
        try:
            check_mode(mode)
        except ValueError as e:
            raise ValueError(f"the report's mode is {mode!r}: {e}") from e
        frontend = data.get("frontend", "fx")
        known = {"frontend", "folded", "mode", "keep_norm", "calibration", "example", "sites", "skipped", "versions"}
        return cls(
            SiteSearch(tuple(sites), skipped), cast(Frontend, frontend), stats, folded=bool(data.get("folded")),
            mode=cast(Mode, mode), keep_norm=bool(data.get("keep_norm", False)), notes=notes, writes=writes,
            norms_kept=frozenset(kept), calibration=calibration, example=data.get("example"), versions=data.get("versions"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json(self, **kwargs: Any) -> str:
        """The report as JSON text (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    @classmethod
    def from_json(cls, text: str) -> Report:
        """Read :meth:`to_json`'s text.

        Raises:
            ValueError: the text is not JSON, or not a report.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the report text is not valid JSON ({e}); expected Report.to_json()'s output") from e
        return cls.from_dict(data)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report file (``*.fxeq.json``), or the report in a folder (:data:`FOLDER_REPORT`).

        Raises:
            FileNotFoundError: there is no such file.
            ValueError: it is not an fxeq report (named).
        """
        file = Path(path)
        file = file / FOLDER_REPORT if file.is_dir() else file
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ValueError(f"{file} is not a readable report ({type(e).__name__}: {why})") from e
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e

    # -----------------------------------------------------------------------
    # Text and picture
    # -----------------------------------------------------------------------

    def table(self) -> str:
        """The report as a plain-text table."""
        state = f"mode {self.mode}" if self.folded else ("calibrated" if self.stats else "not calibrated")
        lines = [
            f"fxeq: {plural(len(self.search.sites), 'site')}, "
            f"{plural(len(self.search.skipped), 'concatenation')} skipped "
            f"(frontend {self.frontend}, {state})"
        ]
        c = self.calibration
        if c is not None:
            lines.append(f"calibration: {c.semantics}; {plural(c.passes, 'pass', 'passes')}, "
                         f"{plural(c.batches, 'batch', 'batches')}, {c.seconds:.2f} s")
        for site in self.search.sites:
            convs = ", ".join(c.module for c in site.convs)
            ratio = self.disequilibrium(site)
            ratio_text = f"; std max/min {ratio:.2f}" if ratio is not None else ""
            lines.append(f"site {site.name} -> {convs}{ratio_text}")
            lines.append(
                f"  {'in':>3} {'channels':>11}  {'upsample':<16} {'mean':>10} {'std':>10} {'samples':>7}  producer"
            )
            for inp in site.inputs:
                stat = self.stats.get((site.name, inp.index))
                up = f"{inp.upsample} x{factor(inp.scale)}" if inp.upsample else "-"
                mean, std, samples = (
                    (f"{stat.mean:.4g}", f"{stat.std:.4g}", str(stat.samples)) if stat else ("-", "-", "-")
                )
                lines.append(
                    f"  {inp.index:>3} {f'{inp.channels[0]}:{inp.channels[1]}':>11}  {up:<16} "
                    f"{mean:>10} {std:>10} {samples:>7}  {inp.producer}"
                )
            for conv in site.convs:
                for note in self.conv_notes(conv):
                    lines.append(f"  note ({conv.module}): {note}")
            for note in site.notes:
                lines.append(f"  note: {note}")
            if site.depends_on:
                lines.append(f"  calibrated after: {', '.join(site.depends_on)}")
        for skipped in self.search.skipped:
            lines.append(f"skipped {skipped.node}: {skipped.text}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None,
             folded: Mapping[tuple[str, int], float] | None = None) -> Path:
        """Draw each site's input stds before fxeq and after it as a PNG; see :func:`fxeq.plot.plot_report`.

        Needs matplotlib (fxeq's ``plot`` extra).
        """
        from .plot import plot_report  # noqa: PLC0415 - matplotlib is optional

        return plot_report(self, path, title=title, folded=folded)

    def __str__(self) -> str:
        return self.table()
