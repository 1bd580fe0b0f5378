"""The built package: one top-level name (mgssl), the configs inside it, the `mgssl` command; and, installed
(not editable) beside a user's own model.py and train.py, `mgssl train` and `python -m mgssl.train` train
the digits default from that folder without touching the user's files."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "mgssl", "pipelines", "model", "train", "tools", "configs")
TINY = ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
        "train.progress=false", "train.tensorboard=false")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of this source tree, built from a copy of it (a build writes build/ and *.egg-info)."""
    work = tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, work / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (work / "src").mkdir(exist_ok=True)
            shutil.copy(source, work / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(work / "src")], check=True, capture_output=True, timeout=300)
    (built,) = (work / "dist").glob("mgssl-*.whl")
    return built


def test_the_wheel_holds_one_top_level_name_the_configs_and_the_command(wheel):
    import configparser

    names = zipfile.ZipFile(wheel).namelist()
    version = wheel.name.split("-")[1]
    assert {n.split("/")[0] for n in names} == {"mgssl", f"mgssl-{version}.dist-info"}
    dist = f"mgssl-{version}.dist-info"
    archive = zipfile.ZipFile(wheel)
    assert archive.read(f"{dist}/top_level.txt").decode().split() == ["mgssl"]
    parser = configparser.ConfigParser()
    parser.read_string(archive.read(f"{dist}/entry_points.txt").decode())
    assert dict(parser["console_scripts"]) == {"mgssl": "mgssl.cli:main"}
    for package in ("pipelines", "model", "train", "tools"):
        assert f"mgssl/{package}/__init__.py" in names
    assert "mgssl/configs/digits.yaml" in names and "mgssl/configs/base/cifar10.yaml" in names
    assert "mgssl/__main__.py" in names and "mgssl/train/__main__.py" in names
    metadata = archive.read(f"{dist}/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [line for line in requires if "dali" in line] == [
        'Requires-Dist: nvidia-dali-cuda120; platform_system == "Linux" and extra == "cuda12"',
        'Requires-Dist: nvidia-dali-cuda130; platform_system == "Linux" and extra == "cuda13"']


@pytest.mark.slow
def test_installed_it_trains_from_a_folder_with_its_own_model_and_train_modules(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "mgssl"]
    user = tmp_path / "project"  # a project of the user's own, nanoGPT-like
    user.mkdir()
    for name in ("model.py", "train.py", "tools.py", "pipelines.py"):
        (user / name).write_text("raise SystemExit('the user\\'s own ' + __file__ + ' was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    for out, command in (("a", [str(site / "bin" / "mgssl"), "train"]), ("b", [sys.executable, "-m", "mgssl.train"])):
        done = subprocess.run([*command, "digits", "--out", out, "--set", *TINY], cwd=user, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        started = json.loads((user / out / "runs.jsonl").read_text())
        assert started["command"].startswith("mgssl train digits" if out == "a" else "python")
        assert started["mgssl_version"] == wheel.name.split("-")[1] and started["git_commit"] is None
        assert json.loads((user / out / "final.json").read_text())["steps"] == 2
    where = subprocess.run([sys.executable, "-c", "import mgssl.train, mgssl.configs; print(mgssl.train.__file__)"],
                           cwd=user, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "mgssl" / "train" / "__init__.py")
