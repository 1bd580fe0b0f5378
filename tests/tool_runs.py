"""Short real runs of the digits default, trained once per test session and shared by the tool tests.

Under pytest-xdist every worker asks for the same runs: the first trains them into a cache folder
under pytest's temporary root while holding a file lock; the others wait, then read the folders."""
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

STEPS = 20
# name -> overrides of the digits config. Two seeds of the baseline and of the full method give
# a standard deviation; the other two Table 4 variants have one seed; 100 labels make Figure 2.
BASELINE = ("method.unlabeled=false", "method.meta=false", "method.mixup=false")
RUNS = {
    "labels50/baseline-s0": BASELINE + ("seed=0",),
    "labels50/baseline-s1": BASELINE + ("seed=1",),
    "labels50/plain-s0": ("method.meta=false", "method.mixup=false", "seed=0"),
    "labels50/meta-s0": ("method.meta=true", "method.mixup=false", "seed=0"),
    "labels50/mixup-s0": ("method.meta=false", "method.mixup=true", "seed=0"),
    "labels50/full-s0": ("seed=0",),
    "labels50/full-s1": ("seed=1",),
    "labels100/baseline-s0": BASELINE + ("seed=0", "data.labels=100"),
    "labels100/full-s0": ("seed=0", "data.labels=100"),
}
COMMON = (f"train.steps={STEPS}", "train.eval_every=5", "train.log_every=5", "train.checkpoint_every=10",
          "train.progress=false", "train.tensorboard=false", "train.device=cpu")


def train_digits(out: Path, overrides: tuple = ()) -> Path:
    """One run of `python -m mgssl.train digits --out OUT --set ...`, in this process."""
    from mgssl.train.config import load_config
    from mgssl.train.engine import run

    cfg = load_config("digits", COMMON + tuple(overrides))
    run(cfg, out, argv=["digits", "--out", str(out), "--set", *COMMON, *overrides])
    return out


def shared_runs(tmp_path_factory) -> Path:
    """The folder holding RUNS (one sub-folder each), trained on first use in this test session."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's root, shared by the workers
    root = base / "digits-tool-runs"
    with FileLock(str(root) + ".lock"):
        done = root / "done.json"
        if not done.is_file():
            for name, overrides in RUNS.items():
                if not (root / name / "final.json").is_file():
                    shutil.rmtree(root / name, ignore_errors=True)  # what a failed earlier attempt left
                    train_digits(root / name, overrides)
            done.write_text(json.dumps(sorted(RUNS)))
    return root


# A digits run of two steps, for tests of how runs start, stop and fail.
TINY = ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
        "train.progress=false", "train.tensorboard=false")


def one_error_line(capsys, code, expected_code, *fragments):
    """The one `error: ...` line a command printed (no traceback), holding every fragment."""
    err = capsys.readouterr().err
    assert code == expected_code and "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err
