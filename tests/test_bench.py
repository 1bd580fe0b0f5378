"""The throughput benchmark end to end, and the fused perturbed forwards it measures."""
import copy
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch

from mgssl.model import build_model
from mgssl.train.meta import batched_probs, meta_targets, perturbed_parameters


@pytest.mark.slow
def test_bench_runs_end_to_end_and_reports_json(repo_root, subprocess_env):
    cmd = [sys.executable, "-m", "mgssl.tools.bench", "--model", "digits_cnn", "--device", "cpu", "--batch-size", "8",
           "--steps", "2", "--warmup", "1", "--threads", "1", "--json"]
    out = subprocess.run(cmd, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "supervised" in out.stdout and "meta+mixup jvp" in out.stdout  # the table
    s = json.loads(lines[-1])
    assert set(s["median_ms"]) == {"supervised", "mixup", "meta+mixup fd", "meta+mixup jvp"}
    assert s["ratio"] == s["ratio_fd"] > 1 and s["ratio_jvp"] > 1
    assert 0 < s["pairs_per_s"] < s["supervised_pairs_per_s"]
    assert s["pairs_per_s"] == pytest.approx(8 * s["steps_per_s"])
    # meta+mixup is about 12 forwards per pair against 3 for the supervised step.
    flops = s["gflop_per_step"]
    assert 3.5 < flops["meta+mixup fd"] / flops["supervised"] < 4.5
    assert flops["meta+mixup jvp"] == pytest.approx(flops["meta+mixup fd"], rel=0.2)
    assert s["peak_tflops"] > 0 and 0 < s["mfu_meta"] < 1
    assert s["peak_memory_mb"]["process"] > 0
    assert s["fidelity_cosine"]["fd"] > 0.999 and s["fidelity_cosine"]["jvp"] > 0.9999
    assert s["fidelity_cosine_meta"] == s["fidelity_cosine"]["fd"]
    assert (s["estimator_setting"], s["estimator"], s["meta_precision"]) == ("auto", "fd", "run")  # fp32: auto is fd


def test_bench_resolves_its_estimator_as_training_does():
    from mgssl.tools.bench import parse_args

    assert [parse_args(["--device", "cpu", "--precision", p]).estimator for p in ("fp32", "bf16", "fp16")] == \
        ["fd", "jvp", "jvp"]
    assert parse_args(["--device", "cpu", "--precision", "bf16", "--estimator", "fd"]).estimator == "fd"


def test_foreach_perturbed_sets_equal_the_per_parameter_reference():
    torch.manual_seed(0)
    params = list(build_model("digits_cnn", 10, 1).parameters())
    g = [torch.randn_like(p) for p in params]
    step = torch.tensor(0.01) / torch.linalg.vector_norm(torch.cat([x.flatten() for x in g]))
    before = [p.detach().clone() for p in params]
    plus, minus = perturbed_parameters(params, g, step)
    for p, gi, pp, pm, b in zip(params, g, plus, minus, before):
        assert torch.equal(pp, p + gi * step) and torch.equal(pm, p - gi * step)
        assert torch.equal(p, b)  # out of place: the model's parameters are not written
    assert any(not torch.equal(pp, p) for pp, p in zip(plus, params))


def test_batched_passes_equal_the_sequential_ones():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1).double()
    model(torch.randn(16, 1, 8, 8, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    names, params = zip(*model.named_parameters())
    buffers = dict(model.named_buffers())
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    g = [torch.randn_like(p) for p in params]
    plus, minus = perturbed_parameters(list(params), g, torch.tensor(0.1, dtype=torch.float64))
    with torch.no_grad():
        batched = batched_probs(model, list(names), [plus, minus, list(params)], buffers, x)
        sequential = [torch.softmax(torch.func.functional_call(model, ({**dict(zip(names, ps)), **buffers},), (x,)), 1)
                      for ps in (plus, minus, params)]
    assert batched.shape == (3, 6, 10)
    for k in range(3):
        assert torch.allclose(batched[k], sequential[k], rtol=0, atol=1e-13)
    assert not torch.allclose(batched[0], batched[1])  # the sets really differ


@pytest.mark.parametrize("midpoint", [False, True])
def test_batched_fd_equals_sequential_fd_and_leaves_the_model_unchanged(midpoint):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1).double()
    model(torch.randn(16, 1, 8, 8, dtype=torch.float64))
    model.eval()
    before = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen),
             torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64))
    seq = meta_targets(model, *batch, estimator="fd", fd_midpoint=midpoint)
    bat = meta_targets(model, *batch, estimator="fd", fd_midpoint=midpoint, fd_batched=True)
    assert torch.allclose(bat.jg, seq.jg, rtol=1e-9, atol=1e-12)
    assert torch.allclose(bat.pseudo_labels, seq.pseudo_labels, rtol=0, atol=1e-13)
    assert torch.equal(bat.grad_norm, seq.grad_norm)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def summary_of(median_ms: dict, mfu: dict) -> dict:
    return {"median_ms": median_ms, "mfu": mfu, "peak_tflops_source": "a measured matmul rate"}


def test_bench_refuses_a_utilisation_over_100_percent_and_a_supervised_step_slower_than_meta():
    from mgssl.tools.bench import impossible_figures

    sane = summary_of({"supervised": 10.0, "mixup": 20.0, "meta+mixup fd": 40.0}, {"meta+mixup fd": 0.3})
    assert impossible_figures(sane) == []
    over = summary_of(sane["median_ms"], {"meta+mixup fd": 2.74})
    assert impossible_figures(over) == ["meta+mixup fd at 274% of the assumed peak (a measured matmul rate)"]
    inverted = summary_of({"supervised": 5600.0, "mixup": 20.0, "meta+mixup jvp": 1900.0}, {})
    (problem,) = impossible_figures(inverted)
    assert "supervised step (5600.0 ms) slower than meta+mixup jvp" in problem


def test_bench_spread_is_the_decile_range_over_the_median():
    from mgssl.tools.bench import spread

    times = [10.0] * 8 + [30.0, 5.0]
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    assert spread(times) == pytest.approx((deciles[-1] - deciles[0]) / 10.0) and spread(times) > 0
    assert spread([10.0] * 5) == 0 and spread([7.0]) == 0


def test_the_fidelity_of_a_zero_meta_gradient_is_undefined_not_zero():
    from mgssl.tools.bench import cosine

    assert math.isnan(cosine(torch.zeros(3), torch.ones(3))) and math.isnan(cosine(torch.ones(3), torch.zeros(3)))
    assert cosine(torch.ones(3), 2 * torch.ones(3)) == pytest.approx(1.0)


def test_bench_fd_times_the_separate_and_the_batched_passes_interleaved(capsys):
    from mgssl.tools import bench_fd

    assert bench_fd.main(["--model", "digits_cnn", "--device", "cpu", "--batch-size", "4", "--rounds", "3",
                          "--warmup", "0", "--threads", "1", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = {"sequential 3 sets", "batched 3 sets", "sequential 2 sets", "batched 2 sets"}
    assert set(s["median_ms"]) == set(s["spread"]) == names
    for sets in ("3", "2"):
        assert s["batched_over_sequential"][sets] == pytest.approx(
            s["median_ms"][f"batched {sets} sets"] / s["median_ms"][f"sequential {sets} sets"])
    assert s["model"] == "digits_cnn" and s["rounds"] == 3 and s["threads"] == 1


def test_bench_fd_refuses_to_time_batched_passes_that_compute_something_else(monkeypatch):
    import mgssl.train.meta as meta
    from mgssl.tools import bench_fd

    real = meta.batched_probs
    monkeypatch.setattr(meta, "batched_probs", lambda *a: real(*a).flip(0))  # θ+εg and θ−εg swapped
    with pytest.raises(SystemExit, match="differ"):
        bench_fd.main(["--model", "digits_cnn", "--device", "cpu", "--batch-size", "4", "--rounds", "1", "--warmup", "0"])
