"""train.compile modes give the eager step's results (on the CPU: inductor without CUDA graphs)."""
import copy

import pytest
import torch

from mgssl.model import build_model
from mgssl.train.compiling import compile_mode, compiled
from mgssl.train.config import MethodConfig, OptimConfig, load_config
from mgssl.train.engine import build_optimizer
from mgssl.train.step import SeparateForwards, StepParts, train_step


def test_compile_modes_read_from_the_config():
    assert load_config("digits").train.compile == "off"
    assert load_config("digits", ("train.compile=true",)).train.compile == "default"  # older configs
    assert load_config("digits", ("train.compile=reduce-overhead",)).train.compile == "reduce-overhead"
    with pytest.raises(ValueError, match="reduce-overhead"):
        load_config("digits", ("train.compile=fast",))
    assert compile_mode(False) == "off"


def steps(net, mode, batch, count=2):
    optimizer = build_optimizer(net, OptimConfig(lr=0.05), torch.device("cpu"))
    parts = StepParts(SeparateForwards(compiled(net, mode)), net, optimizer, 10, compile_meta=mode)
    torch.manual_seed(1)  # the same dropout masks and mixup draws in both runs
    out = [train_step(parts, batch, method=MethodConfig(), lr=0.05, consistency_weight=1.0) for _ in range(count)]
    return out, net


def digits_batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g),
             torch.randn(8, 1, 8, 8, generator=g))
    return tuple(t.to(device) for t in batch)


def assert_trains_like_eager(mode, device="cpu", tol=1e-4):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1).to(device).train()
    batch = digits_batch(device)
    eager_stats, eager = steps(copy.deepcopy(net), "off", batch)
    graph_stats, graph = steps(copy.deepcopy(net), mode, batch)
    for a, b in zip(eager_stats, graph_stats):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=tol, atol=tol / 100), key
    for (name, a), b in zip(eager.state_dict().items(), graph.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol / 100), name
    assert not torch.equal(eager.state_dict()["classifier.weight"], net.state_dict()["classifier.weight"])


@pytest.mark.slow
def test_the_cuda_graph_mode_captures_the_step_and_trains_like_eager(monkeypatch):
    """Every compiled part is captured (dynamo + AOT autograd) and runs, without inductor's code
    generation, which takes about ten minutes on two CPU cores; the GPU test below compiles for real."""
    real_compile = torch.compile
    modes = []

    def capture_only(fn, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", capture_only)
    assert_trains_like_eager("reduce-overhead")
    assert modes and set(modes) == {"reduce-overhead"}  # the forwards and the meta passes, each step


@pytest.mark.cuda
def test_cuda_graphs_train_like_eager():
    assert_trains_like_eager("reduce-overhead", device="cuda", tol=1e-3)
