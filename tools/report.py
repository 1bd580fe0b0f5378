"""python -m mgssl.tools.report RUN_DIR [RUN_DIR ...] --out DIR

A markdown report (DIR/report.md) with PNG figures, made from finished run folders: the test
accuracy curves of every variant, mean and spread over its seeds (the paper's Figure 1), the error
against the number of labels where runs differ in it (Figure 2), and the ablation table (Table 4) of
every experiment trained in two or more of its rows (labeled-only and rows 1-4), with the rows compared
seed by seed: the meta term on against off (row 2 − row 1, row 4 − row 3) and each row against
labeled-only, each comparison with its paired differences, their 95% t interval, the paired t-test and
Wilcoxon's signed-rank test, raw and Holm-adjusted over the comparisons shown together, and a verdict
(with --smallest-effect, also which effects of that size the interval rules out); a table holding
neither kind of pair compares its rows two by two. Then the step at which each row passes labeled-only.
Each argument is a run folder or a folder searched for run folders below it."""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgssl.tools.stats import PairedTests, paired_tests, with_holm
from mgssl.tools.runs import (TABLE4_VARIANTS, VARIANT_KEYS, Run, RunSelectionError, at_common_steps, differing_keys,
                        experiment_key, output_error, read_metric_rows, select_runs)

# final.json's errors a table can show; the default, the last evaluation, is what SSL papers report
METRICS = {"test_error": ("Final test error", "final test error, the last evaluation"),
           "best_test_error": ("Best test error", "best test error over the evaluations"),
           "median_last_test_error": ("Median last test error",
                                      "median test error of the last train.keep_last_evals evaluations"),
           "best_val_test_error": ("Test error of best.pt",
                                   "test error of checkpoints/best.pt, the evaluation of lowest validation error"),
           "ema_test_error": ("Weight-average test error", "final test error of the weight average (train.ema)")}
# Columns of the runs table shown only when some run has them (data.validation, train.ema).
KEPT_MODEL_COLUMNS = ("best_val_test_error", "ema_test_error")
DEFAULT_METRIC = "test_error"
# Table 4's rows in the paper's order: (unlabeled, meta, mixup); the labeled-only baseline first.
ABLATION_ROWS = tuple(TABLE4_VARIANTS.values())
FIGURE1, FIGURE2 = "accuracy_curves.png", "error_vs_labels.png"
META_SIGNAL = "meta_signal.png"


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
    curve_variants: list = field(default_factory=list)  # Figure 1's lines: [(label, [Run])]
    paired: list = field(default_factory=list)  # [(table title, [Paired])]: meta on vs off, seed by seed
    gains: list = field(default_factory=list)  # [(table title, [Paired])]: each row vs labeled-only, seed by seed
    others: list = field(default_factory=list)  # [(table title, [Paired])]: other pairs, where a table has none above
    overtaking: list = field(default_factory=list)  # [(table title, [Overtaking])]: rows against labeled-only


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
    """One table per experiment in which at least two of the ablation's rows (labeled-only and Table 4's
    rows 1-4) were trained."""
    groups = _group(runs, VARIANT_KEYS)
    extra = differing_keys(list(groups))
    tables = []
    for key, members in groups.items():
        by_variant = defaultdict(list)
        for run in members:
            by_variant[(run.unlabeled, run.meta, run.mixup)].append(run)
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


def curve_variants(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Figure 1's lines: the runs grouped into variants (runs equal in all but the seed), each named by
    its method, the settings in which it differs from the other variants, and its seed count."""
    groups = _group(runs, ())
    extra = [k for k in differing_keys(list(groups)) if k not in VARIANT_KEYS]
    named = []
    for key, members in groups.items():
        values = dict(key)
        parts = [members[0].method] + [f"{k}={values.get(k, '<absent>').strip(chr(39))}" for k in extra]
        seeds = len(members)
        named.append((" · ".join(parts) + f" ({seeds} seed{'s' if seeds > 1 else ''})", members))
    return sorted(named, key=lambda item: (ABLATION_ROWS.index(_variant(item[1][0])), item[0]))


def _variant(run: Run) -> tuple:
    return run.unlabeled, run.meta, run.mixup


# The paired comparisons of the meta term, on against off with all else equal: (on, off) rows of TABLE4_ROWS.
META_PAIRS = (("meta", "none", "row 2 − row 1 (no mixup)"), ("both", "mixup", "row 4 − row 3 (with mixup)"))
# What the unlabeled images buy: each semi-supervised row against the labeled-only baseline.
GAIN_PAIRS = tuple((row, "labeled", f"row {n} − labeled only")
                   for n, row in enumerate(("none", "meta", "mixup", "both"), start=1))
# compared where a table has no pair of the kinds above, so any two rows of a study form a comparison
OTHER_PAIRS = (("mixup", "none", "row 3 − row 1"), ("both", "meta", "row 4 − row 2"),
               ("both", "none", "row 4 − row 1"), ("mixup", "meta", "row 3 − row 2"))
SIGNIFICANCE = 0.05


@dataclass
class Paired:
    """One row minus another (meta on minus off, or a row minus labeled-only), seed by seed, in one experiment."""
    label: str
    seeds: list  # the seeds trained in both rows
    differences: list  # error of the first row minus the second's, fractions, one per seed
    test: PairedTests  # its p-values Holm-adjusted over the comparisons shown with it
    unmatched: list = field(default_factory=list)  # seeds trained in only one of the two rows
    subject: str = "the meta term"  # what the first row adds, as the verdict names it

    @property
    def better(self) -> int:
        return sum(d < 0 for d in self.differences)

    @property
    def established(self) -> bool:
        """Both tests reject "no difference" at SIGNIFICANCE after Holm's correction."""
        t = self.test
        return all(p is not None and p < SIGNIFICANCE for p in (t.t_p_holm, t.wilcoxon_p_holm))

    def verdict(self, smallest_effect: Optional[float] = None) -> str:
        """`smallest_effect`: an effect size in points; a comparison not established then also says whether
        its interval rules out effects that large."""
        t = self.test
        if t.t_p is None:
            return (f"{self.label}: not established: {t.n} seed in both rows, no interval; train at least 3 "
                    "seeds of each")
        effect = "lowers" if t.mean < 0 else "raises"
        numbers = (f"{abs(100 * t.mean):.2f} points on average, 95% interval [{100 * t.low:+.2f}, "
                   f"{100 * t.high:+.2f}], Holm-adjusted p = {t.t_p_holm:.3g} (t-test), {t.wilcoxon_p_holm:.3g} "
                   f"(Wilcoxon), {t.n} seeds")
        if self.established:
            return f"{self.label}: established: {self.subject} {effect} the error ({numbers})"
        verdict = (f"{self.label}: not established: {self.subject} {effect} the error by {numbers}; a test's "
                   f"adjusted p is not below {SIGNIFICANCE}")
        return verdict + (f"; {self.excluded(smallest_effect)}" if smallest_effect is not None else "")

    def excluded(self, points: float) -> str:
        """Which effects of `points` or more the 95% interval rules out: a gain, a harm, both or neither."""
        low, high = 100 * self.test.low, 100 * self.test.high
        size = f"{points:g} point{'' if points == 1 else 's'} or more"
        if low > -points and high < points:
            return f"the interval rules out a change of {size} either way"
        if low > -points:
            return f"the interval rules out lowering the error by {size}"
        if high < points:
            return f"the interval rules out raising the error by {size}"
        return f"the interval leaves changes of {size} open"


def errors_by_seed(table: AblationTable, warn=print) -> dict[tuple, dict]:
    """(unlabeled, meta, mixup) -> {seed: error} of one table's rows; of two runs of one seed in a row, the first."""
    out = {}
    for unlabeled, meta, mixup, cell, members in table.rows:
        by_seed = out[(unlabeled, meta, mixup)] = {}
        for run, value in zip(members, cell.values):
            seed = run.get("seed")
            if seed in by_seed:
                warn(f"{run.path}: a second run of seed {seed} in one row; the paired comparisons use the first")
                continue
            by_seed[seed] = value
    return out


def paired_meta(errors: dict[tuple, dict]) -> list[Paired]:
    """Meta on against meta off (rows 2 vs 1 and 4 vs 3) for the seeds that the rows of `errors_by_seed` share."""
    return paired_rows(errors, META_PAIRS, "the meta term")


def paired_gains(errors: dict[tuple, dict]) -> list[Paired]:
    """Each semi-supervised row against labeled-only for the seeds that the rows of `errors_by_seed` share."""
    return paired_rows(errors, GAIN_PAIRS, "the row")


def paired_others(errors: dict[tuple, dict]) -> list[Paired]:
    """The other pairs of semi-supervised rows, for a table whose rows form no pair of the two kinds above."""
    return paired_rows(errors, OTHER_PAIRS, "the first row")


def paired_rows(errors: dict[tuple, dict], pairs: tuple, subject: str) -> list[Paired]:
    """First row minus second, seed by seed, for each (first, second, label) of `pairs` that `errors` holds
    both of; the p-values are Holm-adjusted over the comparisons returned."""
    out = []
    for on, off, label in pairs:
        first, second = errors.get(TABLE4_VARIANTS[on]), errors.get(TABLE4_VARIANTS[off])
        if first is None or second is None:
            continue
        seeds = sorted(set(first) & set(second), key=seed_order)
        unmatched = sorted(set(first) ^ set(second), key=seed_order)
        if not seeds:
            continue
        test = paired_tests([first[s] for s in seeds], [second[s] for s in seeds])
        out.append(Paired(label, seeds, [first[s] - second[s] for s in seeds], test, unmatched, subject))
    for comparison, adjusted in zip(out, with_holm([c.test for c in out])):
        comparison.test = adjusted
    return out


def seed_order(seed) -> tuple:
    """Numbers in numeric order (seed 6 before seed 10), then anything else a final.json may hold, as text."""
    return (0, seed, "") if isinstance(seed, (int, float)) and not isinstance(seed, bool) else (1, 0, str(seed))


def _p(value: Optional[float]) -> str:
    return f"{value:.3g}" if value is not None else "–"


def paired_markdown(comparisons: list[Paired], kind: str = "meta",
                    smallest_effect: Optional[float] = None) -> list[str]:
    """The table of paired differences and a verdict per comparison; for the meta term also one overall.
    `kind`: "meta" (meta on minus off), "gains" (each row minus labeled-only) or "others"; `smallest_effect`:
    see `Paired.verdict`."""
    rows = []
    for c in comparisons:
        t = c.test
        per_seed = ", ".join(f"s{s} {100 * d:+.2f}" for s, d in zip(c.seeds, c.differences))
        interval = f"[{100 * t.low:+.2f}, {100 * t.high:+.2f}]" if t.low is not None else "–"
        ties = sum(d == 0 for d in c.differences)
        rows.append([c.label, t.n, per_seed, f"{100 * t.mean:+.2f}", interval, _p(t.t_p), _p(t.t_p_holm),
                     _p(t.wilcoxon_p), _p(t.wilcoxon_p_holm),
                     f"{c.better} of {t.n}" + (f" ({ties} tie{'s' if ties > 1 else ''})" if ties else "")])
    intro, helps, better = {
        "meta": ("Meta on minus meta off, same seed", "the meta term helps", "Meta better in"),
        "gains": ("Each semi-supervised row minus labeled-only, same seed", "the unlabeled images help",
                  "Row better in"),
        "others": ("The rows two by two, the later row minus the earlier, same seed", "the later row is better",
                   "Later row better in")}[kind]
    md = [f"{intro}, in points of test error (negative: {helps}); the 95% interval is the paired t-test's; "
          "p: two-sided, of the paired t-test (scipy.stats.ttest_rel) and of Wilcoxon's signed-rank test "
          "(scipy.stats.wilcoxon, exact, zero differences left out), raw and Holm-adjusted over the "
          f"comparisons of this table. A comparison is established when both adjusted p are below {SIGNIFICANCE}.",
          "", _md_table(["Comparison", "Seeds", "Per seed", "Mean", "95% interval", "t-test p", "t-test p (Holm)",
                         "Wilcoxon p", "Wilcoxon p (Holm)", better], rows), ""]
    for c in comparisons:
        if c.unmatched:
            many = len(c.unmatched) > 1
            md += [f"{c.label}: seed{'s' if many else ''} {', '.join(map(str, c.unmatched))} "
                   f"{'are' if many else 'is'} in one row only and left out.", ""]
    md += [f"- {c.verdict(smallest_effect)}" for c in comparisons] + [""]
    if kind != "meta":
        return md
    established = [c for c in comparisons if c.established]
    same_sign = len({c.test.mean < 0 for c in comparisons}) == 1
    if comparisons and len(established) == len(comparisons) and same_sign:
        effect = "gain" if comparisons[0].test.mean < 0 else "harm"
        md += [f"**Verdict: the meta term's {effect} is established** (both tests, Holm-adjusted p < "
               f"{SIGNIFICANCE}, in {'each comparison' if len(comparisons) > 1 else 'the comparison'}).", ""]
    else:
        md += [f"**Verdict: the meta term's effect is not established** (both tests, Holm-adjusted p < "
               f"{SIGNIFICANCE}, in {len(established)} of {len(comparisons)} "
               f"comparison{'s' if len(comparisons) > 1 else ''}).", ""]
    return md


@dataclass
class Overtaking:
    """Where one row's mean test error (over its seeds) goes below labeled-only's, in one experiment."""
    method: str
    first_below: Optional[int]  # the first evaluated step at which it is below
    below_from: Optional[int]  # the step from which it is below at every later evaluation
    last_step: Optional[int]  # the last step both evaluated
    compared: int  # evaluations compared: the steps that every seed of both evaluated


def mean_errors(seeds: list[list[dict]]) -> dict[int, float]:
    """step -> mean top-1 test error over the seeds, at the steps every seed evaluated."""
    steps, errors = at_common_steps(seeds, "top1_error")
    return {step: statistics.fmean(column) for step, column in zip(steps, zip(*errors))}


def overtaking(method: str, baseline: list[list[dict]], seeds: list[list[dict]]) -> Overtaking:
    """Where the mean curve of `seeds` passes the baseline's (both: evaluation rows per seed)."""
    base, curve = mean_errors(baseline), mean_errors(seeds)
    steps = sorted(set(base) & set(curve))
    below = [curve[s] < base[s] for s in steps]
    first = next((s for s, b in zip(steps, below) if b), None)
    since = None
    for s, b in zip(reversed(steps), reversed(below)):
        if not b:
            break
        since = s
    return Overtaking(method, first, since, steps[-1] if steps else None, len(steps))


def overtaking_table(table: AblationTable) -> list[Overtaking]:
    """Each semi-supervised row of one Table 4 against its labeled-only row, where it has one."""
    by_variant = {(unlabeled, meta, mixup): members for unlabeled, meta, mixup, _, members in table.rows}
    baseline = by_variant.get((False, False, False))
    if not baseline:
        return []
    return [overtaking(members[0].method, [r.evals for r in baseline], [r.evals for r in members])
            for variant, members in by_variant.items() if variant[0]]


def overtaking_markdown(found: list[Overtaking]) -> list[str]:
    rows = [[o.method, o.first_below if o.first_below is not None else "never",
             o.below_from if o.below_from is not None else "–", o.last_step, o.compared] for o in found]
    return ["Where each row passes labeled-only: the mean test error over seeds, compared at each step "
            "that every run of both rows evaluated.", "",
            _md_table(["Row", "First below labeled-only at step", "Below at every evaluation from step",
                       "Last step compared", "Evaluations compared"], rows), ""]


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


def build_report(paths: list, out: Path, metric: str = DEFAULT_METRIC, command: str = "", warn=None,
                 smallest_effect: Optional[float] = None) -> Report:
    from mgssl.tools import plots

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
    column, meaning = METRICS[metric]
    md += [f"Errors are in percent; Figure 2 and Table 4 show each run's {meaning} (`{metric}` in final.json). "
           "Where runs repeat one experiment with different seeds, a cell reads mean ± sample standard "
           "deviation over the seeds.", "", "## Runs", ""]
    has_top5 = any("test_top5_error" in r.final for r in runs)
    kept = [key for key in KEPT_MODEL_COLUMNS if any(key in r.final for r in runs)]
    header = ["Run", "Data", "Model", "Labels", "Method", "Seed", "Steps", "Final test error", "Best test error"]
    header += ["Test top-5 error"] if has_top5 else []
    header += [METRICS[key][0] for key in kept]
    rows = []
    for r in runs:
        row = [r.name, r.get("dataset", "?"), r.get("model", "?"), r.final.get("num_labels", "?"), r.method,
               r.get("seed", "?"), r.final.get("steps", "?"), _pct(r.final.get("test_error")),
               _pct(r.final.get("best_test_error"))]
        row += [_pct(r.final.get("test_top5_error"))] if has_top5 else []
        rows.append(row + [_pct(r.final.get(key)) for key in kept])
    md += [_md_table(header, rows), ""]
    md += ["Best test error is the lowest over the evaluations, picked on the test set itself, so it flatters the "
           "run." + (" Test error of best.pt is that of the evaluation with the lowest error on the validation "
                     "images (data.validation), the number to report." if "best_val_test_error" in kept else "")
           + (" Weight-average test error is the last evaluation of the average of the weights (train.ema)."
              if "ema_test_error" in kept else ""), ""]
    if skipped:
        md += ["Skipped, not finished (no final.json): " + ", ".join(f"`{p}`" for p in skipped), ""]

    md += ["## Test accuracy during training (Figure 1)", ""]
    report.curve_variants = curve_variants([r for r in runs if r.evals])
    if report.curve_variants:
        fig = plots.accuracy_curves([(label, [r.evals for r in members]) for label, members in report.curve_variants])
        report.figures["accuracy_curves"] = (plots.save(fig, out / FIGURE1), fig)
        md += [f"![test accuracy against training steps]({FIGURE1})", "",
               "One line per variant: the mean over its seeds at the steps all of them evaluated; the band "
               "runs from the lowest to the highest seed.", ""]
        missing = [r.name for r in runs if not r.evals]
        if missing:
            md += ["No evaluations in metrics.jsonl, so no curve, for: " + ", ".join(missing), ""]
    else:
        md += ["None of the runs has evaluations in metrics.jsonl.", ""]

    meta_variants = [(label, [read_metric_rows(r.path, "train") for r in members])
                     for label, members in report.curve_variants if members[0].meta]
    if any(rows for _, seeds in meta_variants for rows in seeds):
        fig = plots.meta_signal_curves(meta_variants)
        report.figures["meta_signal"] = (plots.save(fig, out / META_SIGNAL), fig)
        md += ["### The meta signal during training", "", f"![labeled gradient norm and pseudo-label update]({META_SIGNAL})",
               "", "The norm of the labeled gradient g that moves the pseudo labels, and the mean L1 size of "
               "the move ‖ŷ − ỹ‖₁, from the training log (mean over seeds): where both fade, the meta term "
               "has stopped acting.", ""]

    md += ["## Error against the number of labels (Figure 2)", ""]
    report.labels_panels = labels_panels(runs, metric)
    if report.labels_panels:
        fig = plots.error_vs_labels([(title, {m: [(n, c.mean, c.std) for n, c in points] for m, points in lines.items()})
                                     for title, lines in report.labels_panels])
        report.figures["error_vs_labels"] = (plots.save(fig, out / FIGURE2), fig)
        md += [f"![test error against the number of labels]({FIGURE2})", ""]
        for title, lines in report.labels_panels:
            md += [f"**{title}**", "", _md_table(["Method", "Labels", column, "Seeds"], [
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
        md += [f"**{table.title}**", "", _md_table(["No.", "Meta", "Mix-Up", column, "Seeds"], body), ""]
        errors = errors_by_seed(table, warn=warn)
        comparisons = paired_meta(errors)
        if comparisons:
            report.paired.append((table.title, comparisons))
            md += paired_markdown(comparisons, smallest_effect=smallest_effect)
        gains = paired_gains(errors)
        if gains:
            report.gains.append((table.title, gains))
            md += paired_markdown(gains, kind="gains", smallest_effect=smallest_effect)
        others = [] if comparisons or gains else paired_others(errors)
        if others:
            report.others.append((table.title, others))
            md += paired_markdown(others, kind="others", smallest_effect=smallest_effect)
        passing = overtaking_table(table)
        if passing:
            report.overtaking.append((table.title, passing))
            md += overtaking_markdown(passing)
    if not report.tables:
        md += ["Not formed: no experiment was trained in two or more of the ablation's rows (labeled-only, "
               "rows 1-4). Train them with `mgssl ablation`, or by hand with `--set method.meta=false`, "
               "`--set method.mixup=false`, and `--set method.unlabeled=false method.meta=false "
               "method.mixup=false` for the baseline.", ""]
    commands = [(r.name, c) for r in runs for c in r.commands]
    if commands:
        md += ["## How the runs were made", "", "From each run's runs.jsonl (one line per start or resume):", "",
               "```"] + [line for name, c in commands for line in (f"# {name}", c)] + ["```", ""]
    report.path.write_text("\n".join(md))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl report", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m mgssl.tools.report runs/ --out runs/report\n")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folders, or folders searched for run folders (those holding final.json)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="folder for report.md and its "
                   "figures (default: runs/report)")
    p.add_argument("--metric", default=DEFAULT_METRIC, choices=tuple(METRICS),
                   help=f"which error of final.json Table 4 and Figure 2 use (default: {DEFAULT_METRIC}, the "
                        "last evaluation; median_last_test_error: the median of the last train.keep_last_evals)")
    p.add_argument("--smallest-effect", type=float, metavar="POINTS",
                   help="an effect size in points of error: each comparison not established also says whether "
                        "its 95%% interval rules out effects that large (e.g. 1.0)")
    args = p.parse_args(argv)
    if args.smallest_effect is not None and not args.smallest_effect > 0:
        p.error(f"--smallest-effect {args.smallest_effect:g}: give a positive number of points, e.g. 1.0")
    command = "python -m mgssl.tools.report " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = build_report(args.runs, args.out, args.metric, command, smallest_effect=args.smallest_effect)
    except RunSelectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {output_error(e, '--out')}", file=sys.stderr)
        return 2
    print(f"wrote {report.path} ({len(report.runs)} runs, {len(report.figures)} figures, "
          f"{len(report.tables)} ablation tables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
