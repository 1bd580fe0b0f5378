"""`method.estimator=auto` is resolved once, where the config is made: the steps, config.yaml, the
summary and the tools all read the estimator that runs."""
import subprocess
import sys

import pytest

from mgssl.train.config import load_config


@pytest.mark.parametrize("precision, estimator, expected", [
    ("fp32", "auto", "fd"), ("bf16", "auto", "jvp"), ("fp16", "auto", "jvp"), ("bf16", "fd", "fd"),
    ("fp32", "exact", "exact"),
])
def test_the_config_names_the_estimator_that_runs(precision, estimator, expected):
    cfg = load_config("digits", (f"train.precision={precision}", f"method.estimator={estimator}"))
    assert cfg.method.estimator == expected


def test_the_config_does_not_import_the_meta_gradient_code(subprocess_env):
    code = "import sys; import mgssl.train.config; print('mgssl.train.meta' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
