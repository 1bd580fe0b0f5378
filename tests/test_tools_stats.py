"""The paired t-test of tools.stats against published values, and the report's paired comparison of
the meta term on tiny hand-made run folders whose differences are known."""
import json

import pytest

from mgssl.tools.report import build_report
from mgssl.tools.stats import paired_t

# Student's sleep data (Cushny & Peebles), drug 2 minus drug 1 per patient; R's
# t.test(extra ~ group, data = sleep, paired = TRUE) gives t = 4.0621, df = 9, p = 0.002833,
# 95% interval [0.7001, 2.4599].
SLEEP_DIFFERENCES = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def test_paired_t_matches_the_published_sleep_data_result():
    t = paired_t(SLEEP_DIFFERENCES)
    assert t.n == 10 and t.mean == pytest.approx(1.58)
    assert t.low == pytest.approx(0.7001142, abs=1e-6) and t.high == pytest.approx(2.4598858, abs=1e-6)
    assert t.p == pytest.approx(0.002833, abs=1e-6)
    assert t.mean / (t.sd / 10 ** 0.5) == pytest.approx(4.0621, abs=1e-4)


def test_paired_t_interval_uses_the_t_quantile_not_the_normal_one():
    t = paired_t([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, se sqrt(0.5); t(0.975, 4) = 2.776445
    assert (t.high - t.mean) == pytest.approx(2.776445 * 0.5 ** 0.5, abs=1e-5)
    assert t.p == pytest.approx(0.0132356, abs=1e-6)


def test_paired_t_with_one_pair_or_no_spread():
    one = paired_t([0.02])
    assert one.mean == 0.02 and one.low is None and one.p is None
    same = paired_t([-0.01, -0.01, -0.01])
    assert same.low == same.high == pytest.approx(-0.01) and same.p == 0.0
    with pytest.raises(ValueError):
        paired_t([])


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
    assert without.test.p == pytest.approx(0.002833, abs=1e-6) and without.established
    assert with_mixup.seeds == [0, 1, 2] and with_mixup.unmatched == [3]
    assert with_mixup.test.mean == pytest.approx(0.0, abs=1e-12) and not with_mixup.established
    assert with_mixup.better == 1
    text = report.path.read_text()
    assert "| row 2 − row 1 (no mixup) | 10 | s0 +1.20, s1 +2.40," in text
    assert "[+0.70, +2.46] | 0.00283 | 0 of 10 (1 tie) |" in text
    assert "row 2 − row 1 (no mixup): established: the meta term raises the error" in text
    assert "seed 3 is in one row only" in text
    assert "**Verdict: the meta term's effect is not established** (p < 0.05 in 1 of 2 comparisons)" in text


def test_the_verdict_says_established_when_every_comparison_is(tmp_path):
    gain = [-1.0, -1.5, -0.8, -1.2]
    write_runs(tmp_path / "runs", {"none": {s: 0.1 for s in range(4)},
                                   "meta": {s: 0.1 + d / 100 for s, d in enumerate(gain)}})
    report = build_report([tmp_path / "runs"], tmp_path / "out", warn=lambda text: None)
    ((_, (only,)),) = report.paired
    assert only.established and only.better == 4
    assert "**Verdict: the meta term's gain is established** (p < 0.05 in the comparison)" in report.path.read_text()


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
    assert row4.test.p == pytest.approx(0.002833, abs=1e-6)
    text = report.path.read_text()
    assert "Each semi-supervised row minus labeled-only, same seed" in text
    assert "| row 4 − labeled only | 10 | s0 -1.20, s1 -2.40," in text
    assert "[-2.46, -0.70] | 0.00283 | 9 of 10 (1 tie) |" in text
    assert "row 4 − labeled only: established: the row lowers the error (1.58 points on average" in text
    # the meta term's comparison (row 4 - row 3) keeps its own verdict, the gains add none of their own
    assert text.count("**Verdict:") == 1
