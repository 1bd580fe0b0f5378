"""Checks that only mean something on a GPU (skipped without one; `python -m pytest -m cuda` runs the
whole CUDA subset: these, the sync-free steps in test_host_syncs.py and the resume in test_resume.py)."""
import pytest
import torch

from mgssl.model import build_model
from mgssl.tools.bench import SHAPES, fidelity, synthetic_batch


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("meta_mode", ["eval", "train"])
def test_cuda_meta_gradient_fidelity_quick_check(precision, meta_mode):
    """∇ỹ of both estimators under autocast against a float64 reference: Conv-Large, 8+8 pairs."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    classes, channels, side = SHAPES["convlarge"]
    net = build_model("convlarge", classes, channels, channels_last=True).to(device).train()
    batch = synthetic_batch(classes, channels, side, 8, device, True, torch.Generator().manual_seed(0))
    cosine = fidelity(net, batch, precision, device, meta_mode)
    assert cosine["jvp"] >= 0.999 and cosine["fd"] >= 0.999, cosine


def _ddp_weights_after_steps(compile_mode: str) -> dict:
    """Two meta+mixup steps through engine.training_forwards (DDP on a one-rank NCCL group, then
    compiled in `compile_mode`), the g reduction started and waited for as the engine does."""
    import torch.distributed as dist

    from mgssl.tools.gpu_check import OneRankAsMany
    from mgssl.train import engine
    from mgssl.train.config import MethodConfig, load_config
    from mgssl.train.distributed import start_average_grads
    from mgssl.train.step import StepParts, train_step

    device = torch.device("cuda")
    torch._dynamo.reset()
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    try:
        torch.manual_seed(0)
        net = build_model("digits_cnn", 10, 1).to(device)
        cfg = load_config("digits", (f"train.compile={compile_mode}", "train.device=cuda"))
        forwards = engine.training_forwards(net, cfg, OneRankAsMany(0, 1, 0, device))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        torch.manual_seed(2)
        for _ in range(2):
            batch = tuple(t.to(device) for t in (torch.randn(8, 1, 8, 8, generator=gen),
                                                 torch.randint(0, 10, (8,), generator=gen),
                                                 torch.randn(8, 1, 8, 8, generator=gen)))
            parts = StepParts(forwards, net, optimizer, 10, reduce_grad=lambda g: start_average_grads(g, 1),
                              world_size=1, compile_meta=compile_mode)
            train_step(parts, batch, method=MethodConfig(), lr=0.1, consistency_weight=1.0)
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_ddp_trains_like_eager_ddp(mode):
    eager, graphs = _ddp_weights_after_steps("off"), _ddp_weights_after_steps(mode)
    for key, value in eager.items():
        assert torch.allclose(value.float(), graphs[key].float(), rtol=1e-3, atol=1e-5), key
