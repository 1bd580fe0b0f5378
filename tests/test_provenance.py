"""What a run records of the code that trained it: mgssl's version from the installed package, and a git
commit only where the code is a git checkout of its own."""
import subprocess

import mgssl
from mgssl.train import engine
from mgssl.train.engine import git_commit, source_checkout


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(path):
    path.mkdir(parents=True)
    git(path, "init", "-q")
    (path / "setup.cfg").write_text("[metadata]\nname = mgssl\n")
    git(path, "add", "setup.cfg")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return path


def test_a_checkout_records_its_commit_and_whether_tracked_files_changed(tmp_path):
    repo = checkout(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    assert git_commit(root=repo) == head and git_commit(length=12, root=repo) == head[:12]
    (repo / "setup.cfg").write_text("[metadata]\nname = changed\n")
    assert git_commit(root=repo) == head + "-dirty"


def test_an_install_records_no_commit_even_inside_another_repository(tmp_path, monkeypatch):
    repo = checkout(tmp_path / "project")
    site = repo / ".venv" / "lib" / "site-packages"  # a virtual environment inside the user's own repository
    (site / "mgssl").mkdir(parents=True)
    assert git_commit(root=site) is None  # git would answer with the project's commit: not ours
    assert git_commit(root=tmp_path / "no-git") is None
    monkeypatch.setattr(engine.mgssl, "__file__", str(site / "mgssl" / "__init__.py"))
    assert source_checkout() is None and git_commit() is None


def test_this_checkout_is_found_and_the_version_is_the_packages(repo_root):
    assert source_checkout() == repo_root
    assert isinstance(mgssl.__version__, str) and mgssl.__version__
