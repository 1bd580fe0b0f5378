"""The paired tests of tools.stats against published results (R's t.test and wilcox.test examples), Holm's
correction against its definition, and the report's paired comparisons on tiny hand-made run folders whose
differences are known."""
import json

import pytest

from mgssl.tools.report import build_report
from mgssl.tools.stats import holm, paired_tests

# Student's sleep data (Cushny & Peebles; R's `sleep`): extra hours of sleep of ten patients under drug 1 and
# drug 2. R's t.test(extra ~ group, data = sleep, paired = TRUE), drug 1 minus drug 2, gives t = -4.0621,
# df = 9, p = 0.002833, 95% interval [-2.4599, -0.7001].
SLEEP_DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
SLEEP_DIFFERENCES = [b - a for a, b in zip(SLEEP_DRUG1, SLEEP_DRUG2)]  # 1.2, 2.4, 1.3, 1.3, 0.0, 1.0, ...
# R's wilcox.test example (Hollander & Wolfe, depression scale before (x) and after (y) a tranquilliser):
# wilcox.test(x, y, paired = TRUE) gives V = 40, p-value = 0.03906 (exact: no ties, no zero differences).
DEPRESSION_X = [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30]
DEPRESSION_Y = [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]


def test_the_t_test_matches_rs_sleep_data_result():
    t = paired_tests(SLEEP_DRUG1, SLEEP_DRUG2)
    assert t.n == 10 and t.mean == pytest.approx(-1.58)
    assert t.low == pytest.approx(-2.4598858, abs=1e-6) and t.high == pytest.approx(-0.7001142, abs=1e-6)
    assert t.t_p == pytest.approx(0.002833, abs=1e-6)
    assert t.mean / (t.sd / 10 ** 0.5) == pytest.approx(-4.0621, abs=1e-4)


def test_the_wilcoxon_test_matches_rs_exact_example_and_leaves_zero_differences_out():
    assert paired_tests(DEPRESSION_X, DEPRESSION_Y).wilcoxon_p == pytest.approx(0.0390625, abs=1e-9)
    # the sleep data: patient 5's zero difference is left out; all nine others favour drug 2, so the exact
    # two-sided p is 2 / 2**9
    assert paired_tests(SLEEP_DRUG1, SLEEP_DRUG2).wilcoxon_p == pytest.approx(2 / 2 ** 9)


def test_the_interval_uses_the_t_quantile_not_the_normal_one():
    t = paired_tests([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)  # mean 3, se sqrt(0.5); t(0.975, 4) = 2.776445
    assert (t.high - t.mean) == pytest.approx(2.776445 * 0.5 ** 0.5, abs=1e-5)
    assert t.t_p == pytest.approx(0.0132356, abs=1e-6)


def test_one_pair_no_spread_and_unequal_lengths():
    one = paired_tests([0.12], [0.10])
    assert one.mean == pytest.approx(0.02) and one.low is None and one.t_p is None and one.wilcoxon_p is None
    same = paired_tests([0.09, 0.19, 0.29], [0.1, 0.2, 0.3])
    assert same.low == same.high == pytest.approx(-0.01) and same.t_p == 0.0
    assert same.wilcoxon_p == pytest.approx(0.25)  # the smallest exact two-sided p of three pairs: 2 / 2**3
    with pytest.raises(ValueError):
        paired_tests([], [])
    with pytest.raises(ValueError, match="one value of each setting per seed"):
        paired_tests([0.1, 0.2], [0.1])


def test_holm_adjusts_as_r_p_adjust_does():
    # p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02: sorted, times 4, 3, 2, 1, kept rising
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.4, None, 0.9]) == [pytest.approx(0.8), None, pytest.approx(0.9)]  # None: no test, not counted
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([0.002833]) == [0.002833]


def write_runs(root, errors):
    """Run folders <row>-s<seed> holding only final.json, as `python -m mgssl.train` writes it."""
    variants = {"labeled": (False, False, False), "none": (True, False, False), "meta": (True, True, False),
                "mixup": (True, False, True), "both": (True, True, True)}
    for row, by_seed in errors.items():
        unlabeled, meta, mixup = variants[row]
        for seed, error in by_seed.items():
            folder = root / f"{row}-s{seed}"
            folder.mkdir(parents=True)
            (folder / "final.json").write_text(json.dumps({
                "dataset": "digits", "model": "digits_cnn", "num_labels": 50, "steps": 100, "estimator": "fd",
                "unlabeled": unlabeled, "meta": meta, "mixup": mixup, "seed": seed, "test_error": error,
                "best_test_error": error}))


def test_the_report_compares_meta_on_and_off_seed_by_seed(tmp_path):
    # Row 2 - row 1: the sleep differences (in points); row 4 - row 3: -1, +1, 0 and seed 3 only in row 4.
    none = {s: 0.10 for s in range(10)}
    meta = {s: 0.10 + d / 100 for s, d in enumerate(SLEEP_DIFFERENCES)}
    mixup = {0: 0.05, 1: 0.05, 2: 0.05}
    both = {0: 0.04, 1: 0.06, 2: 0.05, 3: 0.01}
    write_runs(tmp_path / "runs", {"none": none, "meta": meta, "mixup": mixup, "both": both})
    report = build_report([tmp_path / "runs"], tmp_path / "out", warn=lambda text: None)
    ((_, (without, with_mixup)),) = report.paired
    assert without.seeds == list(range(10))
    assert [100 * d for d in without.differences] == pytest.approx(SLEEP_DIFFERENCES)
    assert without.test.t_p == pytest.approx(0.002833, abs=1e-6)
    assert without.test.wilcoxon_p == pytest.approx(2 / 2 ** 9)
    assert with_mixup.seeds == [0, 1, 2] and with_mixup.unmatched == [3]
    assert with_mixup.test.mean == pytest.approx(0.0, abs=1e-12) and with_mixup.better == 1
    # Holm over the two comparisons: the smaller p doubled, the larger kept (at least the doubled smaller)
    assert with_mixup.test.t_p > 0.5 and with_mixup.test.t_p_holm == pytest.approx(with_mixup.test.t_p)
    assert without.test.t_p_holm == pytest.approx(2 * 0.002833, abs=2e-6)
    assert without.test.wilcoxon_p_holm == pytest.approx(4 / 2 ** 9)
    assert without.established and not with_mixup.established
    text = report.path.read_text()
    assert "| row 2 − row 1 (no mixup) | 10 | s0 +1.20, s1 +2.40," in text
    assert "[+0.70, +2.46] | 0.00283 | 0.00567 | 0.00391 | 0.00781 | 0 of 10 (1 tie) |" in text
    assert "row 2 − row 1 (no mixup): established: the meta term raises the error" in text
    assert "seed 3 is in one row only" in text
    assert ("**Verdict: the meta term's effect is not established** (both tests, Holm-adjusted p < 0.05, in 1 of "
            "2 comparisons)") in text


def test_a_comparison_is_established_only_when_both_adjusted_tests_are():
    from mgssl.tools.report import TABLE4_VARIANTS, paired_meta

    # Four seeds all lower: the t-test rejects, but the exact Wilcoxon test cannot go below 2 / 2**4 = 0.125.
    errors = {TABLE4_VARIANTS["none"]: {s: 0.1 for s in range(4)},
              TABLE4_VARIANTS["meta"]: {s: 0.1 - d / 100 for s, d in enumerate([1.0, 1.5, 0.8, 1.2])}}
    (only,) = paired_meta(errors)
    assert only.test.t_p_holm < 0.05 and only.test.wilcoxon_p_holm == pytest.approx(0.125)
    assert not only.established and "not established" in only.verdict()


def test_a_comparison_not_established_says_which_effects_its_interval_rules_out(tmp_path):
    from mgssl.tools.report import TABLE4_VARIANTS, paired_meta

    def only(differences):
        errors = {TABLE4_VARIANTS["none"]: {s: 0.1 for s in range(len(differences))},
                  TABLE4_VARIANTS["meta"]: {s: 0.1 + d / 100 for s, d in enumerate(differences)}}
        (comparison,) = paired_meta(errors)
        assert not comparison.established
        return comparison

    lower = only([-1.0, -1.5, -0.8, -1.2])  # interval [-1.60, -0.65]: Wilcoxon cannot reject with four seeds
    assert only([(-1) ** s * 0.5 for s in range(12)]).seeds == list(range(12))  # seed 2 before seed 10
    assert lower.excluded(0.5) == "the interval rules out raising the error by 0.5 points or more"
    assert lower.excluded(2.0) == "the interval rules out a change of 2 points or more either way"
    higher = only([1.0, 1.5, 0.8, 1.2])
    assert higher.excluded(0.5) == "the interval rules out lowering the error by 0.5 points or more"
    wide = only([-1.0, 1.0, 0.5])  # mean 1/6, interval about [-2.3, +2.6]
    assert wide.excluded(1.0) == "the interval leaves changes of 1 point or more open"
    assert wide.verdict(1.0).endswith("; the interval leaves changes of 1 point or more open")
    assert "interval rules" not in wide.verdict() and "open" not in wide.verdict()
    # the command line: the report's verdicts carry the reading, a size of zero or less is refused
    from mgssl.tools.report import main

    write_runs(tmp_path / "runs", {"none": {s: 0.1 for s in range(4)},
                                   "meta": {s: 0.1 + d / 100 for s, d in enumerate([1.0, 1.5, 0.8, 1.2])}})
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--smallest-effect", "0.5"]) == 0
    text = (tmp_path / "out/report.md").read_text()
    assert "; the interval rules out lowering the error by 0.5 points or more" in text
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--smallest-effect", "0"])


def test_the_verdict_says_established_when_every_comparison_is(tmp_path):
    gain = [-1.0, -1.5, -0.8, -1.2, -0.9, -1.1, -1.3]
    write_runs(tmp_path / "runs", {"none": {s: 0.1 for s in range(7)},
                                   "meta": {s: 0.1 + d / 100 for s, d in enumerate(gain)}})
    report = build_report([tmp_path / "runs"], tmp_path / "out", warn=lambda text: None)
    ((_, (only,)),) = report.paired
    assert only.established and only.better == 7 and only.test.wilcoxon_p == pytest.approx(2 / 2 ** 7)
    assert only.test.t_p_holm == only.test.t_p  # one comparison: nothing to correct
    assert ("**Verdict: the meta term's gain is established** (both tests, Holm-adjusted p < 0.05, in the "
            "comparison)") in report.path.read_text()


def test_the_report_compares_each_row_with_labeled_only_seed_by_seed(tmp_path):
    # Row 4 minus labeled-only: the sleep differences with the sign turned (every seed better); row 3: +1, -1, 0.
    labeled = {s: 0.50 for s in range(10)}
    both = {s: 0.50 - d / 100 for s, d in enumerate(SLEEP_DIFFERENCES)}
    mixup = {0: 0.51, 1: 0.49, 2: 0.50}
    write_runs(tmp_path / "runs", {"labeled": labeled, "mixup": mixup, "both": both})
    report = build_report([tmp_path / "runs"], tmp_path / "out", warn=lambda text: None)
    ((_, (row3, row4)),) = report.gains
    assert row3.label == "row 3 − labeled only" and row3.seeds == [0, 1, 2] and not row3.established
    assert row3.test.mean == pytest.approx(0.0, abs=1e-12) and row3.better == 1
    assert row4.seeds == list(range(10)) and row4.established and row4.better == 9  # seed 4's difference is 0
    assert [-100 * d for d in row4.differences] == pytest.approx(SLEEP_DIFFERENCES)
    assert row4.test.t_p == pytest.approx(0.002833, abs=1e-6)
    text = report.path.read_text()
    assert "Each semi-supervised row minus labeled-only, same seed" in text
    assert "| row 4 − labeled only | 10 | s0 -1.20, s1 -2.40," in text
    assert "[-2.46, -0.70] | 0.00283 | 0.00567 | 0.00391 | 0.00781 | 9 of 10 (1 tie) |" in text
    assert "row 4 − labeled only: established: the row lowers the error (1.58 points on average" in text
    # the meta term's comparison (row 4 - row 3) keeps its own verdict, the gains add none of their own
    assert text.count("**Verdict:") == 1


def test_a_study_of_two_rows_forms_its_table_and_paired_comparison(tmp_path):
    # The 12,000-step study's rows: row 4 and labeled-only, nothing else.
    write_runs(tmp_path / "a", {"labeled": {s: 0.50 for s in range(10)},
                                "both": {s: 0.50 - d / 100 for s, d in enumerate(SLEEP_DIFFERENCES)}})
    report = build_report([tmp_path / "a"], tmp_path / "out-a", warn=lambda text: None)
    text = report.path.read_text()
    assert len(report.tables) == 1 and "Not formed" not in text and not report.paired
    ((_, (row4,)),) = report.gains
    assert row4.test.t_p == pytest.approx(0.002833, abs=1e-6) and row4.test.t_p_holm == row4.test.t_p
    # Two semi-supervised rows that are neither a meta pair nor against labeled-only: compared as they are.
    write_runs(tmp_path / "b", {"none": {s: 0.10 for s in range(10)},
                                "both": {s: 0.10 + d / 100 for s, d in enumerate(SLEEP_DIFFERENCES)}})
    report = build_report([tmp_path / "b"], tmp_path / "out-b", warn=lambda text: None)
    ((_, (other,)),) = report.others
    assert other.label == "row 4 − row 1" and other.test.t_p == pytest.approx(0.002833, abs=1e-6)
    text = report.path.read_text()
    assert "| row 4 − row 1 | 10 | s0 +1.20," in text and "Not formed" not in text
