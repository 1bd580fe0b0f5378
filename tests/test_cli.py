"""The `mgssl` command: each subcommand forwards to its tool's main and exits with its code; library
modules refuse to run as commands."""
import configparser
import importlib
import subprocess
import sys

import pytest

from mgssl import cli


def test_mgssl_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"\n  {name} " in text


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help_under_its_own_name(name, capsys):
    module = importlib.import_module(cli.COMMANDS[name].module)
    assert callable(module.main)
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mgssl {name} ")


def test_the_exit_code_of_the_tool_is_the_commands(capsys):
    assert cli.main(["train", "digits", "--set", "train.step=5"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert cli.exit_code(None) == 0 and cli.exit_code({"rows": 3}) == 0 and cli.exit_code(75) == 75


def test_an_unknown_command_is_one_line_with_the_closest_name(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'train'" in err
    assert cli.main([]) == 2 and "usage: mgssl COMMAND" in capsys.readouterr().out


def test_python_dash_m_mgssl_is_the_same_command(tmp_path, subprocess_env):
    done = subprocess.run([sys.executable, "-m", "mgssl", "train", "--print-config", "digits"], cwd=tmp_path,
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steps: 2000  # (default: 400000)" in done.stdout


@pytest.mark.parametrize("module", ["mgssl.tools.plots", "mgssl.tools.runs", "mgssl.tools.stats"])
def test_library_modules_refuse_to_run_as_commands(module, tmp_path, subprocess_env):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"{module} is a library, not a command; `mgssl --help` lists the commands"


def test_the_console_script_is_mgssl_alone(repo_root):
    setup = configparser.ConfigParser()
    setup.read(repo_root / "setup.cfg")
    scripts = [line.strip() for line in setup["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    assert scripts == ["mgssl = mgssl.cli:main"]
