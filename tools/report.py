"""python -m tools.report RUN_DIR [RUN_DIR ...] --out DIR

A markdown report (DIR/report.md) with PNG figures, made from finished run folders: the test
accuracy curves of every run (the paper's Figure 1), the error against the number of labels where
runs differ in it (Figure 2) and the meta x mixup ablation table (Table 4) where the runs form one.
Each argument is a run folder or a folder searched for run folders below it."""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tools.runs import TABLE4_VARIANTS, VARIANT_KEYS, Run, RunSelectionError, differing_keys, experiment_key, select_runs

METRICS = {"test_error": "final test error", "best_test_error": "best test error over the evaluations",
           "median_last_test_error": "median test error of the last evaluations"}
# Table 4's rows in the paper's order: (unlabeled, meta, mixup); the labeled-only baseline first.
ABLATION_ROWS = tuple(TABLE4_VARIANTS.values())
FIGURE1, FIGURE2 = "accuracy_curves.png", "error_vs_labels.png"


@dataclass
class Cell:
    values: list  # one metric value (a fraction) per seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0  # sample std (n - 1)

    def percent(self) -> str:
        if len(self.values) == 1:
            return f"{100 * self.mean:.2f}"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


@dataclass
class AblationTable:
    title: str
    rows: list  # [(unlabeled, meta, mixup, Cell, [Run])]


@dataclass
class Report:
    path: Path
    runs: list
    skipped: list
    figures: dict = field(default_factory=dict)  # name -> (png path, matplotlib Figure)
    tables: list = field(default_factory=list)  # AblationTable
    labels_panels: list = field(default_factory=list)


def metric_of(run: Run, metric: str):
    value = run.final.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _title(run: Run, key: tuple, extra: list[str], labels: bool = True) -> str:
    """'digits · digits_cnn · 50 labels · 400 steps', then the keys in which this experiment differs
    from the others of the report (`extra`), with its values."""
    parts = [str(run.get("dataset", "?")), str(run.get("model", "?"))]
    if labels and "num_labels" in run.final:
        parts.append(f"{run.final['num_labels']} labels")
    if "steps" in run.final:
        parts.append(f"{run.final['steps']} steps")
    values = dict(key)
    shown = ("data.name", "model.name", "data.labels", "train.steps")
    parts += [f"{k}={values.get(k, '<absent>').strip(chr(39))}" for k in extra if k not in shown]
    return " · ".join(parts)


def _group(runs: list[Run], ignore: tuple) -> dict:
    groups = defaultdict(list)
    for run in runs:
        groups[experiment_key(run, ignore)].append(run)
    return groups


def ablation_tables(runs: list[Run], metric: str, warn=print) -> list[AblationTable]:
    """One table per experiment in which at least two of Table 4's meta x mixup variants were
    trained, with the labeled-only baseline of the same experiment as an extra row when there is one."""
    groups = _group(runs, VARIANT_KEYS)
    extra = differing_keys(list(groups))
    tables = []
    for key, members in groups.items():
        by_variant = defaultdict(list)
        for run in members:
            by_variant[(run.unlabeled, run.meta, run.mixup)].append(run)
        if len([v for v in by_variant if v[0]]) < 2:  # Table 4 compares the meta x mixup variants
            continue
        rows = []
        for variant in ABLATION_ROWS:
            with_value = [r for r in by_variant.get(variant, []) if metric_of(r, metric) is not None]
            for r in by_variant.get(variant, []):
                if metric_of(r, metric) is None:
                    warn(f"{r.path}: final.json has no {metric}; left out of the ablation table")
            if with_value:
                rows.append((*variant, Cell([metric_of(r, metric) for r in with_value]), with_value))
        if len(rows) >= 2:
            tables.append(AblationTable(_title(members[0], key, extra), rows))
    return tables


def labels_panels(runs: list[Run], metric: str) -> list[tuple[str, dict]]:
    """Figure 2's panels: experiments (all but the label count and the method equal) that were
    trained with at least two label counts; (title, {method: [(labels, Cell)]}) each."""
    groups = _group(runs, VARIANT_KEYS + ("data.labels",))
    extra = differing_keys(list(groups))
    panels = []
    for key, members in groups.items():
        cells = defaultdict(lambda: defaultdict(list))
        for run in members:
            value = metric_of(run, metric)
            if value is not None and run.final.get("num_labels") is not None:
                cells[run.method][int(run.final["num_labels"])].append(value)
        # A method trained with one label count is a point, not a line: Table 4 shows it instead.
        lines = {method: [(n, Cell(v)) for n, v in sorted(by_n.items())] for method, by_n in cells.items()
                 if len(by_n) >= 2}
        if not lines:
            continue
        panels.append((_title(members[0], key, extra, labels=False), lines))
    return panels


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "–"


def build_report(paths: list, out: Path, metric: str = "test_error", command: str = "", warn=None) -> Report:
    from tools import plots

    warn = warn or (lambda text: print(text, file=sys.stderr))
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    runs, skipped = select_runs(paths, warn=warn)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "report.md", runs, skipped)
    md = [f"# Results of {len(runs)} run{'s' if len(runs) > 1 else ''}", ""]
    if command:
        md += [f"Made with `{command}` on {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    md += [f"Errors are in percent; the error of a run is its {METRICS[metric]} (`{metric}` in final.json). "
           "Where runs repeat one experiment with different seeds, a cell reads mean ± sample standard "
           "deviation over the seeds.", "", "## Runs", ""]
    has_top5 = any("test_top5_error" in r.final for r in runs)
    header = ["Run", "Data", "Model", "Labels", "Method", "Seed", "Steps", "Test error", "Best test error"]
    header += ["Test top-5 error"] if has_top5 else []
    rows = []
    for r in runs:
        row = [r.name, r.get("dataset", "?"), r.get("model", "?"), r.final.get("num_labels", "?"), r.method,
               r.get("seed", "?"), r.final.get("steps", "?"), _pct(r.final.get("test_error")),
               _pct(r.final.get("best_test_error"))]
        rows.append(row + ([_pct(r.final.get("test_top5_error"))] if has_top5 else []))
    md += [_md_table(header, rows), ""]
    if skipped:
        md += ["Skipped, not finished (no final.json): " + ", ".join(f"`{p}`" for p in skipped), ""]

    md += ["## Test accuracy during training (Figure 1)", ""]
    curves = [(r.name, r.evals) for r in runs if r.evals]
    if curves:
        fig = plots.accuracy_curves(curves)
        report.figures["accuracy_curves"] = (plots.save(fig, out / FIGURE1), fig)
        md += [f"![test accuracy against training steps]({FIGURE1})", ""]
        missing = [r.name for r in runs if not r.evals]
        if missing:
            md += ["No evaluations in metrics.jsonl, so no curve, for: " + ", ".join(missing), ""]
    else:
        md += ["None of the runs has evaluations in metrics.jsonl.", ""]

    md += ["## Error against the number of labels (Figure 2)", ""]
    report.labels_panels = labels_panels(runs, metric)
    if report.labels_panels:
        fig = plots.error_vs_labels([(title, {m: [(n, c.mean, c.std) for n, c in points] for m, points in lines.items()})
                                     for title, lines in report.labels_panels])
        report.figures["error_vs_labels"] = (plots.save(fig, out / FIGURE2), fig)
        md += [f"![test error against the number of labels]({FIGURE2})", ""]
        for title, lines in report.labels_panels:
            md += [f"**{title}**", "", _md_table(["Method", "Labels", "Test error", "Seeds"], [
                [m, n, cell.percent(), len(cell.values)] for m in sorted(lines, key=plots.method_rank)
                for n, cell in lines[m]]), ""]
    else:
        md += ["Not drawn: no method was trained with two label counts in otherwise equal runs. Train the "
               "same config with another `--set data.labels=N` to get it.", ""]

    md += ["## Ablation of meta-learning and mixup (Table 4)", ""]
    report.tables = ablation_tables(runs, metric, warn=warn)
    for table in report.tables:
        body = []
        for unlabeled, meta, mixup, cell, members in table.rows:
            number = ABLATION_ROWS.index((unlabeled, meta, mixup))  # the paper's row number; 0: baseline
            body.append([number or "labeled-only", "✓" if meta else "", "✓" if mixup else "", cell.percent(),
                         len(cell.values)])
        md += [f"**{table.title}**", "", _md_table(["No.", "Meta", "Mix-Up", "Test error", "Seeds"], body), ""]
    if not report.tables:
        md += ["Not formed: no experiment was trained with two or more of the meta x mixup variants. "
               "Train them with `--set method.meta=false`, "
               "`--set method.mixup=false`, and `--set method.unlabeled=false method.meta=false "
               "method.mixup=false` for the baseline.", ""]
    commands = [(r.name, c) for r in runs for c in r.commands]
    if commands:
        md += ["## How the runs were made", "", "From each run's runs.jsonl (one line per start or resume):", "",
               "```"] + [line for name, c in commands for line in (f"# {name}", c)] + ["```", ""]
    report.path.write_text("\n".join(md))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m tools.report runs/ --out runs/report\n")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folders, or folders searched for run folders (those holding final.json)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="folder for report.md and its "
                   "figures (default: runs/report)")
    p.add_argument("--metric", default="test_error", choices=tuple(METRICS),
                   help="which error of final.json the tables and Figure 2 use (default: test_error)")
    args = p.parse_args(argv)
    command = "python -m tools.report " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = build_report(args.runs, args.out, args.metric, command)
    except RunSelectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report.path} ({len(report.runs)} runs, {len(report.figures)} figures, "
          f"{len(report.tables)} ablation tables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
