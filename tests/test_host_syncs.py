"""The training step never makes the host wait for the device: every Table-4 row, both estimators.

Counted on the CPU with train.host_syncs (value reads, copies to the host, tensors made from Python
values); on a GPU the same steps run under torch.cuda.set_sync_debug_mode("error")."""
from contextlib import contextmanager, nullcontext

import pytest
import torch

from mgssl.model import build_model
from mgssl.train.config import MethodConfig, OptimConfig
from mgssl.train.engine import build_optimizer
from mgssl.train.evaluate import error_counts, errors_from_counts
from mgssl.train.host_syncs import count_host_syncs
from mgssl.train.metrics import read_window
from mgssl.train.step import StepParts, train_step

# The rows of configs/README.md's Table 4, as method overrides.
ROWS = {
    "labeled-only": dict(unlabeled=False, meta=False, mixup=False),
    "none": dict(meta=False, mixup=False),
    "meta": dict(mixup=False),
    "mixup": dict(meta=False),
    "both": dict(),
}
CASES = [(row, est) for row in ROWS for est in (("fd", "jvp") if ROWS[row].get("meta", True) else ("fd",))]


def digits_batch(device, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_l, y_l, x_u = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), \
        torch.randn(n, 1, 8, 8, generator=g)
    return x_l.to(device), y_l.to(device), x_u.to(device)


def run_steps(method: MethodConfig, device, steps=3, precision="fp32", channels_last=False, around=None):
    """`steps` training steps of a fresh digits network; `around` (a context) wraps the steps alone."""
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1, channels_last=channels_last).to(device).train()
    optimizer = build_optimizer(net, OptimConfig(), device)
    batch = digits_batch(device)
    if channels_last:
        batch = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch)
    parts = StepParts.of(net, optimizer, 10, precision=precision)
    out = []
    with around if around is not None else nullcontext():
        for step in range(steps):
            out.append(train_step(parts, batch, method=method, lr=0.1, consistency_weight=0.5 * step))
    return out


@pytest.mark.parametrize("row,estimator", CASES)
@pytest.mark.parametrize("meta_mode", ["eval", "train"])
def test_training_steps_make_no_host_sync(row, estimator, meta_mode):
    method = MethodConfig(estimator=estimator, meta_mode=meta_mode, **ROWS[row])
    run_steps(method, torch.device("cpu"), steps=1)  # first-call set-up (lazy imports, caches) is not a step
    counting = count_host_syncs()
    stats = run_steps(method, torch.device("cpu"), around=counting)
    assert dict(counting.counts) == {}
    assert all(torch.isfinite(v) for s in stats for v in s.values())


@pytest.mark.parametrize("meta_precision", ["run", "fp32"])
def test_mixed_precision_step_makes_no_host_sync(meta_precision):
    method = MethodConfig(meta_precision=meta_precision)
    run_steps(method, torch.device("cpu"), steps=1, precision="bf16")
    counting = count_host_syncs()
    run_steps(method, torch.device("cpu"), steps=2, precision="bf16", around=counting)
    assert dict(counting.counts) == {}


def test_the_counter_sees_what_would_sync():
    """The tests above can fail: each kind of sync the step once had is counted."""
    x = torch.ones(4)
    cases = {
        "Tensor.item": lambda: x[0].item(),
        "Tensor.bool": lambda: bool(x[1] > 0),
        "Tensor.tolist": lambda: x.tolist(),
        "torch.tensor": lambda: torch.tensor(0.5),  # a Python value: a blocking host-to-device copy on a GPU
        # Beta's argument checks and F.one_hot's range check read values back.
        "aten._local_scalar_dense": lambda: torch.distributions.Beta(torch.ones(4), torch.ones(4), validate_args=True).sample(),
    }
    for kind, make in cases.items():
        with count_host_syncs() as syncs:
            make()
        assert syncs[kind] >= 1, kind
    with count_host_syncs() as syncs:
        torch.nn.functional.one_hot(torch.arange(3), 3)
    assert syncs["aten._local_scalar_dense"] == 2


def test_a_logging_window_is_read_in_one_copy():
    sums = {"loss": torch.tensor(6.0), "loss_consistency": torch.tensor(2.0), "pseudo_label_shift": torch.tensor(0.3)}
    seen = {"loss": 3, "loss_consistency": 2, "pseudo_label_shift": 3}
    all_finite = torch.tensor(True)
    with count_host_syncs() as syncs:
        finite, means = read_window(all_finite, sums, seen)
    assert dict(syncs) == {"Tensor.tolist": 1}
    assert finite is True and means == pytest.approx({"loss": 2.0, "loss_consistency": 1.0,
                                                      "pseudo_label_shift": 0.1})
    assert read_window(torch.tensor(False), sums, seen)[0] is False


def test_evaluation_accumulates_on_the_device_and_reads_once():
    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1)
    batches = [digits_batch("cpu", n=5, seed=s)[:2] for s in range(3)]
    with count_host_syncs() as syncs:
        totals = error_counts(net, batches, torch.autocast("cpu", enabled=False))
    assert dict(syncs) == {}
    with count_host_syncs() as syncs:
        result = errors_from_counts(totals)
    assert dict(syncs) == {"Tensor.tolist": 1} and result["test_images"] == 15


@pytest.mark.cuda
@pytest.mark.parametrize("row", list(ROWS))
def test_cuda_steps_under_bf16_channels_last_do_not_synchronise(row):
    device = torch.device("cuda")
    method = MethodConfig(estimator="jvp", **ROWS[row])
    run_steps(method, device, steps=1, precision="bf16", channels_last=True)
    torch.cuda.synchronize()
    # Only the steps: building the network and copying the batch to the GPU do synchronise.
    stats = run_steps(method, device, steps=3, precision="bf16", channels_last=True, around=syncs_are_errors())
    assert all(torch.isfinite(v).item() for s in stats for v in s.values())


@contextmanager
def syncs_are_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_prefetched_batches_equal_the_plain_ones_and_resume_exactly():
    import numpy as np

    from mgssl.pipelines.memory import DeviceImages, PairedBatches
    from mgssl.pipelines.prefetch import Prefetched

    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    images = DeviceImages.upload(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 40),
                                 torch.zeros(3), torch.ones(3), device)

    def batches():
        return PairedBatches(images, np.arange(10), np.arange(10, 40), global_batch=4, seed=0, pad=2, flip=True)

    plain, fetched = batches(), Prefetched(batches(), device)
    for _ in range(3):
        fetched.prefetch()
        for a, b in zip(next(plain), next(fetched)):
            assert torch.equal(a, b)
    fetched.prefetch()
    state = fetched.state_dict()  # taken with a batch waiting: that batch must come again after a resume
    resumed = Prefetched(batches(), device)
    resumed.load_state_dict(state)
    for a, b, c in zip(next(plain), next(fetched), next(resumed)):
        assert torch.equal(a, b) and torch.equal(a, c)
