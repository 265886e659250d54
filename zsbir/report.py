"""Paper tables from finished runs: `python -m zsbir.report <dir> [--wandb entity/project] [--format md|csv|latex]`.

Collects every finished run (a `metrics.json` anywhere under the folders given, and the
finished runs of a W&B project when asked), groups them by method, dataset and metric
protocol, and prints one row per method with, for each dataset, the metrics its papers
report: mean ± sample standard deviation over seeds, the number of seeds, and the
published number for the same method and metric beside ours (`published_results.yaml`,
with citations). `--layout` picks a paper's table (its datasets, columns and rows);
the default shows every dataset that has runs.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from zsbir.errors import ZsbirError
from zsbir.eval.retrieval import metric_label

log = logging.getLogger("zsbir.report")

PROTOCOL_NAMES = {
    "voc": "voc = VOC-interpolated AP, as SAKE, DSN and ZSE-SBIR compute it",
    "plain": "plain = non-interpolated AP (torchmetrics-style), as Sketch_LVM and PuXIM compute it",
}
DATASET_ORDER = ("sketchy", "sketchy_split2", "tuberlin", "quickdraw", "sketchy_fg")
FORMATS = ("md", "csv", "latex")


class ReportError(ZsbirError):
    """Nothing to report, or a source of runs cannot be read."""


def published_data() -> dict:
    text = resources.files("zsbir").joinpath("published_results.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)


# ---------------------------------------------------------------------------- collecting runs
@dataclass(frozen=True)
class RunResult:
    """One finished run: what identifies it and its unseen-class test metrics."""

    method: str
    dataset: str
    seed: int
    protocol: str
    per_class: bool
    metrics: dict
    metrics_order: tuple = ()
    source: str = ""
    finished_at: float = 0.0
    eval_protocol: str = "zs"  # the evaluation protocol (docs/metrics.md): zs, gzs, pbir


# Table titles and the first note of each evaluation protocol's table.
EVAL_PROTOCOLS = {
    "zs": ("", "unseen-class test metrics"),
    "gzs": (" — generalized ZS-SBIR (gzs)", "generalized ZS-SBIR metrics over all queries (seen + unseen classes)"),
    "pbir": (" — photo-based image retrieval (pbir)", "photo-to-photo retrieval metrics on the unseen classes"),
    "fg": (" — fine-grained ZS-SBIR (fg)", "instance-level acc@K on the unseen classes (the sketch's own photo)"),
}


def run_from_metrics_file(path: Path) -> RunResult:
    record = json.loads(path.read_text())
    return RunResult(
        method=str(record["method"]), dataset=str(record["dataset"]), seed=int(record["seed"]),
        protocol=str(record["protocol"]), per_class=bool(record.get("per_class", False)),
        metrics={k: v for k, v in record["test"].items() if isinstance(v, (int, float))},
        metrics_order=tuple(record.get("metrics_order") or ()), source=str(path.parent),
        finished_at=path.stat().st_mtime,
    )


def runs_from_metrics_file(path: Path) -> list[RunResult]:
    """The run's zs result, then one per other protocol it evaluated (`protocols` in metrics.json)."""
    from zsbir.eval.protocols import PROTOCOLS

    base = run_from_metrics_file(path)
    record = json.loads(path.read_text())
    runs = [base]
    for name in record.get("protocols") or []:
        if name != "zs" and name in PROTOCOLS and isinstance(record.get(PROTOCOLS[name].result_key), dict):
            metrics = {k: v for k, v in record[PROTOCOLS[name].result_key].items() if isinstance(v, (int, float))}
            runs.append(dataclasses.replace(base, metrics=metrics, eval_protocol=name))
    return runs


def collect_local(folder: Path) -> tuple[list[RunResult], list[str]]:
    """Finished runs under `folder` (recursively) and notes about folders that were skipped."""
    if not folder.exists():
        raise ReportError(f"{folder} does not exist: pass the output folder of your runs (e.g. outputs/)")
    runs, notes = [], []
    for path in sorted(folder.rglob("metrics.json")):
        try:
            runs += runs_from_metrics_file(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            notes.append(f"skipped {path}: not a zsbir metrics.json ({type(err).__name__}: {err})")
    for marker in sorted(folder.rglob("FAILED")):
        if not (marker.parent / "metrics.json").exists():
            first_line = marker.read_text().splitlines()[0] if marker.stat().st_size else ""
            notes.append(f"skipped failed run {marker.parent}: {first_line}")
    return runs, notes


def collect_wandb(project_path: str, api=None) -> list[RunResult]:
    """Finished runs of a W&B project (`entity/project`), read from their config and summary."""
    if api is None:
        import wandb

        try:
            api = wandb.Api(timeout=60)
        except Exception as err:  # noqa: BLE001 - no login, no network: say so plainly
            raise ReportError(f"cannot reach W&B to read {project_path} ({type(err).__name__}: {err}); "
                              "run `wandb login`, or report from local run folders only") from err
    try:
        wandb_runs = list(api.runs(project_path, filters={"state": "finished"}))
    except Exception as err:  # noqa: BLE001
        raise ReportError(f"cannot list the runs of W&B project {project_path!r} ({type(err).__name__}: {err}); "
                          "check the entity/project name and your login") from err
    runs = []
    for wandb_run in wandb_runs:
        config, summary = dict(wandb_run.config), dict(wandb_run.summary)
        metrics = {key.removeprefix("test/"): value for key, value in summary.items()
                   if key.startswith("test/") and isinstance(value, (int, float))}
        if not metrics or config.get("method") is None or config.get("dataset") is None:
            continue  # not a zsbir training run, or one that never reached its final evaluation
        runs.append(RunResult(
            method=str(config["method"]), dataset=str(config["dataset"]), seed=int(config.get("seed", 0)),
            protocol=str(config.get("protocol", "voc")), per_class=bool(config.get("per_class", False)),
            metrics=metrics, source=f"wandb:{project_path}/{wandb_run.id}",
            finished_at=float(summary.get("_timestamp") or 0.0),
        ))
    return runs


def deduplicate(runs: list[RunResult]) -> tuple[list[RunResult], list[str]]:
    """One result per (method, dataset, protocol, seed): the newest, so a re-run never counts twice."""
    newest: dict[tuple, RunResult] = {}
    notes = []
    for run in sorted(runs, key=lambda r: r.finished_at):
        key = (run.method, run.dataset, run.protocol, run.per_class, run.seed, run.eval_protocol)
        if key in newest:
            notes.append(f"{run.method}/{run.dataset} seed {run.seed}: using {run.source} (newest), "
                         f"not {newest[key].source}")
        newest[key] = run
    return list(newest.values()), notes


# ---------------------------------------------------------------------------- the table
@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    published: float | None = None
    published_source: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (n - 1); none for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Row:
    method: str
    label: str
    protocol: str
    per_class: bool
    cells: dict  # (dataset, metric) -> Cell


@dataclass
class Table:
    title: str
    columns: list  # [(dataset, [metrics])]
    rows: list[Row]
    sources: dict  # source key -> citation, for the sources cited in the table
    notes: list[str]
    dataset_labels: dict
    eval_protocol: str = "zs"

    def column_keys(self) -> list[tuple[str, str]]:
        return [(dataset, metric) for dataset, metrics in self.columns for metric in metrics]


def default_columns(runs: list[RunResult], data: dict, eval_protocol: str = "zs") -> list:
    datasets = sorted({r.dataset for r in runs},
                      key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d))
    columns = []
    for dataset in datasets:
        # a protocol with metrics of its own (fg: acc@K) shows them on every dataset
        metrics = (data.get("protocol_metrics") or {}).get(eval_protocol) or data["dataset_metrics"].get(dataset)
        if metrics is None:  # a benchmark without papers: the metrics its runs list, in their order
            order = next((r.metrics_order for r in runs if r.dataset == dataset and r.metrics_order), ())
            metrics = list(order) or sorted({m for r in runs if r.dataset == dataset for m in r.metrics
                                             if m.startswith(("map", "prec"))})
        columns.append((dataset, list(metrics)))
    return columns


def published_value(data: dict, method: str, dataset: str, metric: str, layout: str | None,
                    eval_protocol: str = "zs"):
    """(value, source key) of the published number for our `method`, or (None, None).

    In a paper's layout only that paper's table counts; otherwise the method's sources in
    their order of preference (its own paper first). A table holds the numbers of one
    evaluation protocol (its `protocol` key, default zs).
    """
    rows = data["methods"].get(method, {}).get("rows", {})
    for table_key, row_name in rows.items():
        if layout is not None and table_key != layout:
            continue
        table = data["tables"][table_key]
        if table.get("protocol", "zs") != eval_protocol:
            continue
        value = table["rows"].get(row_name, {}).get(dataset, {}).get(metric)
        if value is not None:
            return float(value), table["source"]
    return None, None


def protocol_note(protocols: set[tuple[str, bool]]) -> str:
    """Which metric protocol produced which rows (rows of any protocol but voc are marked)."""
    parts = []
    for protocol in sorted({p for p, _ in protocols}, key=lambda p: (p != "voc", p)):
        where = "unmarked rows" if protocol == "voc" else f"rows marked [{protocol}]"
        parts.append(f"{where}: {PROTOCOL_NAMES.get(protocol, protocol)}")
    if any(per_class for _, per_class in protocols):
        parts.append("'per class': AP averaged within each class first, then over classes (DSN)")
    return "metric protocol (docs/metrics.md): " + "; ".join(parts)


def build_table(runs: list[RunResult], layout: str | None = None, data: dict | None = None,
                eval_protocol: str = "zs") -> Table:
    data = data or published_data()
    if layout is not None and layout not in data["tables"]:
        raise ReportError(f"unknown layout {layout!r}: choose one of {['runs', *data['tables']]}")
    if layout is None:
        title, columns = "zsbir results" + EVAL_PROTOCOLS[eval_protocol][0], default_columns(runs, data, eval_protocol)
    else:
        table_spec = data["tables"][layout]
        title, columns = table_spec["title"], list(table_spec["columns"].items())
    shown = {dataset for dataset, _ in columns}

    groups: dict[tuple, dict] = {}
    for run in runs:
        if run.dataset in shown:
            groups.setdefault((run.method, run.protocol, run.per_class), {}).setdefault(run.dataset, []).append(run)
    if not groups:
        wanted = ", ".join(sorted(shown)) or "any dataset"
        raise ReportError(f"no finished runs for {wanted} (a finished run has a metrics.json)")
    protocols_per_method: dict[str, set] = {}
    for method, protocol, per_class in groups:
        protocols_per_method.setdefault(method, set()).add((protocol, per_class))

    known = list(data["methods"])  # rows in the data file's order (the papers' chronology), then others

    def row_order(group_key):
        method, protocol, per_class = group_key
        return (known.index(method) if method in known else len(known), method, protocol, per_class)

    rows, cited, notes = [], {}, []
    for (method, protocol, per_class) in sorted(groups, key=row_order):
        by_dataset = groups[(method, protocol, per_class)]
        method_info = data["methods"].get(method, {})
        label = method_info.get("label", method)
        if len(protocols_per_method[method]) > 1 or protocol != "voc" or per_class:
            label += f" [{protocol}{', per class' if per_class else ''}]"
        cells = {}
        for dataset, metrics in columns:
            for metric in metrics:
                values = [r.metrics[metric] for r in by_dataset.get(dataset, []) if metric in r.metrics]
                value, source = published_value(data, method, dataset, metric, layout, eval_protocol)
                if source:
                    cited[source] = data["sources"][source]
                cells[(dataset, metric)] = Cell([float(v) for v in values if not math.isnan(v)], value, source)
        rows.append(Row(method, label, protocol, per_class, cells))
        if method_info.get("note"):
            notes.append(f"{label}: {method_info['note']}")
    notes[:0] = [f"ours: {EVAL_PROTOCOLS[eval_protocol][1]}, mean ± sample std over seeds (n = number of seeds)",
                 protocol_note({(p, c) for _, p, c in groups})]
    return Table(title, columns, rows, cited, notes, data["dataset_labels"], eval_protocol)


# ---------------------------------------------------------------------------- formats
def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ours(cell: Cell, digits: int, pm: str = " ± ") -> str:
    if not cell.n:
        return "–"
    spread = f"{pm}{cell.std:.{digits}f}" if cell.std is not None else ""
    return f"{cell.mean:.{digits}f}{spread} (n={cell.n})"


def _source_numbers(table: Table) -> dict:
    return {key: i + 1 for i, key in enumerate(table.sources)}


def _published(cell: Cell, digits: int, numbers: dict) -> str:
    if cell.published is None:
        return "–"
    return f"{cell.published:.{digits}f} [{numbers[cell.published_source]}]"


def _footer(table: Table) -> list[str]:
    numbers = _source_numbers(table)
    lines = [f"[{numbers[key]}] {src['citation']}" + (f" ({src['note']})" if src.get("note") else "")
             for key, src in table.sources.items()]
    return [*table.notes, *lines]


def format_markdown(table: Table, digits: int = 3) -> str:
    numbers = _source_numbers(table)
    header = ["method"]
    for dataset, metric in table.column_keys():
        name = f"{table.dataset_labels.get(dataset, dataset)} {metric_label(metric)}"
        header += [name, "paper"]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = [row.label]
        for key in table.column_keys():
            cells += [_ours(row.cells[key], digits), _published(row.cells[key], digits, numbers)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {line}" for line in _footer(table)]
    return "\n".join(lines)


def format_csv(table: Table, digits: int = 6) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["method", "protocol", "per_class"]
    for dataset, metric in table.column_keys():
        header += [f"{dataset}/{metric}/{part}" for part in ("mean", "std", "n", "paper")]
    writer.writerow([*header, "paper_sources", "eval_protocol"])
    for row in table.rows:
        values = [row.method, row.protocol, row.per_class]
        used = []
        for key in table.column_keys():
            cell = row.cells[key]
            values += ["" if cell.mean is None else round(cell.mean, digits),
                       "" if cell.std is None else round(cell.std, digits), cell.n,
                       "" if cell.published is None else cell.published]
            citation = table.sources.get(cell.published_source, {}).get("citation")
            if citation and citation not in used:
                used.append(citation)
        writer.writerow([*values, " | ".join(used), table.eval_protocol])
    return out.getvalue()


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text


def format_latex(table: Table, digits: int = 3) -> str:
    numbers = _source_numbers(table)
    spec = "l" + "".join("|" + "cc" * len(metrics) for _, metrics in table.columns)
    groups = " & ".join(rf"\multicolumn{{{2 * len(metrics)}}}{{c}}{{{_latex_escape(table.dataset_labels.get(d, d))}}}"
                        for d, metrics in table.columns)
    metric_header = " & ".join(f"{_latex_escape(metric_label(m))} & paper" for _, m in table.column_keys())
    lines = [f"% {table.title}: generated by python -m zsbir.report (needs \\usepackage{{booktabs}})",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", f" & {groups} \\\\", f"method & {metric_header} \\\\",
             r"\midrule"]
    for row in table.rows:
        cells = [_latex_escape(row.label)]
        for key in table.column_keys():
            cell = row.cells[key]
            if cell.n:
                spread = rf" \pm {cell.std:.{digits}f}" if cell.std is not None else ""
                cells.append(rf"${cell.mean:.{digits}f}{spread}$ \scriptsize{{({cell.n})}}")
            else:
                cells.append("--")
            cells.append("--" if cell.published is None
                         else rf"{cell.published:.{digits}f}\textsuperscript{{{numbers[cell.published_source]}}}")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {_latex_escape(line)}" for line in _footer(table)]
    return "\n".join(lines)


FORMATTERS = {"md": format_markdown, "csv": format_csv, "latex": format_latex}


# ---------------------------------------------------------------------------- entry point
def make_report(folders: list[Path], wandb_project: str | None = None, fmt: str = "md",
                layout: str | None = None, api=None) -> tuple[str, list[str]]:
    """The formatted table and notes about what was skipped or replaced."""
    runs, notes = [], []
    for folder in folders:
        found, skipped = collect_local(folder)
        runs += found
        notes += skipped
    if wandb_project:
        runs += collect_wandb(wandb_project, api=api)
    if not runs:
        where = ", ".join(str(f) for f in folders) + (f", W&B {wandb_project}" if wandb_project else "")
        listing = f" (skipped: {'; '.join(notes)})" if notes else ""
        raise ReportError(f"no finished runs (metrics.json) found in {where}{listing}")
    runs, replaced = deduplicate(runs)
    # One table per evaluation protocol; a paper's layout is a zs table, so other protocols
    # get the default columns.
    texts = []
    for eval_protocol in [p for p in EVAL_PROTOCOLS if any(r.eval_protocol == p for r in runs)]:
        chosen = [r for r in runs if r.eval_protocol == eval_protocol]
        table = build_table(chosen, layout=layout if eval_protocol == "zs" else None, eval_protocol=eval_protocol)
        texts.append(FORMATTERS[fmt](table).strip("\n"))
    # csv: one header row per protocol's block, each row naming its eval_protocol
    return ("\n" if fmt == "csv" else "\n\n").join(texts), notes + replaced


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    layouts = ["runs", *published_data()["tables"]]
    parser = argparse.ArgumentParser(prog="python -m zsbir.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="folders searched recursively for metrics.json")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the finished runs of this W&B project")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("--layout", choices=layouts, default="runs",
                        help="runs: every dataset with runs; otherwise a paper's table layout")
    args = parser.parse_args(argv)
    if not args.folders and not args.wandb:
        parser.error("give at least one folder of runs, or --wandb ENTITY/PROJECT")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        text, notes = make_report(args.folders, args.wandb, args.format, None if args.layout == "runs" else args.layout)
    except ReportError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for note in notes:
        log.info("note: %s", note)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
