"""Every command in the README's shell blocks runs here as written, at tiny sizes: paths of the reader's
data become tiny files in the real formats, and `--set` overrides shrink steps, batches and networks.
The set-up and test lines are what CI (.ci/run) runs."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fake_datasets import write_cifar10, write_class_folders, write_image_folders, write_unlabeled_folder

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
pytestmark = pytest.mark.slow

RUN_QUIETLY = ("train.progress=false", "train.tensorboard=false", "train.device=cpu")
TINY_DIGITS = ("train.steps=4", "train.eval_every=2", "train.log_every=2", "train.checkpoint_every=2", *RUN_QUIETLY)
TINY_CIFAR = ("data.labels=20", "data.batch_size=4", "data.eval_batch_size=8", "model.width=0.0625",
              "train.steps=2", "train.eval_every=2", "train.log_every=1", "train.checkpoint_every=2", *RUN_QUIETLY)
TINY_PHOTOS = ("data.image_size=16", "data.resize_size=18", "data.batch_size=4", "data.eval_batch_size=8",
               "data.workers=1", "model.name=convlarge", "model.width=0.0625", "train.epochs=null", "train.steps=4",
               "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2", "optim.warmup_epochs=null",
               "optim.warmup_steps=0", *RUN_QUIETLY)
TINY_IMAGENET = ("data.labels=0.25", "data.batch_size=4", "data.eval_batch_size=6", "data.image_size=32",
                 "data.resize_size=40", "data.workers=1", "data.labeled_cache=false", "train.epochs=null",
                 "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
                 "train.precision=fp32", "train.compile=off", "method.fp32_meta_steps=0", *RUN_QUIETLY)
# What CI runs of the README: its set-up line, and the test command.
BY_CI = ('pip install -e ".[cuda13,test]"', "python -m pytest -n 2 -q")


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks: continuation lines joined, comments dropped, and
    `a && b` taken as two commands."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0] if not line.lstrip().startswith("#") else ""
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


def run(command: str, cwd: Path, env: dict, *extra: str, replace: dict = ()) -> subprocess.CompletedProcess:
    """One README command with its paths replaced and `extra` arguments appended, as this checkout runs it."""
    for old, new in dict(replace).items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    program = {"mgssl": [sys.executable, "-m", "mgssl"], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    done = subprocess.run(program[argv[0]] + argv[1:] + list(extra), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def commands_starting(prefix: str) -> list[str]:
    found = [c for c in readme_commands() if c.startswith(prefix)]
    assert found, f"the README has no command starting with {prefix!r}"
    return found


# The commands each test below runs; together they must be every command of the README.
COVERED = {
    "first run and resume": ("mgssl train digits", "mgssl train --out runs/digits-seed0 --resume"),
    "own images": ("mgssl train folder", "mgssl predict", "mgssl export"),
    "paper": ("mgssl train convlarge_cifar10_4k",),
    "ablation": ("mgssl ablation", "mgssl report"),
    "many GPUs": ("torchrun", "mgssl plan"),
}


def test_every_readme_command_is_run_by_a_test_or_by_ci():
    covered = [prefix for prefixes in COVERED.values() for prefix in prefixes]
    untested = [c for c in readme_commands() if c not in BY_CI and not any(c.startswith(p) for p in covered)]
    assert not untested, f"README commands no test runs: {untested}"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert all(line in ci for line in BY_CI) and all(line in readme_commands() for line in BY_CI)


def test_the_first_run_and_its_resume(tmp_path, subprocess_env):
    (first,) = [c for c in commands_starting("mgssl train digits")]
    run(first, tmp_path, subprocess_env, "--set", *TINY_DIGITS)
    final = tmp_path / "runs" / "digits-seed0" / "final.json"
    assert json.loads(final.read_text())["steps"] == 4
    # The resume continues the saved run (4 steps, finished): it trains nothing, where the digits
    # config alone would train on to its 2,000 steps.
    (resume,) = commands_starting("mgssl train --out runs/digits-seed0 --resume")
    run(resume, tmp_path, subprocess_env)
    assert json.loads(final.read_text())["steps"] == 4


def test_your_own_images_train_predict_and_export(tmp_path, subprocess_env):
    write_class_folders(tmp_path / "photos")
    write_unlabeled_folder(tmp_path / "more_photos")
    write_class_folders(tmp_path / "new_photos", per_class=2)
    (train,) = commands_starting("mgssl train folder")
    run(train, tmp_path, subprocess_env, "--set", *TINY_PHOTOS)
    (predict,) = commands_starting("mgssl predict")
    run(predict, tmp_path, subprocess_env)
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + 6
    (export,) = commands_starting("mgssl export")
    run(export, tmp_path, subprocess_env)
    assert (tmp_path / "photos.pt").stat().st_size > 0


def test_the_papers_experiments(tmp_path, subprocess_env):
    root = write_cifar10(tmp_path / "cifar10")
    for i, command in enumerate(commands_starting("mgssl train convlarge_cifar10_4k")):
        run(command, tmp_path, subprocess_env, "--out", f"runs/c{i}", "--set", *TINY_CIFAR,
            replace={"/data/cifar10": str(root)})
        assert (tmp_path / "runs" / f"c{i}" / "final.json").is_file()


def test_the_table4_study_and_its_report(tmp_path, subprocess_env):
    (study,) = commands_starting("mgssl ablation")
    run(study, tmp_path, subprocess_env, "--set", *TINY_DIGITS, replace={"--seeds 0-9": "--seeds 0"})
    (report,) = commands_starting("mgssl report")
    run(report, tmp_path, subprocess_env)
    assert "Table 4" in next((tmp_path / "runs").glob("*report*/report.md")).read_text()


def test_many_gpus_on_two_cpu_processes_and_the_time_model(tmp_path, subprocess_env):
    root = write_image_folders(tmp_path / "imagenet", num_classes=3, per_class_train=8, per_class_val=2)
    (launch,) = commands_starting("torchrun")
    run(launch, tmp_path, subprocess_env, "--set", *TINY_IMAGENET,
        replace={"/data/imagenet": str(root), "--nproc_per_node=8": "--nproc_per_node=2"})
    assert (tmp_path / "runs" / "imagenet" / "final.json").is_file()
    (plan,) = commands_starting("mgssl plan")
    done = run(plan, tmp_path, subprocess_env)
    assert "predicted wall time" in done.stdout and "published" in done.stdout


def test_the_method_in_code_runs_on_a_model_of_ones_own():
    import torch

    (snippet,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    scope = {"model": model, "x_l": torch.randn(4, 12), "y_l": torch.tensor([0, 1, 2, 0]), "x_u": torch.randn(5, 12)}
    exec(snippet, scope)
    assert scope["grad"].shape == (5, 3) and torch.isfinite(scope["grad"]).all()
