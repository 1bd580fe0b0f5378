"""DALI comes with the extra of the machine's CUDA (mgssl[cuda12], mgssl[cuda13]), never with the default
install; where the data path needs it and it is missing or does not fit the driver, one line names the
extra. These tests run without DALI too."""
import configparser
import re
import sys

import pytest

from mgssl.pipelines import DataConfig, build_data
from mgssl.pipelines import dali
from mgssl.pipelines.dali import DaliUnavailableError, dali_problem


def setup_cfg(repo_root):
    setup = configparser.ConfigParser()
    setup.read(repo_root / "setup.cfg")
    return setup


def requirements(text):
    return [line.split(";")[0].strip() for line in text.splitlines() if line.strip()]


def test_the_default_install_has_no_dali_and_each_cuda_extra_its_own(repo_root):
    setup = setup_cfg(repo_root)
    assert not [r for r in requirements(setup["options"]["install_requires"]) if "dali" in r]
    extras = setup["options.extras_require"]
    assert requirements(extras["cuda12"]) == ["nvidia-dali-cuda120"]
    assert requirements(extras["cuda13"]) == ["nvidia-dali-cuda130"]
    assert not [r for r in requirements(extras["test"]) if "dali" in r]  # the set-up line names the CUDA extra
    assert dali.DALI_WHEELS == {12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}


def test_ci_installs_as_the_readme_says(repo_root):
    readme = (repo_root / "README.md").read_text()
    ci = (repo_root / ".ci" / "run").read_text()
    (setup_line,) = re.findall(r'^pip install -e "\.\[[^"]*test[^"]*\]"$', ci, flags=re.M)
    assert setup_line in readme and "cuda13" in setup_line


@pytest.mark.parametrize("importable, wheels, driver, expected", [
    (False, {}, None, 'pip install "mgssl[cuda12]" (NVIDIA driver 525.60 or newer, or no GPU) or pip install '
                      '"mgssl[cuda13]" (driver 580 or newer)'),
    (True, {13: "nvidia-dali-cuda130"}, 12, 'pip uninstall nvidia-dali-cuda130 && pip install "mgssl[cuda12]"'),
    (True, {13: "nvidia-dali-cuda130"}, 11, "needs a driver for CUDA 13; update the driver"),
    (True, {12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}, 12,
     "share one import name (nvidia.dali); keep nvidia-dali-cuda120 and pip uninstall the other"),
])
def test_what_keeps_dali_from_running_is_one_line_naming_what_to_install(importable, wheels, driver, expected):
    problem = dali_problem(importable, wheels, driver)
    assert expected in problem and "\n" not in problem


@pytest.mark.parametrize("wheels, driver", [({12: "nvidia-dali-cuda120"}, 13), ({13: "nvidia-dali-cuda130"}, 13),
                                            ({13: "nvidia-dali-cuda130"}, None), ({12: "nvidia-dali-cuda120"}, None)])
def test_a_wheel_the_driver_runs_is_fine_and_any_runs_on_the_cpu(wheels, driver):
    assert dali_problem(True, wheels, driver) is None


@pytest.fixture
def without_dali(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    monkeypatch.setattr(dali, "installed_dali_wheels", lambda: {})


def test_the_imagenet_path_without_dali_stops_before_reading_a_file(tmp_path, without_dali):
    cfg = DataConfig(name="imagenet", root=str(tmp_path / "not-there"), labels=0.1)
    with pytest.raises(DaliUnavailableError, match=r'pip install "mgssl\[cuda12\]"'):
        build_data(cfg, seed=0, device="cpu")


def test_training_on_imagenet_without_dali_is_one_line(tmp_path, without_dali, capsys):
    from mgssl.train.cli import main

    code = main(["resnet18_imagenet_10pct", "--out", str(tmp_path / "run"),
                 "--set", f"data.root={tmp_path}", "train.device=cpu", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: the ImageNet-folder pipeline needs NVIDIA DALI") and "mgssl[cuda13]" in err
    from mgssl.train.rundir import run_files

    assert run_files(tmp_path / "run") == []  # stopped before the run started: nothing but its lock


def test_check_folders_without_dali_is_one_line(tmp_path, without_dali, capsys):
    from mgssl.tools.check_folders import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "mgssl[cuda12]"' in err
