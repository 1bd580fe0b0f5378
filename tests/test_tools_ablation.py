"""tools.ablation on tiny digits runs: which runs it trains, skips, leaves alone and resumes, and
that run folders made by hand with `python -m mgssl.train` are the same runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tool_runs import COMMON, train_digits
from mgssl.tools import ablation
from mgssl.tools.runs import TABLE4_ROWS


def starts(run_dir):
    return [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines()]


def by_hand(out, row, seed, *extra):
    """The run `python -m mgssl.train digits --out OUT/<row>-s<seed> --set seed=<seed> <row overrides>` would make."""
    return train_digits(out / f"{row}-s{seed}", (f"seed={seed}", *TABLE4_ROWS[row], *extra))


def study(out, *extra):
    return ablation.main(["digits", "--seeds", "0-1", "--rows", "none,both", "--out", str(out), "--jobs", "2",
                          "--set", *COMMON, *extra])


@pytest.mark.slow
def test_a_study_skips_finished_runs_leaves_unfinished_ones_alone_and_resumes_them_on_request(tmp_path, capsys):
    out = tmp_path / "study"
    by_hand(out, "none", 0)  # finished, made by hand
    unfinished = by_hand(out, "both", 1, "train.steps=10")  # as if stopped at step 10 of 20
    (unfinished / "final.json").unlink()

    assert study(out) == 1  # both-s1 is left unfinished
    said = capsys.readouterr()
    assert "4 runs" in said.out and "1 finished already, 2 to train" in said.out
    assert "leaving both-s1 alone" in said.out and "both-s1" in said.err
    assert len(starts(out / "none-s0")) == 1  # not trained again
    for name in ("none-s1", "both-s0"):
        final = json.loads((out / name / "final.json").read_text())
        assert final["steps"] == 20 and final["seed"] == int(name[-1])
        assert starts(out / name)[0]["argv"][:4] == ["digits", "--out", str(out / name), "--set"]
        assert (out / "logs" / f"{name}.log").is_file()
    assert json.loads((out / "none-s1" / "final.json").read_text())["meta"] is False
    assert json.loads((out / "both-s0" / "final.json").read_text())["meta"] is True
    assert not (unfinished / "final.json").exists() and len(starts(unfinished)) == 1
    report = (out / "report.md").read_text()
    assert "Skipped, not finished" in report and "both-s1" in report and "row 4 − row 3" not in report

    assert study(out) == 1 and "1 finished already" not in capsys.readouterr().out  # still left alone
    assert study(out, "--resume") == 0
    said = capsys.readouterr().out
    assert "3 finished already, 1 to train" in said and "finished both-s1" in said
    assert [s["resumed_from_step"] for s in starts(unfinished)] == [0, 10]
    assert json.loads((unfinished / "final.json").read_text())["steps"] == 20
    report = (out / "report.md").read_text()
    assert "Skipped" not in report and "| row 2 − row 1" not in report  # rows none and both only
    assert "| 1 |  |  |" in report and "| 4 | ✓ | ✓ |" in report


def test_a_finished_run_with_other_settings_is_refused_before_anything_trains(tmp_path, capsys):
    from mgssl.train.config import load_config, to_dict

    folder = tmp_path / "study" / "none-s0"
    folder.mkdir(parents=True)
    cfg = to_dict(load_config("digits", ("seed=0", *COMMON, *TABLE4_ROWS["none"], "optim.lr=0.05")))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "final.json").write_text(json.dumps({"test_error": 0.1}))
    assert study(tmp_path / "study") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none-s0" in err and "optim.lr: 0.05 there, 0.1 here" in err
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["none-s0"]


def test_the_rows_are_the_readme_overrides_and_win_over_set_and_run_seed_by_seed(tmp_path):
    runs = ablation.plan("digits", [0, 2], ["labeled", "none", "meta", "mixup", "both"], ["train.steps=5"],
                         tmp_path)
    assert [r.name for r in runs] == ["labeled-s0", "none-s0", "meta-s0", "mixup-s0", "both-s0",
                                      "labeled-s2", "none-s2", "meta-s2", "mixup-s2", "both-s2"]
    none = runs[1]
    assert none.argv == ["digits", "--out", str(tmp_path / "none-s0"), "--set", "seed=0", "train.steps=5",
                         "method.meta=false", "method.mixup=false"]
    assert none.config["method"]["meta"] is False and none.config["train"]["steps"] == 5
    assert [(r.config["method"]["unlabeled"], r.config["method"]["meta"], r.config["method"]["mixup"])
            for r in runs[:5]] == [(False, False, False), (True, False, False), (True, True, False),
                                    (True, False, True), (True, True, True)]


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0-x"], "--seeds"), (["--seeds", "0,0"], "each seed once"), (["--rows", "none,4"], "--rows"),
    (["--set", "seed=3"], "use --seeds"), (["--set", "method.mixup=false"], "row mixup would train"),
    (["--set", "optim.lrr=1"], "did you mean 'optim.lr'"), (["--jobs", "0"], "at least 1"),
    (["--gpus", "0,1", "--jobs", "3"], "one run per GPU"), (["--gpus", "0,0"], "each GPU once")])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    argv = ["digits", "--out", str(tmp_path / "s")] + (["--seeds", "0"] if "--seeds" not in args else []) + args
    assert ablation.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_stop_interrupts_each_run_as_ctrl_c_would():
    # The child installs Python's Ctrl-C handler itself, as the trainer does: a process started with
    # SIGINT ignored (a test runner's worker, a background job) would otherwise inherit the ignoring.
    code = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "try:\n    print('ready', flush=True)\n    time.sleep(600)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "ready\n"

    class Log:
        closed = False

        def close(self):
            self.closed = True

    log, said = Log(), []
    ablation.stop({proc: (None, 0.0, log)}, said.append)
    assert proc.returncode == 130 and log.closed and not said


def test_a_dry_run_with_gpus_gives_each_job_its_own_gpu(tmp_path, capsys):
    assert ablation.main(["digits", "--seeds", "0-1", "--rows", "none,both", "--out", str(tmp_path / "s"),
                          "--gpus", "2,3", "--dry-run", "--set", "train.steps=5"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [c.split()[0] for c in commands] == ["CUDA_VISIBLE_DEVICES=2", "CUDA_VISIBLE_DEVICES=3"] * 2
    assert all("python -m mgssl.train digits --out" in c for c in commands)
    assert not (tmp_path / "s").exists()


def test_with_gpus_each_running_job_sees_its_own_gpu_and_a_freed_gpu_is_reused(tmp_path, monkeypatch):
    started = []  # (run name, CUDA_VISIBLE_DEVICES, GPUs of the runs still running then)

    class FakeRun:
        """Stands in for a training process: finishes after a few polls (the first started, first)."""
        running = []

        def __init__(self, argv, env, **kwargs):
            self.name = Path(argv[argv.index("--out") + 1]).name
            self.gpu, self.polls, self.returncode = env.get("CUDA_VISIBLE_DEVICES"), 0, None
            started.append((self.name, self.gpu, sorted(r.gpu for r in FakeRun.running)))
            FakeRun.running.append(self)

        def poll(self):
            self.polls += 1
            if self.polls > 1 and self is FakeRun.running[0]:
                FakeRun.running.remove(self)
                self.returncode = 0
            return self.returncode

    monkeypatch.setattr(ablation.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(ablation.time, "sleep", lambda s: None)
    runs = ablation.plan("digits", [0, 1], ["none", "both"], ["train.steps=5"], tmp_path / "s")
    failed = ablation.run_all(runs, jobs=1, threads=1, out=tmp_path / "s", gpus=["0", "1"], say=lambda t: None)
    assert len(failed) == 4  # the stand-ins write no final.json
    assert [name for name, _, _ in started] == ["none-s0", "both-s0", "none-s1", "both-s1"]
    assert [gpu for _, gpu, _ in started] == ["0", "1", "0", "1"]  # none-s0 ends first and frees GPU 0
    assert all(gpu not in others for _, gpu, others in started) and max(len(o) for *_, o in started) == 1
    log = (tmp_path / "s" / "logs" / "both-s1.log").read_text()
    assert log.startswith("$ CUDA_VISIBLE_DEVICES=1 ") and "-m mgssl.train digits --out" in log


def test_a_job_without_gpus_keeps_the_environment_and_imports_this_mgssl():
    import mgssl

    env = ablation.child_env(3)
    assert env["OMP_NUM_THREADS"] == "3" and env.get("CUDA_VISIBLE_DEVICES") == os.environ.get(
        "CUDA_VISIBLE_DEVICES")
    assert ablation.child_env(1, "5")["CUDA_VISIBLE_DEVICES"] == "5"
    root = env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(root) / "mgssl" / "__init__.py").resolve() == Path(mgssl.__file__).resolve()


def test_seeds_parse_as_ranges_and_lists():
    assert ablation.parse_seeds("0-2") == [0, 1, 2]
    assert ablation.parse_seeds("0,3,5-6") == [0, 3, 5, 6]


def test_the_readme_lists_the_rows_as_the_study_trains_them(repo_root):
    text = (repo_root / "README.md").read_text()
    table = text[text.index("| `--rows` name |"):].split("\n\n")[0].splitlines()[2:]
    listed = {}
    for line in table:
        name, _, overrides = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        listed[name] = tuple(overrides.split()) if overrides != "(none)" else ()
    assert listed == TABLE4_ROWS
    assert "mgssl ablation digits --seeds 0-9 --out runs/table4" in text


def test_an_older_run_folder_matches_the_same_experiment_made_today():
    # A run saved before keys were added (and with the estimator that `auto` resolves to in fp32)
    # is the same experiment as today's default: the study must not refuse it, the report not split it.
    from mgssl.train.config import Config, to_dict
    from mgssl.tools.runs import normalized_config

    today = to_dict(Config())
    older = to_dict(Config())
    older["method"]["estimator"] = "fd"
    del older["train"]["deterministic"]
    assert today["method"]["estimator"] == "fd"  # `auto` is resolved where the config is made
    today["method"]["estimator"] = "auto"  # as config.yaml held it before
    assert normalized_config(older) == normalized_config(today)
    older["method"]["meta_multiplier"] = 0.5
    assert normalized_config(older) != normalized_config(today)
