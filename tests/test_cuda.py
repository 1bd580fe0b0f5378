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
