"""Shared test set-up. Area-specific fixtures live in each test module, not here."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Two cores in CI: one intra-op thread per test process keeps pytest-xdist workers from fighting.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run on a GPU when torch sees one and are skipped otherwise."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cifar10_root() -> Path:
    """Real CIFAR-10 (cifar-10-batches-py/) at $MGSSL_CIFAR10 or at data/c10, where the README makes it;
    the test is skipped when neither holds it."""
    root = Path(os.environ.get("MGSSL_CIFAR10", REPO / "data" / "c10"))
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 not at {root} (set MGSSL_CIFAR10 to a folder holding cifar-10-batches-py/)")
    return root


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for child processes (`python -m mgssl.train`, torchrun) that run this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
