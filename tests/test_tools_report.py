"""tools.report on real short digits runs: the figures and tables hold what the run folders hold."""
import json
import re
import shutil
import statistics

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from tool_runs import RUNS, shared_runs
from mgssl.tools import plots
from mgssl.tools.report import build_report, main
from mgssl.tools.runs import RunSelectionError, read_evals, read_metric_rows, select_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory):
    return build_report([runs_root], tmp_path_factory.mktemp("report"), warn=lambda text: None)


def finals(root):
    return {name: json.loads((root / name / "final.json").read_text()) for name in RUNS}


def markdown_tables(text):
    """Each markdown table in `text` as a list of rows (lists of cell strings), header first."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line.strip()):
                current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def section(text, heading):
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def percent_cell(cell):
    """'12.34 ± 0.56' -> (12.34, 0.56); '12.34' -> (12.34, None)."""
    parts = [float(p) for p in cell.split("±")]
    return parts[0], (parts[1] if len(parts) > 1 else None)


def assert_png(path, fig):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = fig.get_size_inches() * fig.dpi
        assert image.size == (round(width), round(height))


def test_the_report_and_its_figures_are_written(report):
    assert report.path.is_file()
    assert sorted(report.figures) == ["accuracy_curves", "error_vs_labels", "meta_signal"]
    for path, fig in report.figures.values():
        assert path.parent == report.path.parent
        assert f"]({path.name})" in report.path.read_text()
        assert_png(path, fig)


def test_the_meta_signal_figure_draws_the_logged_gradient_norm_and_label_update_of_the_meta_variants(report, runs_root):
    _, fig = report.figures["meta_signal"]
    grad_ax, shift_ax = fig.axes
    grads = {line.get_label(): line for line in grad_ax.get_lines()}
    assert set(grads) == {"meta · data.labels=50 (1 seed)", "meta + mixup · data.labels=100 (1 seed)",
                          "meta + mixup · data.labels=50 (2 seeds)"}  # the variants without meta log neither
    seeds = [read_metric_rows(runs_root / f"labels50/full-s{s}", "train") for s in (0, 1)]
    full = grads["meta + mixup · data.labels=50 (2 seeds)"]
    assert list(full.get_xdata()) == [r["step"] for r in seeds[0]]
    assert list(full.get_ydata()) == pytest.approx([(a["labeled_grad_norm"] + b["labeled_grad_norm"]) / 2
                                                    for a, b in zip(*seeds)])
    shift = {line.get_label(): line for line in shift_ax.get_lines()}["meta · data.labels=50 (1 seed)"]
    rows = read_metric_rows(runs_root / "labels50/meta-s0", "train")
    assert list(shift.get_ydata()) == pytest.approx([r["pseudo_label_shift"] for r in rows])


def test_figure1_draws_one_line_per_variant_with_the_spread_of_its_seeds(report, runs_root):
    _, fig = report.figures["accuracy_curves"]
    (ax,) = fig.axes  # digits has 10 classes: no top-5 panel
    lines = {line.get_label(): line for line in ax.get_lines()}
    variants = {name.rsplit("-s", 1)[0] for name in RUNS}  # labels50/full-s0 and -s1 are one variant
    assert len(lines) == len(variants) == 7
    full = lines["meta + mixup · data.labels=50 (2 seeds)"]
    seeds = [read_evals(runs_root / f"labels50/full-s{s}") for s in (0, 1)]
    assert list(full.get_xdata()) == [e["step"] for e in seeds[0]]
    expected = [100 * (1 - (a["top1_error"] + b["top1_error"]) / 2) for a, b in zip(*seeds)]
    assert list(full.get_ydata()) == pytest.approx(expected)
    one = lines["mixup · data.labels=50 (1 seed)"]
    evals = read_evals(runs_root / "labels50/mixup-s0")
    assert list(one.get_ydata()) == pytest.approx([100 * (1 - e["top1_error"]) for e in evals])
    assert evals[-1]["top1_error"] == pytest.approx(finals(runs_root)["labels50/mixup-s0"]["test_error"])
    assert len(ax.collections) == 2  # a band for each of the two variants with two seeds
    (band,) = [c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3], to_rgb(full.get_color()))]
    edges = band.get_paths()[0].vertices[:, 1]
    lows = [100 * (1 - max(a["top1_error"], b["top1_error"])) for a, b in zip(*seeds)]
    highs = [100 * (1 - min(a["top1_error"], b["top1_error"])) for a, b in zip(*seeds)]
    assert min(edges) == pytest.approx(min(lows)) and max(edges) == pytest.approx(max(highs))
    assert set(np.round(edges, 6)) == set(np.round(lows + highs, 6))


def test_figure2_plots_mean_and_std_over_seeds_against_labels(report, runs_root):
    final = finals(runs_root)
    _, fig = report.figures["error_vs_labels"]
    (ax,) = fig.axes
    drawn = {c.get_label(): c for c in ax.containers}
    assert sorted(drawn) == ["labeled-only", "meta + mixup"]  # the other variants have one label count
    for method, prefix in (("labeled-only", "baseline"), ("meta + mixup", "full")):
        line = drawn[method].lines[0]
        assert list(line.get_xdata()) == [50, 100]
        seeds50 = [final[n]["test_error"] for n in RUNS if n.startswith(f"labels50/{prefix}-")]
        expected = [100 * statistics.fmean(seeds50), 100 * final[f"labels100/{prefix}-s0"]["test_error"]]
        assert list(line.get_ydata()) == pytest.approx(expected)
    table = markdown_tables(section(report.path.read_text(), "## Error against"))[0]
    assert table[0] == ["Method", "Labels", "Final test error", "Seeds"]
    rows = {(r[0], int(r[1])): r for r in table[1:]}
    mean, std = percent_cell(rows[("meta + mixup", 50)][2])
    runs50 = [final[f"labels50/full-s{s}"]["test_error"] for s in (0, 1)]
    assert mean == pytest.approx(100 * statistics.fmean(runs50), abs=0.006)
    assert std == pytest.approx(100 * statistics.stdev(runs50), abs=0.006)
    assert rows[("meta + mixup", 50)][3] == "2" and rows[("labeled-only", 100)][3] == "1"


def test_table4_holds_the_final_errors_of_the_runs(report, runs_root):
    final = finals(runs_root)
    text = section(report.path.read_text(), "## Ablation")
    # 100 labels has two rows, labeled-only and row 4: a table of its own with their paired comparison
    text, hundred = text.split("**digits · digits_cnn · 100 labels")
    table100, gains100, _ = markdown_tables(hundred)
    assert [r[0] for r in table100[1:]] == ["labeled-only", "4"] and [r[0] for r in gains100[1:]] == [
        "row 4 − labeled only"]
    difference = 100 * (final["labels100/full-s0"]["test_error"] - final["labels100/baseline-s0"]["test_error"])
    assert gains100[1][1:3] == ["1", f"s0 {difference:+.2f}"]
    # Table 4, meta on vs off, each row vs labeled-only, where rows pass labeled-only
    table, paired, gains, passing = markdown_tables(text)
    assert passing[0][0] == "Row" and len(passing) == 1 + sum(1 for row in table[1:] if row[0] != "labeled-only")
    assert table[0] == ["No.", "Meta", "Mix-Up", "Final test error", "Seeds"]
    # Meta on minus off for the seed both rows have: seed 0 (full-s1 has no mixup-s1 to pair with).
    rows = {r[0]: r for r in paired[1:]}
    for label, on, off in (("row 2 − row 1 (no mixup)", "meta", "plain"), ("row 4 − row 3 (with mixup)", "full", "mixup")):
        difference = 100 * (final[f"labels50/{on}-s0"]["test_error"] - final[f"labels50/{off}-s0"]["test_error"])
        assert rows[label][1] == "1" and rows[label][2] == f"s0 {difference:+.2f}" and rows[label][4] == "–"
    assert "seed 1 is in one row only" in text and "not established" in text
    # Each row minus labeled-only: rows 1-3 for seed 0, row 4 for seeds 0 and 1 (baseline-s1 pairs full-s1).
    rows = {r[0]: r for r in gains[1:]}
    assert list(rows) == [f"row {n} − labeled only" for n in (1, 2, 3, 4)]
    for n, prefix in ((1, "plain"), (2, "meta"), (3, "mixup"), (4, "full")):
        seeds = (0, 1) if n == 4 else (0,)
        error = {s: final[f"labels50/{prefix}-s{s}"]["test_error"] for s in seeds}
        differences = [100 * (error[s] - final[f"labels50/baseline-s{s}"]["test_error"]) for s in seeds]
        assert rows[f"row {n} − labeled only"][1:3] == [
            str(len(seeds)), ", ".join(f"s{s} {d:+.2f}" for s, d in zip(seeds, differences))]
    rows = {r[0]: r for r in table[1:]}
    assert list(rows) == ["labeled-only", "1", "2", "3", "4"]
    expected = {"labeled-only": ("baseline", "", ""), "1": ("plain", "", ""), "2": ("meta", "✓", ""),
                "3": ("mixup", "", "✓"), "4": ("full", "✓", "✓")}
    for number, (prefix, meta, mixup) in expected.items():
        errors = [100 * final[n]["test_error"] for n in RUNS if n.startswith(f"labels50/{prefix}-")]
        mean, std = percent_cell(rows[number][3])
        assert rows[number][1:3] == [meta, mixup]
        assert mean == pytest.approx(statistics.fmean(errors), abs=0.006)
        assert int(rows[number][4]) == len(errors)
        if len(errors) > 1:
            assert std == pytest.approx(statistics.stdev(errors), abs=0.006)
        else:
            assert std is None


def test_the_runs_table_lists_each_runs_errors(report, runs_root):
    final = finals(runs_root)
    table = markdown_tables(section(report.path.read_text(), "## Runs"))[0]
    header, rows = table[0], {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    assert "Final test error" in header and sorted(rows) == sorted(RUNS)
    for name, row in rows.items():
        assert float(row["Final test error"]) == pytest.approx(100 * final[name]["test_error"], abs=0.006)
        assert float(row["Best test error"]) == pytest.approx(100 * final[name]["best_test_error"], abs=0.006)
        assert int(row["Labels"]) == final[name]["num_labels"] and int(row["Seed"]) == final[name]["seed"]
    commands = section(report.path.read_text(), "## How the runs were made")
    for name in RUNS:  # each run's training command, from its runs.jsonl
        assert f"# {name}\n" in commands and f"--out {runs_root / name} " in commands


def test_unfinished_runs_are_skipped_with_a_note(runs_root, tmp_path):
    for name in ("labels50/full-s0", "labels50/meta-s0"):
        shutil.copytree(runs_root / name, tmp_path / "runs" / name)
    (tmp_path / "runs" / "labels50/meta-s0" / "final.json").unlink()  # as while it still trains
    notes = []
    report = build_report([tmp_path / "runs"], tmp_path / "out", warn=notes.append)
    assert [r.path.name for r in report.runs] == ["full-s0"]
    assert [p.name for p in report.skipped] == ["meta-s0"]
    assert any("meta-s0" in n and "--resume" in n for n in notes)
    text = report.path.read_text()
    assert "Skipped, not finished" in text and "meta-s0" in text
    assert "error_vs_labels" not in report.figures and not report.tables
    assert "Not drawn" in text and "Not formed" in text


def test_an_empty_selection_is_an_error_that_says_what_to_do(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunSelectionError, match="no finished run"):
        select_runs([tmp_path / "empty"])
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no finished run" in err and "python -m mgssl.train" in err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_command_line_writes_the_report(runs_root, tmp_path, capsys):
    assert main([str(runs_root / "labels50"), str(runs_root / "labels100" / "full-s0"), "--out",
                 str(tmp_path / "out"), "--metric", "best_test_error"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = (tmp_path / "out" / "report.md").read_text()
    assert "best_test_error" in text
    assert (tmp_path / "out" / "accuracy_curves.png").is_file()
    rows = {r[0]: r for r in markdown_tables(section(text, "## Ablation"))[0][1:]}
    best = json.loads((runs_root / "labels50/meta-s0/final.json").read_text())["best_test_error"]
    assert percent_cell(rows["2"][3])[0] == pytest.approx(100 * best, abs=0.006)


def test_a_resumed_run_repeating_an_evaluation_step_is_drawn_once(runs_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs_root / "labels50/full-s0", run)
    evals = read_evals(run)
    repeat = {**evals[-1], "top1_error": 0.5}
    with open(run / "metrics.jsonl", "a") as f:  # a resume from an earlier checkpoint re-evaluates
        f.write(json.dumps(repeat) + "\n")
    again = read_evals(run)
    assert [e["step"] for e in again] == [e["step"] for e in evals]
    assert again[-1]["top1_error"] == 0.5


def test_a_top5_panel_appears_when_runs_logged_top5():
    rows = [{"step": s, "top1_error": 0.5, "top5_error": 0.2} for s in (10, 20)]
    fig = plots.accuracy_curves([("a", [rows]), ("b", [rows, rows])])
    assert len(fig.axes) == 2
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == pytest.approx([80.0, 80.0])


def test_runs_without_config_yaml_are_grouped_by_final_json(runs_root, tmp_path):
    final = finals(runs_root)
    for name in ("labels50/meta-s0", "labels50/full-s0", "labels50/full-s1", "labels100/full-s0"):
        shutil.copytree(runs_root / name, tmp_path / "runs" / name)
        (tmp_path / "runs" / name / "config.yaml").unlink()
    report = build_report([tmp_path / "runs"], tmp_path / "out", warn=lambda text: None)
    (table,) = report.tables
    assert "50 labels" in table.title
    cells = {(meta, mixup): cell for _, meta, mixup, cell, _ in table.rows}
    assert sorted(cells) == [(True, False), (True, True)]
    assert cells[(True, True)].values == [final[f"labels50/full-s{s}"]["test_error"] for s in (0, 1)]
    ((_, lines),) = report.labels_panels  # the full method was trained with 50 and 100 labels
    assert sorted(lines) == ["meta + mixup"] and [n for n, _ in lines["meta + mixup"]] == [50, 100]
    assert "error_vs_labels" in report.figures


def test_runs_of_different_settings_are_not_averaged_together(runs_root, tmp_path):
    import yaml

    for name in ("full-s0", "mixup-s0", "meta-s0", "plain-s0"):
        shutil.copytree(runs_root / "labels50" / name, tmp_path / "runs" / name)
    for name in ("full-s0", "mixup-s0"):  # as if trained with --set optim.lr=0.05
        path = tmp_path / "runs" / name / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config["optim"]["lr"] = 0.05
        path.write_text(yaml.safe_dump(config))
    report = build_report([tmp_path / "runs"], tmp_path / "out", warn=lambda text: None)
    assert sorted(t.title.split(" · ")[-1] for t in report.tables) == ["optim.lr=0.05", "optim.lr=0.1"]
    for table in report.tables:
        assert all(len(cell.values) == 1 for *_, cell, _ in table.rows)


def _hand_written_run(folder, meta, errors):
    """A run folder as `python -m mgssl.train` leaves it, with chosen errors in final.json."""
    import yaml

    from mgssl.train.config import load_config, to_dict

    folder.mkdir(parents=True)
    cfg = load_config("digits", (f"method.meta={str(meta).lower()}", "method.mixup=false"))
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    test_error, median_last, best = errors
    (folder / "final.json").write_text(json.dumps({
        "test_error": test_error, "median_last_test_error": median_last, "best_test_error": best, "steps": 10,
        "num_labels": 50, "dataset": "digits", "model": "digits_cnn", "seed": 0, "meta": meta, "mixup": False,
        "unlabeled": True}))


def test_each_table_names_the_error_it_shows_and_the_readme_agrees(tmp_path, repo_root):
    from mgssl.tools.report import DEFAULT_METRIC, METRICS

    _hand_written_run(tmp_path / "runs" / "plain", False, (0.30, 0.20, 0.10))
    _hand_written_run(tmp_path / "runs" / "meta", True, (0.25, 0.15, 0.05))
    for metric, row2 in ((None, "25.00"), ("median_last_test_error", "15.00")):
        args = [str(tmp_path / "runs"), "--out", str(tmp_path / f"out-{metric}")] + (["--metric", metric] if metric else [])
        assert main(args) == 0
        text = (tmp_path / f"out-{metric}" / "report.md").read_text()
        table, *_ = markdown_tables(section(text, "## Ablation"))  # then the paired comparison
        column = METRICS[metric or DEFAULT_METRIC][0]
        assert table[0][3] == column and {r[0]: r[3] for r in table[1:]}["2"] == row2
        assert f"`{metric or DEFAULT_METRIC}` in final.json" in text
    # test_error is the last evaluation (the default of the report), median_last_test_error the median.
    assert DEFAULT_METRIC == "test_error" and "last evaluation" in METRICS[DEFAULT_METRIC][1]
    readme = " ".join((repo_root / "README.md").read_text().split())
    assert "`test_error` (the last evaluation)" in readme and "`median_last_test_error` (the median" in readme
    digits = readme[readme.index("**digits**"):readme.index("**CIFAR-10**")]
    assert "`test_error` of final.json, the last evaluation" in digits and "median" not in digits


def test_overtaking_finds_the_first_step_below_and_the_step_from_which_it_stays_below():
    from mgssl.tools.report import overtaking

    def rows(errors, steps=(100, 200, 300, 400, 500)):
        return [{"step": s, "top1_error": e} for s, e in zip(steps, errors)]

    baseline = [rows([0.8, 0.6, 0.5, 0.5, 0.5]), rows([0.8, 0.6, 0.5, 0.5, 0.5])]
    # mean over two seeds: 0.85, 0.55 (below), 0.55, 0.45 (below), 0.4 (below)
    seeds = [rows([0.9, 0.5, 0.5, 0.4, 0.4]), rows([0.8, 0.6, 0.6, 0.5, 0.4])]
    o = overtaking("meta + mixup", baseline, seeds)
    assert (o.first_below, o.below_from, o.last_step, o.compared) == (200, 400, 500, 5)
    never = overtaking("x", baseline, [rows([0.9] * 5)])
    assert (never.first_below, never.below_from) == (None, None)
    # only the steps every seed of both rows evaluated are compared
    short = overtaking("x", baseline, [rows([0.4, 0.4], steps=(100, 300)), rows([0.4, 0.4, 0.4])])
    assert (short.first_below, short.below_from, short.compared) == (100, 100, 2)


def test_the_report_says_where_each_row_passes_labeled_only(report):
    from mgssl.tools.report import mean_errors

    # one table per label count: 50 labels (all rows) and 100 labels (labeled-only and row 4)
    assert len(report.overtaking) == 2
    for title, found in report.overtaking:
        (table,) = [t for t in report.tables if t.title == title]
        members = {(u, m, x): runs for u, m, x, _, runs in table.rows}
        assert sorted(o.method for o in found) == sorted(runs[0].method for v, runs in members.items() if v[0])
        base = mean_errors([r.evals for r in members[(False, False, False)]])
        for o in found:
            (runs,) = [rs for v, rs in members.items() if v[0] and rs[0].method == o.method]
            curve = mean_errors([r.evals for r in runs])
            if o.first_below is not None:
                assert curve[o.first_below] < base[o.first_below]
                assert all(curve[s] >= base[s] for s in base if s < o.first_below and s in curve)
            if o.below_from is not None:
                assert all(curve[s] < base[s] for s in base if s >= o.below_from and s in curve)
    text = report.path.read_text()
    assert "Where each row passes labeled-only" in section(text, "## Ablation")


def test_best_pt_and_weight_average_errors_get_columns_of_their_own(tmp_path):
    _hand_written_run(tmp_path / "runs" / "plain", False, (0.30, 0.20, 0.10))
    _hand_written_run(tmp_path / "runs" / "kept", True, (0.25, 0.15, 0.05))
    final = json.loads((tmp_path / "runs" / "kept" / "final.json").read_text())
    final.update(best_val_test_error=0.22, ema_test_error=0.21)
    (tmp_path / "runs" / "kept" / "final.json").write_text(json.dumps(final))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    table = markdown_tables(section(text, "## Runs"))[0]
    rows = {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    assert rows["kept"]["Test error of best.pt"] == "22.00" and rows["kept"]["Weight-average test error"] == "21.00"
    assert rows["plain"]["Test error of best.pt"] == "–" and rows["kept"]["Best test error"] == "5.00"
    assert "lowest error on the validation images" in section(text, "## Runs")
