"""The trainer on an ImageNet-layout folder through the DALI pipeline (CPU), including an exact resume.
A small network keeps it quick: the data path, not the network, is under test."""
import pytest
import torch

from fake_datasets import write_image_folders

pytest.importorskip("nvidia.dali")


def overrides(root, steps):
    return ("data.name=imagenet", f"data.root={root}", "data.labels=0.25", "data.batch_size=4",
            "data.eval_batch_size=8", "data.image_size=16", "data.resize_size=20", "data.workers=1",
            "data.augment=authors", "model.name=digits_cnn", f"train.steps={steps}", "train.eval_every=2",
            "train.checkpoint_every=2", "train.log_every=2", "train.device=cpu", "optim.warmup_steps=1",
            "method.consistency_rampup=1")


@pytest.mark.slow
def test_training_on_image_folders_resumes_to_the_same_weights(tmp_path):
    from mgssl.train.config import load_config
    from mgssl.train.engine import run

    root = write_image_folders(tmp_path / "data", num_classes=3, per_class_train=8, per_class_val=2)
    straight = run(load_config("digits", overrides(root, 4)), tmp_path / "straight")
    assert straight["steps"] == 4 and straight["num_labels"] == 6 and straight["dataset"] == "imagenet"
    run(load_config("digits", overrides(root, 2)), tmp_path / "split")
    run(load_config("digits", overrides(root, 4)), tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert a["data"] == b["data"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
