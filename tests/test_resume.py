"""A run killed with SIGKILL and resumed ends bit-identical to one that was never interrupted."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from mgssl.train import checkpoint as ckpt
from mgssl.train.config import load_config
from mgssl.train.engine import run
from mgssl.train.metrics import read_metrics

STEPS = 40
# Checkpoints fall inside logging windows (every 5 vs every 4 steps): a resumed window must average
# the same steps as the uninterrupted one.
SETTINGS = ("train.eval_every=10", "train.checkpoint_every=5", "train.log_every=4", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu")  # exact on the CPU with the defaults; GPU: below


def wait_for_step(run_dir, proc, step, timeout=300):
    """Block until the run has logged `step` (or more); the process must still be running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_metrics(run_dir, "train") if (run_dir / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    pytest.fail(f"the run did not reach step {step} in {timeout}s")


def without_time(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "pairs_per_s", "images_per_s")} for r in rows]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical_to_a_straight_run(tmp_path, subprocess_env):
    straight = tmp_path / "straight"
    run(load_config("digits", (f"train.steps={STEPS}",) + SETTINGS), straight)

    # The interrupted run is asked for far more steps (the step schedule does not depend on the total),
    # so it is certainly still running when it is killed; it is resumed with the real total.
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mgssl.train", "digits", "--out", str(killed), "--set", "train.steps=100000", *SETTINGS]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(killed, proc, 12)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    at_kill = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 10 <= at_kill < STEPS

    summary = run(load_config("digits", (f"train.steps={STEPS}",) + SETTINGS), killed, resume=True)

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert b["step"] == a["step"] == STEPS
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    moments_a, moments_b = list(ckpt.tensors_of(a["optimizer"])), list(ckpt.tensors_of(b["optimizer"]))
    assert len(moments_a) == len(moments_b) and all(torch.equal(x, y) for x, y in zip(moments_a, moments_b))
    assert torch.equal(a["rng"][0]["cpu"], b["rng"][0]["cpu"]) and a["data"] == b["data"]
    final_a = json.loads((straight / "final.json").read_text())
    assert summary["weights_sha256"] == final_a["weights_sha256"]
    assert summary["test_error"] == final_a["test_error"] and a["evals"] == b["evals"]
    # The steps the killed process logged after its checkpoint were dropped and logged again once.
    assert without_time(read_metrics(killed)) == without_time(read_metrics(straight))
    starts = [json.loads(line) for line in (killed / "runs.jsonl").read_text().splitlines()]
    assert [s["resumed_from_step"] for s in starts] == [0, at_kill]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_resume_with_deterministic_kernels_is_bit_identical(tmp_path, subprocess_env, precision):
    """Each run in its own process, as a real resume: cuBLAS reads its workspace setting once."""
    common = ("train.device=cuda", "train.deterministic=true", f"train.precision={precision}", *SETTINGS[:-1])

    def train(out, steps, *extra):
        cmd = [sys.executable, "-m", "mgssl.train", "digits", "--out", str(out), *extra, "--set", f"train.steps={steps}",
               *common]
        done = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    train(tmp_path / "straight", 20)
    train(tmp_path / "resumed", 10)
    train(tmp_path / "resumed", 20, "--resume")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    flags = json.loads((tmp_path / "resumed" / "runs.jsonl").read_text().splitlines()[-1])["backend_flags"]
    assert flags["deterministic_algorithms"] and flags["cublas_workspace_config"]
